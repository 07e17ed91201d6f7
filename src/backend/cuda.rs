//! The cuda device: cudarc 0.19 (dynamic loading) over the driver API, NVRTC and cuBLAS.
//!
//! * libcuda / libnvrtc / libcublas are probed with `is_culib_present()` before any other call
//!   (cudarc panics when a library is missing), so no driver means a clear error.
//! * Kernel files are compiled by NVRTC to CUBIN for the GPU's `sm_XY` on first use (PTX from an
//!   NVRTC newer than the driver would not load), cached on disk under a key of source hash +
//!   compile options + arch + NVRTC version, and kept loaded (module and function caches).
//! * Opening a device checks that NVRTC and cuBLAS are not from a newer CUDA major release than
//!   the driver ([`version_problems`]).
//! * Launches take the same `void**` argument list as the emu device (`cuLaunchKernel`).
//! * Uploads are staged through a pinned host area (`cuMemHostAlloc`) and queued without a
//!   synchronisation (`GpuDevice::htod` decides when the area may be reused).
//! * Memory is stream-ordered (`cuMemAllocAsync` / `cuMemFreeAsync` on the device's stream,
//!   from the default pool, which keeps freed memory: `keep_pool_memory`; plain `cuMemAlloc`
//!   where the device has no pools);
//!   GEMMs go to cuBLAS (`cublasGemmStridedBatchedEx`, bf16/f32 in, f32 compute), row-major
//!   through the column-major (B, A) trick.
//! * Graphs ([`super::GpuDevice::capture`]): stream capture of the device's stream
//!   (thread-local mode) into a `CUgraph`, instantiated once (`cuGraphInstantiateWithFlags`) and
//!   launched with `cuGraphLaunch`. cuBLAS gets a workspace of its own at start-up
//!   (`cublasSetWorkspace`, after `cublasSetStream`, which resets it), so a captured GEMM never
//!   allocates one. Not yet run on a GPU: CI has none (the same capture code runs on emu).

use std::collections::HashMap;
use std::ffi::{c_void, CStr, CString};
use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::{anyhow, bail, Context, Result};
use cudarc::cublas::sys as cublas;
use cudarc::driver::sys as cu;

use super::{nvrtc, sources, Driver, Gemm, GpuKind, Kernel, LaunchCfg, NativeGraph};
use crate::dtype::DType;

fn cu_check(r: cu::CUresult, what: &str) -> Result<()> {
    if r == cu::CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    let mut s: *const std::ffi::c_char = std::ptr::null();
    let msg = unsafe {
        if cu::cuGetErrorString(r, &mut s) == cu::CUresult::CUDA_SUCCESS && !s.is_null() {
            CStr::from_ptr(s).to_string_lossy().into_owned()
        } else {
            format!("{r:?}")
        }
    };
    Err(anyhow!("{what}: {msg}"))
}

fn cublas_check(r: cublas::cublasStatus_t, what: &str) -> Result<()> {
    if r == cublas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(anyhow!("{what}: {r:?}"))
    }
}

/// Ok when a CUDA GPU can be used here: libcuda, libnvrtc and libcublas load, the driver
/// initialises and reports at least one device. Never panics.
pub fn available() -> Result<()> {
    if !unsafe { cu::is_culib_present() } {
        bail!("CUDA driver library (libcuda.so) not found: no NVIDIA driver on this machine (use --device cpu or emu)");
    }
    nvrtc::available()?;
    if !unsafe { cublas::is_culib_present() } {
        bail!("cuBLAS (libcublas.so) not found: install the CUDA runtime libraries (e.g. `pip install nvidia-cublas`) and put them on LD_LIBRARY_PATH");
    }
    unsafe {
        cu_check(cu::cuInit(0), "cuInit")?;
        let mut n = 0;
        cu_check(cu::cuDeviceGetCount(&mut n), "cuDeviceGetCount")?;
        if n == 0 {
            bail!("the CUDA driver reports no GPU");
        }
        let mut driver = 0;
        cu_check(cu::cuDriverGetVersion(&mut driver), "cuDriverGetVersion")?;
        let problems = version_problems(driver, nvrtc::version()?, None);
        if !problems.is_empty() {
            bail!("{}", problems.join("\n"));
        }
    }
    Ok(())
}

/// What is wrong with this driver / NVRTC / cuBLAS pairing, one line each (empty: they pair).
/// `driver` is `cuDriverGetVersion`'s number (12080 = CUDA 12.8), `cublas` is
/// `cublasGetVersion`'s (120804 = 12.8.4). A library from a newer CUDA major release than the
/// driver does not work with it: NVRTC's CUBINs would not load, cuBLAS would fail to start.
pub fn version_problems(driver: i32, nvrtc: (i32, i32), cublas: Option<i32>) -> Vec<String> {
    let (dmaj, dmin) = (driver / 1000, (driver % 1000) / 10);
    let mut out = Vec::new();
    if nvrtc.0 > dmaj {
        out.push(format!(
            "NVRTC {}.{} is newer than the driver's CUDA {dmaj}.{dmin}: install NVRTC for CUDA {dmaj} (`pip install nvidia-cuda-nvrtc-cu{dmaj}`) or a driver for CUDA {}",
            nvrtc.0, nvrtc.1, nvrtc.0
        ));
    }
    if let Some(v) = cublas {
        let (bmaj, bmin) = (v / 10000, (v % 10000) / 100);
        if bmaj > dmaj {
            out.push(format!(
                "cuBLAS {bmaj}.{bmin} is newer than the driver's CUDA {dmaj}.{dmin}: install cuBLAS for CUDA {dmaj} (`pip install nvidia-cublas-cu{dmaj}`) or a driver for CUDA {bmaj}"
            ));
        }
    }
    out
}

/// Directory of compiled CUBINs: `$FCGPU_KERNEL_CACHE`, else `$XDG_CACHE_HOME/fcgpu/kernels`,
/// else `~/.cache/fcgpu/kernels`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FCGPU_KERNEL_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("fcgpu").join("kernels")
}

/// File name of a cached CUBIN: source hash + hash of the compile options + arch + NVRTC
/// version. The options are in the key so a changed flag (say, a new `-D` or a dropped
/// `-lineinfo`) never loads a CUBIN built with the old ones.
pub fn cache_key(file: &str, arch: &str, nvrtc_version: (i32, i32)) -> String {
    cache_key_for(file, arch, nvrtc_version, &nvrtc::options(arch, false))
}

fn cache_key_for(file: &str, arch: &str, nvrtc_version: (i32, i32), options: &[String]) -> String {
    let opts: Vec<&[u8]> = options.iter().map(|o| o.as_bytes()).collect();
    format!(
        "{}-{:016x}-{:08x}-{arch}-nvrtc{}.{}.cubin",
        file.trim_end_matches(".cu"),
        sources::source_hash(file),
        sources::fnv1a(&opts) as u32,
        nvrtc_version.0,
        nvrtc_version.1
    )
}

/// CUBIN of `file` for `arch`, from the disk cache or compiled (and cached).
pub fn cubin(file: &str, arch: &str) -> Result<Vec<u8>> {
    let ver = nvrtc::version()?;
    let dir = cache_dir();
    let path = dir.join(cache_key(file, arch, ver));
    if let Ok(b) = std::fs::read(&path) {
        if !b.is_empty() {
            return Ok(b);
        }
    }
    let c = nvrtc::compile(file, arch, false)?;
    if !c.ok {
        bail!("NVRTC failed to compile {file} for {arch}:\n{}", c.log);
    }
    if std::fs::create_dir_all(&dir).is_ok() {
        let tmp = dir.join(format!(".{}.{}", std::process::id(), cache_key(file, arch, ver)));
        if std::fs::write(&tmp, &c.cubin).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    Ok(c.cubin)
}

/// Whether `dev` has stream-ordered memory pools; if so, its default pool is told to keep freed
/// memory (release threshold: unlimited) instead of handing it back to the driver at every
/// synchronisation (the default threshold 0), so a steady state of same-sized allocations is
/// served from the pool.
unsafe fn keep_pool_memory(dev: cu::CUdevice) -> bool {
    let mut supported = 0;
    let attr = cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED;
    if cu::cuDeviceGetAttribute(&mut supported, attr, dev) != cu::CUresult::CUDA_SUCCESS || supported == 0 {
        return false;
    }
    let mut pool: cu::CUmemoryPool = std::ptr::null_mut();
    if cu::cuDeviceGetDefaultMemPool(&mut pool, dev) == cu::CUresult::CUDA_SUCCESS {
        let mut threshold: u64 = u64::MAX;
        let attr = cu::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;
        // A failure here only costs speed: the pool then releases at synchronisations as before.
        let _ = cu::cuMemPoolSetAttribute(pool, attr, &mut threshold as *mut u64 as *mut c_void);
    }
    true
}

struct Handles {
    ctx: cu::CUcontext,
    stream: cu::CUstream,
    blas: cublas::cublasHandle_t,
}

pub struct CudaDriver {
    ordinal: usize,
    dev: cu::CUdevice,
    h: Handles,
    arch: String,
    name: String,
    /// (driver CUDA version, NVRTC version, cuBLAS version) as numbers, for `fcgpu doctor`.
    driver_version: i32,
    nvrtc_version: (i32, i32),
    blas_version: i32,
    modules: Mutex<HashMap<&'static str, usize>>,
    functions: Mutex<HashMap<&'static str, (usize, u32)>>,
    /// Stream-ordered allocation (`cuMemAllocAsync` from the device's default pool, which keeps
    /// freed memory); false where the device has no memory pools: plain `cuMemAlloc`.
    pools: bool,
    /// Pinned host staging area of `STAGE_BYTES` for uploads (`cuMemHostAlloc`, on first
    /// use; 0 = not yet, or refused: uploads are then blocking copies).
    pinned: Mutex<usize>,
    /// cuBLAS's workspace (`CUBLAS_WORKSPACE_BYTES`, `cuMemAlloc`; 0 where that failed and cuBLAS
    /// keeps its default).
    blas_workspace: u64,
}

/// Bytes of the workspace cuBLAS is given (32 MiB: what cuBLAS recommends for Hopper, more than
/// it needs elsewhere).
const CUBLAS_WORKSPACE_BYTES: usize = 32 << 20;

/// An instantiated CUDA graph, launched on the stream it was captured from.
struct CudaGraphExec {
    ctx: cu::CUcontext,
    stream: cu::CUstream,
    exec: cu::CUgraphExec,
}

// Used only with its context bound, on the device's one stream (see `CudaDriver`).
unsafe impl Send for CudaGraphExec {}
unsafe impl Sync for CudaGraphExec {}

impl NativeGraph for CudaGraphExec {
    unsafe fn launch(&self) -> Result<()> {
        cu_check(cu::cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")?;
        cu_check(cu::cuGraphLaunch(self.exec, self.stream), "cuGraphLaunch")
    }
}

impl Drop for CudaGraphExec {
    fn drop(&mut self) {
        unsafe {
            if cu::cuCtxSetCurrent(self.ctx) == cu::CUresult::CUDA_SUCCESS {
                let _ = cu::cuGraphExecDestroy(self.exec);
            }
        }
    }
}

// The raw handles are used only with the context bound, and cuBLAS / the stream are guarded by
// the driver's own thread safety (one stream, calls serialised by the caller's order).
unsafe impl Send for CudaDriver {}
unsafe impl Sync for CudaDriver {}

impl CudaDriver {
    pub fn new(ordinal: usize) -> Result<CudaDriver> {
        available()?;
        unsafe {
            let mut n = 0;
            cu_check(cu::cuDeviceGetCount(&mut n), "cuDeviceGetCount")?;
            if ordinal >= n as usize {
                bail!("CUDA device {ordinal} requested but only {n} present");
            }
            let mut dev: cu::CUdevice = 0;
            cu_check(cu::cuDeviceGet(&mut dev, ordinal as i32), "cuDeviceGet")?;
            let (mut major, mut minor) = (0, 0);
            cu_check(
                cu::cuDeviceGetAttribute(
                    &mut major,
                    cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                    dev,
                ),
                "compute capability",
            )?;
            cu_check(
                cu::cuDeviceGetAttribute(
                    &mut minor,
                    cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                    dev,
                ),
                "compute capability",
            )?;
            if major < 8 {
                bail!("GPU compute capability {major}.{minor}: fcgpu's kernels need sm_80 or newer (bf16 mma.sync)");
            }
            let mut buf = [0 as std::ffi::c_char; 256];
            cu_check(cu::cuDeviceGetName(buf.as_mut_ptr(), 256, dev), "cuDeviceGetName")?;
            let gpu = CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned();
            let mut ctx: cu::CUcontext = std::ptr::null_mut();
            cu_check(cu::cuDevicePrimaryCtxRetain(&mut ctx, dev), "cuDevicePrimaryCtxRetain")?;
            cu_check(cu::cuCtxSetCurrent(ctx), "cuCtxSetCurrent")?;
            let mut stream: cu::CUstream = std::ptr::null_mut();
            cu_check(cu::cuStreamCreate(&mut stream, 1 /* CU_STREAM_NON_BLOCKING */), "cuStreamCreate")?;
            let mut blas: cublas::cublasHandle_t = std::ptr::null_mut();
            cublas_check(cublas::cublasCreate_v2(&mut blas), "cublasCreate")?;
            let (mut driver, mut blas_version) = (0, 0);
            cu_check(cu::cuDriverGetVersion(&mut driver), "cuDriverGetVersion")?;
            cublas_check(cublas::cublasGetVersion_v2(blas, &mut blas_version), "cublasGetVersion")?;
            let nvrtc_version = nvrtc::version()?;
            let problems = version_problems(driver, nvrtc_version, Some(blas_version));
            if !problems.is_empty() {
                bail!("{}", problems.join("\n"));
            }
            cublas_check(
                cublas::cublasSetStream_v2(blas, stream as cublas::cudaStream_t),
                "cublasSetStream",
            )?;
            // After cublasSetStream, which resets the workspace to cuBLAS's default: a workspace
            // of its own means a GEMM captured into a graph never allocates one.
            let mut blas_workspace: cu::CUdeviceptr = 0;
            if cu::cuMemAlloc_v2(&mut blas_workspace, CUBLAS_WORKSPACE_BYTES) == cu::CUresult::CUDA_SUCCESS {
                cublas_check(
                    cublas::cublasSetWorkspace_v2(
                        blas,
                        blas_workspace as *mut c_void,
                        CUBLAS_WORKSPACE_BYTES,
                    ),
                    "cublasSetWorkspace",
                )?;
            } else {
                blas_workspace = 0;
            }
            let arch = format!("sm_{major}{minor}");
            let pools = keep_pool_memory(dev);
            Ok(CudaDriver {
                ordinal,
                dev,
                h: Handles { ctx, stream, blas },
                name: format!("{gpu} ({arch}, cuda:{ordinal})"),
                arch,
                driver_version: driver,
                nvrtc_version,
                blas_version,
                modules: Mutex::new(HashMap::new()),
                functions: Mutex::new(HashMap::new()),
                pools,
                pinned: Mutex::new(0),
                blas_workspace,
            })
        }
    }

    pub fn arch(&self) -> &str {
        &self.arch
    }

    fn bind(&self) -> Result<()> {
        cu_check(unsafe { cu::cuCtxSetCurrent(self.h.ctx) }, "cuCtxSetCurrent")
    }

    /// (function, dynamic shared memory limit set so far) of kernel `k`, loading its module.
    fn function(&self, k: Kernel) -> Result<(cu::CUfunction, u32)> {
        if let Some(&(f, s)) = self.functions.lock().unwrap().get(k.name) {
            return Ok((f as cu::CUfunction, s));
        }
        let module = {
            let mut mods = self.modules.lock().unwrap();
            match mods.get(k.file) {
                Some(&m) => m as cu::CUmodule,
                None => {
                    let image = cubin(k.file, &self.arch).with_context(|| format!("loading {}", k.file))?;
                    let mut m: cu::CUmodule = std::ptr::null_mut();
                    cu_check(
                        unsafe { cu::cuModuleLoadData(&mut m, image.as_ptr() as *const c_void) },
                        "cuModuleLoadData",
                    )?;
                    mods.insert(k.file, m as usize);
                    m
                }
            }
        };
        let name = CString::new(k.name)?;
        let mut f: cu::CUfunction = std::ptr::null_mut();
        cu_check(
            unsafe { cu::cuModuleGetFunction(&mut f, module, name.as_ptr()) },
            &format!("kernel {} in {}", k.name, k.file),
        )?;
        self.functions.lock().unwrap().insert(k.name, (f as usize, 48 * 1024));
        Ok((f, 48 * 1024))
    }
}

fn dtype_code(d: DType) -> Result<cublas::cudaDataType> {
    Ok(match d {
        DType::F32 => cublas::cudaDataType::CUDA_R_32F,
        DType::BF16 => cublas::cudaDataType::CUDA_R_16BF,
        DType::F16 => cublas::cudaDataType::CUDA_R_16F,
    })
}

impl Driver for CudaDriver {
    fn kind(&self) -> GpuKind {
        GpuKind::Cuda
    }
    fn ordinal(&self) -> usize {
        self.ordinal
    }
    fn name(&self) -> String {
        self.name.clone()
    }
    fn versions(&self) -> Vec<(&'static str, String)> {
        let (d, b) = (self.driver_version, self.blas_version);
        vec![
            ("driver_cuda", format!("{}.{}", d / 1000, (d % 1000) / 10)),
            ("nvrtc", format!("{}.{}", self.nvrtc_version.0, self.nvrtc_version.1)),
            ("cublas", format!("{}.{}.{}", b / 10000, (b % 10000) / 100, b % 100)),
            ("arch", self.arch.clone()),
            ("pairing", "ok (NVRTC and cuBLAS are not newer than the driver's CUDA major)".into()),
        ]
    }
    fn memory_info(&self) -> Option<super::DriverMemory> {
        self.bind().ok()?;
        let (mut free, mut total) = (0usize, 0usize);
        let ok = unsafe { cu::cuMemGetInfo_v2(&mut free, &mut total) } == cu::CUresult::CUDA_SUCCESS;
        if !ok {
            return None;
        }
        let pool_used_high = self.pools.then(|| unsafe {
            let mut pool: cu::CUmemoryPool = std::ptr::null_mut();
            let mut high = 0u64;
            let got = cu::cuDeviceGetDefaultMemPool(&mut pool, self.dev) == cu::CUresult::CUDA_SUCCESS
                && cu::cuMemPoolGetAttribute(
                    pool,
                    cu::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                    &mut high as *mut u64 as *mut c_void,
                ) == cu::CUresult::CUDA_SUCCESS;
            got.then_some(high)
        });
        Some(super::DriverMemory {
            free: free as u64,
            total: total as u64,
            pool_used_high: pool_used_high.flatten(),
        })
    }
    fn alloc(&self, bytes: usize) -> Result<u64> {
        self.bind()?;
        let mut p: cu::CUdeviceptr = 0;
        if self.pools {
            cu_check(
                unsafe { cu::cuMemAllocAsync(&mut p, bytes, self.h.stream) },
                &format!("cuMemAllocAsync({bytes} bytes)"),
            )?;
        } else {
            cu_check(unsafe { cu::cuMemAlloc_v2(&mut p, bytes) }, &format!("cuMemAlloc({bytes} bytes)"))?;
        }
        Ok(p)
    }
    unsafe fn free(&self, ptr: u64, _bytes: usize) {
        if self.bind().is_ok() {
            if self.pools {
                let _ = cu::cuMemFreeAsync(ptr, self.h.stream);
            } else {
                // Not stream-ordered: the memory may still be in use by queued work.
                let _ = cu::cuStreamSynchronize(self.h.stream);
                let _ = cu::cuMemFree_v2(ptr);
            }
        }
    }
    unsafe fn htod(&self, src: &[u8], dst: u64) -> Result<()> {
        self.bind()?;
        cu_check(
            cu::cuMemcpyHtoDAsync_v2(dst, src.as_ptr() as *const c_void, src.len(), self.h.stream),
            "cuMemcpyHtoD",
        )?;
        // `src` may be freed when we return: wait for the copy.
        cu_check(cu::cuStreamSynchronize(self.h.stream), "cuStreamSynchronize")
    }
    unsafe fn htod_staged(&self, src: &[u8], dst: u64, at: usize) -> Result<()> {
        self.bind()?;
        let mut pinned = self.pinned.lock().unwrap();
        if *pinned == 0 {
            let mut p: *mut c_void = std::ptr::null_mut();
            if cu::cuMemHostAlloc(&mut p, super::STAGE_BYTES, 0) == cu::CUresult::CUDA_SUCCESS {
                *pinned = p as usize;
            }
        }
        if *pinned == 0 || at + src.len() > super::STAGE_BYTES {
            // No pinned memory: a pageable copy that must finish before `src` may go (a
            // synchronisation the counters do not see; only where cuMemHostAlloc failed).
            return self.htod(src, dst);
        }
        // The staging bytes are free (GpuDevice hands out each only once between two
        // synchronisations), so the copy reads them after we return; `src` can go now.
        let stage = (*pinned + at) as *mut u8;
        std::ptr::copy_nonoverlapping(src.as_ptr(), stage, src.len());
        cu_check(
            cu::cuMemcpyHtoDAsync_v2(dst, stage as *const c_void, src.len(), self.h.stream),
            "cuMemcpyHtoDAsync (staged)",
        )
    }
    unsafe fn dtoh(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        self.bind()?;
        cu_check(
            cu::cuMemcpyDtoHAsync_v2(dst.as_mut_ptr() as *mut c_void, src, dst.len(), self.h.stream),
            "cuMemcpyDtoH",
        )?;
        cu_check(cu::cuStreamSynchronize(self.h.stream), "cuStreamSynchronize")
    }
    unsafe fn dtod(&self, src: u64, dst: u64, bytes: usize) -> Result<()> {
        self.bind()?;
        cu_check(cu::cuMemcpyDtoDAsync_v2(dst, src, bytes, self.h.stream), "cuMemcpyDtoD")
    }
    unsafe fn memset_zero(&self, dst: u64, bytes: usize) -> Result<()> {
        self.bind()?;
        cu_check(cu::cuMemsetD8Async(dst, 0, bytes, self.h.stream), "cuMemsetD8")
    }
    unsafe fn launch(&self, k: Kernel, cfg: LaunchCfg, params: &mut [*mut c_void]) -> Result<()> {
        self.bind()?;
        let (f, limit) = self.function(k)?;
        if cfg.shared_bytes > limit {
            cu_check(
                cu::cuFuncSetAttribute(
                    f,
                    cu::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    cfg.shared_bytes as i32,
                ),
                &format!("{}: {} bytes of dynamic shared memory", k.name, cfg.shared_bytes),
            )?;
            self.functions.lock().unwrap().insert(k.name, (f as usize, cfg.shared_bytes));
        }
        let (gx, gy, gz) = cfg.grid;
        let (bx, by, bz) = cfg.block;
        cu_check(
            cu::cuLaunchKernel(
                f,
                gx,
                gy,
                gz,
                bx,
                by,
                bz,
                cfg.shared_bytes,
                self.h.stream,
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            ),
            &format!("launch {}", k.name),
        )
    }
    unsafe fn gemm(&self, g: &Gemm) -> Result<()> {
        self.bind()?;
        // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: hand cuBLAS (B, A) with
        // m and n swapped; a row-major matrix with row stride ld is its transpose, column-major.
        let op = |t: bool| {
            if t {
                cublas::cublasOperation_t::CUBLAS_OP_T
            } else {
                cublas::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let ty = dtype_code(g.dtype)?;
        let (alpha, beta) = (g.alpha, g.beta);
        cublas_check(
            cublas::cublasGemmStridedBatchedEx(
                self.h.blas,
                op(g.trans_b),
                op(g.trans_a),
                g.n as i32,
                g.m as i32,
                g.k as i32,
                &alpha as *const f32 as *const c_void,
                g.b as *const c_void,
                ty,
                g.ldb as i32,
                g.stride_b as i64,
                g.a as *const c_void,
                ty,
                g.lda as i32,
                g.stride_a as i64,
                &beta as *const f32 as *const c_void,
                g.c as *mut c_void,
                ty,
                g.ldc as i32,
                g.stride_c as i64,
                g.batch as i32,
                cublas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            ),
            "cublasGemmStridedBatchedEx",
        )
    }
    fn synchronize(&self) -> Result<()> {
        self.bind()?;
        cu_check(unsafe { cu::cuStreamSynchronize(self.h.stream) }, "cuStreamSynchronize")
    }
    fn begin_capture(&self) -> Result<bool> {
        self.bind()?;
        // Thread-local: a call that may not be captured (cuMemAlloc, a synchronous copy) fails
        // when this thread makes it; GpuDevice refuses those before they get here anyway.
        let mode = cu::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        cu_check(unsafe { cu::cuStreamBeginCapture_v2(self.h.stream, mode) }, "cuStreamBeginCapture")?;
        Ok(true)
    }
    fn end_capture(&self, keep: bool) -> Result<Option<Box<dyn NativeGraph>>> {
        self.bind()?;
        unsafe {
            let mut graph: cu::CUgraph = std::ptr::null_mut();
            let r = cu::cuStreamEndCapture(self.h.stream, &mut graph);
            if r != cu::CUresult::CUDA_SUCCESS || !keep {
                if !graph.is_null() {
                    let _ = cu::cuGraphDestroy(graph);
                }
                cu_check(r, "cuStreamEndCapture")?;
                return Ok(None);
            }
            let mut exec: cu::CUgraphExec = std::ptr::null_mut();
            let r = cu::cuGraphInstantiateWithFlags(&mut exec, graph, 0);
            // The executable graph does not need the graph it was made from.
            let _ = cu::cuGraphDestroy(graph);
            cu_check(r, "cuGraphInstantiate")?;
            Ok(Some(Box::new(CudaGraphExec { ctx: self.h.ctx, stream: self.h.stream, exec })))
        }
    }
}

impl Drop for CudaDriver {
    fn drop(&mut self) {
        unsafe {
            if self.bind().is_ok() {
                let _ = cu::cuStreamSynchronize(self.h.stream);
                let pinned = *self.pinned.lock().unwrap();
                if pinned != 0 {
                    let _ = cu::cuMemFreeHost(pinned as *mut c_void);
                }
                for (_, &m) in self.modules.lock().unwrap().iter() {
                    let _ = cu::cuModuleUnload(m as cu::CUmodule);
                }
                let _ = cublas::cublasDestroy_v2(self.h.blas);
                if self.blas_workspace != 0 {
                    let _ = cu::cuMemFree_v2(self.blas_workspace);
                }
                let _ = cu::cuStreamDestroy_v2(self.h.stream);
                let _ = cu::cuDevicePrimaryCtxRelease_v2(self.dev);
            }
        }
        let _ = self.ordinal;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_key_changes_with_the_compile_options() {
        let opts = nvrtc::options("sm_90", false);
        let key = cache_key_for("rope.cu", "sm_90", (12, 8), &opts);
        assert_eq!(key, cache_key("rope.cu", "sm_90", (12, 8)));
        let mut more = opts.clone();
        more.push("-DFCGPU_EXTRA=1".into());
        assert_ne!(key, cache_key_for("rope.cu", "sm_90", (12, 8), &more));
        assert_ne!(key, cache_key_for("rope.cu", "sm_90", (12, 8), &opts[..opts.len() - 1]));
        assert_ne!(key, cache_key("rope.cu", "sm_90", (12, 9)));
    }

    #[test]
    fn versions_pair_when_no_library_is_from_a_newer_cuda_than_the_driver() {
        assert!(version_problems(12080, (12, 8), Some(120804)).is_empty());
        assert!(version_problems(13000, (12, 9), Some(120900)).is_empty());
        let p = version_problems(12040, (13, 0), Some(130001));
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].starts_with("NVRTC 13.0 is newer than the driver's CUDA 12.4"), "{}", p[0]);
        assert!(p[0].contains("nvidia-cuda-nvrtc-cu12"), "{}", p[0]);
        assert!(p[1].starts_with("cuBLAS 13.0 is newer than the driver's CUDA 12.4"), "{}", p[1]);
    }
}
