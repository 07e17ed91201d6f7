//! Fused LM head + log-prob + entropy on GPU tensors: logits chunk by chunk through the device
//! GEMM in the head's dtype, then the fused row kernel (f32 statistics); backward recomputes
//! each chunk. Output `[2, N]` f32 like the CPU op.

use anyhow::Result;

use crate::autograd::GradFn;
use crate::backend::storage::GpuStorage;
use crate::backend::{GpuBuffer, GpuDevice};
use crate::kernels::logprob::{linear_lpe_bwd, linear_lpe_fwd, CHUNK};
use crate::ops::device::{alloc, backward_device, buf, cast, copy_bytes, kernel_dtype, upload_ids, zeros};
use crate::ops::grad_fn;
use crate::tensor::{DType, Tensor};

pub(super) fn linear_logprob_entropy(
    dev: &GpuDevice,
    h: &Tensor,
    w: &Tensor,
    targets: &[u32],
    temperature: f32,
) -> Result<Tensor> {
    let dt = kernel_dtype(w);
    let (n, hidden, vocab) = (targets.len(), w.dim(1), w.dim(0));
    let (hc, wc) = (cast(h, dt)?, cast(w, dt)?);
    let tg = upload_ids(dev, targets)?;
    let (logp, ent, logz) =
        (alloc(dev, DType::F32, n)?, alloc(dev, DType::F32, n)?, alloc(dev, DType::F32, n)?);
    linear_lpe_fwd(
        dev,
        dt,
        buf(&hc),
        buf(&wc),
        &tg,
        n,
        hidden,
        vocab,
        temperature,
        CHUNK,
        &logp.buf,
        &ent.buf,
        &logz.buf,
    )?;
    let out = alloc(dev, DType::F32, 2 * n)?;
    copy_bytes(&out.buf, 0, &logp.buf, 0, n * 4)?;
    copy_bytes(&out.buf, n * 4, &ent.buf, 0, n * 4)?;
    let back = LogprobBack { h: h.clone(), w: w.clone(), targets: tg, n, temperature, ent, logz, dt };
    Ok(Tensor::from_gpu_op(out, &[2, n], grad_fn(back)))
}

struct LogprobBack {
    h: Tensor,
    w: Tensor,
    targets: GpuBuffer,
    n: usize,
    temperature: f32,
    ent: GpuStorage,
    logz: GpuStorage,
    dt: DType,
}

impl GradFn for LogprobBack {
    fn name(&self) -> &'static str {
        "linear_logprob_entropy"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.h.clone(), self.w.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let dev = backward_device("linear_logprob_entropy", g, &self.h)?;
        let (n, dt) = (self.n, self.dt);
        let (hidden, vocab) = (self.w.dim(1), self.w.dim(0));
        // Row 0 of the gradient weighs the log-probs, row 1 the entropies.
        let g = cast(g, DType::F32)?;
        let (glp, gh) = (alloc(&dev, DType::F32, n)?, alloc(&dev, DType::F32, n)?);
        copy_bytes(&glp.buf, 0, buf(&g), 0, n * 4)?;
        copy_bytes(&gh.buf, 0, buf(&g), n * 4, n * 4)?;
        let (h, w) = (cast(&self.h, dt)?, cast(&self.w, dt)?);
        let dh = alloc(&dev, dt, n * hidden)?;
        let dw = self.w.tracks_grad().then(|| zeros(&dev, dt, vocab * hidden)).transpose()?;
        linear_lpe_bwd(
            &dev,
            dt,
            buf(&h),
            buf(&w),
            &self.targets,
            n,
            hidden,
            vocab,
            self.temperature,
            CHUNK,
            &self.logz.buf,
            &self.ent.buf,
            Some(&glp.buf),
            Some(&gh.buf),
            &dh.buf,
            dw.as_ref().map(|s| &s.buf),
        )?;
        Ok(vec![
            Some(Tensor::from_gpu(dh, self.h.shape())?),
            dw.map(|s| Tensor::from_gpu(s, self.w.shape())).transpose()?,
        ])
    }
}
