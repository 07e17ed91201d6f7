//! Element-wise ops and the reductions losses need: add, mul, scale, sum, weighted_sum, narrow.

use anyhow::{ensure, Result};

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
        let gv = g.f32s()?;
        let da: Vec<f32> = gv.iter().zip(self.1.f32s()?).map(|(g, b)| g * b).collect();
        let db: Vec<f32> = gv.iter().zip(self.0.f32s()?).map(|(g, a)| g * a).collect();
        Ok(vec![Some(Tensor::from_vec(da, g.shape())?), Some(Tensor::from_vec(db, g.shape())?)])
    }
}

/// `s · a` for a constant s.
pub fn scale(a: &Tensor, s: f32) -> Result<Tensor> {
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
        Ok(vec![Some(Tensor::from_vec(d, self.0.shape())?)])
    }
}

/// The slice `start..start+len` of dimension `dim`.
pub fn narrow(a: &Tensor, dim: usize, start: usize, len: usize) -> Result<Tensor> {
    ensure!(dim < a.dims() && start + len <= a.dim(dim), "narrow: {}..{} of dim {} in {:?}", start, start + len, dim, a.shape());
    let outer: usize = a.shape()[..dim].iter().product();
    let inner: usize = a.shape()[dim + 1..].iter().product();
    let full = a.dim(dim) * inner;
    let src = a.f32s()?;
    let mut y = Vec::with_capacity(outer * len * inner);
    for o in 0..outer {
        y.extend_from_slice(&src[o * full + start * inner..o * full + (start + len) * inner]);
    }
    let mut shape = a.shape().to_vec();
    shape[dim] = len;
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
        Ok(vec![Some(Tensor::from_vec(self.1.iter().map(|d| d * g).collect(), self.0.shape())?)])
    }
}
