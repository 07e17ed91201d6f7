//! Next-token sampling from one row of logits: greedy, temperature, top-k, top-p.
//!
//! Order as in transformers' `generate`: temperature, then top-k, then top-p on what top-k left
//! (renormalised). Every draw also reports the token's log-probability and the entropy of the
//! *full* distribution softmax(z / T), before any truncation — what GRPO's old-policy pass and
//! entropy bonus use (SPEC §3) — so a rollout needs no second forward pass. Greedy (T = 0)
//! reports them at T = 1.

use rand::Rng;

use crate::ops::logprob::cpu::row_stats;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplerParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 = off.
    pub top_p: f32,
    /// Keep the k most likely tokens; 0 = off.
    pub top_k: usize,
}

impl Default for SamplerParams {
    fn default() -> Self {
        SamplerParams { temperature: 1.0, top_p: 1.0, top_k: 0 }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Draw {
    pub token: u32,
    /// log softmax(z / T)[token] (T = 1 for greedy), before truncation.
    pub logprob: f32,
    /// Entropy of softmax(z / T) over the whole vocabulary, before truncation.
    pub entropy: f32,
}

/// Index of the largest logit (the first of ties, as `torch.argmax`). NaN is never chosen.
pub fn argmax(z: &[f32]) -> usize {
    let mut best = 0;
    let mut bv = f32::NEG_INFINITY;
    for (i, &x) in z.iter().enumerate() {
        if x > bv {
            bv = x;
            best = i;
        }
    }
    best
}

/// Unnormalised probabilities `w_i = exp(z_i/T − max/T)` (f32) into `w`, with the sums
/// `(max/T, Σw, Σw·(z/T − max/T))` accumulated in f64 as `row_stats` does.
fn weights(z: &[f32], inv_t: f32, w: &mut Vec<f32>) -> (f32, f64, f64) {
    let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max) * inv_t;
    w.clear();
    w.reserve(z.len());
    let (mut s, mut t) = (0.0f64, 0.0f64);
    for &x in z {
        let d = x * inv_t - m;
        let e = d.exp();
        w.push(e);
        s += e as f64;
        t += (e * d) as f64;
    }
    (m, s, t)
}

/// The truncated, renormalised sampling distribution as (token, probability) pairs, most likely
/// first (ties by token id). Exposed for tests.
pub fn truncated_distribution(z: &[f32], p: &SamplerParams) -> Vec<(u32, f64)> {
    let mut w = Vec::new();
    let (_, total, _) = weights(z, 1.0 / p.temperature, &mut w);
    truncate(&w, total, p)
}

/// Top-k then top-p over weights `w` (summing to `total`).
fn truncate(w: &[f32], total: f64, p: &SamplerParams) -> Vec<(u32, f64)> {
    let vocab = w.len();
    let mut cand: Vec<u32> = (0..vocab as u32).collect();
    let by_prob = |a: &u32, b: &u32| w[*b as usize].total_cmp(&w[*a as usize]).then(a.cmp(b));
    if p.top_k > 0 && p.top_k < vocab {
        cand.select_nth_unstable_by(p.top_k - 1, by_prob);
        cand.truncate(p.top_k);
    } else if p.top_p < 1.0 {
        // Only tokens above a tiny relative probability can be in the nucleus when those tokens
        // already hold top_p of the mass (the nucleus is a most-likely-first prefix): avoids
        // sorting the whole vocabulary.
        let thr = (1e-7 * total) as f32;
        let big: Vec<u32> = cand.iter().copied().filter(|&i| w[i as usize] >= thr).collect();
        let mass: f64 = big.iter().map(|&i| w[i as usize] as f64).sum();
        if mass >= p.top_p as f64 * total {
            cand = big;
        }
    }
    cand.sort_unstable_by(by_prob);
    let mass: f64 = cand.iter().map(|&i| w[i as usize] as f64).sum();
    if p.top_p < 1.0 {
        // Keep a token while the mass before it is below top_p (transformers' TopPLogitsWarper
        // drops tokens whose ascending cumulative mass is ≤ 1 − top_p); at least one is kept.
        let mut before = 0.0f64;
        let mut keep = 0;
        for &i in &cand {
            if keep > 0 && before >= p.top_p as f64 * mass {
                break;
            }
            before += w[i as usize] as f64;
            keep += 1;
        }
        cand.truncate(keep);
    }
    let kept: f64 = cand.iter().map(|&i| w[i as usize] as f64).sum();
    cand.into_iter().map(|i| (i, w[i as usize] as f64 / kept)).collect()
}

/// Draws the next token from logits `z`.
pub fn sample<R: Rng + ?Sized>(z: &[f32], p: &SamplerParams, rng: &mut R) -> Draw {
    if p.temperature <= 0.0 {
        let token = argmax(z);
        let st = row_stats(z, token, 1.0);
        return Draw { token: token as u32, logprob: st.logp, entropy: st.entropy };
    }
    let inv_t = 1.0 / p.temperature;
    let mut w = Vec::new();
    let (m, s, t) = weights(z, inv_t, &mut w);
    let token = if p.top_p >= 1.0 && (p.top_k == 0 || p.top_k >= z.len()) {
        // Untruncated: inverse CDF in one pass over the weights, no sort.
        let u = rng.random::<f64>() * s;
        let mut acc = 0.0f64;
        let mut pick = argmax(z);
        for (i, &e) in w.iter().enumerate() {
            if e > 0.0 {
                acc += e as f64;
                pick = i;
                if acc > u {
                    break;
                }
            }
        }
        pick
    } else {
        let dist = truncate(&w, s, p);
        let u = rng.random::<f64>();
        let mut acc = 0.0;
        let mut pick = dist[dist.len() - 1].0;
        for &(i, q) in &dist {
            acc += q;
            if acc > u {
                pick = i;
                break;
            }
        }
        pick as usize
    };
    let log_s = s.ln();
    let logprob = ((z[token] * inv_t - m) as f64 - log_s) as f32;
    Draw { token: token as u32, logprob, entropy: (log_s - t / s) as f32 }
}
