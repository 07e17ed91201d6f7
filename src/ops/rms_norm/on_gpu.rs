//! RMSNorm on GPU tensors: in x's dtype, saving each row's 1/rms (f32) for the backward; dw in f32.

use anyhow::Result;

use crate::autograd::GradFn;
use crate::backend::storage::GpuStorage;
use crate::backend::GpuDevice;
use crate::kernels::rms_norm::{rms_norm_bwd, rms_norm_fwd};
use crate::ops::device::{alloc, backward_device, buf, cast, kernel_dtype};
use crate::ops::grad_fn;
use crate::tensor::{DType, Tensor};

pub(super) fn rms_norm(dev: &GpuDevice, x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    let dt = kernel_dtype(x);
    let d = w.numel();
    let rows = x.numel().checked_div(d).unwrap_or(0);
    let (xc, wc) = (cast(x, dt)?, cast(w, dt)?);
    let y = alloc(dev, dt, x.numel())?;
    let rstd = alloc(dev, DType::F32, rows)?;
    rms_norm_fwd(dev, dt, buf(&xc), buf(&wc), &y.buf, &rstd.buf, rows, d, eps)?;
    Ok(Tensor::from_gpu_op(y, x.shape(), grad_fn(RmsNormBack { x: x.clone(), w: w.clone(), rstd, dt, rows })))
}

struct RmsNormBack {
    x: Tensor,
    w: Tensor,
    rstd: GpuStorage,
    dt: DType,
    rows: usize,
}

impl GradFn for RmsNormBack {
    fn name(&self) -> &'static str {
        "rms_norm"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.x.clone(), self.w.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let dev = backward_device("rms_norm", g, &self.x)?;
        let d = self.w.numel();
        let (g, x, w) = (cast(g, self.dt)?, cast(&self.x, self.dt)?, cast(&self.w, self.dt)?);
        let dx = alloc(&dev, self.dt, self.x.numel())?;
        let dw = alloc(&dev, DType::F32, d)?;
        rms_norm_bwd(
            &dev,
            self.dt,
            buf(&x),
            buf(&w),
            buf(&g),
            &self.rstd.buf,
            &dx.buf,
            &dw.buf,
            self.rows,
            d,
            false,
        )?;
        if self.rows == 0 {
            dw.buf.zero()?;
        }
        Ok(vec![Some(Tensor::from_gpu(dx, self.x.shape())?), Some(Tensor::from_gpu(dw, self.w.shape())?)])
    }
}
