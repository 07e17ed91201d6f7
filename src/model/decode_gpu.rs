//! Attention over KV caches on a GPU device (the rollout engine's decoder there), the strategy
//! the one transformer block (`block.rs`) calls for every layer.
//!
//! Keys and values go into each sequence's device cache (in the model's activation dtype, bf16
//! or f32; one copy per step and layer).
//! The new tokens of steps that start from an empty cache (prefills) go through flash attention
//! together, as packed sequences; a single new token after a cache goes through the
//! decode-attention kernel against its cache. A step of several tokens after a cache runs one
//! token at a time ([`Model::forward_split_gpu`]).
//!
//! The rollout's steady state, one new token after a cache for every sequence, has its own
//! batched step ([`Model::decode_step_gpu`]): a fixed number of launches per layer whatever the
//! batch (the projections as GEMMs over the batch, one fused bias/norm/RoPE/KV-append kernel,
//! one decode-attention launch reaching each sequence's cache through a table, fused residual
//! add + RMSNorm), one upload of that table, and no allocation: every activation lives in a
//! [`DecodeWorkspace`] reused from step to step. Its kernels round where the per-op path stores,
//! so its logits are the per-op path's, bit for bit (tests/generate_device.rs).
//!
//! With graphs on ([`decode_graphs_from_env`], `FCGPU_CUDA_GRAPHS=1`; off by default) the step's
//! launches are captured once per batch size and replayed as one launch: every argument they
//! take is fixed for a batch size (workspace buffers, weights, the table's device addresses),
//! and what changes from step to step (tokens, positions, cache addresses) is read from the
//! table the step uploads first.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{ensure, Context, Result};

use super::block::Attention;
use super::decode::Step;
use super::Model;
use crate::backend::{Gemm, GpuBuffer, GpuDevice, GpuGraph};
use crate::kernels::attention::{decode_attn_row, CacheRows};
use crate::kernels::decode_step::{self as ks, HeadDims, QkvExtras, StepTable};
use crate::ops::device::{buf, cast, copy_bytes, zeros};
use crate::ops::{self};
use crate::tensor::{DType, Tensor};

/// Attention against the device caches of `steps` (room made by `SeqCache::gpu_prepare`).
pub(crate) struct GpuCache<'s, 'a> {
    dev: GpuDevice,
    steps: &'s mut [Step<'a>],
    starts: &'s [usize],
    /// Each step's new tokens as a packed sequence (flash attention for the prefills).
    seqs: Vec<(usize, usize)>,
    /// Keys visible to each decode token (its own included, written before attention runs).
    lens: GpuBuffer,
    /// Element dtype of the caches, and of q/k/v and the output here.
    dt: DType,
    prefill: bool,
}

impl<'s, 'a> GpuCache<'s, 'a> {
    pub(crate) fn new(
        model: &Model,
        steps: &'s mut [Step<'a>],
        starts: &'s [usize],
    ) -> Result<GpuCache<'s, 'a>> {
        let dev = model.embed.gpu_storage().context("the model is not on a GPU device")?.device().clone();
        let seqs = steps.iter().zip(starts).map(|(s, &r0)| (r0, s.tokens.len())).collect();
        let lens: Vec<i32> = steps.iter().map(|s| s.cache.len() as i32 + 1).collect();
        let lens = dev.upload_i32(&lens)?;
        let prefill = steps.iter().any(|s| s.tokens.len() > 1);
        Ok(GpuCache { dev, steps, starts, seqs, lens, dt: model.kv_shape().dtype, prefill })
    }
}

impl Attention for GpuCache<'_, '_> {
    fn attend(&mut self, li: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (n, nh, nkv, hd) = (q.dim(0), q.dim(1), k.dim(1), q.dim(2));
        let dt = self.dt;
        let (q, k, v) = (cast(q, dt)?, cast(k, dt)?, cast(v, dt)?);
        let row = nkv * hd * dt.size();
        for (s, &r0) in self.steps.iter_mut().zip(self.starts) {
            let at = s.cache.own.gpu_offset(li, s.cache.own.len());
            let g = s.cache.own.gpu_buffers()?;
            copy_bytes(&g.k, at, buf(&k), r0 * row, s.tokens.len() * row)?;
            copy_bytes(&g.v, at, buf(&v), r0 * row, s.tokens.len() * row)?;
        }
        // Flash attention for the prefills (several tokens, empty cache: causal attention among
        // them); decode attention against the cache for every single new token (its rows of the
        // flash output, if any, are overwritten).
        let a = if self.prefill {
            cast(&ops::attention(&q, &k, &v, &self.seqs)?, dt)?
        } else {
            Tensor::from_gpu(zeros(&self.dev, dt, n * nh * hd)?, &[n, nh, hd])?
        };
        for (e, s) in self.steps.iter_mut().enumerate() {
            if s.tokens.len() > 1 {
                continue;
            }
            let own = &mut s.cache.own;
            let (max_len, at) = (own.capacity(), own.gpu_offset(li, 0));
            let g = own.gpu_buffers()?;
            let cache = CacheRows { k: &g.k, v: &g.v, at, max_len, lens: &self.lens, entry: e, dtype: dt };
            decode_attn_row(&self.dev, buf(&q), buf(&a), self.starts[e], &cache, (nh, nkv, hd))?;
        }
        Ok(a)
    }
}

impl Model {
    /// Steps one at a time; one that continues a cache with several tokens, token by token.
    pub(crate) fn forward_split_gpu(&self, steps: &mut [Step], last_only: bool) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        for s in steps.iter_mut() {
            if s.tokens.len() > 1 && !s.cache.is_empty() {
                let mut last = Vec::new();
                for t in s.tokens.chunks(1) {
                    last = self.cached_logits(&mut [Step { cache: &mut *s.cache, tokens: t }], true)?;
                    if !last_only {
                        out.extend_from_slice(&last);
                    }
                }
                if last_only {
                    out.extend(last);
                }
            } else {
                out.extend(
                    self.cached_logits(&mut [Step { cache: &mut *s.cache, tokens: s.tokens }], last_only)?,
                );
            }
        }
        Ok(out)
    }
}

/// Byte offsets of the sections of a decode step's table for `b` sequences (see
/// [`StepTable`]): three i64 arrays, three i32 arrays, then cos and sin (f32 `[b, head_dim/2]`).
fn table_offsets(b: usize, head_dim: usize) -> [usize; 9] {
    let h = head_dim / 2;
    let (i64s, i32s) = (8 * b, 4 * b);
    let ids = 3 * i64s;
    let cos = ids + 3 * i32s;
    [0, i64s, 2 * i64s, ids, ids + i32s, ids + 2 * i32s, cos, cos + 4 * b * h, cos + 8 * b * h]
}

/// The activations of a batched decode step for up to `cap` sequences, allocated once and reused
/// by every step (a steady decode step allocates nothing), and the host side of its table.
pub struct DecodeWorkspace {
    dev: GpuDevice,
    dt: DType,
    cap: usize,
    vocab: usize,
    /// Residual stream, normed input, q, k, v, attention output, projection output, gate, up,
    /// SwiGLU output (its own buffer: the kernel's pointers are `__restrict__`).
    x: GpuBuffer,
    h: GpuBuffer,
    q: GpuBuffer,
    k: GpuBuffer,
    v: GpuBuffer,
    a: GpuBuffer,
    o: GpuBuffer,
    g: GpuBuffer,
    u: GpuBuffer,
    m: GpuBuffer,
    /// `A·x` of a LoRA adapter (`rank` wide; unused without adapters).
    lr: GpuBuffer,
    logits: GpuBuffer,
    table: GpuBuffer,
    host: Vec<u8>,
    /// Captured steps by batch size; `None`: graphs off.
    graphs: Option<DecodeGraphs>,
}

/// The decode step's graphs (see [`Model::decode_step_gpu`]). A graph bakes in the workspace's
/// buffers (allocated once, never replaced), the table's device addresses (fixed for a batch
/// size) and the model's weights and shapes (`key`, checked every step: another model, or
/// weights moved to other buffers, drops every graph).
#[derive(Default)]
struct DecodeGraphs {
    key: u64,
    /// Batch sizes that have run once without a graph (kernels loaded, cuBLAS warmed up).
    warm: BTreeSet<usize>,
    by_batch: BTreeMap<usize, GpuGraph>,
}

/// Whether decode steps use graphs unless told otherwise: `FCGPU_CUDA_GRAPHS=1` on, anything
/// else (unset included) off. Off by default because the cuda side (stream capture of the step,
/// cuBLAS included) has not yet run on a GPU: CI has none, and only the emu side (the recorded
/// launch list, the same capture code and checks) is tested.
pub fn decode_graphs_from_env() -> bool {
    std::env::var("FCGPU_CUDA_GRAPHS").is_ok_and(|v| v.trim() == "1")
}

impl DecodeWorkspace {
    /// Buffers for steps of up to `cap` sequences of `model` (on a GPU device).
    pub fn new(model: &Model, cap: usize) -> Result<DecodeWorkspace> {
        let dev = model.embed.gpu_storage().context("the model is not on a GPU device")?.device().clone();
        ensure!(model.batched_decode_supported(), "this model has no batched decode step");
        let (c, dt, cap) = (&model.config, model.embed.dtype(), cap.max(1));
        let es = dt.size();
        let ws = crate::backend::memory::Category::Workspace;
        let rows = |width: usize| crate::backend::memory::scope(ws, || dev.alloc(cap * width * es));
        let (qw, kw) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        Ok(DecodeWorkspace {
            x: rows(c.hidden_size)?,
            h: rows(c.hidden_size)?,
            q: rows(qw)?,
            k: rows(kw)?,
            v: rows(kw)?,
            a: rows(qw)?,
            o: rows(c.hidden_size)?,
            g: rows(c.intermediate_size)?,
            u: rows(c.intermediate_size)?,
            m: rows(c.intermediate_size)?,
            lr: rows(model.lora().map_or(1, |l| l.rank))?,
            logits: rows(c.vocab_size)?,
            table: crate::backend::memory::scope(ws, || dev.alloc(table_offsets(cap, c.head_dim)[8]))?,
            host: Vec::new(),
            graphs: decode_graphs_from_env().then(DecodeGraphs::default),
            vocab: c.vocab_size,
            dev,
            dt,
            cap,
        })
    }

    /// Most sequences a step may have.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Turns graphs on or off (off drops the captured ones); the default is
    /// [`decode_graphs_from_env`].
    pub fn set_graphs(&mut self, on: bool) {
        if on != self.graphs.is_some() {
            self.graphs = on.then(DecodeGraphs::default);
        }
    }

    pub fn graphs_on(&self) -> bool {
        self.graphs.is_some()
    }

    /// Batch sizes with a captured step.
    pub fn captured_batches(&self) -> Vec<usize> {
        self.graphs.as_ref().map_or_else(Vec::new, |g| g.by_batch.keys().copied().collect())
    }

    /// The logits of the last step (`[b, vocab]` rows from the start) and their dtype.
    pub fn logits(&self) -> (&GpuBuffer, DType) {
        (&self.logits, self.dt)
    }

    /// The first `b` rows of logits on the host, as f32 (the host sampler's download).
    pub fn download_logits(&self, b: usize) -> Result<Vec<f32>> {
        ensure!(b <= self.cap, "{b} rows of logits from a workspace of {}", self.cap);
        let es = self.dt.size();
        let mut bytes = vec![0u8; b * self.vocab * es];
        // SAFETY: the first b rows lie in the logits buffer (b ≤ cap).
        unsafe { self.dev.dtoh(self.logits.ptr(), &mut bytes)? };
        Ok(match self.dt {
            DType::F32 => bytemuck::cast_slice::<u8, f32>(&bytes).to_vec(),
            _ => bytemuck::cast_slice::<u8, half::bf16>(&bytes).iter().map(|x| x.to_f32()).collect(),
        })
    }

    /// Builds the table of `steps` (caches already prepared) on the host and uploads it (one
    /// staged copy, no synchronisation); returns its device addresses.
    fn upload_table(&mut self, model: &Model, steps: &mut [Step]) -> Result<StepTable> {
        let (b, hd) = (steps.len(), model.config.head_dim);
        let row = model.kv_shape().row();
        let off = table_offsets(b, hd);
        let mut host = std::mem::take(&mut self.host);
        host.clear();
        host.resize(off[8], 0);
        for (i, s) in steps.iter_mut().enumerate() {
            let pos = s.cache.len();
            let cap = s.cache.own.capacity();
            let g = s.cache.own.gpu_buffers()?;
            let put = |host: &mut [u8], sec: usize, size: usize, bytes: &[u8]| {
                host[off[sec] + i * size..off[sec] + (i + 1) * size].copy_from_slice(bytes)
            };
            put(&mut host, 0, 8, &g.k.ptr().to_le_bytes());
            put(&mut host, 1, 8, &g.v.ptr().to_le_bytes());
            put(&mut host, 2, 8, &((cap * row) as i64).to_le_bytes());
            put(&mut host, 3, 4, &(s.tokens[0] as i32).to_le_bytes());
            put(&mut host, 4, 4, &(pos as i32).to_le_bytes());
            put(&mut host, 5, 4, &(pos as i32 + 1).to_le_bytes());
            let (cos, sin) = model.rope.cos_sin(pos as u32);
            put(&mut host, 6, 2 * hd, bytemuck::cast_slice(&cos));
            put(&mut host, 7, 2 * hd, bytemuck::cast_slice(&sin));
        }
        self.table.write_at(0, &host)?;
        self.host = host;
        let at = |sec: usize| self.table.ptr() + off[sec] as u64;
        Ok(StepTable {
            kbase: at(0),
            vbase: at(1),
            lstride: at(2),
            ids: at(3),
            pos: at(4),
            lens: at(5),
            cos: at(6),
            sin: at(7),
        })
    }
}

/// The device address of a weight on the GPU.
fn wp(t: &Tensor) -> u64 {
    buf(t).ptr()
}

fn wp_opt(t: Option<&Tensor>) -> u64 {
    t.map_or(0, wp)
}

impl Model {
    /// Whether [`Model::decode_step_gpu`] can run this model: on a GPU device, every weight in
    /// the activation dtype (bf16 or f32), biases only on q/k/v, an even head_dim up to 256.
    pub fn batched_decode_supported(&self) -> bool {
        let dt = self.embed.dtype();
        let c = &self.config;
        let mut same = self.device().is_gpu() && matches!(dt, DType::BF16 | DType::F32);
        self.visit(&mut |_, t| same &= t.dtype() == dt);
        let plain = self.layers.iter().all(|l| {
            [&l.o_proj, &l.gate_proj, &l.up_proj, &l.down_proj].iter().all(|p| p.bias.is_none())
                && l.q_norm.is_some() == l.k_norm.is_some()
        });
        same && plain && c.head_dim.is_multiple_of(2) && c.head_dim <= 256
    }

    /// One decode step of every sequence of `steps` (one new token each, after a non-empty
    /// cache) in a fixed number of launches: the logits land in `ws` (rows in step order) and the
    /// new keys and values in the caches. Allocates nothing once the caches have room (rollouts
    /// size a sample's cache for the whole sequence at its first step, which copies its prompt's
    /// prefix).
    pub fn decode_step_gpu(&self, steps: &mut [Step], ws: &mut DecodeWorkspace) -> Result<()> {
        let (c, b) = (&self.config, steps.len());
        ensure!(b <= ws.cap, "a decode step of {b} sequences in a workspace for {}", ws.cap);
        for (i, s) in steps.iter_mut().enumerate() {
            ensure!(
                s.tokens.len() == 1 && !s.cache.is_empty(),
                "decode step {i} is not one token after a cache"
            );
            ensure!(
                s.cache.own.shape == self.kv_shape(),
                "decode step {i}: the cache does not fit the model"
            );
            ensure!(
                (s.tokens[0] as usize) < c.vocab_size,
                "token id {} is outside the vocabulary",
                s.tokens[0]
            );
            s.cache.gpu_prepare(1)?;
        }
        let t = ws.upload_table(self, steps)?;
        if ws.graphs.is_some() {
            self.decode_graphed(ws, &t, b)?;
        } else {
            // SAFETY: the workspace holds `cap ≥ b` rows of every activation, the weights have
            // the model's shapes, and every cache of the table has room for its new position.
            unsafe { self.decode_launches(ws, &t, b)? };
        }
        for s in steps.iter_mut() {
            s.cache.own.commit(1);
        }
        Ok(())
    }

    /// [`Model::decode_launches`] through the workspace's graphs: the first step at a batch size
    /// runs them as they are (loading kernels and warming cuBLAS up outside any capture), the
    /// second captures them and replays the graph, later ones replay it (one launch).
    fn decode_graphed(&self, ws: &mut DecodeWorkspace, t: &StepTable, b: usize) -> Result<()> {
        let key = self.graph_key();
        let mut gs = ws.graphs.take().expect("graphs on");
        if gs.key != key {
            gs = DecodeGraphs { key, ..Default::default() };
        }
        let ws_ref: &DecodeWorkspace = ws;
        // SAFETY (all three): as in `decode_step_gpu`; a graph replays launches captured for this
        // batch size on this workspace (its buffers live as long as it) and this model's weights
        // (`key`), reading this step's table from the same addresses.
        let r = (|| unsafe {
            if let Some(g) = gs.by_batch.get(&b) {
                return g.replay();
            }
            if gs.warm.insert(b) {
                return self.decode_launches(ws_ref, t, b);
            }
            let g = ws_ref.dev.capture(|| self.decode_launches(ws_ref, t, b))?;
            g.replay()?;
            gs.by_batch.insert(b, g);
            Ok(())
        })();
        ws.graphs = Some(gs);
        r
    }

    /// What a decode graph bakes in of the model: its shapes and its weights' device addresses.
    fn graph_key(&self) -> u64 {
        let c = &self.config;
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut mix = |x: u64| h = (h ^ x).wrapping_mul(0x0000_0100_0000_01b3);
        let dims =
            [c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size];
        for x in dims.into_iter().chain([c.vocab_size, self.embed.dtype().size()]) {
            mix(x as u64);
        }
        mix(c.rms_norm_eps.to_bits() as u64);
        // Every weight decode_launches passes, in its order.
        for w in [&self.embed, &self.norm, self.lm_head_weight()] {
            mix(wp(w));
        }
        for l in &self.layers {
            for w in [&l.input_norm, &l.post_norm] {
                mix(wp(w));
            }
            for p in [&l.q_proj, &l.k_proj, &l.v_proj, &l.o_proj, &l.gate_proj, &l.up_proj, &l.down_proj] {
                mix(wp(&p.weight));
                mix(wp_opt(p.bias.as_ref()));
                // LoRA adapters, and whether they are on (off runs no adapter launch).
                if let Some(ad) = p.lora.as_ref().filter(|a| a.active()) {
                    mix(wp(&ad.a));
                    mix(wp(&ad.b));
                }
            }
            mix(wp_opt(l.q_norm.as_ref()));
            mix(wp_opt(l.k_norm.as_ref()));
        }
        h
    }

    /// The launches of [`Model::decode_step_gpu`]: embedding, first norm, 12 per layer, LM head.
    ///
    /// # Safety
    /// `ws` has room for `b` rows and `t` is the uploaded table of `b` prepared caches.
    unsafe fn decode_launches(&self, ws: &DecodeWorkspace, t: &StepTable, b: usize) -> Result<()> {
        let (c, dev, dt) = (&self.config, &ws.dev, ws.dt);
        let (hid, eps) = (c.hidden_size, c.rms_norm_eps);
        let d = HeadDims { batch: b, q_heads: c.num_heads, kv_heads: c.num_kv_heads, head_dim: c.head_dim };
        let lin = |x: &GpuBuffer, p: &super::Linear, y: &GpuBuffer| -> Result<()> {
            let w = &p.weight;
            dev.gemm(&Gemm::simple(dt, b, w.dim(0), w.dim(1), x.ptr(), wp(w), true, y.ptr()))?;
            // A LoRA adapter: one small GEMM pair, y += (alpha/r)·(x·Aᵀ)·Bᵀ, the base untouched.
            if let Some(ad) = p.lora.as_ref().filter(|a| a.active()) {
                let (r, ow) = (ad.a.dim(0), ad.b.dim(0));
                dev.gemm(&Gemm::simple(dt, b, r, ad.a.dim(1), x.ptr(), wp(&ad.a), true, ws.lr.ptr()))?;
                let mut g = Gemm::simple(dt, b, ow, r, ws.lr.ptr(), wp(&ad.b), true, y.ptr());
                (g.alpha, g.beta) = (ad.scale(), 1.0);
                dev.gemm(&g)?;
            }
            Ok(())
        };
        ks::embedding(dev, dt, t.ids, wp(&self.embed), ws.x.ptr(), b, c.vocab_size, hid)?;
        ks::rmsnorm(dev, dt, ws.x.ptr(), wp(&self.layers[0].input_norm), ws.h.ptr(), b, hid, eps)?;
        for (li, l) in self.layers.iter().enumerate() {
            lin(&ws.h, &l.q_proj, &ws.q)?;
            lin(&ws.h, &l.k_proj, &ws.k)?;
            lin(&ws.h, &l.v_proj, &ws.v)?;
            let ex = QkvExtras {
                bq: wp_opt(l.q_proj.bias.as_ref()),
                bk: wp_opt(l.k_proj.bias.as_ref()),
                bv: wp_opt(l.v_proj.bias.as_ref()),
                qn: wp_opt(l.q_norm.as_ref()),
                kn: wp_opt(l.k_norm.as_ref()),
            };
            ks::decode_qkv(dev, dt, (ws.q.ptr(), ws.k.ptr(), ws.v.ptr()), &ex, t, li, d, eps)?;
            ks::decode_attn_batch(dev, dt, ws.q.ptr(), ws.a.ptr(), t, li, d)?;
            lin(&ws.a, &l.o_proj, &ws.o)?;
            ks::add_rmsnorm(dev, dt, ws.x.ptr(), ws.o.ptr(), wp(&l.post_norm), ws.h.ptr(), b, hid, eps)?;
            lin(&ws.h, &l.gate_proj, &ws.g)?;
            lin(&ws.h, &l.up_proj, &ws.u)?;
            crate::kernels::swiglu::swiglu_fwd(dev, dt, &ws.g, &ws.u, &ws.m, b * c.intermediate_size)?;
            lin(&ws.m, &l.down_proj, &ws.o)?;
            // The residual add, then the next layer's input norm (the final norm after the last).
            let next = self.layers.get(li + 1).map_or(&self.norm, |n| &n.input_norm);
            ks::add_rmsnorm(dev, dt, ws.x.ptr(), ws.o.ptr(), wp(next), ws.h.ptr(), b, hid, eps)?;
        }
        let head = self.lm_head_weight();
        dev.gemm(&Gemm::simple(dt, b, head.dim(0), head.dim(1), ws.h.ptr(), wp(head), true, ws.logits.ptr()))
    }
}
