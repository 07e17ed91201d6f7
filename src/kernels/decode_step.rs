//! The batched decode step on a GPU device: launch wrappers for `kernels/decode_step.cu`
//! (`decode_qkv`, `add_rmsnorm`), the batched decode attention of `kernels/decode_attn.cu` and
//! the device sampler's `draw_rows` of `kernels/sample.cu`. They take raw device addresses
//! because a step's inputs are sections of one uploaded table and rows of reused workspace
//! buffers; the caller (`model::decode_gpu::DecodeWorkspace`) sizes both.

use anyhow::{bail, ensure, Result};

use crate::backend::{dtype_suffix, GpuDevice, Kernel, KernelArgs, LaunchCfg};
use crate::dtype::DType;

/// Device addresses of a decode step's per-sequence table: each sequence's block table
/// (`blocks`: i64 block addresses, `[B, *nblk]`; `nblk`: one i32, the entries per sequence),
/// token ids, positions and attended lengths (i32), and the RoPE cos/sin of each position (f32
/// `[B, head_dim/2]`); and the paged layout (`model::kv_cache`): positions per block and the
/// elements from a block's keys to its values.
#[derive(Clone, Copy, Debug)]
pub struct StepTable {
    pub blocks: u64,
    pub nblk: u64,
    pub block_size: usize,
    pub vofs: usize,
    pub ids: u64,
    pub pos: u64,
    pub lens: u64,
    pub cos: u64,
    pub sin: u64,
}

/// Shapes of one layer's attention in a decode step.
#[derive(Clone, Copy, Debug)]
pub struct HeadDims {
    pub batch: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl HeadDims {
    fn check(&self) -> Result<()> {
        ensure!(
            self.head_dim > 0 && self.head_dim <= 256 && self.head_dim.is_multiple_of(2),
            "batched decode needs an even head_dim up to 256, not {}",
            self.head_dim
        );
        ensure!(
            self.kv_heads > 0 && self.q_heads.is_multiple_of(self.kv_heads),
            "q_heads {} not a multiple of kv_heads {}",
            self.q_heads,
            self.kv_heads
        );
        ensure!(self.batch <= 65535, "a decode step of {} sequences is more than one grid holds", self.batch);
        Ok(())
    }
}

/// Threads per row: one per element up to 256 (rmsnorm_fwd's choice, so the sums match it).
pub fn row_block(d: usize) -> u32 {
    (d.div_ceil(32) * 32).clamp(32, 256) as u32
}

fn pick(dtype: DType, bf16: &'static str, f32: &'static str) -> Result<&'static str> {
    Ok(if dtype_suffix(dtype)? == "bf16" { bf16 } else { f32 })
}

/// Optional per-layer vectors of `decode_qkv`: q/k/v biases and Qwen3's q/k norm weights.
#[derive(Clone, Copy, Debug, Default)]
pub struct QkvExtras {
    pub bq: u64,
    pub bk: u64,
    pub bv: u64,
    pub qn: u64,
    pub kn: u64,
}

/// Bias, q/k norm and RoPE of the projected q (in place), k and v of one layer, and k/v appended
/// to every sequence's cache at its position (see `kernels/decode_step.cu`).
///
/// # Safety
/// `q`, `k`, `v` hold `batch` rows of their heads in `dtype`; the extras (0 = absent) hold
/// `[heads·head_dim]` biases and `[head_dim]` norm weights; `t` is a table of `batch` entries
/// whose caches have room for position `pos[b]` of layer `layer`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn decode_qkv(
    dev: &GpuDevice,
    dtype: DType,
    (q, k, v): (u64, u64, u64),
    ex: &QkvExtras,
    t: &StepTable,
    layer: usize,
    d: HeadDims,
    eps: f32,
) -> Result<()> {
    d.check()?;
    if d.batch == 0 {
        return Ok(());
    }
    let mut a = KernelArgs::new();
    a.ptr(q).ptr(k).ptr(v).ptr(ex.bq).ptr(ex.bk).ptr(ex.bv).ptr(ex.qn).ptr(ex.kn);
    a.ptr(t.cos).ptr(t.sin).ptr(t.blocks).ptr(t.nblk).ptr(t.pos);
    a.i32(t.block_size as i32)
        .i64(t.vofs as i64)
        .i32(layer as i32)
        .i32(d.q_heads as i32)
        .i32(d.kv_heads as i32)
        .i32(d.head_dim as i32)
        .f32(eps);
    let grid = ((d.q_heads + 2 * d.kv_heads) as u32, d.batch as u32, 1);
    let cfg = LaunchCfg { grid, block: (row_block(d.head_dim), 1, 1), shared_bytes: 0 };
    dev.launch(Kernel::new("decode_step.cu", pick(dtype, "decode_qkv_bf16", "decode_qkv_f32")?), cfg, &mut a)
}

/// The per-op decoder's KV append: `n` rows of `k` and `v` (`row` elements each, `dtype`) into
/// paged caches, row t at `slots[t]` (i64 address of its key row at layer 0) plus layer
/// `layer`'s offset (see `kernels/decode_step.cu`).
///
/// # Safety
/// `k`, `v` hold `n` rows; `slots` holds `n` addresses of slots of blocks laid out as
/// `model::kv_cache` says, with `block_size` positions and values `vofs` elements after keys.
#[allow(clippy::too_many_arguments)]
pub unsafe fn kv_append(
    dev: &GpuDevice,
    dtype: DType,
    (k, v): (u64, u64),
    slots: u64,
    n: usize,
    row: usize,
    (layer, block_size, vofs): (usize, usize, usize),
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    ensure!(n <= i32::MAX as usize && row <= i32::MAX as usize, "kv_append of {n} rows of {row}");
    let mut a = KernelArgs::new();
    a.ptr(k).ptr(v).ptr(slots).i32(row as i32);
    a.i64((layer * block_size * row) as i64).i64(vofs as i64);
    let cfg = LaunchCfg { grid: (n as u32, 1, 1), block: (128, 1, 1), shared_bytes: 0 };
    dev.launch(Kernel::new("decode_step.cu", pick(dtype, "kv_append_bf16", "kv_append_f32")?), cfg, &mut a)
}

/// One query token per sequence of the batch against its own cache (layer `layer`), in one
/// launch; `o` `[batch, q_heads, head_dim]`.
///
/// # Safety
/// `q` and `o` hold `batch` rows of `q_heads·head_dim` elements of `dtype`; `t` is a table of
/// `batch` entries whose caches hold `lens[b]` written positions of layer `layer`.
pub unsafe fn decode_attn_batch(
    dev: &GpuDevice,
    dtype: DType,
    q: u64,
    o: u64,
    t: &StepTable,
    layer: usize,
    d: HeadDims,
) -> Result<()> {
    d.check()?;
    if d.batch == 0 {
        return Ok(());
    }
    let mut a = KernelArgs::new();
    a.ptr(q).ptr(t.blocks).ptr(t.nblk).ptr(t.lens).ptr(o);
    a.i32(layer as i32).i32(d.q_heads as i32).i32(d.kv_heads as i32).i32(d.head_dim as i32);
    a.i32(t.block_size as i32).i64(t.vofs as i64).f32(1.0 / (d.head_dim as f32).sqrt());
    let cfg = LaunchCfg { grid: (d.q_heads as u32, d.batch as u32, 1), block: (128, 1, 1), shared_bytes: 0 };
    let name = pick(dtype, "decode_attn_batch_bf16", "decode_attn_batch_f32")?;
    dev.launch(Kernel::new("decode_attn.cu", name), cfg, &mut a)
}

/// `x += y` (the residual, in place), then `h = RMSNorm(x)·w`, over `rows` rows of `d`.
///
/// # Safety
/// `x`, `y`, `h` hold `rows × d` elements of `dtype`, `w` holds `d`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn add_rmsnorm(
    dev: &GpuDevice,
    dtype: DType,
    x: u64,
    y: u64,
    w: u64,
    h: u64,
    rows: usize,
    d: usize,
    eps: f32,
) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    let mut a = KernelArgs::new();
    a.ptr(x).ptr(y).ptr(w).ptr(h).i32(d as i32).f32(eps);
    let name = pick(dtype, "add_rmsnorm_bf16", "add_rmsnorm_f32")?;
    dev.launch(Kernel::new("decode_step.cu", name), LaunchCfg::linear(rows as u32, row_block(d)), &mut a)
}

/// `y = RMSNorm(x)·w` without saving 1/rms (inference), `rmsnorm_fwd` with a null `rstd`.
///
/// # Safety
/// `x` and `y` hold `rows × d` elements of `dtype`, `w` holds `d`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn rmsnorm(
    dev: &GpuDevice,
    dtype: DType,
    x: u64,
    w: u64,
    y: u64,
    rows: usize,
    d: usize,
    eps: f32,
) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    let mut a = KernelArgs::new();
    a.ptr(x).ptr(w).ptr(y).null().i32(d as i32).f32(eps);
    let name = pick(dtype, "rmsnorm_fwd_bf16", "rmsnorm_fwd_f32")?;
    dev.launch(Kernel::new("rmsnorm.cu", name), LaunchCfg::linear(rows as u32, row_block(d)), &mut a)
}

/// `out[t] = table[ids[t]]` with the ids already on the device (a section of the step table).
///
/// # Safety
/// `ids` holds `tokens` i32, `table` `vocab × d` and `out` `tokens × d` elements of `dtype`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn embedding(
    dev: &GpuDevice,
    dtype: DType,
    ids: u64,
    table: u64,
    out: u64,
    tokens: usize,
    vocab: usize,
    d: usize,
) -> Result<()> {
    if tokens == 0 {
        return Ok(());
    }
    let mut a = KernelArgs::new();
    a.ptr(ids).ptr(table).ptr(out).i32(vocab as i32).i32(d as i32);
    let name = pick(dtype, "embedding_fwd_bf16", "embedding_fwd_f32")?;
    dev.launch(Kernel::new("embedding.cu", name), LaunchCfg::linear(tokens as u32, row_block(d)), &mut a)
}

/// Sampling settings of [`draw_rows`] (the CPU sampler's `SamplerParams`, greedy when the
/// temperature is 0).
#[derive(Clone, Copy, Debug)]
pub struct DrawParams {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
}

/// Where [`draw_rows`] reads and writes: `rows` (i32, each sample's row of logits), `u` (f32
/// uniforms in [0, 1)), and the outputs `tokens` (i32), `logp`, `entropy` (f32), `samples` of
/// each.
#[derive(Clone, Copy, Debug)]
pub struct DrawIo {
    pub rows: u64,
    pub u: u64,
    pub tokens: u64,
    pub logp: u64,
    pub entropy: u64,
    pub samples: usize,
}

/// One launch draws every sample's next token from its row of `logits` (`[rows, vocab]`, row
/// stride `ld`), with the token's log-probability and the full distribution's entropy.
///
/// # Safety
/// `logits` holds every row `rows[i]` names (`vocab` elements of `dtype` each, `ld` apart);
/// every address of `io` holds `samples` 4-byte values.
pub unsafe fn draw_rows(
    dev: &GpuDevice,
    dtype: DType,
    logits: u64,
    ld: usize,
    vocab: usize,
    p: &DrawParams,
    io: &DrawIo,
) -> Result<()> {
    ensure!(p.top_p > 0.0 && p.top_p <= 1.0, "top_p must be in (0, 1]");
    ensure!(p.temperature >= 0.0 && p.temperature.is_finite(), "temperature must be finite and ≥ 0");
    if vocab == 0 || vocab > i32::MAX as usize {
        bail!("draw_rows: vocabulary of {vocab}");
    }
    if io.samples == 0 {
        return Ok(());
    }
    let greedy = p.temperature <= 0.0;
    let inv_t = if greedy { 1.0 } else { 1.0 / p.temperature };
    let mut a = KernelArgs::new();
    a.ptr(logits).i64(ld as i64).i32(vocab as i32).ptr(io.rows).f32(inv_t).f32(p.top_p);
    a.i32(p.top_k.min(i32::MAX as usize) as i32).i32(greedy as i32).ptr(io.u);
    a.ptr(io.tokens).ptr(io.logp).ptr(io.entropy);
    let name = pick(dtype, "draw_rows_bf16", "draw_rows_f32")?;
    dev.launch(Kernel::new("sample.cu", name), LaunchCfg::linear(io.samples as u32, 256), &mut a)
}
