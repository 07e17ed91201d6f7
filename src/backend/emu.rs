//! The emu device: "device" memory is host memory, kernels are the `kernels/*.cu` sources
//! compiled as C++ by build.rs and run with the CUDA execution model emulated
//! (`kernels/emu/runtime.cpp`), GEMMs run on the CPU (gemm crate). Launches are synchronous.
//!
//! `FCGPU_EMU_CHECK=1` (or a comma list of `memcheck,initcheck,racecheck,synccheck,shuffle`) turns
//! on the sanitizer (kernels/emu/check.cpp): launches run the instrumented copy of the kernels,
//! device memory comes from a never-reused, poisoned arena, and a launch whose checks found faults
//! fails with their report. `FCGPU_EMU_SEED` seeds the schedule fuzzing (`shuffle`).

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
    static fcemu_chk_registry: [*const FcemuKernel; 0];
    fn fcemu_chk_alloc(bytes: usize) -> *mut c_void;
    fn fcemu_chk_free(p: *mut c_void);
    fn fcemu_chk_mark(p: *const c_void, n: usize);
    fn fcemu_chk_copy_shadow(src: *const c_void, dst: *mut c_void, n: usize);
    fn fcemu_chk_range(
        p: *const c_void,
        n: usize,
        read: i32,
        write: i32,
        flags: u32,
        msg: *mut c_char,
        cap: usize,
    ) -> i32;
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
        flags: u32,
        seed: u64,
        report: *mut c_char,
        cap: usize,
    ) -> i32;
}

/// Which sanitizer checks an emu device runs (`FCGPU_EMU_CHECK`); bits as in kernels/emu/check.h.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EmuChecks {
    pub flags: u32,
    /// Seed of the schedule fuzzing (`FCGPU_EMU_SEED`, default 1).
    pub seed: u64,
}

const CHECK_NAMES: [(&str, u32); 5] =
    [("memcheck", 1), ("initcheck", 2), ("racecheck", 4), ("synccheck", 8), ("shuffle", 16)];
/// The checks that need the instrumented copy of the kernels and the checked arena.
const INSTRUMENTED: u32 = 1 | 2 | 4;

impl EmuChecks {
    pub const NONE: EmuChecks = EmuChecks { flags: 0, seed: 1 };
    pub const ALL: EmuChecks = EmuChecks { flags: 31, seed: 1 };

    /// `1`/`all` (every check), `0`/empty (none), or a comma list of check names.
    pub fn parse(spec: &str) -> Result<EmuChecks> {
        let spec = spec.trim();
        match spec {
            "" | "0" => return Ok(EmuChecks::NONE),
            "1" | "all" => return Ok(EmuChecks::ALL),
            _ => {}
        }
        let mut flags = 0;
        for name in spec.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let bit = CHECK_NAMES.iter().find(|(n, _)| *n == name).map(|(_, b)| *b).ok_or_else(|| {
                anyhow!(
                    "FCGPU_EMU_CHECK: unknown check `{name}` (expected 1, all, or a comma list of {})",
                    Self::names().join(", ")
                )
            })?;
            flags |= bit;
        }
        Ok(EmuChecks { flags, seed: 1 })
    }

    /// Every check's name.
    pub fn names() -> Vec<&'static str> {
        CHECK_NAMES.iter().map(|(n, _)| *n).collect()
    }

    /// `FCGPU_EMU_CHECK` and `FCGPU_EMU_SEED` of this process.
    pub fn from_env() -> Result<EmuChecks> {
        let mut c = EmuChecks::parse(&std::env::var("FCGPU_EMU_CHECK").unwrap_or_default())?;
        if let Ok(s) = std::env::var("FCGPU_EMU_SEED") {
            c.seed =
                s.trim().parse().map_err(|_| anyhow!("FCGPU_EMU_SEED={s:?} is not an unsigned integer"))?;
        }
        Ok(c)
    }

    pub fn with_seed(mut self, seed: u64) -> EmuChecks {
        self.seed = seed;
        self
    }

    /// Whether check `name` is on.
    pub fn has(&self, name: &str) -> bool {
        CHECK_NAMES.iter().any(|(n, b)| *n == name && self.flags & b != 0)
    }

    fn instrumented(&self) -> bool {
        self.flags & INSTRUMENTED != 0
    }
}

struct Table(HashMap<&'static str, usize>);

/// name -> address of the kernel's `FcemuKernel` entry: the plain copy, or (`checked`) the
/// instrumented one.
fn table(checked: bool) -> &'static Table {
    static PLAIN: OnceLock<Table> = OnceLock::new();
    static CHECKED: OnceLock<Table> = OnceLock::new();
    let cell = if checked { &CHECKED } else { &PLAIN };
    cell.get_or_init(|| {
        let mut m = HashMap::new();
        unsafe {
            let mut t = if checked {
                std::ptr::addr_of!(fcemu_chk_registry) as *const *const FcemuKernel
            } else {
                std::ptr::addr_of!(fcemu_registry) as *const *const FcemuKernel
            };
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

/// Prefix of the planted-bug kernels of tests/kernels/ (in the emu registry for the sanitizer's
/// tests, not fcgpu kernels).
pub const PLANTED_PREFIX: &str = "planted_";

/// Names of every kernel compiled into the emu device.
pub fn kernel_names() -> Vec<&'static str> {
    let mut v: Vec<_> = table(false).0.keys().copied().filter(|n| !n.starts_with(PLANTED_PREFIX)).collect();
    v.sort();
    v
}

const ALIGN: usize = 256;

pub struct EmuDriver {
    max_threads: u32,
    checks: EmuChecks,
    /// A bad `FCGPU_EMU_CHECK`: every launch fails with it (opening the device cannot fail).
    bad_env: Option<String>,
}

impl Default for EmuDriver {
    fn default() -> Self {
        Self::new()
    }
}

impl EmuDriver {
    /// OS threads per launch: all cores, or `FCGPU_EMU_THREADS`; checks from `FCGPU_EMU_CHECK`.
    pub fn new() -> EmuDriver {
        let (checks, bad_env) = match EmuChecks::from_env() {
            Ok(c) => (c, None),
            Err(e) => (EmuChecks::NONE, Some(format!("{e:#}"))),
        };
        EmuDriver { bad_env, ..EmuDriver::with_checks(checks) }
    }

    /// A device running `checks`, whatever the environment says.
    pub fn with_checks(checks: EmuChecks) -> EmuDriver {
        let max_threads = std::env::var("FCGPU_EMU_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
        EmuDriver { max_threads, checks, bad_env: None }
    }

    pub fn checks(&self) -> EmuChecks {
        self.checks
    }

    /// memcheck/initcheck of a range the CPU GEMM reads (`read`) or writes.
    fn check_range(&self, what: &str, p: u64, bytes: usize, read: bool, write: bool) -> Result<()> {
        let mut msg = [0 as c_char; 512];
        let bad = unsafe {
            fcemu_chk_range(
                p as *const c_void,
                bytes,
                read as i32,
                write as i32,
                self.checks.flags,
                msg.as_mut_ptr(),
                msg.len(),
            )
        };
        if bad != 0 {
            let m = unsafe { CStr::from_ptr(msg.as_ptr()) }.to_string_lossy();
            let check = if m.contains("uninitialized") { "initcheck" } else { "memcheck" };
            bail!("{check}: emu gemm {what}: {bytes} bytes {m}");
        }
        Ok(())
    }

    /// The checks of one GEMM's operands, row by row (rows of `cols` elements `ld` apart).
    fn check_gemm(&self, g: &Gemm) -> Result<()> {
        let es = g.dtype.size();
        let (a_rows, a_cols) = if g.trans_a { (g.k, g.m) } else { (g.m, g.k) };
        let (b_rows, b_cols) = if g.trans_b { (g.n, g.k) } else { (g.k, g.n) };
        for b in 0..g.batch {
            let rows =
                |base: u64, stride: usize, ld: usize, r: usize| base + ((b * stride + r * ld) * es) as u64;
            for r in 0..a_rows {
                self.check_range("reads A", rows(g.a, g.stride_a, g.lda, r), a_cols * es, true, false)?;
            }
            for r in 0..b_rows {
                self.check_range("reads B", rows(g.b, g.stride_b, g.ldb, r), b_cols * es, true, false)?;
            }
            for r in 0..g.m {
                self.check_range("writes C", rows(g.c, g.stride_c, g.ldc, r), g.n * es, g.beta != 0.0, true)?;
            }
        }
        Ok(())
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
    fn versions(&self) -> Vec<(&'static str, String)> {
        let checks: Vec<&str> = EmuChecks::names().into_iter().filter(|n| self.checks.has(n)).collect();
        vec![
            ("fcgpu", env!("CARGO_PKG_VERSION").to_string()),
            ("emu_checks", if checks.is_empty() { "none".into() } else { checks.join(",") }),
        ]
    }
    fn alloc(&self, bytes: usize) -> Result<u64> {
        if self.checks.instrumented() {
            let p = unsafe { fcemu_chk_alloc(bytes) };
            if p.is_null() {
                bail!("emu (FCGPU_EMU_CHECK): the checked arena (256 GiB of address space, never reused so that a use after free is caught) is exhausted allocating {bytes} bytes");
            }
            return Ok(p as u64);
        }
        // Zeroed so that a kernel reading uninitialised memory is at least deterministic.
        let p = unsafe { alloc_zeroed(layout(bytes)) };
        if p.is_null() {
            bail!("emu: out of host memory allocating {bytes} bytes");
        }
        Ok(p as u64)
    }
    unsafe fn free(&self, ptr: u64, bytes: usize) {
        if self.checks.instrumented() {
            fcemu_chk_free(ptr as *mut c_void);
        } else {
            dealloc(ptr as *mut u8, layout(bytes))
        }
    }
    unsafe fn htod(&self, src: &[u8], dst: u64) -> Result<()> {
        std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len());
        if self.checks.instrumented() {
            fcemu_chk_mark(dst as *const c_void, src.len());
        }
        Ok(())
    }
    unsafe fn dtoh(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len());
        Ok(())
    }
    unsafe fn dtod(&self, src: u64, dst: u64, bytes: usize) -> Result<()> {
        std::ptr::copy(src as *const u8, dst as *mut u8, bytes);
        if self.checks.instrumented() {
            fcemu_chk_copy_shadow(src as *const c_void, dst as *mut c_void, bytes);
        }
        Ok(())
    }
    unsafe fn memset_zero(&self, dst: u64, bytes: usize) -> Result<()> {
        std::ptr::write_bytes(dst as *mut u8, 0, bytes);
        if self.checks.instrumented() {
            fcemu_chk_mark(dst as *const c_void, bytes);
        }
        Ok(())
    }
    unsafe fn launch(&self, k: Kernel, cfg: LaunchCfg, params: &mut [*mut c_void]) -> Result<()> {
        if let Some(e) = &self.bad_env {
            bail!("{e}");
        }
        let e = *table(self.checks.instrumented())
            .0
            .get(k.name)
            .ok_or_else(|| anyhow!("emu: no kernel named {} (in {})", k.name, k.file))?;
        let (gx, gy, gz) = cfg.grid;
        let (bx, by, bz) = cfg.block;
        let mut report = vec![0 as c_char; 8192];
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
            self.checks.flags,
            self.checks.seed,
            report.as_mut_ptr(),
            report.len(),
        );
        if rc == -2 {
            let r = CStr::from_ptr(report.as_ptr()).to_string_lossy();
            bail!("FCGPU_EMU_CHECK found faults in {} with {:?}:\n{}", k.name, cfg, r.trim_end());
        }
        if rc != 0 {
            bail!("emu: launch of {} with {:?} failed ({rc})", k.name, cfg);
        }
        Ok(())
    }
    unsafe fn gemm(&self, g: &Gemm) -> Result<()> {
        if self.checks.instrumented() {
            self.check_gemm(g)?;
        }
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
