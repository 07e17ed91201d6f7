//! SwiGLU gate: `silu(gate) ⊙ up`.

pub mod cpu;

use anyhow::{ensure, Result};

use super::device::{alloc, buf, cast, kernel_dtype, on_gpu};
use super::grad_fn;
use crate::autograd::GradFn;
use crate::kernels::swiglu::{swiglu_bwd, swiglu_fwd};
use crate::tensor::{DType, Tensor};

pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    ensure!(gate.shape() == up.shape(), "swiglu: gate {:?} vs up {:?}", gate.shape(), up.shape());
    let back = |dt| grad_fn(SwigluBack { gate: gate.clone(), up: up.clone(), dt });
    let Some(dev) = on_gpu("swiglu", &[gate, up])? else {
        let y = cpu::forward(gate.f32s()?, up.f32s()?);
        return Ok(Tensor::from_op(y, gate.shape(), back(DType::F32)));
    };
    // On a device: in the gate's dtype.
    let dt = kernel_dtype(gate);
    let (g, u) = (cast(gate, dt)?, cast(up, dt)?);
    let y = alloc(&dev, dt, gate.numel())?;
    swiglu_fwd(&dev, dt, buf(&g), buf(&u), &y.buf, gate.numel())?;
    Ok(Tensor::from_gpu_op(y, gate.shape(), back(dt)))
}

struct SwigluBack {
    gate: Tensor,
    up: Tensor,
    /// The dtype the forward computed in (f32 on the cpu).
    dt: DType,
}

impl GradFn for SwigluBack {
    fn name(&self) -> &'static str {
        "swiglu"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.gate.clone(), self.up.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let shape = self.gate.shape();
        let Some(dev) = on_gpu("swiglu backward", &[g, &self.gate, &self.up])? else {
            let (dg, du) = cpu::backward(self.gate.f32s()?, self.up.f32s()?, g.f32s()?);
            return Ok(vec![Some(Tensor::from_vec(dg, shape)?), Some(Tensor::from_vec(du, shape)?)]);
        };
        let (n, dt) = (self.gate.numel(), self.dt);
        let (g, gate, up) = (cast(g, dt)?, cast(&self.gate, dt)?, cast(&self.up, dt)?);
        let (dg, du) = (alloc(&dev, dt, n)?, alloc(&dev, dt, n)?);
        swiglu_bwd(&dev, dt, buf(&gate), buf(&up), buf(&g), &dg.buf, &du.buf, n)?;
        Ok(vec![Some(Tensor::from_gpu(dg, shape)?), Some(Tensor::from_gpu(du, shape)?)])
    }
}
