//! Shared pieces of the ops' GPU paths: which device the inputs live on (mixed devices are an
//! error naming the op), dtype casts, device allocations, copies inside buffers, and gradient
//! accumulation. Every op checks its inputs with [`on_gpu`] first: `None` sends it down the CPU
//! kernel of its `cpu.rs`, `Some(dev)` to the launch wrappers of `crate::kernels` (bf16 or f32
//! storage, f32 accumulation inside the kernels). Each op has one backward rule; what it saved
//! says which device it runs on.

use anyhow::{bail, ensure, Result};

use crate::backend::storage::GpuStorage;
use crate::backend::{GpuBuffer, GpuDevice};
use crate::tensor::{DType, Tensor};

/// The GPU device all of `ts` are on, `None` when all are on the cpu; an error when they differ.
pub(crate) fn on_gpu(op: &str, ts: &[&Tensor]) -> Result<Option<GpuDevice>> {
    let first = ts[0].device();
    if let Some(t) = ts.iter().find(|t| t.device() != first) {
        bail!(
            "{op}: inputs on different devices ({first} and {}); move them with to_device first",
            t.device()
        );
    }
    Ok(ts[0].gpu_storage().map(|g| g.device().clone()))
}

/// The dtype GPU kernels compute a tensor in: its own (f32 or bf16); f16 goes through f32.
pub(crate) fn kernel_dtype(t: &Tensor) -> DType {
    match t.dtype() {
        DType::F16 => DType::F32,
        d => d,
    }
}

/// `t` in `dtype` (itself when it already is).
pub(crate) fn cast(t: &Tensor, dtype: DType) -> Result<Tensor> {
    t.to_dtype(dtype)
}

/// The device buffer of a tensor known to be on a GPU.
pub(crate) fn buf(t: &Tensor) -> &GpuBuffer {
    &t.gpu_storage().expect("a tensor on a GPU device").buf
}

/// Uninitialised storage (every element is written by the kernel that fills it).
pub(crate) fn alloc(dev: &GpuDevice, dtype: DType, len: usize) -> Result<GpuStorage> {
    GpuStorage::uninit(dev, dtype, len)
}

pub(crate) fn zeros(dev: &GpuDevice, dtype: DType, len: usize) -> Result<GpuStorage> {
    GpuStorage::zeros(dev, dtype, len)
}

/// Token ids as an i32 device buffer.
pub(crate) fn upload_ids(dev: &GpuDevice, ids: &[u32]) -> Result<GpuBuffer> {
    let v: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    dev.upload_i32(&v)
}

/// Copies `bytes` bytes from `src` at `src_off` to `dst` at `dst_off` (both on one device).
pub(crate) fn copy_bytes(
    dst: &GpuBuffer,
    dst_off: usize,
    src: &GpuBuffer,
    src_off: usize,
    bytes: usize,
) -> Result<()> {
    ensure!(
        src_off + bytes <= src.bytes() && dst_off + bytes <= dst.bytes(),
        "device copy of {bytes} bytes out of bounds"
    );
    if bytes == 0 {
        return Ok(());
    }
    // SAFETY: both ranges were checked to lie inside live allocations.
    unsafe { dst.device().dtod(src.ptr() + src_off as u64, dst.ptr() + dst_off as u64, bytes) }
}

/// `prev + g` as a new f32 tensor on their device: gradient accumulation (never in place: one
/// gradient tensor can be shared, e.g. both inputs of an add receive the same one).
pub(crate) fn accumulate(prev: &Tensor, g: &Tensor) -> Result<Tensor> {
    let Some(dev) = on_gpu("gradient accumulation", &[prev, g])? else {
        bail!("accumulate: tensors on the cpu")
    };
    let n = prev.numel();
    let out = alloc(&dev, DType::F32, n)?;
    crate::kernels::cast::cast(&dev, buf(prev), prev.dtype(), &out.buf, DType::F32, n)?;
    let gk = cast(g, kernel_dtype(g))?;
    crate::kernels::elementwise::axpy(&dev, gk.dtype(), buf(&gk), 1.0, &out.buf, n)?;
    Tensor::from_gpu(out, prev.shape())
}

/// The GPU device of a backward rule: the gradient `g` must be on the device of the forward's
/// input `like`.
pub(crate) fn backward_device(op: &str, g: &Tensor, like: &Tensor) -> Result<GpuDevice> {
    match on_gpu(op, &[g, like])? {
        Some(d) => Ok(d),
        None => bail!("{op}: the backward of a GPU op got a gradient on the cpu"),
    }
}
