//! Element-wise ops and reductions on GPU tensors (`kernels/elementwise.cu`, `kernels/cast.cu`),
//! in the first operand's dtype.

use anyhow::Result;

use crate::backend::storage::GpuStorage;
use crate::backend::{GpuDevice, Kernel, KernelArgs, LaunchCfg};
use crate::kernels::elementwise as ew;
use crate::ops::device::{alloc, buf, cast, kernel_dtype, zeros};
use crate::tensor::{DType, Tensor};

/// `a ⊙ b` or `a + b` into new storage (no graph).
pub(super) fn binary(dev: &GpuDevice, mul: bool, a: &Tensor, b: &Tensor) -> Result<GpuStorage> {
    let dt = kernel_dtype(a);
    let (a, b) = (cast(a, dt)?, cast(b, dt)?);
    let y = alloc(dev, dt, a.numel())?;
    if mul {
        ew::mul(dev, dt, buf(&a), buf(&b), &y.buf, a.numel())?;
    } else {
        ew::add(dev, dt, buf(&a), buf(&b), &y.buf, a.numel())?;
    }
    Ok(y)
}

/// Gradients of `a ⊙ b`: `(g ⊙ b, g ⊙ a)`, each in its input's dtype.
pub(super) fn mul_back(dev: &GpuDevice, g: &Tensor, a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
    let da = binary(dev, true, &cast(g, kernel_dtype(a))?, b)?;
    let db = binary(dev, true, &cast(g, kernel_dtype(b))?, a)?;
    Ok((Tensor::from_gpu(da, a.shape())?, Tensor::from_gpu(db, b.shape())?))
}

pub(super) fn scale(dev: &GpuDevice, a: &Tensor, s: f32) -> Result<GpuStorage> {
    let dt = kernel_dtype(a);
    let a = cast(a, dt)?;
    let y = alloc(dev, dt, a.numel())?;
    ew::scale(dev, dt, buf(&a), s, &y.buf, a.numel())?;
    Ok(y)
}

/// `Σ aᵢ·wᵢ` (f32 scalar): products, then one block's fixed-order sum (deterministic).
pub(super) fn weighted_sum(dev: &GpuDevice, a: &Tensor, w: &[f32]) -> Result<GpuStorage> {
    let n = a.numel();
    let a = cast(a, DType::F32)?;
    let wb = dev.upload_f32(w)?;
    let prod = alloc(dev, DType::F32, n)?;
    ew::mul(dev, DType::F32, buf(&a), &wb, &prod.buf, n)?;
    let out = zeros(dev, DType::F32, 1)?;
    let mut k = KernelArgs::new();
    k.buf(&prod.buf).i32(n as i32).buf(&out.buf).i32(0);
    dev.launch(Kernel::new("cast.cu", "sum_f32"), LaunchCfg::linear(1, 256), &mut k)?;
    Ok(out)
}

/// Rows `outer` of `full` elements; the block `start..start+len` of each (`inner`-sized items)
/// copied out (`back` = false) or into a zeroed full-size tensor (`back` = true).
#[allow(clippy::too_many_arguments)]
pub(super) fn narrow_copy(
    dev: &GpuDevice,
    x: &Tensor,
    outer: usize,
    full: usize,
    start: usize,
    len: usize,
    inner: usize,
    back: bool,
) -> Result<GpuStorage> {
    let dt = kernel_dtype(x);
    let x = cast(x, dt)?;
    let cols = len * inner;
    if back {
        let y = zeros(dev, dt, outer * full)?;
        ew::copy_2d(dev, dt, buf(&x), 0, cols, &y.buf, start * inner, full, outer, cols)?;
        Ok(y)
    } else {
        let y = alloc(dev, dt, outer * cols)?;
        ew::copy_2d(dev, dt, buf(&x), start * inner, full, &y.buf, 0, cols, outer, cols)?;
        Ok(y)
    }
}
