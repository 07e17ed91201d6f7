//! SwiGLU gate: `silu(gate) ⊙ up`.

pub mod cpu;
mod on_gpu;

use anyhow::{ensure, Result};

use super::device::on_gpu;
use super::grad_fn;
use crate::autograd::GradFn;
use crate::tensor::Tensor;

pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    ensure!(gate.shape() == up.shape(), "swiglu: gate {:?} vs up {:?}", gate.shape(), up.shape());
    if let Some(dev) = on_gpu("swiglu", &[gate, up])? {
        return on_gpu::swiglu(&dev, gate, up);
    }
    let y = cpu::forward(gate.f32s()?, up.f32s()?);
    Ok(Tensor::from_op(y, gate.shape(), grad_fn(SwigluBack(gate.clone(), up.clone()))))
}

struct SwigluBack(Tensor, Tensor);

impl GradFn for SwigluBack {
    fn name(&self) -> &'static str {
        "swiglu"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.0.clone(), self.1.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (dg, du) = cpu::backward(self.0.f32s()?, self.1.f32s()?, g.f32s()?);
        Ok(vec![Some(Tensor::from_vec(dg, g.shape())?), Some(Tensor::from_vec(du, g.shape())?)])
    }
}
