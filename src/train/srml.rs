//! SRML (SPEC §4): `L = α·L_think + (1−α)·L_result` over the completion tokens, built as
//! constant per-token weights on the log-probabilities of `Model::token_logprobs`.
//!
//! Segments: think = the first `think_len` completion tokens (`<think>` through the token that
//! completes `</think>`, however many tokens the marker takes); result = every completion token
//! after them (end-of-turn included). `think_len` 0: all result.
//! Prompt tokens never carry loss. When a whole batch has no token of one segment, the loss is
//! the other segment's alone (α effectively 0 or 1).

use std::ops::Range;

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};

use crate::model::Batch;
use crate::ops;
use crate::tensor::Tensor;

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LossKind {
    Srml,
    Plain,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AlphaMode {
    Fixed,
    Learnable,
    LossRatio,
}

#[derive(Clone, Copy, Debug)]
pub struct LossConfig {
    pub kind: LossKind,
    pub alpha_mode: AlphaMode,
    /// Segment means over all tokens of the batch instead of per sequence then over sequences.
    pub pooled: bool,
}

/// Rows of the packed `[2, N]` log-prob tensor that predict each segment's tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spans {
    pub think: Range<usize>,
    pub result: Range<usize>,
}

/// Segments of every sequence of `batch`, whose first `prompt_lens[i]` tokens are the prompt and
/// whose next `think_lens[i]` tokens are the think segment.
pub fn spans(batch: &Batch, prompt_lens: &[usize], think_lens: &[usize]) -> Result<Vec<Spans>> {
    ensure!(
        prompt_lens.len() == batch.seqs.len() && think_lens.len() == batch.seqs.len(),
        "{} prompt lengths and {} think lengths for {} sequences",
        prompt_lens.len(),
        think_lens.len(),
        batch.seqs.len()
    );
    let mut out = Vec::with_capacity(prompt_lens.len());
    for ((&(s, l), &pl), &tl) in batch.seqs.iter().zip(prompt_lens).zip(think_lens) {
        ensure!(pl >= 1 && pl <= l, "prompt of {pl} tokens in a sequence of {l}");
        ensure!(pl + tl <= l, "think segment of {tl} tokens after a prompt of {pl} in a sequence of {l}");
        // Token j is predicted by row j − 1.
        let (c0, end) = (s + pl, s + l);
        out.push(Spans { think: c0 - 1..c0 - 1 + tl, result: c0 - 1 + tl..end - 1 });
    }
    Ok(out)
}

/// Think lengths when one token id closes the think segment (a tokenizer with `</think>` as a
/// single token): the completion up to and including its first occurrence; 0 without one.
pub fn think_lens_by_token(batch: &Batch, prompt_lens: &[usize], think_end: u32) -> Vec<usize> {
    batch
        .seqs
        .iter()
        .zip(prompt_lens)
        .map(|(&(s, l), &pl)| {
            let c0 = s + pl.min(l);
            (c0..s + l).find(|&j| batch.ids[j] == think_end).map_or(0, |j| j + 1 - c0)
        })
        .collect()
}

/// Per-row weights `w` with `L_seg = Σ w[r]·(−log p[r])` for the think and result segments.
pub fn segment_weights(spans: &[Spans], n_rows: usize, pooled: bool) -> (Vec<f32>, Vec<f32>) {
    let mut wt = vec![0.0f32; n_rows];
    let mut wr = vec![0.0f32; n_rows];
    for (w, seg) in [(&mut wt, 0), (&mut wr, 1)] {
        let pick = |s: &Spans| if seg == 0 { s.think.clone() } else { s.result.clone() };
        let total: usize = spans.iter().map(|s| pick(s).len()).sum();
        let nonempty = spans.iter().filter(|s| !pick(s).is_empty()).count();
        for s in spans {
            let r = pick(s);
            if r.is_empty() {
                continue;
            }
            let v = if pooled { 1.0 / total as f32 } else { 1.0 / (nonempty as f32 * r.len() as f32) };
            w[r].fill(v);
        }
    }
    (wt, wr)
}

#[derive(Debug)]
pub struct LossOut {
    /// The scalar to differentiate.
    pub loss: Tensor,
    pub l_think: f32,
    pub l_result: f32,
    /// The α used (for `plain`: the think share of the completion tokens, its effective α).
    pub alpha: f32,
    /// ∂L/∂α (learnable mode trains α = sigmoid(a) with it); 0 when the batch lacks one of
    /// the segments (α is then not in the loss) and for `plain`.
    pub dl_dalpha: f32,
}

/// The loss on log-probs `lp` (`[2, N]`, row 0 used). `alpha` is the fixed or current
/// learnable α; `loss-ratio` computes its own from the batch.
pub fn loss(lp: &Tensor, spans: &[Spans], cfg: &LossConfig, alpha: f32) -> Result<LossOut> {
    ensure!(lp.dims() == 2 && lp.dim(0) == 2, "SRML needs [2, N] log-probs, got {:?}", lp.shape());
    let n = lp.dim(1);
    let vals = lp.host_f32()?;
    let (wt, wr) = segment_weights(spans, n, cfg.pooled);
    let seg = |w: &[f32]| -> f32 {
        w.iter().zip(&vals[..n]).map(|(&w, &x)| -(w as f64) * x as f64).sum::<f64>() as f32
    };
    let (l_think, l_result) = (seg(&wt), seg(&wr));
    let n_think: usize = spans.iter().map(|s| s.think.len()).sum();
    let n_result: usize = spans.iter().map(|s| s.result.len()).sum();
    ensure!(n_think + n_result > 0, "batch has no completion tokens");
    let mut w = vec![0.0f32; 2 * n];
    let alpha_used = match cfg.kind {
        LossKind::Plain => {
            let inv = 1.0 / (n_think + n_result) as f32;
            for s in spans {
                w[s.think.start..s.result.end].fill(-inv);
            }
            n_think as f32 * inv
        }
        LossKind::Srml => {
            let a = match cfg.alpha_mode {
                AlphaMode::Fixed | AlphaMode::Learnable => alpha,
                AlphaMode::LossRatio => {
                    let s = l_think + l_result;
                    if s > 0.0 && s.is_finite() {
                        l_result / s
                    } else {
                        0.5
                    }
                }
            };
            let a = if n_think == 0 {
                0.0
            } else if n_result == 0 {
                1.0
            } else {
                a
            };
            for r in 0..n {
                w[r] = -(a * wt[r] + (1.0 - a) * wr[r]);
            }
            a
        }
    };
    let loss = ops::weighted_sum(lp, &w)?;
    // α only enters the loss when both segments are present (else it is forced to 0 or 1 above),
    // so a batch without one of them gives α no gradient.
    let dl_dalpha =
        if cfg.kind == LossKind::Srml && n_think > 0 && n_result > 0 { l_think - l_result } else { 0.0 };
    Ok(LossOut { loss, l_think, l_result, alpha: alpha_used, dl_dalpha })
}

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

pub fn logit(p: f32) -> f32 {
    (p / (1.0 - p)).ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spans with the think segment closed by token 9.
    fn spans9(b: &Batch, pl: &[usize]) -> Vec<Spans> {
        spans(b, pl, &think_lens_by_token(b, pl, 9)).unwrap()
    }

    fn setup() -> (Batch, Vec<usize>, Tensor) {
        // Token 9 is </think>. Seq 0: prompt [1,2], completion [8,5,9,6,7]. Seq 1: prompt [1],
        // completion [4,4] (no </think>: all result).
        let batch = Batch::from_sequences(&[vec![1u32, 2, 8, 5, 9, 6, 7], vec![1, 4, 4]]);
        let n = batch.ids.len();
        let lp: Vec<f32> = (0..n).map(|i| -0.1 * (i as f32 + 1.0)).chain((0..n).map(|_| 0.5)).collect();
        (batch, vec![2, 1], Tensor::from_vec(lp, &[2, n]).unwrap())
    }

    #[test]
    fn spans_cover_completion_only() {
        let (b, pl, _) = setup();
        let s = spans9(&b, &pl);
        // Completion token j is predicted by row j-1: seq 0 tokens 2..7 -> rows 1..6.
        assert_eq!(s[0], Spans { think: 1..4, result: 4..6 });
        assert_eq!(s[1], Spans { think: 7..7, result: 7..9 });
        assert_eq!(think_lens_by_token(&b, &pl, 9), vec![3, 0]);
        // Explicit lengths give the same spans; one past the sequence is an error.
        assert_eq!(spans(&b, &pl, &[3, 0]).unwrap(), s);
        assert!(spans(&b, &pl, &[6, 0]).is_err());
    }

    #[test]
    fn srml_matches_direct_computation() {
        let (b, pl, lp) = setup();
        let s = spans9(&b, &pl);
        let nll: Vec<f32> = lp.to_vec()[..10].iter().map(|x| -x).collect();
        let mean = |r: Range<usize>| nll[r.clone()].iter().sum::<f32>() / r.len() as f32;
        // Per sequence: think only in seq 0; result mean over both sequences.
        let lt = mean(1..4);
        let lr = (mean(4..6) + mean(7..9)) / 2.0;
        let cfg = LossConfig { kind: LossKind::Srml, alpha_mode: AlphaMode::Fixed, pooled: false };
        let out = loss(&lp, &s, &cfg, 0.7).unwrap();
        assert!((out.l_think - lt).abs() < 1e-6 && (out.l_result - lr).abs() < 1e-6);
        assert!((out.loss.to_scalar().unwrap() - (0.7 * lt + 0.3 * lr)).abs() < 1e-6);
        // Gradient = the weights: prompt rows and sequence-end rows get none.
        let g = out.loss.detach().requires_grad();
        let lp2 = lp.detach().requires_grad();
        let o2 = loss(&lp2, &s, &cfg, 0.7).unwrap();
        let grads = o2.loss.backward().unwrap();
        let gv = grads.get(&lp2).unwrap().to_vec();
        drop(g);
        assert_eq!(gv[0], 0.0);
        assert_eq!(gv[6], 0.0);
        assert!((gv[1] + 0.7 / 3.0).abs() < 1e-6);
        assert!((gv[4] + 0.3 / 2.0 / 2.0).abs() < 1e-6);
        assert!(gv[10..].iter().all(|&x| x == 0.0));
        // Pooled.
        let cfg = LossConfig { pooled: true, ..cfg };
        let out = loss(&lp, &s, &cfg, 0.7).unwrap();
        let lr_pooled = (nll[4] + nll[5] + nll[7] + nll[8]) / 4.0;
        assert!((out.l_result - lr_pooled).abs() < 1e-6);
        // Loss ratio: α = L_r / (L_t + L_r).
        let cfg = LossConfig { alpha_mode: AlphaMode::LossRatio, pooled: false, ..cfg };
        let out = loss(&lp, &s, &cfg, 0.7).unwrap();
        let a = lr / (lt + lr);
        assert!((out.alpha - a).abs() < 1e-6);
        assert!((out.loss.to_scalar().unwrap() - (a * lt + (1.0 - a) * lr)).abs() < 1e-5);
        assert!((out.dl_dalpha - (lt - lr)).abs() < 1e-6);
    }

    #[test]
    fn alpha_has_no_gradient_without_a_think_segment() {
        // Only seq 1 (no </think>): the loss is L_result alone, whatever α is.
        let batch = Batch::from_sequences(&[vec![1u32, 4, 4]]);
        let lp = Tensor::from_vec(vec![-0.3, -0.7, -0.2, 0.5, 0.5, 0.5], &[2, 3]).unwrap();
        let s = spans9(&batch, &[1]);
        let cfg = LossConfig { kind: LossKind::Srml, alpha_mode: AlphaMode::Learnable, pooled: false };
        let (a, b) = (loss(&lp, &s, &cfg, 0.2).unwrap(), loss(&lp, &s, &cfg, 0.9).unwrap());
        assert_eq!(a.loss.to_scalar().unwrap(), b.loss.to_scalar().unwrap());
        assert_eq!(a.alpha, 0.0);
        assert_eq!(a.dl_dalpha, 0.0);
    }

    #[test]
    fn plain_is_mean_over_completion_tokens() {
        let (b, pl, lp) = setup();
        let s = spans9(&b, &pl);
        let v = lp.to_vec();
        let rows = [1, 2, 3, 4, 5, 7, 8];
        let direct = -rows.iter().map(|&r| v[r]).sum::<f32>() / rows.len() as f32;
        let cfg = LossConfig { kind: LossKind::Plain, alpha_mode: AlphaMode::Fixed, pooled: false };
        let out = loss(&lp, &s, &cfg, 0.7).unwrap();
        assert!((out.loss.to_scalar().unwrap() - direct).abs() < 1e-6);
        assert!((out.alpha - 3.0 / 7.0).abs() < 1e-6);
    }
}
