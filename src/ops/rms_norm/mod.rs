//! RMSNorm over the last dimension: `y = x / sqrt(mean(x²) + eps) · w`.

pub mod cpu;

use anyhow::{ensure, Result};

use super::device::{alloc, backward_device, buf, cast, kernel_dtype, on_gpu};
use super::grad_fn;
use crate::autograd::GradFn;
use crate::backend::storage::GpuStorage;
use crate::kernels::rms_norm::{rms_norm_bwd, rms_norm_fwd};
use crate::tensor::{DType, Tensor};

pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    let d = *x.shape().last().unwrap_or(&0);
    ensure!(w.shape() == [d], "rms_norm: weight {:?} for rows of {}", w.shape(), d);
    let back = |saved| grad_fn(RmsNormBack { x: x.clone(), w: w.clone(), saved });
    let Some(dev) = on_gpu("rms_norm", &[x, w])? else {
        let y = cpu::forward(x.f32s()?, w.f32s()?, eps);
        return Ok(Tensor::from_op(y, x.shape(), back(Saved::Cpu { eps })));
    };
    // On a device: in x's dtype, saving each row's 1/rms (f32) for the backward.
    let dt = kernel_dtype(x);
    let rows = x.numel().checked_div(d).unwrap_or(0);
    let (xc, wc) = (cast(x, dt)?, cast(w, dt)?);
    let y = alloc(&dev, dt, x.numel())?;
    let rstd = alloc(&dev, DType::F32, rows)?;
    rms_norm_fwd(&dev, dt, buf(&xc), buf(&wc), &y.buf, &rstd.buf, rows, d, eps)?;
    Ok(Tensor::from_gpu_op(y, x.shape(), back(Saved::Gpu { rstd, dt, rows })))
}

/// What the backward needs besides x and w, by the device the forward ran on.
enum Saved {
    Cpu { eps: f32 },
    Gpu { rstd: GpuStorage, dt: DType, rows: usize },
}

struct RmsNormBack {
    x: Tensor,
    w: Tensor,
    saved: Saved,
}

impl GradFn for RmsNormBack {
    fn name(&self) -> &'static str {
        "rms_norm"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.x.clone(), self.w.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (dx, dw) = match self.saved {
            Saved::Cpu { eps } => {
                let (dx, dw) = cpu::backward(self.x.f32s()?, self.w.f32s()?, g.f32s()?, eps);
                (Tensor::from_vec(dx, self.x.shape())?, Tensor::from_vec(dw, self.w.shape())?)
            }
            Saved::Gpu { ref rstd, dt, rows } => {
                let dev = backward_device("rms_norm", g, &self.x)?;
                let d = self.w.numel();
                let (g, x, w) = (cast(g, dt)?, cast(&self.x, dt)?, cast(&self.w, dt)?);
                let dx = alloc(&dev, dt, self.x.numel())?;
                let dw = alloc(&dev, DType::F32, d)?;
                rms_norm_bwd(
                    &dev,
                    dt,
                    buf(&x),
                    buf(&w),
                    buf(&g),
                    &rstd.buf,
                    &dx.buf,
                    &dw.buf,
                    rows,
                    d,
                    false,
                )?;
                if rows == 0 {
                    dw.buf.zero()?;
                }
                (Tensor::from_gpu(dx, self.x.shape())?, Tensor::from_gpu(dw, self.w.shape())?)
            }
        };
        Ok(vec![Some(dx), Some(dw)])
    }
}
