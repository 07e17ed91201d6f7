//! RMSNorm over the last dimension: `y = x / sqrt(mean(x²) + eps) · w`.

pub mod cpu;
mod on_gpu;

use anyhow::{ensure, Result};

use super::device::on_gpu;
use super::grad_fn;
use crate::autograd::GradFn;
use crate::tensor::Tensor;

pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    let d = *x.shape().last().unwrap_or(&0);
    ensure!(w.shape() == [d], "rms_norm: weight {:?} for rows of {}", w.shape(), d);
    if let Some(dev) = on_gpu("rms_norm", &[x, w])? {
        return on_gpu::rms_norm(&dev, x, w, eps);
    }
    let y = cpu::forward(x.f32s()?, w.f32s()?, eps);
    Ok(Tensor::from_op(y, x.shape(), grad_fn(RmsNormBack { x: x.clone(), w: w.clone(), eps })))
}

struct RmsNormBack {
    x: Tensor,
    w: Tensor,
    eps: f32,
}

impl GradFn for RmsNormBack {
    fn name(&self) -> &'static str {
        "rms_norm"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.x.clone(), self.w.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (dx, dw) = cpu::backward(self.x.f32s()?, self.w.f32s()?, g.f32s()?, self.eps);
        Ok(vec![Some(Tensor::from_vec(dx, self.x.shape())?), Some(Tensor::from_vec(dw, self.w.shape())?)])
    }
}
