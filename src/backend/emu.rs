//! The emu device: "device" memory is host memory, kernels are the `kernels/*.cu` sources
//! compiled as C++ by build.rs and run with the CUDA execution model emulated
//! (`kernels/emu/runtime.cpp`), GEMMs run on the CPU (gemm crate). Launches are synchronous.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Result};
use half::bf16;

use super::{Driver, Gemm, GpuKind, Kernel, LaunchCfg};
use crate::dtype::DType;

#[repr(C)]
struct FcemuKernel {
    name: *const c_char,
    func: Option<unsafe extern "C" fn(*mut *mut c_void)>,
}

extern "C" {
    static fcemu_registry: [*const FcemuKernel; 0];
    fn fcemu_launch(
        k: *const FcemuKernel,
        gx: u32,
        gy: u32,
        gz: u32,
        bx: u32,
        by: u32,
        bz: u32,
        smem: u32,
        args: *mut *mut c_void,
        max_threads: u32,
    ) -> i32;
}

struct Table(HashMap<&'static str, usize>);

/// name -> address of the kernel's `FcemuKernel` entry.
fn table() -> &'static Table {
    static T: OnceLock<Table> = OnceLock::new();
    T.get_or_init(|| {
        let mut m = HashMap::new();
        unsafe {
            let mut t = std::ptr::addr_of!(fcemu_registry) as *const *const FcemuKernel;
            while !(*t).is_null() {
                let mut e = *t;
                while !(*e).name.is_null() {
                    let name = CStr::from_ptr((*e).name).to_str().expect("kernel name");
                    m.insert(name, e as usize);
                    e = e.add(1);
                }
                t = t.add(1);
            }
        }
        Table(m)
    })
}

/// Names of every kernel compiled into the emu device.
pub fn kernel_names() -> Vec<&'static str> {
    let mut v: Vec<_> = table().0.keys().copied().collect();
    v.sort();
    v
}

const ALIGN: usize = 256;

pub struct EmuDriver {
    max_threads: u32,
}

impl Default for EmuDriver {
    fn default() -> Self {
        Self::new()
    }
}

impl EmuDriver {
    /// OS threads per launch: all cores, or `FCGPU_EMU_THREADS`.
    pub fn new() -> EmuDriver {
        let max_threads = std::env::var("FCGPU_EMU_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
        EmuDriver { max_threads }
    }
}

fn layout(bytes: usize) -> Layout {
    Layout::from_size_align(bytes.max(1), ALIGN).expect("layout")
}

unsafe fn to_f32(ptr: u64, dtype: DType, n: usize) -> Vec<f32> {
    match dtype {
        DType::F32 => std::slice::from_raw_parts(ptr as *const f32, n).to_vec(),
        DType::BF16 => std::slice::from_raw_parts(ptr as *const bf16, n).iter().map(|x| x.to_f32()).collect(),
        DType::F16 => {
            std::slice::from_raw_parts(ptr as *const half::f16, n).iter().map(|x| x.to_f32()).collect()
        }
    }
}

impl Driver for EmuDriver {
    fn kind(&self) -> GpuKind {
        GpuKind::Emu
    }
    fn name(&self) -> String {
        "emu (CUDA execution model on the CPU)".into()
    }
    fn alloc(&self, bytes: usize) -> Result<u64> {
        // Zeroed so that a kernel reading uninitialised memory is at least deterministic.
        let p = unsafe { alloc_zeroed(layout(bytes)) };
        if p.is_null() {
            bail!("emu: out of host memory allocating {bytes} bytes");
        }
        Ok(p as u64)
    }
    unsafe fn free(&self, ptr: u64, bytes: usize) {
        dealloc(ptr as *mut u8, layout(bytes))
    }
    unsafe fn htod(&self, src: &[u8], dst: u64) -> Result<()> {
        std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len());
        Ok(())
    }
    unsafe fn dtoh(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len());
        Ok(())
    }
    unsafe fn dtod(&self, src: u64, dst: u64, bytes: usize) -> Result<()> {
        std::ptr::copy(src as *const u8, dst as *mut u8, bytes);
        Ok(())
    }
    unsafe fn memset_zero(&self, dst: u64, bytes: usize) -> Result<()> {
        std::ptr::write_bytes(dst as *mut u8, 0, bytes);
        Ok(())
    }
    unsafe fn launch(&self, k: Kernel, cfg: LaunchCfg, params: &mut [*mut c_void]) -> Result<()> {
        let e = *table()
            .0
            .get(k.name)
            .ok_or_else(|| anyhow!("emu: no kernel named {} (in {})", k.name, k.file))?;
        let (gx, gy, gz) = cfg.grid;
        let (bx, by, bz) = cfg.block;
        let rc = fcemu_launch(
            e as *const FcemuKernel,
            gx,
            gy,
            gz,
            bx,
            by,
            bz,
            cfg.shared_bytes,
            params.as_mut_ptr(),
            self.max_threads,
        );
        if rc != 0 {
            bail!("emu: launch of {} with {:?} failed ({rc})", k.name, cfg);
        }
        Ok(())
    }
    unsafe fn gemm(&self, g: &Gemm) -> Result<()> {
        let es = g.dtype.size() as u64;
        for b in 0..g.batch {
            let (a, bb, c) = (
                g.a + (b * g.stride_a) as u64 * es,
                g.b + (b * g.stride_b) as u64 * es,
                g.c + (b * g.stride_c) as u64 * es,
            );
            // Strides of op(A) (m x k) and op(B) (k x n) in elements: (row stride, col stride).
            let (a_rs, a_cs) = if g.trans_a { (1, g.lda as isize) } else { (g.lda as isize, 1) };
            let (b_rs, b_cs) = if g.trans_b { (1, g.ldb as isize) } else { (g.ldb as isize, 1) };
            match g.dtype {
                DType::F32 => gemm::gemm(
                    g.m,
                    g.n,
                    g.k,
                    c as *mut f32,
                    1,
                    g.ldc as isize,
                    g.beta != 0.0,
                    a as *const f32,
                    a_cs,
                    a_rs,
                    bb as *const f32,
                    b_cs,
                    b_rs,
                    g.beta,
                    g.alpha,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(0),
                ),
                DType::BF16 => {
                    // Widen to f32 (exact), multiply with f32 accumulation, round once.
                    let a_rows = if g.trans_a { g.k } else { g.m };
                    let b_rows = if g.trans_b { g.n } else { g.k };
                    let av = to_f32(
                        a,
                        DType::BF16,
                        (a_rows.max(1) - 1) * g.lda + if g.trans_a { g.m } else { g.k },
                    );
                    let bv = to_f32(
                        bb,
                        DType::BF16,
                        (b_rows.max(1) - 1) * g.ldb + if g.trans_b { g.k } else { g.n },
                    );
                    let mut cv = vec![0f32; g.m * g.n];
                    let cptr = c as *mut bf16;
                    if g.beta != 0.0 {
                        for i in 0..g.m {
                            for j in 0..g.n {
                                cv[i * g.n + j] = (*cptr.add(i * g.ldc + j)).to_f32();
                            }
                        }
                    }
                    gemm::gemm(
                        g.m,
                        g.n,
                        g.k,
                        cv.as_mut_ptr(),
                        1,
                        g.n as isize,
                        g.beta != 0.0,
                        av.as_ptr(),
                        a_cs,
                        a_rs,
                        bv.as_ptr(),
                        b_cs,
                        b_rs,
                        g.beta,
                        g.alpha,
                        false,
                        false,
                        false,
                        gemm::Parallelism::Rayon(0),
                    );
                    for i in 0..g.m {
                        for j in 0..g.n {
                            *cptr.add(i * g.ldc + j) = bf16::from_f32(cv[i * g.n + j]);
                        }
                    }
                }
                DType::F16 => bail!("emu gemm: f16 is not supported"),
            }
        }
        Ok(())
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}
