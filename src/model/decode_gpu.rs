//! Attention over KV caches on a GPU device (the rollout engine's decoder there), the strategy
//! the one transformer block (`block.rs`) calls for every layer.
//!
//! Keys and values go into each sequence's blocks of the paged cache (`kv_cache.rs`; in the
//! model's activation dtype, bf16 or f32): one `kv_append` launch per layer scatters every new
//! token's row to its slot, whatever the blocks, before attention reads them. The new tokens of
//! steps that start from an empty cache (prefills) go through flash attention together, as
//! packed sequences; a single new token after a cache goes through the paged decode-attention
//! kernel against its blocks. When a step continues a cache with several tokens (a prompt after
//! a prefix-cache hit, a preempted sequence recomputed), every new token gets its own entry in
//! the block table, its step's blocks up to its own position, and one launch of the paged
//! kernel attends all of them.
//!
//! The rollout's steady state, one new token after a cache for every sequence, has its own
//! batched step ([`Model::decode_step_gpu`]): a fixed number of launches per layer whatever the
//! batch (the projections as GEMMs over the batch, one fused bias/norm/RoPE/KV-append kernel,
//! one decode-attention launch reaching each sequence's blocks through its block table, fused
//! residual add + RMSNorm), one upload of the step's table, and no allocation: every activation lives in a
//! [`DecodeWorkspace`] reused from step to step. Its kernels round where the per-op path stores,
//! so its logits are the per-op path's, bit for bit (tests/generate_device.rs).
//!
//! With graphs on ([`decode_graphs_from_env`], `FCGPU_CUDA_GRAPHS=1`; off by default) the step's
//! launches are captured once per batch size and replayed as one launch: every argument they
//! take is fixed for a batch size (workspace buffers, weights, the table's device addresses),
//! and what changes from step to step (tokens, positions, block tables and their width) is read
//! from the table the step uploads first.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{ensure, Context, Result};

use super::block::Attention;
use super::decode::Step;
use super::kv_cache::BlockRef;
use super::Model;
use crate::backend::{Gemm, GpuBuffer, GpuDevice, GpuGraph};
use crate::kernels::decode_step::{self as ks, HeadDims, QkvExtras, StepTable};
use crate::ops::device::{buf, cast, zeros};
use crate::ops::{self};
use crate::tensor::{DType, Tensor};

/// Attention against the paged device caches of `steps` (blocks prepared by `pack_steps`).
pub(crate) struct GpuCache<'s, 'a> {
    dev: GpuDevice,
    steps: &'s mut [Step<'a>],
    starts: &'s [usize],
    /// Each step's new tokens as a packed sequence (flash attention for the prefills).
    seqs: Vec<(usize, usize)>,
    /// The address of every new token's key slot at layer 0 (i64, packed order): the KV append.
    slots: GpuBuffer,
    /// Every step's block table and attended length (its new token included): what the
    /// decode-attention kernel reads for a single new token.
    table: PagedTable,
    /// Element dtype of the caches, and of q/k/v and the output here.
    dt: DType,
    prefill: bool,
    /// The table has an entry per new token (a step continues a cache with several tokens):
    /// every row goes through the paged attention kernel, none through flash attention.
    per_token: bool,
}

/// Block tables `[entries, nblk]` (i64 addresses), their width `nblk` (one i32) and lengths
/// (i32 per entry), uploaded together; `view` is the step table the kernels take.
struct PagedTable {
    _buf: GpuBuffer,
    nblk: usize,
    view: StepTable,
}

impl PagedTable {
    /// A table of `entries`: each a block table and the length attended through it.
    fn upload(dev: &GpuDevice, entries: &[(&[BlockRef], usize)], pool: (usize, usize)) -> Result<PagedTable> {
        let nblk = entries.iter().map(|e| e.0.len()).max().unwrap_or(0).max(1);
        let (b, tab) = (entries.len(), 8);
        let mut host = vec![0u8; tab + 8 * b * nblk + 4 * b];
        host[..4].copy_from_slice(&(nblk as i32).to_le_bytes());
        for (i, (blocks, len)) in entries.iter().enumerate() {
            for (j, blk) in blocks.iter().enumerate() {
                let at = tab + 8 * (i * nblk + j);
                host[at..at + 8].copy_from_slice(&blk.addr.to_le_bytes());
            }
            let at = tab + 8 * b * nblk + 4 * i;
            host[at..at + 4].copy_from_slice(&(*len as i32).to_le_bytes());
        }
        let buf = crate::backend::memory::scope(crate::backend::memory::Category::Workspace, || {
            dev.upload_bytes(&host)
        })?;
        let p = buf.ptr();
        let view = StepTable {
            blocks: p + tab as u64,
            nblk: p,
            block_size: pool.0,
            vofs: pool.1,
            ids: 0,
            pos: 0,
            lens: p + (tab + 8 * b * nblk) as u64,
            cos: 0,
            sin: 0,
        };
        Ok(PagedTable { _buf: buf, nblk, view })
    }
}

impl<'s, 'a> GpuCache<'s, 'a> {
    pub(crate) fn new(
        model: &Model,
        steps: &'s mut [Step<'a>],
        starts: &'s [usize],
    ) -> Result<GpuCache<'s, 'a>> {
        let dev = model.embed.gpu_storage().context("the model is not on a GPU device")?.device().clone();
        let seqs: Vec<(usize, usize)> =
            steps.iter().zip(starts).map(|(s, &r0)| (r0, s.tokens.len())).collect();
        let pool =
            steps.first().map_or((1, 0), |s| (s.cache.pool().block_size(), s.cache.pool().half_elems()));
        ensure!(
            steps.iter().all(|s| s.cache.pool().block_size() == pool.0),
            "one forward pass over caches with different KV block sizes"
        );
        let mut slots = Vec::new();
        for s in steps.iter() {
            let p0 = s.cache.len();
            slots.extend((p0..p0 + s.tokens.len()).map(|p| s.cache.gpu_row(0, p).0 as i64));
        }
        let slots = crate::backend::memory::scope(crate::backend::memory::Category::Workspace, || {
            dev.upload_bytes(bytemuck::cast_slice(&slots))
        })?;
        // A step of several tokens after a cache: an entry per new token, each attending through
        // its step's blocks up to itself (its key is appended before attention reads it).
        let per_token = steps.iter().any(|s| s.tokens.len() > 1 && !s.cache.is_empty());
        let entries: Vec<(&[BlockRef], usize)> = if per_token {
            steps
                .iter()
                .flat_map(|s| (1..=s.tokens.len()).map(move |i| (s.cache.blocks(), s.cache.len() + i)))
                .collect()
        } else {
            steps.iter().map(|s| (s.cache.blocks(), s.cache.len() + s.tokens.len())).collect()
        };
        let table = PagedTable::upload(&dev, &entries, pool)?;
        let prefill = steps.iter().any(|s| s.tokens.len() > 1);
        let dt = model.kv_shape().dtype;
        Ok(GpuCache { dev, steps, starts, seqs, slots, table, dt, prefill, per_token })
    }
}

impl Attention for GpuCache<'_, '_> {
    fn attend(&mut self, li: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (n, nh, nkv, hd) = (q.dim(0), q.dim(1), k.dim(1), q.dim(2));
        let dt = self.dt;
        let (q, k, v) = (cast(q, dt)?, cast(k, dt)?, cast(v, dt)?);
        let t = &self.table.view;
        // SAFETY: `slots` holds the n packed tokens' slots, prepared blocks of this layout.
        unsafe {
            ks::kv_append(
                &self.dev,
                dt,
                (buf(&k).ptr(), buf(&v).ptr()),
                self.slots.ptr(),
                n,
                nkv * hd,
                (li, t.block_size, t.vofs),
            )?
        };
        let d = HeadDims { batch: 1, q_heads: nh, kv_heads: nkv, head_dim: hd };
        let (qp, row_bytes) = (buf(&q).ptr(), (nh * hd * dt.size()) as u64);
        if self.per_token || !self.prefill {
            // One launch for every row: row e of q against entry e of the table.
            let a = Tensor::from_gpu(zeros(&self.dev, dt, n * nh * hd)?, &[n, nh, hd])?;
            let d = HeadDims { batch: n, ..d };
            // SAFETY: q and a hold n rows; the table holds an entry (blocks, length) per row.
            unsafe { ks::decode_attn_batch(&self.dev, dt, qp, buf(&a).ptr(), t, li, d)? };
            return Ok(a);
        }
        // Flash attention for the prefills (several tokens, empty cache: causal attention among
        // them); decode attention against the cache for every single new token (its rows of the
        // flash output are overwritten).
        let a = cast(&ops::attention(&q, &k, &v, &self.seqs)?, dt)?;
        let ap = buf(&a).ptr();
        let nblk = self.table.nblk as u64;
        for (e, s) in self.steps.iter().enumerate() {
            if s.tokens.len() > 1 {
                continue;
            }
            let r = self.starts[e] as u64 * row_bytes;
            let one = StepTable { blocks: t.blocks + 8 * e as u64 * nblk, lens: t.lens + 4 * e as u64, ..*t };
            // SAFETY: row starts[e] of q and a exists; entry e of the table is this step's.
            unsafe { ks::decode_attn_batch(&self.dev, dt, qp + r, ap + r, &one, li, d)? };
        }
        Ok(a)
    }
}

/// Byte offsets of the sections of a decode step's table for `b` sequences (see
/// [`StepTable`]): the block-table width (one i32, 8 bytes kept), token ids, positions and
/// lengths (i32 `[b]` each), cos and sin (f32 `[b, head_dim/2]`), then the block tables (i64,
/// from the last offset on; their width varies from step to step).
fn table_offsets(b: usize, head_dim: usize) -> [usize; 7] {
    let h = head_dim / 2;
    let cos = 8 + 12 * b;
    let blocks = (cos + 8 * b * h).next_multiple_of(8);
    [0, 8, 8 + 4 * b, 8 + 8 * b, cos, cos + 4 * b * h, blocks]
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
    /// Positions per KV block of the caches this workspace serves, and the most blocks one
    /// sequence can have (the model's context): what the table has room for.
    block_size: usize,
    max_blocks: usize,
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
    /// Buffers for steps of up to `cap` sequences of `model` (on a GPU device) whose caches have
    /// blocks of `block_size` positions.
    pub fn new(model: &Model, cap: usize, block_size: usize) -> Result<DecodeWorkspace> {
        let dev = model.embed.gpu_storage().context("the model is not on a GPU device")?.device().clone();
        ensure!(model.batched_decode_supported(), "this model has no batched decode step");
        let (c, dt, cap) = (&model.config, model.embed.dtype(), cap.max(1));
        ensure!(block_size >= 1, "a KV block holds at least one position");
        let max_blocks = c.max_position_embeddings.div_ceil(block_size).max(1);
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
            table: crate::backend::memory::scope(ws, || {
                dev.alloc(table_offsets(cap, c.head_dim)[6] + 8 * cap * max_blocks)
            })?,
            block_size,
            max_blocks,
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
        let off = table_offsets(b, hd);
        let nblk = steps.iter().map(|s| s.cache.blocks().len()).max().unwrap_or(0).max(1);
        ensure!(nblk <= self.max_blocks, "a sequence of {nblk} KV blocks is past the model's context");
        let mut host = std::mem::take(&mut self.host);
        host.clear();
        host.resize(off[6] + 8 * b * nblk, 0);
        host[..4].copy_from_slice(&(nblk as i32).to_le_bytes());
        let mut half = 0;
        for (i, s) in steps.iter_mut().enumerate() {
            ensure!(
                s.cache.pool().block_size() == self.block_size,
                "a cache of {}-position blocks in a decode workspace for {}",
                s.cache.pool().block_size(),
                self.block_size
            );
            half = s.cache.pool().half_elems();
            let pos = s.cache.len();
            let put = |host: &mut [u8], sec: usize, size: usize, bytes: &[u8]| {
                host[off[sec] + i * size..off[sec] + (i + 1) * size].copy_from_slice(bytes)
            };
            put(&mut host, 1, 4, &(s.tokens[0] as i32).to_le_bytes());
            put(&mut host, 2, 4, &(pos as i32).to_le_bytes());
            put(&mut host, 3, 4, &(pos as i32 + 1).to_le_bytes());
            let (cos, sin) = model.rope.cos_sin(pos as u32);
            put(&mut host, 4, 2 * hd, bytemuck::cast_slice(&cos));
            put(&mut host, 5, 2 * hd, bytemuck::cast_slice(&sin));
            for (j, blk) in s.cache.blocks().iter().enumerate() {
                let at = off[6] + 8 * (i * nblk + j);
                host[at..at + 8].copy_from_slice(&blk.addr.to_le_bytes());
            }
        }
        self.table.write_at(0, &host)?;
        self.host = host;
        let at = |sec: usize| self.table.ptr() + off[sec] as u64;
        Ok(StepTable {
            blocks: at(6),
            nblk: at(0),
            block_size: self.block_size,
            vofs: half,
            ids: at(1),
            pos: at(2),
            lens: at(3),
            cos: at(4),
            sin: at(5),
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
    /// new keys and values in the caches. Allocates nothing once the pool has the blocks
    /// (rollouts reserve a group's worst case when they admit it; a sample's first step copies
    /// its partial prompt block, if shared).
    pub fn decode_step_gpu(&self, steps: &mut [Step], ws: &mut DecodeWorkspace) -> Result<()> {
        let (c, b) = (&self.config, steps.len());
        ensure!(b <= ws.cap, "a decode step of {b} sequences in a workspace for {}", ws.cap);
        for (i, s) in steps.iter_mut().enumerate() {
            ensure!(
                s.tokens.len() == 1 && !s.cache.is_empty(),
                "decode step {i} is not one token after a cache"
            );
            ensure!(s.cache.shape() == self.kv_shape(), "decode step {i}: the cache does not fit the model");
            ensure!(
                (s.tokens[0] as usize) < c.vocab_size,
                "token id {} is outside the vocabulary",
                s.tokens[0]
            );
            s.cache.prepare(1)?;
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
            s.cache.commit(1);
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
