//! Incremental forward over a KV cache, on plain f32 slices (no autograd).
//!
//! One call advances a set of sequences at once: each [`Step`] feeds some new tokens of one
//! sequence (a whole prompt for a prefill, one token when decoding) after what its cache holds.
//! The projections and the MLP of every new token of every sequence go through one gemm per
//! weight (decode is matrix-matrix over the live batch); attention runs per (sequence, KV head)
//! in parallel, against the cached keys of that sequence (shared prompt prefix + own tokens).

use anyhow::{ensure, Result};
use rayon::prelude::*;

use super::kv_cache::{KvShape, SeqCache};
use super::{Linear, Model};
use crate::ops::attention::cpu::masked_softmax_rows;
use crate::ops::matmul::cpu::{gemm, gemm_strided, Mat};
use crate::ops::{rms_norm, rope, swiglu, SendPtr};

/// New tokens of one sequence, to run after what `cache` holds.
pub struct Step<'a> {
    pub cache: &'a mut SeqCache,
    pub tokens: &'a [u32],
}

/// Query rows per attention task in a prefill (bounds the score tile to `BQ × context`).
const BQ: usize = 64;

fn linear(x: &[f32], rows: usize, lin: &Linear) -> Result<Vec<f32>> {
    let w = lin.weight.f32s()?;
    let (out_f, in_f) = (lin.weight.dim(0), lin.weight.dim(1));
    let mut y = vec![0.0f32; rows * out_f];
    if let Some(b) = &lin.bias {
        let b = b.f32s()?;
        for r in y.chunks_exact_mut(out_f) {
            r.copy_from_slice(b);
        }
    }
    gemm(Mat::new(x, rows, in_f), Mat::new(w, out_f, in_f).t(), &mut y, lin.bias.is_some());
    Ok(y)
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    x.par_chunks_mut(4096)
        .zip(y.par_chunks(4096))
        .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
}

/// One attention task: `rows` query rows against a sequence's keys.
#[derive(Clone, Copy)]
struct Task {
    entry: usize,
    kvh: usize,
    /// Query head (prefill) or `usize::MAX` for the whole GQA group of one decode token.
    head: usize,
    /// First query token (relative to the entry) and count.
    t0: usize,
    rows: usize,
}

impl Model {
    /// The cache layout this model needs.
    pub fn kv_shape(&self) -> KvShape {
        KvShape {
            layers: self.config.num_layers,
            kv_heads: self.config.num_kv_heads,
            head_dim: self.config.head_dim,
            device: self.device(),
        }
    }

    /// Runs the new tokens of every step after its cache, appends their keys and values to the
    /// cache, and returns the logits `[steps, vocab]` of each step's last token.
    pub fn forward_cached(&self, steps: &mut [Step]) -> Result<Vec<f32>> {
        if self.device().is_gpu() {
            return self.forward_cached_gpu(steps, true);
        }
        let h = self.final_hidden_cached(steps, true)?;
        let c = &self.config;
        let e = steps.len();
        let mut logits = vec![0.0f32; e * c.vocab_size];
        gemm(
            Mat::new(&h, e, c.hidden_size),
            Mat::new(self.lm_head_weight().f32s()?, c.vocab_size, c.hidden_size).t(),
            &mut logits,
            false,
        );
        Ok(logits)
    }

    /// Like [`Model::forward_cached`], but the logits of every new token `[tokens, vocab]`
    /// (tests compare them with the full forward).
    pub fn forward_cached_all(&self, steps: &mut [Step]) -> Result<Vec<f32>> {
        if self.device().is_gpu() {
            return self.forward_cached_gpu(steps, false);
        }
        let h = self.final_hidden_cached(steps, false)?;
        let c = &self.config;
        let n = h.len() / c.hidden_size;
        let mut logits = vec![0.0f32; n * c.vocab_size];
        gemm(
            Mat::new(&h, n, c.hidden_size),
            Mat::new(self.lm_head_weight().f32s()?, c.vocab_size, c.hidden_size).t(),
            &mut logits,
            false,
        );
        Ok(logits)
    }

    /// Final-norm hidden states of the last new token of each step (`last_only`) or of all.
    fn final_hidden_cached(&self, steps: &mut [Step], last_only: bool) -> Result<Vec<f32>> {
        let c = &self.config;
        let (hid, nh, nkv, hd) = (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim);
        let (qs, ks) = (nh * hd, nkv * hd);
        let group = nh / nkv;
        let shape = self.kv_shape();
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut starts = Vec::with_capacity(steps.len());
        for (i, s) in steps.iter().enumerate() {
            ensure!(!s.tokens.is_empty(), "decode step {i} has no tokens");
            ensure!(
                s.cache.own.shape == shape,
                "decode step {i}: cache shape {:?} does not fit the model {:?}",
                s.cache.own.shape,
                shape
            );
            if let Some(&bad) = s.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
                anyhow::bail!("token id {bad} is outside the vocabulary of {}", c.vocab_size);
            }
            starts.push(ids.len());
            let p0 = s.cache.len() as u32;
            ids.extend_from_slice(s.tokens);
            positions.extend(p0..p0 + s.tokens.len() as u32);
        }
        let n = ids.len();
        let mut tasks = Vec::new();
        for (e, s) in steps.iter().enumerate() {
            let len = s.tokens.len();
            if len == 1 {
                tasks.extend((0..nkv).map(|kvh| Task { entry: e, kvh, head: usize::MAX, t0: 0, rows: 1 }));
            } else {
                for head in 0..nh {
                    for t0 in (0..len).step_by(BQ) {
                        tasks.push(Task { entry: e, kvh: head / group, head, t0, rows: (len - t0).min(BQ) });
                    }
                }
            }
        }

        let mut x = crate::ops::embedding::cpu::forward(self.embed.f32s()?, hid, &ids);
        let eps = c.rms_norm_eps;
        let scale = 1.0 / (hd as f32).sqrt();
        for (li, l) in self.layers.iter().enumerate() {
            let hn = rms_norm::cpu::forward(&x, l.input_norm.f32s()?, eps);
            let mut q = linear(&hn, n, &l.q_proj)?;
            let mut k = linear(&hn, n, &l.k_proj)?;
            let v = linear(&hn, n, &l.v_proj)?;
            if let (Some(qn), Some(kn)) = (&l.q_norm, &l.k_norm) {
                q = rms_norm::cpu::forward(&q, qn.f32s()?, eps);
                k = rms_norm::cpu::forward(&k, kn.f32s()?, eps);
            }
            let q = rope::cpu::apply(&q, nh, hd, &positions, &self.rope, false);
            let k = rope::cpu::apply(&k, nkv, hd, &positions, &self.rope, false);
            for (s, &r0) in steps.iter_mut().zip(&starts) {
                s.cache.own.write(li, s.tokens.len(), &k[r0 * ks..], &v[r0 * ks..], ks);
            }
            let mut a = vec![0.0f32; n * qs];
            let ap = SendPtr(a.as_mut_ptr());
            let views: Vec<(&SeqCache, usize, usize)> =
                steps.iter().zip(&starts).map(|(s, &r0)| (&*s.cache, r0, s.tokens.len())).collect();
            tasks.par_iter().for_each(|t| {
                let (cache, r0, len) = views[t.entry];
                let (prefix_len, own_len) = (cache.prefix_len(), cache.own.len() + len);
                let past = cache.len(); // positions before this step's tokens
                let (head0, rows, q_rs, ones) = if t.head == usize::MAX {
                    (t.kvh * group, group, hd, true)
                } else {
                    (t.head, t.rows, qs, false)
                };
                let qoff = (r0 + t.t0) * qs + head0 * hd;
                // Query row r sees every cached key, plus this step's keys up to its own.
                let visible = |r: usize| if ones { past + 1 } else { past + t.t0 + r + 1 };
                let own = (cache.own.keys(li, t.kvh), cache.own.values(li, t.kvh), own_len);
                let pre = cache.prefix.as_ref().map(|p| (p.keys(li, t.kvh), p.values(li, t.kvh), prefix_len));
                // SAFETY: each task writes only its own query rows (head, tokens) of `a`.
                unsafe {
                    attend(
                        q.as_ptr().add(qoff),
                        q_rs,
                        rows,
                        hd,
                        scale,
                        pre,
                        own,
                        &visible,
                        { ap }.0.add(qoff),
                        q_rs,
                    );
                }
            });
            let o = linear(&a, n, &l.o_proj)?;
            add_in_place(&mut x, &o);
            let hn = rms_norm::cpu::forward(&x, l.post_norm.f32s()?, eps);
            let m = swiglu::cpu::forward(&linear(&hn, n, &l.gate_proj)?, &linear(&hn, n, &l.up_proj)?);
            add_in_place(&mut x, &linear(&m, n, &l.down_proj)?);
        }
        for s in steps.iter_mut() {
            s.cache.own.commit(s.tokens.len());
        }
        let x = if last_only {
            let mut last = Vec::with_capacity(steps.len() * hid);
            for (s, &r0) in steps.iter().zip(&starts) {
                let r = r0 + s.tokens.len() - 1;
                last.extend_from_slice(&x[r * hid..(r + 1) * hid]);
            }
            last
        } else {
            x
        };
        Ok(rms_norm::cpu::forward(&x, self.norm.f32s()?, eps))
    }
}

type Seg<'a> = (&'a [f32], &'a [f32], usize);

/// Softmax(q·Kᵀ·scale)·V for `rows` query rows (row stride `q_rs`) over a prefix segment and an
/// own segment of keys (each `len × hd`, contiguous); row r attends to the first `visible(r)`
/// keys of the concatenation. Writes `rows × hd` at `out` (row stride `out_rs`).
#[allow(clippy::too_many_arguments)]
unsafe fn attend(
    q: *const f32,
    q_rs: usize,
    rows: usize,
    hd: usize,
    scale: f32,
    pre: Option<Seg>,
    own: Seg,
    visible: &dyn Fn(usize) -> usize,
    out: *mut f32,
    out_rs: usize,
) {
    let p = pre.map_or(0, |s| s.2);
    let total = p + own.2;
    let mut sc = vec![0.0f32; rows * total];
    if let Some((pk, _, pl)) = pre {
        gemm_strided(
            rows,
            pl,
            hd,
            sc.as_mut_ptr(),
            total,
            false,
            q,
            q_rs as isize,
            1,
            pk.as_ptr(),
            1,
            hd as isize,
            scale,
        );
    }
    gemm_strided(
        rows,
        own.2,
        hd,
        sc.as_mut_ptr().add(p),
        total,
        false,
        q,
        q_rs as isize,
        1,
        own.0.as_ptr(),
        1,
        hd as isize,
        scale,
    );
    masked_softmax_rows(&mut sc, rows, total, visible);
    let mut acc = false;
    if let Some((_, pv, pl)) = pre {
        if pl > 0 {
            gemm_strided(
                rows,
                hd,
                pl,
                out,
                out_rs,
                false,
                sc.as_ptr(),
                total as isize,
                1,
                pv.as_ptr(),
                hd as isize,
                1,
                1.0,
            );
            acc = true;
        }
    }
    gemm_strided(
        rows,
        hd,
        own.2,
        out,
        out_rs,
        acc,
        sc.as_ptr().add(p),
        total as isize,
        1,
        own.1.as_ptr(),
        hd as isize,
        1,
        1.0,
    );
}
