//! Incremental forward over a KV cache (no autograd), on the cpu or a GPU device.
//!
//! One call advances a set of sequences at once: each [`Step`] feeds some new tokens of one
//! sequence (a whole prompt for a prefill, one token when decoding) after what its cache holds.
//! Every new token of every step goes through the one transformer block (`block.rs`) as one
//! batch (decode is matrix-matrix over the live batch); only attention differs, a strategy
//! against the caches: on the cpu ([`CpuCache`]) it runs per (sequence, KV head) in parallel,
//! against the cached keys of that sequence (shared prompt prefix + own tokens); on a GPU device
//! see `decode_gpu.rs`.

use anyhow::{ensure, Result};
use rayon::prelude::*;

use super::block::Attention;
use super::kv_cache::{KvShape, SeqCache};
use super::Model;
use crate::autograd::no_grad;
use crate::ops::attention::cpu::masked_softmax_rows;
use crate::ops::matmul::cpu::gemm_strided;
use crate::ops::{self, SendPtr};
use crate::tensor::Tensor;

/// New tokens of one sequence, to run after what `cache` holds.
pub struct Step<'a> {
    pub cache: &'a mut SeqCache,
    pub tokens: &'a [u32],
}

/// Query rows per attention task in a prefill (bounds the score tile to `BQ × context`).
const BQ: usize = 64;

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

/// The new tokens of a set of steps, packed: ids, positions, and each step's first row.
pub(crate) struct Packed {
    pub ids: Vec<u32>,
    pub positions: Vec<u32>,
    pub starts: Vec<usize>,
}

impl Model {
    /// The cache layout this model needs.
    pub fn kv_shape(&self) -> KvShape {
        KvShape {
            layers: self.config.num_layers,
            kv_heads: self.config.num_kv_heads,
            head_dim: self.config.head_dim,
            device: self.device(),
            dtype: self.embed.dtype(),
        }
    }

    /// Runs the new tokens of every step after its cache, appends their keys and values to the
    /// cache, and returns the logits `[steps, vocab]` of each step's last token.
    pub fn forward_cached(&self, steps: &mut [Step]) -> Result<Vec<f32>> {
        self.cached_logits(steps, true)
    }

    /// Like [`Model::forward_cached`], but the logits of every new token `[tokens, vocab]`
    /// (tests compare them with the full forward).
    pub fn forward_cached_all(&self, steps: &mut [Step]) -> Result<Vec<f32>> {
        self.cached_logits(steps, false)
    }

    /// Logits of each step's last new token (`last_only`) or of all, on the host.
    pub(crate) fn cached_logits(&self, steps: &mut [Step], last_only: bool) -> Result<Vec<f32>> {
        Ok(self.cached_logits_tensor(steps, last_only)?.host_f32()?.into_owned())
    }

    /// [`Model::forward_cached`] leaving the logits `[steps, vocab]` where they were computed
    /// (on a GPU device: for the device sampler).
    pub fn forward_cached_device(&self, steps: &mut [Step]) -> Result<Tensor> {
        self.cached_logits_tensor(steps, true)
    }

    fn cached_logits_tensor(&self, steps: &mut [Step], last_only: bool) -> Result<Tensor> {
        no_grad(|| {
            let p = self.pack_steps(steps)?;
            let x = if self.device().is_gpu() {
                let mut attn = super::decode_gpu::GpuCache::new(self, steps, &p.starts)?;
                self.layers_forward(&p.ids, &p.positions, &mut attn)?
            } else {
                let mut attn = CpuCache::new(self, steps, &p.starts);
                self.layers_forward(&p.ids, &p.positions, &mut attn)?
            };
            for s in steps.iter_mut() {
                s.cache.commit(s.tokens.len());
            }
            let x = if last_only {
                // Each step's last row (an embedding lookup into the hidden states).
                let last: Vec<u32> =
                    steps.iter().zip(&p.starts).map(|(s, &r0)| (r0 + s.tokens.len() - 1) as u32).collect();
                ops::embedding(&x, &last)?
            } else {
                x
            };
            let h = ops::rms_norm(&x, &self.norm, self.config.rms_norm_eps)?;
            ops::linear(&h, self.lm_head_weight(), None)
        })
    }

    /// Checks the steps against the model, packs their new tokens and prepares their caches'
    /// blocks for them.
    fn pack_steps(&self, steps: &mut [Step]) -> Result<Packed> {
        let (c, shape) = (&self.config, self.kv_shape());
        let mut p =
            Packed { ids: Vec::new(), positions: Vec::new(), starts: Vec::with_capacity(steps.len()) };
        for (i, s) in steps.iter_mut().enumerate() {
            ensure!(!s.tokens.is_empty(), "decode step {i} has no tokens");
            ensure!(
                s.cache.shape() == shape,
                "decode step {i}: cache shape {:?} does not fit the model {:?}",
                s.cache.shape(),
                shape
            );
            if let Some(&bad) = s.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
                anyhow::bail!("token id {bad} is outside the vocabulary of {}", c.vocab_size);
            }
            s.cache.prepare(s.tokens.len())?;
            p.starts.push(p.ids.len());
            let p0 = s.cache.len() as u32;
            p.ids.extend_from_slice(s.tokens);
            p.positions.extend(p0..p0 + s.tokens.len() as u32);
        }
        Ok(p)
    }
}

/// Attention against the cpu caches: each layer's new keys and values are appended (committed
/// after the last layer), then every [`Task`] runs in parallel.
struct CpuCache<'s, 'a> {
    steps: &'s mut [Step<'a>],
    starts: &'s [usize],
    tasks: Vec<Task>,
    /// q heads, kv heads, head dim.
    dims: (usize, usize, usize),
}

impl<'s, 'a> CpuCache<'s, 'a> {
    fn new(model: &Model, steps: &'s mut [Step<'a>], starts: &'s [usize]) -> CpuCache<'s, 'a> {
        let c = &model.config;
        let (nh, nkv) = (c.num_heads, c.num_kv_heads);
        let group = nh / nkv;
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
        CpuCache { steps, starts, tasks, dims: (nh, nkv, c.head_dim) }
    }
}

impl Attention for CpuCache<'_, '_> {
    fn attend(&mut self, li: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (nh, nkv, hd) = self.dims;
        let (qs, ks, group, n) = (nh * hd, nkv * hd, nh / nkv, q.dim(0));
        let scale = 1.0 / (hd as f32).sqrt();
        let (q, k, v) = (q.f32s()?, k.f32s()?, v.f32s()?);
        for (s, &r0) in self.steps.iter_mut().zip(self.starts) {
            s.cache.write(li, s.tokens.len(), &k[r0 * ks..], &v[r0 * ks..], ks);
        }
        let mut a = vec![0.0f32; n * qs];
        let ap = SendPtr(a.as_mut_ptr());
        let views: Vec<(&SeqCache, usize, usize)> =
            self.steps.iter().zip(self.starts).map(|(s, &r0)| (&*s.cache, r0, s.tokens.len())).collect();
        self.tasks.par_iter().for_each(|t| {
            let (cache, r0, len) = views[t.entry];
            let past = cache.len(); // positions before this step's tokens
            let (head0, rows, q_rs, ones) = if t.head == usize::MAX {
                (t.kvh * group, group, hd, true)
            } else {
                (t.head, t.rows, qs, false)
            };
            let qoff = (r0 + t.t0) * qs + head0 * hd;
            // Query row r sees every cached key, plus this step's keys up to its own.
            let visible = |r: usize| if ones { past + 1 } else { past + t.t0 + r + 1 };
            // Keys this task's last row sees (later ones in the step are masked anyway).
            let upto = if ones { past + 1 } else { past + t.t0 + rows };
            // Cached keys block by block, then this step's own from the packed k/v (so a prefill
            // is one product over its rows, as it would be without a cache).
            let mut segs: Vec<Seg> = cache
                .segments(li, t.kvh, past)
                .into_iter()
                .map(|(k, v, n)| Seg { k: k.as_ptr(), v: v.as_ptr(), n, k_ds: 1, k_js: hd, v_rs: hd })
                .collect();
            let own = upto.min(past + len) - past;
            let at = r0 * ks + t.kvh * hd;
            // SAFETY: rows r0..r0 + own of the packed k/v lie in them (own ≤ the step's tokens).
            segs.push(unsafe {
                Seg { k: k.as_ptr().add(at), v: v.as_ptr().add(at), n: own, k_ds: 1, k_js: ks, v_rs: ks }
            });
            // SAFETY: each task writes only its own query rows (head, tokens) of `a`.
            unsafe {
                attend(
                    q.as_ptr().add(qoff),
                    q_rs,
                    rows,
                    hd,
                    scale,
                    &segs,
                    &visible,
                    { ap }.0.add(qoff),
                    q_rs,
                );
            }
        });
        Tensor::from_vec(a, &[n, nh, hd])
    }
}

/// `n` keys and values of one KV head: key j's element d at `k[d·k_ds + j·k_js]`, value j's
/// row at `v[j·v_rs]` (a cache block: `k_ds` 1, `k_js` and `v_rs` the head dim; the step's own
/// packed rows: 1 and the row width).
struct Seg {
    k: *const f32,
    v: *const f32,
    n: usize,
    k_ds: usize,
    k_js: usize,
    v_rs: usize,
}

/// Softmax(q·Kᵀ·scale)·V for `rows` query rows (row stride `q_rs`) over the keys of `segs` in
/// order (the blocks of a paged cache, then the step's own keys); row r attends to the first
/// `visible(r)` keys of their concatenation. Writes `rows × hd` at `out` (row stride `out_rs`).
#[allow(clippy::too_many_arguments)]
unsafe fn attend(
    q: *const f32,
    q_rs: usize,
    rows: usize,
    hd: usize,
    scale: f32,
    segs: &[Seg],
    visible: &dyn Fn(usize) -> usize,
    out: *mut f32,
    out_rs: usize,
) {
    let total: usize = segs.iter().map(|s| s.n).sum();
    let mut sc = vec![0.0f32; rows * total];
    let mut at = 0;
    for &Seg { k, n, k_ds, k_js, .. } in segs {
        let sp = sc.as_mut_ptr().add(at);
        gemm_strided(
            rows,
            n,
            hd,
            sp,
            total,
            false,
            q,
            q_rs as isize,
            1,
            k,
            k_ds as isize,
            k_js as isize,
            scale,
        );
        at += n;
    }
    masked_softmax_rows(&mut sc, rows, total, visible);
    let (mut at, mut acc) = (0, false);
    for &Seg { v, n, v_rs, .. } in segs.iter().filter(|s| s.n > 0) {
        let sp = sc.as_ptr().add(at);
        gemm_strided(rows, hd, n, out, out_rs, acc, sp, total as isize, 1, v, v_rs as isize, 1, 1.0);
        (at, acc) = (at + n, true);
    }
}
