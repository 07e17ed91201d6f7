//! Copy heads for a fresh tiny model: a previous-token head in layer 0 and an induction head
//! in layer 1, set by construction instead of learnt.
//!
//! Copying a value the model has never seen (`city='Brivinkel'` from "… to Brivinkel …")
//! takes an induction head: find the earlier occurrence of the current token and predict what
//! followed it. Pre-trained checkpoints have such heads; a ~1M-parameter model trained from
//! random weights on a 2-core CPU does not form one (docs/induction-probe.md: no phase change
//! within 8,325 steps in fcgpu or PyTorch). So the embedded model starts with the circuit in
//! place, the way a fine-tuning user's checkpoint would; every weight stays trainable, and
//! whether and where to copy is still learnt from the task.
//!
//! The layout (h = hidden size, d = head dim, one head per KV group is wired):
//! - Token embeddings live in the first h/2 dimensions of the residual stream; the second half
//!   is where layer 0 writes the previous token.
//! - Layer 0, KV head j: query and key are constant biases (no content) on the fastest rotary
//!   pairs, chosen so that after RoPE the score peaks at the key one position back; the value
//!   copies embedding dimensions [j·d, (j+1)·d) and the output writes them to h/2 + j·d.
//! - Layer 1, KV head j: the query reads the current token's dimensions [j·d, (j+1)·d), the key
//!   reads the previous-token copy of the same dimensions, both on the slowest rotary pairs
//!   (nearly position-free over the task's prompt lengths), so the score is large where the
//!   token before the key equals the current token; the value copies that key position's own
//!   token and the output adds it to the embedding half, where the tied LM head reads it.
//! - The MLPs of layers 0 and 1 start at zero output so they do not blur the two halves.

use anyhow::{ensure, Result};

use crate::model::Model;

/// Standard deviation of the embedding entries (in the first half): an embedding's norm is
/// then about 1, so the tied LM head gives a copied token a clear lead.
const EMBED_STD: f32 = 0.125;
/// Score scale of the previous-token head: softmax all but one-hot at offset 1.
const PREV_SCALE: f32 = 12.0;
/// Score scale of the induction head's token match.
const MATCH_SCALE: f32 = 3.0;
/// Output weight of the induction head. The copied token arrives RMS-normalised (norm about
/// √(h/2) ≈ 8 at h = 128), so this writes it at several times the current token's own
/// embedding and the LM head predicts it. Measured on the embedded task (400 SRML steps × 8,
/// seed 0, 100 held-out prompts): weight 0.35 / 0.7 / 1.4 / 2.12 gave 9% / 13% / 9% / 6%
/// held-out call accuracy; larger weights make greedy decoding loop on its own output.
const COPY_OUT: f32 = 0.7;
/// A rotary pair is "fast" (usable for the previous-token offset) above this many radians per
/// position, and "slow" (position-free for the match) when it turns less than
/// `SLOW_TURN` radians over `SLOW_SPAN` positions.
const FAST_RAD: f64 = 0.05;
const SLOW_SPAN: f64 = 512.0;
const SLOW_TURN: f64 = 0.3;
/// RoPE θ of a model with copy heads: large, so that most rotary pairs are slow.
pub const ROPE_THETA: f64 = 1e9;

/// Whether a model of this shape can take copy heads: two layers or more, and the KV heads'
/// value dimensions exactly cover half the hidden size.
pub fn fits(hidden: usize, layers: usize, heads: usize, kv_heads: usize) -> bool {
    let d = hidden / heads.max(1);
    layers >= 2 && heads % kv_heads.max(1) == 0 && kv_heads * d * 2 == hidden && d % 2 == 0
}

/// Rotary pair frequencies of head dim `d` (pair k turns dims k and k + d/2).
fn inv_freq(d: usize, theta: f64) -> Vec<f64> {
    (0..d / 2).map(|k| theta.powf(-2.0 * k as f64 / d as f64)).collect()
}

/// Sets the copy heads into `model` (fresh weights; see the module comment).
pub fn wire(model: &mut Model) -> Result<()> {
    let c = &model.config;
    let (h, nh, nkv, d) = (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim);
    ensure!(
        fits(h, c.num_layers, nh, nkv) && d * nh == h,
        "copy heads need ≥ 2 layers and kv_heads·head_dim = hidden/2"
    );
    let group = nh / nkv;
    let inv = inv_freq(d, c.rope_theta);
    let fast: Vec<usize> = (0..d / 2).filter(|&k| inv[k] > FAST_RAD).collect();
    let slow: Vec<usize> = (0..d / 2).filter(|&k| inv[k] * SLOW_SPAN < SLOW_TURN).collect();
    ensure!(
        !fast.is_empty() && slow.len() >= 4,
        "rope_theta {} leaves too few fast or slow rotary pairs",
        c.rope_theta
    );
    let slow_dims: Vec<usize> = slow.iter().copied().chain(slow.iter().map(|k| k + d / 2)).collect();
    // RMSNorm scales the residual to norm √h; the copies are brought back to embedding size.
    let unit = 1.0 / (h as f32).sqrt();
    let mut first_err = None;
    model.visit_mut(&mut |name, t| {
        let r = set_param(
            name,
            t,
            &Layout { h, d, nkv, group, fast: &fast, slow_dims: &slow_dims, inv: &inv, unit },
        );
        if let Err(e) = r {
            first_err.get_or_insert(e);
        }
    });
    first_err.map_or(Ok(()), Err)
}

struct Layout<'a> {
    h: usize,
    d: usize,
    nkv: usize,
    group: usize,
    fast: &'a [usize],
    slow_dims: &'a [usize],
    inv: &'a [f64],
    unit: f32,
}

/// Parameters of layers 0 and 1 that are set from zero (the rest keep their random draw).
const WIRED: [&str; 8] = [
    "self_attn.q_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.weight",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.o_proj.weight",
    "mlp.down_proj.weight",
];

/// The wired value of one parameter (others are left as they are).
fn set_param(name: &str, t: &mut crate::tensor::Tensor, l: &Layout) -> Result<()> {
    let (h, d) = (l.h, l.d);
    let mut v = t.to_vec();
    // Weights are [out, in]; biases [out] (one column).
    let cols = if t.shape().len() == 2 { t.shape()[1] } else { 1 };
    if matches!(name, "model.embed_tokens.weight" | "lm_head.weight") {
        // Keep the random draw's shape, rescaled, in the first half; zero the second.
        for (i, x) in v.iter_mut().enumerate() {
            *x = if i % cols < h / 2 { *x / 0.02 * EMBED_STD } else { 0.0 };
        }
        return t.replace_data(v);
    }
    let layer1 = name.starts_with("model.layers.1.");
    if !(layer1 || name.starts_with("model.layers.0.")) {
        return Ok(());
    }
    let part = &name["model.layers.0.".len()..];
    if !WIRED.contains(&part) {
        return Ok(());
    }
    v.iter_mut().for_each(|x| *x = 0.0);
    let mut put = |row: usize, col: usize, x: f32| v[row * cols + col] = x;
    for j in 0..l.nkv {
        let (q, src, dst) = ((j * l.group) * d, j * d, h / 2 + j * d);
        match (layer1, part) {
            (false, "self_attn.q_proj.bias") => l.fast.iter().for_each(|&k| put(q + k, 0, PREV_SCALE)),
            (false, "self_attn.k_proj.bias") => l.fast.iter().for_each(|&k| {
                // Score cos(θ·(j − i) + θ) peaks at j = i − 1.
                put(j * d + k, 0, l.inv[k].cos() as f32);
                put(j * d + k + d / 2, 0, l.inv[k].sin() as f32);
            }),
            (_, "self_attn.v_proj.weight") => (0..d).for_each(|i| put(j * d + i, src + i, 1.0)),
            (false, "self_attn.o_proj.weight") => (0..d).for_each(|i| put(dst + i, q + i, l.unit)),
            (true, "self_attn.q_proj.weight") => {
                l.slow_dims.iter().enumerate().for_each(|(i, &s)| put(q + s, src + i, MATCH_SCALE))
            }
            (true, "self_attn.k_proj.weight") => {
                l.slow_dims.iter().enumerate().for_each(|(i, &s)| put(j * d + s, dst + i, 1.0))
            }
            (true, "self_attn.o_proj.weight") => (0..d).for_each(|i| put(src + i, q + i, COPY_OUT)),
            _ => {}
        }
    }
    t.replace_data(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Batch, ModelConfig};
    use crate::train::probe::splitmix64;
    use crate::train::tiny::{self, TinySize};

    /// `noise M s noise M s` with a random marker, string and noise lengths (the offset of the
    /// copy varies, so only an induction head predicts the second `s`), and where `s` starts
    /// the second time.
    fn varied_copy(seed: u64, vocab: u64) -> (Vec<u32>, usize, usize) {
        let mut x = seed;
        let mut next = |m: u64| {
            x = splitmix64(x);
            x % m
        };
        let (len, gap1, gap2) = (4 + next(20), next(40), next(40));
        let mut toks = (0..1 + len + gap1 + gap2).map(|_| 3 + next(vocab - 3) as u32);
        let m = toks.next().unwrap_or(3);
        let s: Vec<u32> = toks.by_ref().take(len as usize).collect();
        let mut v: Vec<u32> = toks.by_ref().take(gap1 as usize).collect();
        v.push(m);
        v.extend(&s);
        v.extend(toks);
        v.push(m);
        let start = v.len();
        v.extend(&s);
        (v, start, s.len())
    }

    /// Mean log p of the second copy's tokens over 16 sequences.
    fn copy_logprob(model: &Model) -> f32 {
        let seqs: Vec<(Vec<u32>, usize, usize)> = (0..16).map(|i| varied_copy(i, 1536)).collect();
        let batch = Batch::from_sequences(&seqs.iter().map(|s| s.0.clone()).collect::<Vec<_>>());
        let lp = model.token_logprobs(&batch, 1.0).unwrap().to_vec();
        let (mut sum, mut n) = (0.0, 0);
        for (k, &(off, _)) in batch.seqs.iter().enumerate() {
            let (_, start, len) = seqs[k];
            // Row p predicts token p + 1.
            for p in start - 1..start + len - 1 {
                sum += lp[off + p];
                n += 1;
            }
        }
        sum / n as f32
    }

    fn fresh(theta: f64) -> Model {
        let mut raw = tiny::config_json(TinySize::TINY, 1536, 0, 1);
        raw["rope_theta"] = theta.into();
        Model::init_random(ModelConfig::from_json(raw, std::path::Path::new("<test>")).unwrap(), 0).unwrap()
    }

    #[test]
    fn wired_heads_copy_strings_at_varied_offsets_from_the_start() {
        let plain = copy_logprob(&fresh(ROPE_THETA));
        let mut wired = fresh(ROPE_THETA);
        wire(&mut wired).unwrap();
        let copied = copy_logprob(&wired);
        // Uniform over 1,536 tokens is ln 1536 ≈ 7.3 nats; the wired model is near certain.
        assert!(plain < -7.0, "random init: {plain}");
        assert!(copied > -1.0, "wired: {copied}");
    }

    #[test]
    fn shapes_without_room_for_the_heads_are_refused() {
        for t in [TinySize::TINY, TinySize::SMALL] {
            assert!(fits(t.hidden, t.layers, t.heads, t.kv_heads), "{t:?}");
        }
        let m = TinySize::MICRO;
        assert!(!fits(m.hidden, m.layers, m.heads, m.kv_heads) && !fits(192, 4, 6, 2));
        let mut m = fresh(10000.0);
        assert!(wire(&mut m).is_err(), "θ = 10⁴ leaves no slow rotary pairs for the match");
    }
}
