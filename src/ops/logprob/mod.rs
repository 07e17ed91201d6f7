//! Fused LM head + log-prob + entropy (SPEC §7): from hidden states `h` `[N, H]` and the head
//! `W` `[V, H]` it gives, per row, `log p(target)` and the entropy of softmax(h·Wᵀ / T).
//! Rows go through in chunks, so the `N × V` logits never exist at once; backward recomputes
//! each chunk's logits from `h` and `W` (or, when they fit in one chunk, reuses forward's).

pub mod cpu;

use std::sync::Mutex;

use anyhow::{ensure, Result};

use super::device::{alloc, backward_device, buf, cast, copy_bytes, kernel_dtype, on_gpu, upload_ids, zeros};
use super::grad_fn;
use crate::autograd::GradFn;
use crate::backend::storage::GpuStorage;
use crate::backend::{GpuBuffer, GpuDevice};
use crate::kernels::logprob::{linear_lpe_bwd, linear_lpe_fwd, CHUNK};
use crate::tensor::{DType, Tensor};

/// Returns `[2, N]`: row 0 the log-probs of `targets`, row 1 the entropies.
pub fn linear_logprob_entropy(h: &Tensor, w: &Tensor, targets: &[u32], temperature: f32) -> Result<Tensor> {
    ensure!(
        h.dims() == 2 && w.dims() == 2 && h.dim(1) == w.dim(1),
        "logprob: hidden {:?} vs head {:?}",
        h.shape(),
        w.shape()
    );
    ensure!(targets.len() == h.dim(0), "logprob: {} targets for {} rows", targets.len(), h.dim(0));
    ensure!(
        temperature > 0.0 && temperature.is_finite(),
        "logprob: temperature must be positive, got {temperature}"
    );
    let vocab = w.dim(0);
    if let Some(t) = targets.iter().find(|&&t| t as usize >= vocab) {
        anyhow::bail!("logprob: target id {t} outside the vocabulary of {vocab}");
    }
    let back = |saved| grad_fn(LogprobBack { h: h.clone(), w: w.clone(), temperature, saved });
    if let Some(dev) = on_gpu("linear_logprob_entropy", &[h, w])? {
        let (out, saved) = forward_gpu(&dev, h, w, targets, temperature)?;
        return Ok(Tensor::from_gpu_op(out, &[2, targets.len()], back(saved)));
    }
    let keep = crate::autograd::is_enabled() && (h.tracks_grad() || w.tracks_grad());
    let (stats, logits) = cpu::forward(h.f32s()?, w.f32s()?, targets, temperature, keep);
    let n = targets.len();
    let mut out = Vec::with_capacity(2 * n);
    out.extend(stats.iter().map(|s| s.logp));
    out.extend(stats.iter().map(|s| s.entropy));
    let saved = Saved::Cpu { targets: targets.to_vec(), stats, logits: Mutex::new(logits) };
    Ok(Tensor::from_op_f32(out, &[2, n], back(saved)))
}

/// On a device: logits chunk by chunk through the device GEMM in the head's dtype, then the
/// fused row kernel (f32 statistics). Output `[2, N]` f32 like the CPU op.
fn forward_gpu(
    dev: &GpuDevice,
    h: &Tensor,
    w: &Tensor,
    targets: &[u32],
    temperature: f32,
) -> Result<(GpuStorage, Saved)> {
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
    Ok((out, Saved::Gpu { targets: tg, n, ent, logz, dt }))
}

/// The row statistics the backward starts from, on the device the forward ran on.
enum Saved {
    Cpu {
        targets: Vec<u32>,
        stats: Vec<cpu::RowStats>,
        /// Forward logits kept for a small batch; taken by the first backward.
        logits: Mutex<Option<Vec<f32>>>,
    },
    Gpu {
        targets: GpuBuffer,
        n: usize,
        ent: GpuStorage,
        logz: GpuStorage,
        dt: DType,
    },
}

struct LogprobBack {
    h: Tensor,
    w: Tensor,
    temperature: f32,
    saved: Saved,
}

impl GradFn for LogprobBack {
    fn name(&self) -> &'static str {
        "linear_logprob_entropy"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.h.clone(), self.w.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (dh, dw) = match &self.saved {
            Saved::Cpu { targets, stats, logits } => {
                let n = targets.len();
                let gv = g.f32s()?;
                let (dh, dw) = cpu::backward(
                    self.h.f32s()?,
                    self.w.f32s()?,
                    targets,
                    self.temperature,
                    stats,
                    &gv[..n],
                    &gv[n..],
                    self.w.tracks_grad(),
                    logits.lock().unwrap().take(),
                );
                (
                    Tensor::from_vec(dh, self.h.shape())?,
                    dw.map(|d| Tensor::from_vec(d, self.w.shape())).transpose()?,
                )
            }
            Saved::Gpu { targets, n, ent, logz, dt } => self.backward_gpu(g, targets, *n, ent, logz, *dt)?,
        };
        Ok(vec![Some(dh), dw])
    }
}

impl LogprobBack {
    /// On a device: each chunk's logits recomputed; dh in the head's dtype.
    fn backward_gpu(
        &self,
        g: &Tensor,
        targets: &GpuBuffer,
        n: usize,
        ent: &GpuStorage,
        logz: &GpuStorage,
        dt: DType,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let dev = backward_device("linear_logprob_entropy", g, &self.h)?;
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
            targets,
            n,
            hidden,
            vocab,
            self.temperature,
            CHUNK,
            &logz.buf,
            &ent.buf,
            Some(&glp.buf),
            Some(&gh.buf),
            &dh.buf,
            dw.as_ref().map(|s| &s.buf),
        )?;
        Ok((
            Tensor::from_gpu(dh, self.h.shape())?,
            dw.map(|s| Tensor::from_gpu(s, self.w.shape())).transpose()?,
        ))
    }
}
