//! Element-wise ops and the reductions losses need: add, mul, scale, sum, weighted_sum, narrow.

use anyhow::{ensure, Result};

use super::device::{alloc, buf, cast, kernel_dtype, on_gpu, zeros};
use super::grad_fn;
use crate::autograd::GradFn;
use crate::backend::storage::GpuStorage;
use crate::backend::{GpuDevice, Kernel, KernelArgs, LaunchCfg};
use crate::kernels::elementwise as ew;
use crate::tensor::{DType, Tensor};

fn same_shape(op: &str, a: &Tensor, b: &Tensor) -> Result<()> {
    ensure!(a.shape() == b.shape(), "{op}: shapes differ: {:?} vs {:?}", a.shape(), b.shape());
    Ok(())
}

/// `a + b` (residual connections).
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    same_shape("add", a, b)?;
    if let Some(dev) = on_gpu("add", &[a, b])? {
        // The backward (the gradient, twice) is device-independent.
        return Ok(Tensor::from_gpu_op(
            binary_gpu(&dev, false, a, b)?,
            a.shape(),
            grad_fn(AddBack(a.clone(), b.clone())),
        ));
    }
    let y: Vec<f32> = a.f32s()?.iter().zip(b.f32s()?).map(|(x, y)| x + y).collect();
    Ok(Tensor::from_op(y, a.shape(), grad_fn(AddBack(a.clone(), b.clone()))))
}

struct AddBack(Tensor, Tensor);
impl GradFn for AddBack {
    fn name(&self) -> &'static str {
        "add"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.0.clone(), self.1.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(g.clone()), Some(g.clone())])
    }
}

/// `a ⊙ b`.
pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    same_shape("mul", a, b)?;
    if let Some(dev) = on_gpu("mul", &[a, b])? {
        return Ok(Tensor::from_gpu_op(
            binary_gpu(&dev, true, a, b)?,
            a.shape(),
            grad_fn(MulBack(a.clone(), b.clone())),
        ));
    }
    let y: Vec<f32> = a.f32s()?.iter().zip(b.f32s()?).map(|(x, y)| x * y).collect();
    Ok(Tensor::from_op(y, a.shape(), grad_fn(MulBack(a.clone(), b.clone()))))
}

struct MulBack(Tensor, Tensor);
impl GradFn for MulBack {
    fn name(&self) -> &'static str {
        "mul"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.0.clone(), self.1.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        if let Some(dev) = on_gpu("mul backward", &[g, &self.0, &self.1])? {
            let (da, db) = mul_back_gpu(&dev, g, &self.0, &self.1)?;
            return Ok(vec![Some(da), Some(db)]);
        }
        let gv = g.f32s()?;
        let da: Vec<f32> = gv.iter().zip(self.1.f32s()?).map(|(g, b)| g * b).collect();
        let db: Vec<f32> = gv.iter().zip(self.0.f32s()?).map(|(g, a)| g * a).collect();
        Ok(vec![Some(Tensor::from_vec(da, g.shape())?), Some(Tensor::from_vec(db, g.shape())?)])
    }
}

/// `s · a` for a constant s.
pub fn scale(a: &Tensor, s: f32) -> Result<Tensor> {
    if let Some(dev) = on_gpu("scale", &[a])? {
        return Ok(Tensor::from_gpu_op(scale_gpu(&dev, a, s)?, a.shape(), grad_fn(ScaleBack(a.clone(), s))));
    }
    let y: Vec<f32> = a.f32s()?.iter().map(|x| x * s).collect();
    Ok(Tensor::from_op(y, a.shape(), grad_fn(ScaleBack(a.clone(), s))))
}

struct ScaleBack(Tensor, f32);
impl GradFn for ScaleBack {
    fn name(&self) -> &'static str {
        "scale"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.0.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(scale(g, self.1)?)])
    }
}

/// Sum of all elements (a scalar).
pub fn sum(a: &Tensor) -> Result<Tensor> {
    let w = vec![1.0; a.numel()];
    weighted_sum(a, &w)
}

/// `Σ aᵢ·wᵢ` with constant weights: every token loss (NLL, SRML, policy loss) is one of these.
/// Accumulates in f64 so long sequences don't lose precision.
pub fn weighted_sum(a: &Tensor, w: &[f32]) -> Result<Tensor> {
    ensure!(w.len() == a.numel(), "weighted_sum: {} weights for {} elements", w.len(), a.numel());
    if let Some(dev) = on_gpu("weighted_sum", &[a])? {
        return Ok(Tensor::from_gpu_op(
            weighted_sum_gpu(&dev, a, w)?,
            &[],
            grad_fn(WeightedSumBack(a.clone(), w.to_vec())),
        ));
    }
    let s: f64 = a.f32s()?.iter().zip(w).map(|(&x, &w)| x as f64 * w as f64).sum();
    Ok(Tensor::from_op_f32(vec![s as f32], &[], grad_fn(WeightedSumBack(a.clone(), w.to_vec()))))
}

struct WeightedSumBack(Tensor, Vec<f32>);
impl GradFn for WeightedSumBack {
    fn name(&self) -> &'static str {
        "weighted_sum"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.0.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let g = g.to_scalar()?;
        let d: Vec<f32> = self.1.iter().map(|w| w * g).collect();
        Ok(vec![Some(Tensor::from_vec_like(d, self.0.shape(), &self.0)?)])
    }
}

/// The slice `start..start+len` of dimension `dim`.
pub fn narrow(a: &Tensor, dim: usize, start: usize, len: usize) -> Result<Tensor> {
    ensure!(
        dim < a.dims() && start + len <= a.dim(dim),
        "narrow: {}..{} of dim {} in {:?}",
        start,
        start + len,
        dim,
        a.shape()
    );
    let outer: usize = a.shape()[..dim].iter().product();
    let inner: usize = a.shape()[dim + 1..].iter().product();
    let full = a.dim(dim) * inner;
    let mut shape = a.shape().to_vec();
    shape[dim] = len;
    if let Some(dev) = on_gpu("narrow", &[a])? {
        let y = narrow_copy_gpu(&dev, a, outer, full, start, len, inner, false)?;
        return Ok(Tensor::from_gpu_op(y, &shape, grad_fn(NarrowBack { a: a.clone(), dim, start, len })));
    }
    let src = a.f32s()?;
    let mut y = Vec::with_capacity(outer * len * inner);
    for o in 0..outer {
        y.extend_from_slice(&src[o * full + start * inner..o * full + (start + len) * inner]);
    }
    Ok(Tensor::from_op(y, &shape, grad_fn(NarrowBack { a: a.clone(), dim, start, len })))
}

struct NarrowBack {
    a: Tensor,
    dim: usize,
    start: usize,
    len: usize,
}
impl GradFn for NarrowBack {
    fn name(&self) -> &'static str {
        "narrow"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.a.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let shape = self.a.shape();
        let outer: usize = shape[..self.dim].iter().product();
        let inner: usize = shape[self.dim + 1..].iter().product();
        let full = shape[self.dim] * inner;
        if let Some(dev) = on_gpu("narrow backward", &[g, &self.a])? {
            let d = narrow_copy_gpu(&dev, g, outer, full, self.start, self.len, inner, true)?;
            return Ok(vec![Some(Tensor::from_gpu(d, shape)?)]);
        }
        let gv = g.f32s()?;
        let mut d = vec![0.0; self.a.numel()];
        for o in 0..outer {
            let src = &gv[o * self.len * inner..(o + 1) * self.len * inner];
            d[o * full + self.start * inner..o * full + (self.start + self.len) * inner].copy_from_slice(src);
        }
        Ok(vec![Some(Tensor::from_vec(d, shape)?)])
    }
}

/// A scalar loss computed outside the graph from `x`, whose gradient `dx` (∂value/∂x) the
/// caller already has (fused loss kernels such as the GRPO policy loss compute both at once).
pub fn scalar_with_grad(x: &Tensor, value: f32, dx: Vec<f32>) -> Result<Tensor> {
    ensure!(dx.len() == x.numel(), "scalar_with_grad: {} gradients for {} elements", dx.len(), x.numel());
    if x.device().is_gpu() {
        return Ok(
            Tensor::from_vec_like(vec![value], &[], x)?.with_grad_fn(grad_fn(KnownGradBack(x.clone(), dx)))
        );
    }
    Ok(Tensor::from_op_f32(vec![value], &[], grad_fn(KnownGradBack(x.clone(), dx))))
}

struct KnownGradBack(Tensor, Vec<f32>);
impl GradFn for KnownGradBack {
    fn name(&self) -> &'static str {
        "scalar_with_grad"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.0.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let g = g.to_scalar()?;
        Ok(vec![Some(Tensor::from_vec_like(
            self.1.iter().map(|d| d * g).collect(),
            self.0.shape(),
            &self.0,
        )?)])
    }
}

// On a device: `kernels/elementwise.cu` and `kernels/cast.cu`, in the first operand's dtype.

/// `a ⊙ b` or `a + b` into new storage (no graph).
fn binary_gpu(dev: &GpuDevice, mul: bool, a: &Tensor, b: &Tensor) -> Result<GpuStorage> {
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
fn mul_back_gpu(dev: &GpuDevice, g: &Tensor, a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
    let da = binary_gpu(dev, true, &cast(g, kernel_dtype(a))?, b)?;
    let db = binary_gpu(dev, true, &cast(g, kernel_dtype(b))?, a)?;
    Ok((Tensor::from_gpu(da, a.shape())?, Tensor::from_gpu(db, b.shape())?))
}

fn scale_gpu(dev: &GpuDevice, a: &Tensor, s: f32) -> Result<GpuStorage> {
    let dt = kernel_dtype(a);
    let a = cast(a, dt)?;
    let y = alloc(dev, dt, a.numel())?;
    ew::scale(dev, dt, buf(&a), s, &y.buf, a.numel())?;
    Ok(y)
}

/// `Σ aᵢ·wᵢ` (f32 scalar): products, then one block's fixed-order sum (deterministic).
fn weighted_sum_gpu(dev: &GpuDevice, a: &Tensor, w: &[f32]) -> Result<GpuStorage> {
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
fn narrow_copy_gpu(
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
