//! Element-wise ops and the reductions losses need: add, mul, scale, sum, weighted_sum, narrow.

mod on_gpu;

use anyhow::{ensure, Result};

use super::device::on_gpu;
use super::grad_fn;
use crate::autograd::GradFn;
use crate::tensor::Tensor;

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
            on_gpu::binary(&dev, false, a, b)?,
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
            on_gpu::binary(&dev, true, a, b)?,
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
            let (da, db) = on_gpu::mul_back(&dev, g, &self.0, &self.1)?;
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
        return Ok(Tensor::from_gpu_op(
            on_gpu::scale(&dev, a, s)?,
            a.shape(),
            grad_fn(ScaleBack(a.clone(), s)),
        ));
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
            on_gpu::weighted_sum(&dev, a, w)?,
            &[],
            grad_fn(WeightedSumBack(a.clone(), w.to_vec())),
        ));
    }
    let s: f64 = a.f32s()?.iter().zip(w).map(|(&x, &w)| x as f64 * w as f64).sum();
    Ok(Tensor::from_op(vec![s as f32], &[], grad_fn(WeightedSumBack(a.clone(), w.to_vec()))))
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
        let y = on_gpu::narrow_copy(&dev, a, outer, full, start, len, inner, false)?;
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
            let d = on_gpu::narrow_copy(&dev, g, outer, full, self.start, self.len, inner, true)?;
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
    Ok(Tensor::from_op(vec![value], &[], grad_fn(KnownGradBack(x.clone(), dx))))
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
