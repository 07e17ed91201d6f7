//! Next-token sampling from one row of logits: greedy, temperature, top-k, top-p.
//!
//! Order as in transformers' `generate`: temperature, then top-k, then top-p on what top-k left
//! (renormalised). Every draw also reports the token's log-probability and the entropy of the
//! *full* distribution softmax(z / T), before any truncation — what GRPO's old-policy pass and
//! entropy bonus use (SPEC §3) — so a rollout needs no second forward pass. Greedy (T = 0)
//! reports them at T = 1.
//!
//! Rows that are not a distribution: NaN logits count as −inf (never drawn, no mass), and a row
//! whose maximum is not finite (every logit −inf or NaN, or a +inf among them) draws token 0
//! with log-prob and entropy NaN ([`invalid_row`]) — the device sampler's rule too
//! (kernels/sample.cu), so such a row is visible downstream instead of a garbage token.

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

/// The draw of a row without a distribution (see the module doc).
pub fn invalid_row() -> Draw {
    Draw { token: 0, logprob: f32::NAN, entropy: f32::NAN }
}

/// Whether row `z` has no finite maximum (ignoring NaN): every logit −inf or NaN, or a +inf.
fn no_distribution(z: &[f32]) -> bool {
    !z.iter().copied().fold(f32::NEG_INFINITY, f32::max).is_finite()
}

/// Unnormalised probabilities `w_i = exp(z_i/T − max/T)` (f32; 0 for −inf and NaN logits) into
/// `w`, with the sums `(max/T, Σw, Σw·(z/T − max/T))` accumulated in f64 as `row_stats` does.
fn weights(z: &[f32], inv_t: f32, w: &mut Vec<f32>) -> (f32, f64, f64) {
    let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max) * inv_t;
    w.clear();
    w.reserve(z.len());
    let (mut s, mut t) = (0.0f64, 0.0f64);
    for &x in z {
        let d = x * inv_t - m;
        let e = if d.is_nan() { 0.0 } else { d.exp() };
        w.push(e);
        s += e as f64;
        // 0·(−inf) would be NaN: a masked logit adds nothing.
        if e > 0.0 {
            t += (e * d) as f64;
        }
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
    if no_distribution(z) {
        return invalid_row();
    }
    if p.temperature <= 0.0 {
        let token = argmax(z);
        if z.iter().any(|x| !x.is_finite()) {
            // row_stats would spread a NaN, and 0·(−inf) of a masked logit is NaN there: the
            // stats with NaN as −inf and masked logits adding nothing.
            let mut w = Vec::new();
            let (m, s, t) = weights(z, 1.0, &mut w);
            let log_s = s.ln();
            return Draw {
                token: token as u32,
                logprob: ((z[token] - m) as f64 - log_s) as f32,
                entropy: (log_s - t / s) as f32,
            };
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn params(temperature: f32, top_p: f32, top_k: usize) -> [SamplerParams; 1] {
        [SamplerParams { temperature, top_p, top_k }]
    }

    /// A row of all −inf, all NaN, or with a +inf has no distribution: token 0, NaN stats, for
    /// every setting (greedy, plain, top-k, top-p).
    #[test]
    fn rows_without_a_distribution_draw_token_0_with_nan_stats() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let rows = [
            vec![f32::NEG_INFINITY; 7],
            vec![f32::NAN; 7],
            vec![0.0, f32::INFINITY, 1.0],
            vec![f32::NAN, f32::NEG_INFINITY],
        ];
        for z in &rows {
            for p in [params(0.0, 1.0, 0), params(1.0, 1.0, 0), params(0.7, 0.9, 0), params(1.0, 1.0, 2)] {
                let d = sample(z, &p[0], &mut rng);
                assert_eq!(d.token, 0, "{z:?} {p:?}");
                assert!(d.logprob.is_nan() && d.entropy.is_nan(), "{z:?} {p:?}: {d:?}");
            }
        }
    }

    /// NaN logits count as −inf: never drawn, no mass; a masked (−inf) logit leaves the entropy
    /// finite.
    #[test]
    fn nan_logits_are_never_drawn_and_masked_logits_keep_the_entropy_finite() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        let z = [f32::NAN, 1.0, f32::NEG_INFINITY, 0.5, f32::NAN];
        for p in [params(0.0, 1.0, 0), params(1.0, 1.0, 0), params(1.0, 0.8, 0), params(2.0, 1.0, 1)] {
            for _ in 0..50 {
                let d = sample(&z, &p[0], &mut rng);
                assert!(d.token == 1 || d.token == 3, "{p:?}: {d:?}");
                assert!(d.logprob.is_finite() && d.entropy.is_finite(), "{p:?}: {d:?}");
            }
        }
        let d = sample(&z, &params(1.0, 1.0, 0)[0], &mut rng);
        let h = {
            let (a, b) = (1.0f64.exp(), 0.5f64.exp());
            let (pa, pb) = (a / (a + b), b / (a + b));
            -(pa * pa.ln() + pb * pb.ln())
        };
        assert!((d.entropy as f64 - h).abs() < 1e-6, "{} vs {h}", d.entropy);
    }
}
