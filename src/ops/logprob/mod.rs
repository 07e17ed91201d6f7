//! Fused LM head + log-prob + entropy (SPEC §7): from hidden states `h` `[N, H]` and the head
//! `W` `[V, H]` it gives, per row, `log p(target)` and the entropy of softmax(h·Wᵀ / T).
//! Rows go through in chunks, so the `N × V` logits never exist at once; backward recomputes
//! each chunk's logits from `h` and `W` (or, when they fit in one chunk, reuses forward's).

pub mod cpu;
mod on_gpu;

use anyhow::{ensure, Result};

use super::device::on_gpu;
use super::grad_fn;
use crate::autograd::GradFn;
use crate::tensor::Tensor;

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
    if let Some(dev) = on_gpu("linear_logprob_entropy", &[h, w])? {
        return on_gpu::linear_logprob_entropy(&dev, h, w, targets, temperature);
    }
    let keep = crate::autograd::is_enabled() && (h.tracks_grad() || w.tracks_grad());
    let (stats, logits) = cpu::forward(h.f32s()?, w.f32s()?, targets, temperature, keep);
    let n = targets.len();
    let mut out = Vec::with_capacity(2 * n);
    out.extend(stats.iter().map(|s| s.logp));
    out.extend(stats.iter().map(|s| s.entropy));
    let back = LogprobBack {
        h: h.clone(),
        w: w.clone(),
        targets: targets.to_vec(),
        temperature,
        stats,
        logits: std::sync::Mutex::new(logits),
    };
    Ok(Tensor::from_op(out, &[2, n], grad_fn(back)))
}

struct LogprobBack {
    h: Tensor,
    w: Tensor,
    targets: Vec<u32>,
    temperature: f32,
    stats: Vec<cpu::RowStats>,
    /// Forward logits kept for a small batch; taken by the first backward.
    logits: std::sync::Mutex<Option<Vec<f32>>>,
}

impl GradFn for LogprobBack {
    fn name(&self) -> &'static str {
        "linear_logprob_entropy"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.h.clone(), self.w.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let n = self.targets.len();
        let gv = g.f32s()?;
        let (dh, dw) = cpu::backward(
            self.h.f32s()?,
            self.w.f32s()?,
            &self.targets,
            self.temperature,
            &self.stats,
            &gv[..n],
            &gv[n..],
            self.w.tracks_grad(),
            self.logits.lock().unwrap().take(),
        );
        Ok(vec![
            Some(Tensor::from_vec(dh, self.h.shape())?),
            dw.map(|d| Tensor::from_vec(d, self.w.shape())).transpose()?,
        ])
    }
}
