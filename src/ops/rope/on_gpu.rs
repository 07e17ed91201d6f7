//! RoPE on GPU tensors: per-token cos/sin computed on the host exactly as the CPU op does
//! (`RopeTable::cos_sin`), uploaded once per call and kept for the backward.

use anyhow::Result;

use super::RopeTable;
use crate::autograd::GradFn;
use crate::backend::ops::rope::rope as rope_kernel;
use crate::backend::{GpuBuffer, GpuDevice};
use crate::ops::device::{alloc, backward_device, buf, cast, kernel_dtype};
use crate::ops::grad_fn;
use crate::tensor::{DType, Tensor};

/// `[tokens, head_dim/2]` cos and sin tables on the device.
pub(crate) fn tables(dev: &GpuDevice, positions: &[u32], table: &RopeTable) -> Result<(GpuBuffer, GpuBuffer)> {
    let half = table.inv_freq.len();
    let (mut cos, mut sin) = (Vec::with_capacity(positions.len() * half), Vec::with_capacity(positions.len() * half));
    for &p in positions {
        let (c, s) = table.cos_sin(p);
        cos.extend(c);
        sin.extend(s);
    }
    Ok((dev.upload_f32(&cos)?, dev.upload_f32(&sin)?))
}

pub(super) fn rope(dev: &GpuDevice, x: &Tensor, positions: &[u32], table: &RopeTable) -> Result<Tensor> {
    let dt = kernel_dtype(x);
    let xc = cast(x, dt)?;
    let (cos, sin) = tables(dev, positions, table)?;
    let y = alloc(dev, dt, x.numel())?;
    rope_kernel(dev, dt, buf(&xc), &cos, &sin, &y.buf, x.dim(0), x.dim(1), x.dim(2), false)?;
    Ok(Tensor::from_gpu_op(y, x.shape(), grad_fn(RopeBack { x: x.clone(), cos, sin, dt })))
}

struct RopeBack {
    x: Tensor,
    cos: GpuBuffer,
    sin: GpuBuffer,
    dt: DType,
}

impl GradFn for RopeBack {
    fn name(&self) -> &'static str {
        "rope"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.x.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let dev = backward_device("rope", g, &self.x)?;
        let g = cast(g, self.dt)?;
        let d = alloc(&dev, self.dt, self.x.numel())?;
        // The transpose of a rotation is the rotation by the opposite angle.
        rope_kernel(&dev, self.dt, buf(&g), &self.cos, &self.sin, &d.buf, self.x.dim(0), self.x.dim(1), self.x.dim(2), true)?;
        Ok(vec![Some(Tensor::from_gpu(d, self.x.shape())?)])
    }
}
