//! GPU devices: `cuda` (a real GPU through cudarc: NVRTC -> CUBIN, cuBLAS, stream-ordered memory)
//! and `emu` (the same kernels compiled as C++ by build.rs and run on the CPU with the CUDA
//! execution model emulated). Both sit behind one [`Driver`] trait, so every launch site
//! (`src/kernels/*.rs`) is the same code for both: it builds a [`KernelArgs`] (the `void**`
//! argument list `cuLaunchKernel` takes) and calls [`GpuDevice::launch`].
//!
//! A fixed sequence of launches can be captured once and replayed as one ([`GpuDevice::capture`],
//! [`GpuGraph`]): a CUDA graph on cuda (stream capture), a recorded launch list on emu, through
//! the same code, with the same checks (work that cannot be captured is an error on both).

use std::ffi::c_void;
use std::fmt;
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use half::bf16;

use crate::device::Device;
use crate::dtype::DType;

pub mod counters;
pub mod cuda;
pub mod emu;
pub mod memory;
pub mod meta;
pub mod nvrtc;
pub mod sources;
pub mod storage;

/// Which driver runs a [`GpuDevice`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GpuKind {
    Cuda,
    Emu,
    /// Shapes and dtypes without data ([`meta::MetaDriver`]).
    Meta,
}

/// A kernel: an `extern "C" __global__` function `name` in `kernels/<file>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Kernel {
    pub file: &'static str,
    pub name: &'static str,
}

impl Kernel {
    pub const fn new(file: &'static str, name: &'static str) -> Kernel {
        Kernel { file, name }
    }
}

/// Grid, block and dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchCfg {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: u32,
}

impl LaunchCfg {
    /// 1-D launch: `grid` blocks of `block` threads.
    pub fn linear(grid: u32, block: u32) -> LaunchCfg {
        LaunchCfg { grid: (grid.max(1), 1, 1), block: (block, 1, 1), shared_bytes: 0 }
    }
    /// Grid-stride elementwise launch over `n` elements with 256-thread blocks.
    pub fn elementwise(n: usize) -> LaunchCfg {
        let blocks = n.div_ceil(256).clamp(1, 65535 * 4) as u32;
        LaunchCfg::linear(blocks, 256)
    }
    pub fn with_shared(mut self, bytes: u32) -> LaunchCfg {
        self.shared_bytes = bytes;
        self
    }
}

/// The argument list of one launch: one 8-byte slot per kernel parameter, in order, passed to
/// the driver as `void**` (pointers to the slots), exactly as `cuLaunchKernel(kernelParams)`
/// wants it. Device pointers are `u64` (CUdeviceptr on cuda, a host address on emu); scalars sit
/// in the low bytes of their slot (little-endian), so a pointer to the slot is a pointer to them.
#[derive(Default, Debug)]
pub struct KernelArgs {
    slots: Vec<u64>,
    /// Kind of each slot (p, i, u, l, f), checked against the kernel's signature at launch.
    kinds: String,
}

impl KernelArgs {
    pub fn new() -> KernelArgs {
        KernelArgs { slots: Vec::with_capacity(16), kinds: String::with_capacity(16) }
    }
    pub fn ptr(&mut self, p: u64) -> &mut Self {
        self.slots.push(p);
        self.kinds.push('p');
        self
    }
    pub fn buf(&mut self, b: &GpuBuffer) -> &mut Self {
        self.ptr(b.ptr)
    }
    /// Device pointer `offset_bytes` into `b`.
    pub fn buf_at(&mut self, b: &GpuBuffer, offset_bytes: usize) -> &mut Self {
        self.ptr(b.ptr + offset_bytes as u64)
    }
    /// A null pointer (an optional input the kernel skips).
    pub fn null(&mut self) -> &mut Self {
        self.ptr(0)
    }
    /// An optional buffer: its pointer, or null.
    pub fn opt(&mut self, b: Option<&GpuBuffer>) -> &mut Self {
        self.ptr(b.map_or(0, |b| b.ptr))
    }
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.slots.push(v as u32 as u64);
        self.kinds.push('i');
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.slots.push(v as u64);
        self.kinds.push('u');
        self
    }
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.slots.push(v as u64);
        self.kinds.push('l');
        self
    }
    pub fn f32(&mut self, v: f32) -> &mut Self {
        self.slots.push(v.to_bits() as u64);
        self.kinds.push('f');
        self
    }
    /// The kinds of the arguments so far (p pointer, i int, u unsigned, l long long, f float).
    pub fn kinds(&self) -> &str {
        &self.kinds
    }
    pub fn len(&self) -> usize {
        self.slots.len()
    }
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
    /// The `void**` list; valid while `self` is neither moved nor changed.
    pub fn as_params(&mut self) -> Vec<*mut c_void> {
        self.slots.iter_mut().map(|s| s as *mut u64 as *mut c_void).collect()
    }
}

/// Row-major GEMM, optionally strided-batched:
/// `C[b] (m x n) = alpha * op(A[b]) (m x k) * op(B[b]) (k x n) + beta * C[b]`,
/// `op(X) = X^T` when `trans_x`. `lda/ldb/ldc` are row strides in elements of the stored
/// matrices, `stride_*` the element distance between batch entries. A, B, C share `dtype`;
/// accumulation is f32 (bf16 in, f32 accumulate on cuda: cuBLAS `CUBLAS_COMPUTE_32F`).
#[derive(Clone, Copy, Debug)]
pub struct Gemm {
    pub dtype: DType,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: u64,
    pub lda: usize,
    pub trans_a: bool,
    pub b: u64,
    pub ldb: usize,
    pub trans_b: bool,
    pub c: u64,
    pub ldc: usize,
    pub alpha: f32,
    pub beta: f32,
    pub batch: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
}

impl Gemm {
    /// A plain, contiguous `C = A * op(B)` (no batch), lds from the shapes.
    #[allow(clippy::too_many_arguments)]
    pub fn simple(dtype: DType, m: usize, n: usize, k: usize, a: u64, b: u64, trans_b: bool, c: u64) -> Gemm {
        Gemm {
            dtype,
            m,
            n,
            k,
            a,
            lda: k,
            trans_a: false,
            b,
            ldb: if trans_b { k } else { n },
            trans_b,
            c,
            ldc: n,
            alpha: 1.0,
            beta: 0.0,
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
        }
    }
}

/// What a device does. Implemented by [`cuda::CudaDriver`] and [`emu::EmuDriver`].
///
/// # Safety
/// Pointers are raw device addresses: callers (the safe wrappers on [`GpuDevice`] and the
/// launch wrappers) guarantee that they point into live allocations of this device of the
/// stated size.
pub trait Driver: Send + Sync {
    fn kind(&self) -> GpuKind;
    /// Device ordinal (cuda:N); 0 for emu.
    fn ordinal(&self) -> usize {
        0
    }
    /// Human-readable name: GPU model and arch, or "emu".
    fn name(&self) -> String;
    /// (name, version) of what the device runs on (driver, NVRTC, cuBLAS, arch), for
    /// `fcgpu doctor`.
    fn versions(&self) -> Vec<(&'static str, String)> {
        Vec::new()
    }
    fn alloc(&self, bytes: usize) -> Result<u64>;
    /// (free, total) device memory as the driver reports it (cuda: `cuMemGetInfo`), and the
    /// high-water mark of the memory pool's used bytes where it keeps one; `None` off cuda.
    fn memory_info(&self) -> Option<DriverMemory> {
        None
    }
    /// # Safety
    /// `ptr` came from `alloc` of this driver with the same `bytes`, and is not used again.
    unsafe fn free(&self, ptr: u64, bytes: usize);
    /// # Safety
    /// `dst..dst+src.len()` lies in a live allocation.
    unsafe fn htod(&self, src: &[u8], dst: u64) -> Result<()>;
    /// Host→device copy through pinned staging memory at byte `at` of the device's staging area
    /// (`at + src.len() <= STAGE_BYTES`), queued on the stream without waiting: `src` is copied
    /// into the staging area before this returns, and [`GpuDevice`] reuses a staging byte only
    /// after a synchronisation. Default: the blocking [`Driver::htod`] (emu, whose copies are
    /// immediate anyway).
    /// # Safety
    /// `dst..dst+src.len()` lies in a live allocation.
    unsafe fn htod_staged(&self, src: &[u8], dst: u64, at: usize) -> Result<()> {
        let _ = at;
        self.htod(src, dst)
    }
    /// # Safety
    /// `src..src+dst.len()` lies in a live allocation.
    unsafe fn dtoh(&self, src: u64, dst: &mut [u8]) -> Result<()>;
    /// # Safety
    /// Both ranges lie in live allocations.
    unsafe fn dtod(&self, src: u64, dst: u64, bytes: usize) -> Result<()>;
    /// # Safety
    /// The range lies in a live allocation.
    unsafe fn memset_zero(&self, dst: u64, bytes: usize) -> Result<()>;
    /// Launch `k` with the `void**` list `params` (one pointer per kernel parameter).
    /// # Safety
    /// `params` matches the kernel's signature and every pointer argument is valid for it.
    unsafe fn launch(&self, k: Kernel, cfg: LaunchCfg, params: &mut [*mut c_void]) -> Result<()>;
    /// # Safety
    /// The matrices lie in live allocations of the sizes the spec implies.
    unsafe fn gemm(&self, g: &Gemm) -> Result<()>;
    /// Wait for all queued work.
    fn synchronize(&self) -> Result<()>;
    /// Starts capturing the device's stream into a graph (cuda: stream capture); `false` where
    /// the driver has no graphs of its own (emu: [`GpuDevice`] records the work instead).
    fn begin_capture(&self) -> Result<bool> {
        Ok(false)
    }
    /// Ends the capture [`Driver::begin_capture`] started: the instantiated graph when `keep`,
    /// nothing (the graph discarded) after an error inside the capture.
    fn end_capture(&self, keep: bool) -> Result<Option<Box<dyn NativeGraph>>> {
        let _ = keep;
        Ok(None)
    }
}

/// What a driver reports of its device memory (see [`Driver::memory_info`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DriverMemory {
    pub free: u64,
    pub total: u64,
    /// `CU_MEMPOOL_ATTR_USED_MEM_HIGH` of the default pool (cuda with pools).
    pub pool_used_high: Option<u64>,
}

/// A driver's own executable graph (cuda: a `CUgraphExec`); freed on drop.
pub trait NativeGraph: Send + Sync {
    /// Queues the whole graph on the device's stream.
    /// # Safety
    /// Every allocation the captured work touches is still live.
    unsafe fn launch(&self) -> Result<()>;
}

/// One piece of captured work, as the emu device records it (arguments deep-copied).
#[derive(Debug)]
enum GraphOp {
    Launch { k: Kernel, cfg: LaunchCfg, slots: Vec<u64> },
    Gemm(Gemm),
    Dtod { src: u64, dst: u64, bytes: usize },
    Zero { dst: u64, bytes: usize },
}

/// A capture in progress on a device: by the thread that started it; the work recorded so far
/// (emu), or whether the driver captures it itself (cuda); buffers dropped inside it.
struct Capturing {
    thread: std::thread::ThreadId,
    native: bool,
    ops: Vec<GraphOp>,
    nodes: usize,
    frees: Vec<(u64, usize, memory::Category)>,
}

/// What a launch, GEMM, copy or memset does: run (counted), go to the driver's own capture
/// (uncounted), or be recorded (emu capture).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Run,
    Native,
    Recorded,
}

/// Work captured by [`GpuDevice::capture`], replayed with [`GpuGraph::replay`]: an instantiated
/// CUDA graph on cuda, the recorded list of launches (arguments deep-copied) on emu. Pointers
/// and launch arguments are baked in: a replay does exactly what the capture saw, on whatever
/// the buffers then hold.
pub struct GpuGraph {
    // Declared before `dev`, so a native graph is destroyed while its driver lives.
    body: GraphBody,
    nodes: usize,
    dev: GpuDevice,
}

enum GraphBody {
    Recorded(Vec<GraphOp>),
    Native(Box<dyn NativeGraph>),
}

impl fmt::Debug for GpuGraph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.body {
            GraphBody::Recorded(_) => "recorded",
            GraphBody::Native(_) => "native",
        };
        write!(f, "GpuGraph({kind}, {} nodes, {:?})", self.nodes, self.dev)
    }
}

impl GpuGraph {
    /// Launches, GEMMs, copies and memsets captured.
    pub fn nodes(&self) -> usize {
        self.nodes
    }
    pub fn device(&self) -> &GpuDevice {
        &self.dev
    }
    /// Runs the captured work again, in order, on the device's stream. Counted as one launch
    /// (the captured work was not counted when captured). An error inside a capture.
    /// # Safety
    /// Every allocation the captured work touches is still live (and of the captured size).
    pub unsafe fn replay(&self) -> Result<()> {
        let dev = &self.dev;
        dev.refuse_in_capture("replaying a graph")?;
        let _range = nvtx_range("graph");
        dev.counters.launch();
        match &self.body {
            GraphBody::Native(g) => g.launch().context("launching a captured graph")?,
            GraphBody::Recorded(ops) => {
                for op in ops {
                    match op {
                        GraphOp::Launch { k, cfg, slots } => {
                            let mut slots = slots.clone();
                            let mut params: Vec<*mut c_void> =
                                slots.iter_mut().map(|s| s as *mut u64 as *mut c_void).collect();
                            dev.drv.launch(*k, *cfg, &mut params).with_context(|| {
                                format!(
                                    "replaying {} ({}), grid {:?} block {:?}",
                                    k.name, k.file, cfg.grid, cfg.block
                                )
                            })?;
                        }
                        GraphOp::Gemm(g) => dev.drv.gemm(g).context("replaying a gemm")?,
                        GraphOp::Dtod { src, dst, bytes } => dev.drv.dtod(*src, *dst, *bytes)?,
                        GraphOp::Zero { dst, bytes } => dev.drv.memset_zero(*dst, *bytes)?,
                    }
                }
            }
        }
        if sync_launches() {
            let mut staged = dev.staged.lock().unwrap();
            dev.counters.sync();
            *staged = 0;
            dev.drv.synchronize().context("a replayed graph failed (FCGPU_SYNC_LAUNCH=1)")?;
        }
        Ok(())
    }
}

/// Bytes of pinned host memory per device that uploads are staged through. An upload that fits
/// is queued without a synchronisation; the area is reused from its start after the next
/// synchronisation (a download, `synchronize`), or after one forced when it is full. A larger
/// upload is a blocking copy.
pub const STAGE_BYTES: usize = 4 << 20;

/// A GPU device (cuda or emu), its [`counters::Counters`] and the fill level of its upload
/// staging area (bytes in use since the last synchronisation). Cheap to clone.
#[derive(Clone)]
pub struct GpuDevice {
    drv: Arc<dyn Driver>,
    counters: Arc<counters::Counters>,
    staged: Arc<std::sync::Mutex<usize>>,
    /// Bytes allocated and live, by category ([`memory`]).
    mem: Arc<memory::MemCounters>,
    /// The capture in progress on this device, if any (see [`GpuDevice::capture`]).
    capture: Arc<std::sync::Mutex<Option<Capturing>>>,
}

impl fmt::Debug for GpuDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GpuDevice({:?}: {})", self.kind(), self.drv.name())
    }
}

impl GpuDevice {
    fn wrap(drv: Arc<dyn Driver>) -> GpuDevice {
        GpuDevice {
            drv,
            counters: Arc::default(),
            staged: Arc::default(),
            mem: Arc::default(),
            capture: Arc::default(),
        }
    }

    /// What this device has been asked to do so far (see [`counters`]).
    pub fn counts(&self) -> counters::Counts {
        self.counters.snapshot()
    }

    /// Device memory allocated through this device: live and peak bytes by category.
    pub fn memory(&self) -> memory::MemSnapshot {
        self.mem.snapshot()
    }

    /// Starts a new memory peak from what is live now.
    pub fn reset_peak_memory(&self) {
        self.mem.reset_peak()
    }

    /// A meta device of its own (shapes, no data), with counters that start at zero.
    pub fn meta() -> GpuDevice {
        GpuDevice::wrap(Arc::new(meta::MetaDriver::default()))
    }

    /// The process-wide meta device (what `Device::Meta` names).
    pub fn shared_meta() -> GpuDevice {
        static META: std::sync::OnceLock<GpuDevice> = std::sync::OnceLock::new();
        META.get_or_init(GpuDevice::meta).clone()
    }

    /// The emulated device (always available).
    pub fn emu() -> GpuDevice {
        GpuDevice::wrap(Arc::new(emu::EmuDriver::new()))
    }

    /// An emu device running the sanitizer checks `checks` (whatever `FCGPU_EMU_CHECK` says).
    pub fn emu_checked(checks: emu::EmuChecks) -> GpuDevice {
        GpuDevice::wrap(Arc::new(emu::EmuDriver::with_checks(checks)))
    }

    /// CUDA device `ordinal`. A clear error (never a panic) when there is no driver or GPU.
    pub fn cuda(ordinal: usize) -> Result<GpuDevice> {
        Ok(GpuDevice::wrap(Arc::new(cuda::CudaDriver::new(ordinal)?)))
    }

    /// Open a device by name: `emu`, `cuda` (= `cuda:0`) or `cuda:N`. For `cuda` without a
    /// driver or GPU this is a clear error, not a panic.
    pub fn open(name: &str) -> Result<GpuDevice> {
        match name {
            "emu" => Ok(GpuDevice::emu()),
            "meta" => Ok(GpuDevice::meta()),
            "cuda" => GpuDevice::cuda(0),
            _ => match name.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
                Some(n) => GpuDevice::cuda(n),
                None => bail!("unknown GPU device `{name}` (expected emu, meta, cuda or cuda:N)"),
            },
        }
    }

    /// The process-wide emu device (one per process, so a `Copy` device tag such as
    /// `Device::Emu` can name it).
    pub fn shared_emu() -> GpuDevice {
        static EMU: std::sync::OnceLock<GpuDevice> = std::sync::OnceLock::new();
        EMU.get_or_init(GpuDevice::emu).clone()
    }

    /// The process-wide handle of CUDA device `ordinal` (created on first use: one context,
    /// stream, cuBLAS handle and module cache per GPU), for a `Copy` tag such as `Device::Cuda(n)`.
    pub fn shared_cuda(ordinal: usize) -> Result<GpuDevice> {
        static CUDA: std::sync::Mutex<Vec<(usize, GpuDevice)>> = std::sync::Mutex::new(Vec::new());
        let mut v = CUDA.lock().unwrap();
        if let Some((_, d)) = v.iter().find(|(o, _)| *o == ordinal) {
            return Ok(d.clone());
        }
        let d = GpuDevice::cuda(ordinal)?;
        v.push((ordinal, d.clone()));
        Ok(d)
    }

    /// Whether two handles are the same device (same driver instance).
    pub fn same(&self, other: &GpuDevice) -> bool {
        Arc::ptr_eq(&self.drv, &other.drv)
    }

    /// Whether `cuda(0)` can work here: libcuda, libnvrtc and libcublas load and a GPU exists.
    pub fn cuda_available() -> bool {
        cuda::available().is_ok()
    }

    pub fn kind(&self) -> GpuKind {
        self.drv.kind()
    }
    /// The `Copy` tag tensors carry for this device (`Device::Emu` or `Device::Cuda(n)`).
    pub fn tag(&self) -> Device {
        match self.kind() {
            GpuKind::Emu => Device::Emu,
            GpuKind::Meta => Device::Meta,
            GpuKind::Cuda => Device::Cuda(self.drv.ordinal() as u32),
        }
    }
    pub fn name(&self) -> String {
        self.drv.name()
    }
    /// The raw driver: its calls are not counted (use the device's methods).
    pub fn driver(&self) -> &dyn Driver {
        &*self.drv
    }

    /// Captures the device work `f` queues into a graph instead of running it: its kernel
    /// launches, GEMMs, device-to-device copies and memsets (none of them counted). Anything else
    /// on this device from this thread inside `f` (an allocation, an upload, a download, a
    /// synchronisation, a replay, a nested capture) is an error, and so is dropping a buffer
    /// (captured work may use it; it is freed when the capture ends), on emu as on cuda.
    ///
    /// cuda: stream capture of the device's one stream (`CU_STREAM_CAPTURE_MODE_THREAD_LOCAL`;
    /// cuBLAS runs on that stream, with a workspace of its own set once at start-up, so its
    /// GEMMs are captured and allocate nothing), instantiated once. Other threads must not use
    /// the device during a capture: their work would be captured too (emu records only this
    /// thread's work). emu: the work is recorded, arguments deep-copied, and a replay runs it.
    /// Work that the cuda side could only check at run time (kernel loading inside the capture)
    /// is best kept out by running `f` once before capturing it.
    pub fn capture(&self, f: impl FnOnce() -> Result<()>) -> Result<GpuGraph> {
        {
            let mut c = self.capture.lock().unwrap();
            ensure!(c.is_none(), "a graph capture inside a graph capture (or another thread's)");
            let native = self.drv.begin_capture().context("starting a graph capture")?;
            let thread = std::thread::current().id();
            *c = Some(Capturing { thread, native, ops: Vec::new(), nodes: 0, frees: Vec::new() });
        }
        let r = f();
        let c = self.capture.lock().unwrap().take().expect("the capture in progress");
        let native = if c.native { self.drv.end_capture(r.is_ok()) } else { Ok(None) };
        let freed = c.frees.len();
        for (ptr, bytes, cat) in c.frees {
            self.mem.free(cat, memory::counted(bytes));
            // SAFETY: the buffer was dropped inside the capture; nothing else holds it.
            unsafe { self.drv.free(ptr, bytes) }
        }
        r.context("capturing a graph")?;
        let native = native.context("ending a graph capture")?;
        ensure!(freed == 0, "{freed} buffer(s) dropped inside a graph capture (captured work may use them)");
        let body = match native {
            Some(g) => GraphBody::Native(g),
            None => GraphBody::Recorded(c.ops),
        };
        Ok(GpuGraph { body, nodes: c.nodes, dev: self.clone() })
    }

    /// Whether this thread is capturing on this device.
    fn in_capture(&self) -> bool {
        let c = self.capture.lock().unwrap();
        c.as_ref().is_some_and(|c| c.thread == std::thread::current().id())
    }

    fn refuse_in_capture(&self, what: &str) -> Result<()> {
        ensure!(
            !self.in_capture(),
            "{what} inside a graph capture (only kernel launches, GEMMs, device-to-device copies and memsets can be captured)"
        );
        Ok(())
    }

    /// Where a launch, GEMM, copy or memset goes (see [`Route`]); `op` builds its record.
    fn route(&self, op: impl FnOnce() -> GraphOp) -> Route {
        let mut c = self.capture.lock().unwrap();
        match c.as_mut() {
            Some(c) if c.thread == std::thread::current().id() => {
                c.nodes += 1;
                if c.native {
                    Route::Native
                } else {
                    c.ops.push(op());
                    Route::Recorded
                }
            }
            _ => Route::Run,
        }
    }

    /// Device-to-device copy of `bytes` bytes (counted as a launch).
    /// # Safety
    /// Both ranges lie in live allocations of this device.
    pub unsafe fn dtod(&self, src: u64, dst: u64, bytes: usize) -> Result<()> {
        match self.route(|| GraphOp::Dtod { src, dst, bytes }) {
            Route::Recorded => return Ok(()),
            Route::Native => {}
            Route::Run => self.counters.launch(),
        }
        self.drv.dtod(src, dst, bytes)
    }

    /// Blocking device→host copy into `dst` (counted).
    /// # Safety
    /// `src..src+dst.len()` lies in a live allocation of this device.
    pub unsafe fn dtoh(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        self.refuse_in_capture("a download (device→host copy)")?;
        let mut staged = self.staged.lock().unwrap();
        self.counters.d2h(dst.len());
        *staged = 0;
        self.drv.dtoh(src, dst)
    }

    /// Host→device copy of `data` to `dst`: staged and queued without a synchronisation when it
    /// fits the staging area (synchronising first, counted, when the area is full), else
    /// blocking (counted as a synchronisation).
    /// # Safety
    /// `dst..dst+data.len()` lies in a live allocation of this device.
    pub unsafe fn htod(&self, data: &[u8], dst: u64) -> Result<()> {
        self.refuse_in_capture("an upload (host→device copy)")?;
        if data.is_empty() {
            return Ok(());
        }
        let mut staged = self.staged.lock().unwrap();
        self.counters.h2d(data.len());
        if data.len() > STAGE_BYTES {
            self.counters.sync();
            *staged = 0;
            return self.drv.htod(data, dst);
        }
        if *staged + data.len() > STAGE_BYTES {
            self.counters.sync();
            self.drv.synchronize()?;
            *staged = 0;
        }
        let at = *staged;
        // Staged copies start 256-byte aligned (pinned-memory copies are fastest aligned).
        *staged = (at + data.len()).next_multiple_of(256).min(STAGE_BYTES);
        self.drv.htod_staged(data, dst, at)
    }

    /// The one launch path: NVTX range named after the kernel, then the driver launch.
    pub fn launch(&self, k: Kernel, cfg: LaunchCfg, args: &mut KernelArgs) -> Result<()> {
        let (bx, by, bz) = cfg.block;
        ensure!(
            bx * by * bz > 0 && bx * by * bz <= 1024,
            "{}: block {:?} has no threads or more than 1024",
            k.name,
            cfg.block
        );
        let (gx, gy, gz) = cfg.grid;
        ensure!(
            gx > 0 && gy > 0 && gz > 0 && gy <= 65535 && gz <= 65535,
            "{}: bad grid {:?}",
            k.name,
            cfg.grid
        );
        let want = sources::signature(k.name)
            .ok_or_else(|| anyhow::anyhow!("no kernel named {} (in {})", k.name, k.file))?;
        ensure!(
            want == args.kinds(),
            "{}: launched with arguments ({}) but the kernel takes ({}) (p pointer, i int, u unsigned, l long long, f float)",
            k.name,
            args.kinds(),
            want
        );
        let _range = nvtx_range(k.name);
        let route = self.route(|| GraphOp::Launch { k, cfg, slots: args.slots.clone() });
        match route {
            Route::Recorded => return Ok(()),
            Route::Native => {}
            Route::Run => self.counters.launch(),
        }
        let mut params = args.as_params();
        unsafe { self.drv.launch(k, cfg, &mut params) }.with_context(|| {
            format!("launching {} ({}), grid {:?} block {:?}", k.name, k.file, cfg.grid, cfg.block)
        })?;
        if sync_launches() && matches!(route, Route::Run) {
            // A fault is reported by the next call on the stream, far from the kernel that made
            // it; synchronising here names the kernel (at the cost of all overlap).
            let mut staged = self.staged.lock().unwrap();
            self.counters.sync();
            *staged = 0;
            self.drv.synchronize().with_context(|| {
                format!(
                    "kernel {} ({}) failed, grid {:?} block {:?} (FCGPU_SYNC_LAUNCH=1)",
                    k.name, k.file, cfg.grid, cfg.block
                )
            })?;
        }
        Ok(())
    }

    pub fn gemm(&self, g: &Gemm) -> Result<()> {
        ensure!(matches!(g.dtype, DType::F32 | DType::BF16), "gemm: dtype {:?} is not supported", g.dtype);
        ensure!(g.batch >= 1, "gemm: batch 0");
        let _range = nvtx_range("gemm");
        match self.route(|| GraphOp::Gemm(*g)) {
            Route::Recorded => return Ok(()),
            Route::Native => {}
            Route::Run => self.counters.launch(),
        }
        unsafe { self.drv.gemm(g) }
    }

    pub fn synchronize(&self) -> Result<()> {
        self.refuse_in_capture("a synchronisation")?;
        let mut staged = self.staged.lock().unwrap();
        self.counters.sync();
        *staged = 0;
        self.drv.synchronize()
    }

    /// Uninitialised buffer of `bytes` bytes.
    pub fn alloc(&self, bytes: usize) -> Result<GpuBuffer> {
        self.refuse_in_capture("an allocation")?;
        self.counters.alloc();
        let ptr = self.drv.alloc(bytes.max(1))?;
        let cat = memory::current();
        self.mem.alloc(cat, memory::counted(bytes));
        Ok(GpuBuffer { ptr, bytes, cat: std::sync::Mutex::new(cat), dev: self.clone() })
    }
    pub fn zeros(&self, bytes: usize) -> Result<GpuBuffer> {
        let b = self.alloc(bytes)?;
        b.zero()?;
        Ok(b)
    }
    pub fn upload_bytes(&self, data: &[u8]) -> Result<GpuBuffer> {
        let b = self.alloc(data.len())?;
        b.write_bytes(data)?;
        Ok(b)
    }
    pub fn upload_f32(&self, data: &[f32]) -> Result<GpuBuffer> {
        self.upload_bytes(bytemuck::cast_slice(data))
    }
    pub fn upload_i32(&self, data: &[i32]) -> Result<GpuBuffer> {
        self.upload_bytes(bytemuck::cast_slice(data))
    }
    pub fn upload_bf16(&self, data: &[bf16]) -> Result<GpuBuffer> {
        self.upload_bytes(bytemuck::cast_slice(data))
    }
    /// Upload f32 values stored as `dtype` (F32 or BF16).
    pub fn upload_as(&self, data: &[f32], dtype: DType) -> Result<GpuBuffer> {
        match dtype {
            DType::F32 => self.upload_f32(data),
            DType::BF16 => self.upload_bf16(&data.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>()),
            DType::F16 => {
                let v: Vec<half::f16> = data.iter().map(|&x| half::f16::from_f32(x)).collect();
                self.upload_bytes(bytemuck::cast_slice(&v))
            }
        }
    }
}

/// A device allocation. Freed on drop (stream-ordered on cuda).
pub struct GpuBuffer {
    ptr: u64,
    bytes: usize,
    /// What it is counted as ([`memory::scope`], [`GpuBuffer::count_as`]).
    cat: std::sync::Mutex<memory::Category>,
    dev: GpuDevice,
}

impl fmt::Debug for GpuBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GpuBuffer({:#x}, {} bytes)", self.ptr, self.bytes)
    }
}

impl GpuBuffer {
    /// Device address (CUdeviceptr on cuda, host address on emu).
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    pub fn device(&self) -> &GpuDevice {
        &self.dev
    }
    /// Counts this buffer as `cat` from now on (a parameter's gradient is made by the backward
    /// pass as any activation is, and becomes a gradient when autograd hands it over).
    pub fn count_as(&self, cat: memory::Category) {
        let mut c = self.cat.lock().unwrap();
        if *c != cat {
            self.dev.mem.recount(*c, cat, memory::counted(self.bytes));
            *c = cat;
        }
    }
    pub fn download_bytes(&self) -> Result<Vec<u8>> {
        let mut v = vec![0u8; self.bytes];
        unsafe { self.dev.dtoh(self.ptr, &mut v)? };
        Ok(v)
    }
    pub fn download_f32(&self) -> Result<Vec<f32>> {
        ensure!(self.bytes.is_multiple_of(4), "download_f32 of {} bytes", self.bytes);
        let mut v = vec![0f32; self.bytes / 4];
        unsafe { self.dev.dtoh(self.ptr, bytemuck::cast_slice_mut(&mut v))? };
        Ok(v)
    }
    pub fn download_i32(&self) -> Result<Vec<i32>> {
        ensure!(self.bytes.is_multiple_of(4), "download_i32 of {} bytes", self.bytes);
        let mut v = vec![0i32; self.bytes / 4];
        unsafe { self.dev.dtoh(self.ptr, bytemuck::cast_slice_mut(&mut v))? };
        Ok(v)
    }
    pub fn download_bf16(&self) -> Result<Vec<bf16>> {
        ensure!(self.bytes.is_multiple_of(2), "download_bf16 of {} bytes", self.bytes);
        let mut v = vec![bf16::ZERO; self.bytes / 2];
        unsafe { self.dev.dtoh(self.ptr, bytemuck::cast_slice_mut(&mut v))? };
        Ok(v)
    }
    /// Values stored as `dtype`, widened to f32.
    pub fn download_as_f32(&self, dtype: DType) -> Result<Vec<f32>> {
        Ok(match dtype {
            DType::F32 => self.download_f32()?,
            DType::BF16 => self.download_bf16()?.iter().map(|x| x.to_f32()).collect(),
            DType::F16 => {
                let b = self.download_bytes()?;
                let v: &[half::f16] = bytemuck::cast_slice(&b);
                v.iter().map(|x| x.to_f32()).collect()
            }
        })
    }
    /// Overwrite the buffer from host bytes (same length); see [`GpuDevice::htod`].
    pub fn write_bytes(&self, data: &[u8]) -> Result<()> {
        ensure!(data.len() == self.bytes, "write of {} bytes into a buffer of {}", data.len(), self.bytes);
        // SAFETY: the whole buffer is the destination.
        unsafe { self.dev.htod(data, self.ptr) }
    }

    /// Overwrite bytes `at..at + data.len()` from the host; see [`GpuDevice::htod`].
    pub fn write_at(&self, at: usize, data: &[u8]) -> Result<()> {
        ensure!(
            at + data.len() <= self.bytes,
            "write of {} bytes at {at} into a buffer of {}",
            data.len(),
            self.bytes
        );
        // SAFETY: the range was checked to lie in the buffer.
        unsafe { self.dev.htod(data, self.ptr + at as u64) }
    }
    pub fn zero(&self) -> Result<()> {
        let (dst, bytes) = (self.ptr, self.bytes);
        match self.dev.route(|| GraphOp::Zero { dst, bytes }) {
            Route::Recorded => return Ok(()),
            Route::Native => {}
            Route::Run => self.dev.counters.launch(),
        }
        unsafe { self.dev.drv.memset_zero(dst, bytes) }
    }
}

impl Drop for GpuBuffer {
    fn drop(&mut self) {
        if self.dev.in_capture() {
            // Freed when the capture ends (a free is not capturable), which then fails: captured
            // work may use the buffer.
            let mut c = self.dev.capture.lock().unwrap();
            if let Some(c) = c.as_mut() {
                c.frees.push((self.ptr, self.bytes.max(1), *self.cat.lock().unwrap()));
                return;
            }
        }
        self.dev.mem.free(*self.cat.lock().unwrap(), memory::counted(self.bytes));
        unsafe { self.dev.drv.free(self.ptr, self.bytes.max(1)) }
    }
}

/// An NVTX range for the duration of the returned guard. Ranges are pushed only when a profiler
/// is attached (Nsight Systems sets `NVTX_INJECTION64_PATH`; `FCGPU_NVTX=1` forces them on), so
/// without one a launch pays a single cached boolean check and no allocation.
pub fn nvtx_range(name: &str) -> NvtxRange {
    if nvtx_enabled() {
        nvtx::range_push!("{}", name);
        NvtxRange(true)
    } else {
        NvtxRange(false)
    }
}

pub fn nvtx_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var_os("NVTX_INJECTION64_PATH").is_some()
            || std::env::var("FCGPU_NVTX").is_ok_and(|v| v == "1")
    })
}

/// `FCGPU_SYNC_LAUNCH=1`: synchronise after every kernel launch, so a kernel fault is reported
/// with the kernel's name (read once per process).
pub fn sync_launches() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("FCGPU_SYNC_LAUNCH").is_ok_and(|v| v == "1"))
}

pub struct NvtxRange(bool);

impl Drop for NvtxRange {
    fn drop(&mut self) {
        if self.0 {
            nvtx::range_pop!();
        }
    }
}

/// The kernel-name suffix of a storage dtype (`f32`, `bf16`); f16 has no kernels.
pub fn dtype_suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => bail!("f16 kernels are not provided (only casts); use bf16 or f32"),
    })
}

/// Opening the GPU behind a [`Device`] tag lives here, so `crate::device` stays a leaf.
impl Device {
    /// [`Device::parse`], then open a GPU device: `--device cuda` without a driver or GPU is a
    /// clear error here, before any work starts.
    pub fn resolve(name: &str) -> Result<Device> {
        let d = Device::parse(name)?;
        if d.is_gpu() {
            d.gpu().with_context(|| format!("--device {name}"))?;
        }
        Ok(d)
    }

    /// `--device` of a command: [`Device::resolve`] with empty meaning `auto`, errors naming
    /// `fcgpu <command>`; a GPU chosen by `auto` is reported on stderr.
    pub fn for_command(arg: &str, command: &str) -> Result<Device> {
        let arg = if arg.is_empty() { "auto" } else { arg };
        let d = Device::resolve(arg).with_context(|| format!("fcgpu {command}"))?;
        ensure!(
            d != Device::Meta,
            "fcgpu {command}: --device meta has no data (it counts memory for `fcgpu plan`); use cpu, cuda, cuda:N, emu or auto"
        );
        if arg == "auto" && d.is_gpu() {
            eprintln!("device: {d} ({})", d.gpu()?.name());
        }
        Ok(d)
    }

    /// cuda:0 when it can be used, else cpu.
    pub fn auto() -> Device {
        if GpuDevice::cuda_available() {
            Device::Cuda(0)
        } else {
            Device::Cpu
        }
    }

    /// The GPU behind this tag (opened on first use); an error for the cpu.
    pub fn gpu(self) -> Result<GpuDevice> {
        match self {
            Device::Cpu => bail!("the cpu is not a GPU device"),
            Device::Emu => Ok(GpuDevice::shared_emu()),
            Device::Meta => Ok(GpuDevice::shared_meta()),
            Device::Cuda(n) => GpuDevice::shared_cuda(n as usize),
        }
    }
}
