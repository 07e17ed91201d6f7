//! SwiGLU on GPU tensors, in the gate's dtype.

use anyhow::Result;

use crate::autograd::GradFn;
use crate::backend::GpuDevice;
use crate::kernels::swiglu::{swiglu_bwd, swiglu_fwd};
use crate::ops::device::{alloc, backward_device, buf, cast, kernel_dtype};
use crate::ops::grad_fn;
use crate::tensor::{DType, Tensor};

pub(super) fn swiglu(dev: &GpuDevice, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let dt = kernel_dtype(gate);
    let (g, u) = (cast(gate, dt)?, cast(up, dt)?);
    let y = alloc(dev, dt, gate.numel())?;
    swiglu_fwd(dev, dt, buf(&g), buf(&u), &y.buf, gate.numel())?;
    Ok(Tensor::from_gpu_op(y, gate.shape(), grad_fn(SwigluBack { gate: gate.clone(), up: up.clone(), dt })))
}

struct SwigluBack {
    gate: Tensor,
    up: Tensor,
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
        let dev = backward_device("swiglu", g, &self.gate)?;
        let n = self.gate.numel();
        let (g, gate, up) = (cast(g, self.dt)?, cast(&self.gate, self.dt)?, cast(&self.up, self.dt)?);
        let (dg, du) = (alloc(&dev, self.dt, n)?, alloc(&dev, self.dt, n)?);
        swiglu_bwd(&dev, self.dt, buf(&gate), buf(&up), buf(&g), &dg.buf, &du.buf, n)?;
        Ok(vec![
            Some(Tensor::from_gpu(dg, self.gate.shape())?),
            Some(Tensor::from_gpu(du, self.gate.shape())?),
        ])
    }
}
