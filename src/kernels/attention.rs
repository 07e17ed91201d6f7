//! Attention on a GPU device: FlashAttention-2 forward/backward (`kernels/flash_attn.cu`, tensor
//! cores through mma.sync) over packed variable-length sequences, and decode attention over a
//! KV cache (`kernels/decode_attn.cu`).

use anyhow::{ensure, Result};

use crate::backend::{GpuBuffer, GpuDevice, Kernel, KernelArgs, LaunchCfg};
use crate::dtype::DType;
use crate::kernels::cast::cast;

/// Query / key rows per block of the kernels.
const BM_FWD: usize = 64;
const BN: usize = 64;

fn bm_bwd(head_dim: usize) -> usize {
    if head_dim == 128 {
        16
    } else {
        64
    }
}

/// Dynamic shared memory of `fa_fwd_d{D}`.
pub fn fwd_smem(head_dim: usize) -> usize {
    (BM_FWD + 2 * BN) * (head_dim + 8) * 2
}

/// Dynamic shared memory of `fa_bwd_d{D}`.
pub fn bwd_smem(head_dim: usize) -> usize {
    let bm = bm_bwd(head_dim);
    (2 * BN + 2 * bm) * (head_dim + 8) * 2 + BN * (bm + 8) * 2 + 2 * bm * 4
}

/// `cu_seqlens` (n_seq + 1 offsets) of packed sequences given as (start, len); they must be
/// contiguous and in order. Also returns the longest length.
pub fn cu_seqlens(seqs: &[(usize, usize)]) -> Result<(Vec<i32>, usize)> {
    let mut cu = Vec::with_capacity(seqs.len() + 1);
    cu.push(seqs.first().map_or(0, |s| s.0) as i32);
    for &(s, l) in seqs {
        ensure!(s as i32 == *cu.last().unwrap(), "sequences must be packed back to back (cu_seqlens)");
        cu.push((s + l) as i32);
    }
    Ok((cu, seqs.iter().map(|s| s.1).max().unwrap_or(0)))
}

/// The table of packed sequences the flash kernels read: the `cu_seqlens` offsets (n_seq + 1)
/// and, when any sequence has a shared prefix (`prefix[i] = Some(p)`: sequence `i` also attends
/// to every key of sequence `p`; see `ops::attention_shared`), four i32 per sequence after them:
/// its prefix's first key row and length (0 without one), and the first index and count of the
/// sequences naming it as their prefix (consecutive). Also returns the longest own length.
/// Set [`FlashDims::shared`] when `prefix` has any entry.
pub fn seq_table(seqs: &[(usize, usize)], prefix: &[Option<usize>]) -> Result<(Vec<i32>, usize)> {
    let (mut t, max_len) = cu_seqlens(seqs)?;
    if prefix.iter().all(Option::is_none) {
        return Ok((t, max_len));
    }
    ensure!(prefix.len() == seqs.len(), "{} prefix entries for {} sequences", prefix.len(), seqs.len());
    for (i, p) in prefix.iter().enumerate() {
        let (ps, pl) = p.map_or((0, 0), |p| seqs[p]);
        let kids: Vec<usize> = (0..seqs.len()).filter(|&c| prefix[c] == Some(i)).collect();
        ensure!(
            kids.windows(2).all(|w| w[1] == w[0] + 1),
            "the sequences sharing prefix {i} are not consecutive"
        );
        let first = kids.first().copied().unwrap_or(0);
        t.extend([ps as i32, pl as i32, first as i32, kids.len() as i32]);
    }
    Ok((t, max_len))
}

/// Shapes of one flash-attention call.
#[derive(Clone, Copy, Debug)]
pub struct FlashDims {
    /// Total packed tokens (rows of q, k, v).
    pub tokens: usize,
    pub n_seq: usize,
    pub max_len: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// The sequence table carries shared prefixes (see [`seq_table`]).
    pub shared: bool,
}

impl FlashDims {
    fn check(&self) -> Result<()> {
        ensure!(
            self.kv_heads > 0 && self.q_heads.is_multiple_of(self.kv_heads),
            "q_heads {} not a multiple of kv_heads {}",
            self.q_heads,
            self.kv_heads
        );
        ensure!(self.q_heads <= 65535 && self.n_seq <= 65535, "too many heads or sequences for one launch");
        ensure!(
            FLASH_HEAD_DIMS.contains(&self.head_dim),
            "flash attention supports head_dim {:?}, not {} (zero-pad to one of them)",
            FLASH_HEAD_DIMS,
            self.head_dim
        );
        Ok(())
    }
    /// (forward, backward, backward of the dependants' queries on their prefix) kernel names.
    fn kernels(&self) -> (&'static str, &'static str, &'static str) {
        match self.head_dim {
            16 => ("fa_fwd_d16", "fa_bwd_d16", "fa_bwd_dep_d16"),
            32 => ("fa_fwd_d32", "fa_bwd_d32", "fa_bwd_dep_d32"),
            64 => ("fa_fwd_d64", "fa_bwd_d64", "fa_bwd_dep_d64"),
            _ => ("fa_fwd_d128", "fa_bwd_d128", "fa_bwd_dep_d128"),
        }
    }
    /// i32 entries of the sequence table ([`seq_table`]).
    pub fn table_len(&self) -> usize {
        self.n_seq + 1 + if self.shared { 4 * self.n_seq } else { 0 }
    }
    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
}

/// Head dims the flash kernels are compiled for.
pub const FLASH_HEAD_DIMS: [usize; 4] = [16, 32, 64, 128];

/// The smallest flash head dim that holds `head_dim` (which is then zero-padded to it: zero
/// columns change neither q·k nor the softmax, and give zero output columns), if any.
pub fn padded_head_dim(head_dim: usize) -> Option<usize> {
    FLASH_HEAD_DIMS.iter().copied().find(|&d| d >= head_dim)
}

/// Causal GQA forward: `o` (bf16, like q) and `lse` (f32 `[tokens, q_heads]`).
/// `cu_seqlens`: i32 device buffer of n_seq + 1 offsets.
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_fwd(
    dev: &GpuDevice,
    d: &FlashDims,
    q: &GpuBuffer,
    k: &GpuBuffer,
    v: &GpuBuffer,
    cu_seqlens: &GpuBuffer,
    o: &GpuBuffer,
    lse: &GpuBuffer,
) -> Result<()> {
    flash_attn_fwd_scaled(dev, d, q, k, v, cu_seqlens, o, lse, d.scale())
}

/// [`flash_attn_fwd`] with an explicit softmax scale (a zero-padded head dim keeps the scale of
/// the real one).
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_fwd_scaled(
    dev: &GpuDevice,
    d: &FlashDims,
    q: &GpuBuffer,
    k: &GpuBuffer,
    v: &GpuBuffer,
    cu_seqlens: &GpuBuffer,
    o: &GpuBuffer,
    lse: &GpuBuffer,
    scale: f32,
) -> Result<()> {
    d.check()?;
    ensure!(
        q.bytes() >= d.tokens * d.q_heads * d.head_dim * 2
            && o.bytes() >= q.bytes().min(d.tokens * d.q_heads * d.head_dim * 2),
        "flash_attn_fwd: q/o too small"
    );
    ensure!(
        k.bytes() >= d.tokens * d.kv_heads * d.head_dim * 2
            && v.bytes() >= d.tokens * d.kv_heads * d.head_dim * 2,
        "flash_attn_fwd: k/v too small"
    );
    ensure!(
        lse.bytes() >= d.tokens * d.q_heads * 4 && cu_seqlens.bytes() >= d.table_len() * 4,
        "flash_attn_fwd: lse/cu_seqlens too small"
    );
    if d.n_seq == 0 || d.max_len == 0 {
        return Ok(());
    }
    let cfg = LaunchCfg {
        grid: (d.max_len.div_ceil(BM_FWD) as u32, d.q_heads as u32, d.n_seq as u32),
        block: (128, 1, 1),
        shared_bytes: fwd_smem(d.head_dim) as u32,
    };
    let mut a = KernelArgs::new();
    a.buf(q)
        .buf(k)
        .buf(v)
        .buf(o)
        .buf(lse)
        .buf(cu_seqlens)
        .i32(d.q_heads as i32)
        .i32(d.kv_heads as i32)
        .f32(scale)
        .i32(d.shared as i32);
    dev.launch(Kernel::new("flash_attn.cu", d.kernels().0), cfg, &mut a)
}

/// Backward: `dq`, `dk`, `dv` (bf16) from `dout`, the forward's `o` and `lse`.
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_bwd(
    dev: &GpuDevice,
    d: &FlashDims,
    q: &GpuBuffer,
    k: &GpuBuffer,
    v: &GpuBuffer,
    cu_seqlens: &GpuBuffer,
    o: &GpuBuffer,
    lse: &GpuBuffer,
    dout: &GpuBuffer,
    dq: &GpuBuffer,
    dk: &GpuBuffer,
    dv: &GpuBuffer,
) -> Result<()> {
    flash_attn_bwd_scaled(dev, d, q, k, v, cu_seqlens, o, lse, dout, dq, dk, dv, d.scale())
}

/// [`flash_attn_bwd`] with an explicit softmax scale (as the forward had).
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_bwd_scaled(
    dev: &GpuDevice,
    d: &FlashDims,
    q: &GpuBuffer,
    k: &GpuBuffer,
    v: &GpuBuffer,
    cu_seqlens: &GpuBuffer,
    o: &GpuBuffer,
    lse: &GpuBuffer,
    dout: &GpuBuffer,
    dq: &GpuBuffer,
    dk: &GpuBuffer,
    dv: &GpuBuffer,
    scale: f32,
) -> Result<()> {
    d.check()?;
    let nq = d.tokens * d.q_heads * d.head_dim;
    ensure!(
        dout.bytes() >= nq * 2 && dq.bytes() >= nq * 2 && o.bytes() >= nq * 2,
        "flash_attn_bwd: buffers too small"
    );
    ensure!(
        dk.bytes() >= d.tokens * d.kv_heads * d.head_dim * 2
            && dv.bytes() >= d.tokens * d.kv_heads * d.head_dim * 2,
        "flash_attn_bwd: dk/dv too small"
    );
    ensure!(cu_seqlens.bytes() >= d.table_len() * 4, "flash_attn_bwd: cu_seqlens too small");
    if d.n_seq == 0 || d.max_len == 0 {
        return Ok(());
    }
    let delta = bwd_delta(dev, d, "fa_bwd_dot", o, dout)?;
    let dq32 = dev.zeros(nq * 4)?;
    let cfg = LaunchCfg {
        grid: (d.max_len.div_ceil(BN) as u32, d.kv_heads as u32, d.n_seq as u32),
        block: (128, 1, 1),
        shared_bytes: bwd_smem(d.head_dim) as u32,
    };
    // With shared prefixes, first what every dependant's queries give its prefix's dK/dV
    // (f32, summed with atomics), which the main kernel then starts its prefix tiles from.
    let acc = if d.shared {
        let nk = d.tokens * d.kv_heads * d.head_dim * 4;
        let (acc_dk, acc_dv) = (dev.zeros(nk)?, dev.zeros(nk)?);
        let mut a = KernelArgs::new();
        a.buf(q).buf(k).buf(v).buf(dout).buf(lse).buf(&delta).buf(&dq32).buf(&acc_dk).buf(&acc_dv);
        a.buf(cu_seqlens).i32(d.q_heads as i32).i32(d.kv_heads as i32).f32(scale);
        dev.launch(Kernel::new("flash_attn.cu", d.kernels().2), cfg, &mut a)?;
        Some((acc_dk, acc_dv))
    } else {
        None
    };
    // Without them the accumulators are never read: any buffer stands in.
    let (acc_dk, acc_dv) = acc.as_ref().map_or((&dq32, &dq32), |(a, b)| (a, b));
    let mut a = KernelArgs::new();
    a.buf(q)
        .buf(k)
        .buf(v)
        .buf(dout)
        .buf(lse)
        .buf(&delta)
        .buf(&dq32)
        .buf(dk)
        .buf(dv)
        .buf(acc_dk)
        .buf(acc_dv)
        .buf(cu_seqlens)
        .i32(d.q_heads as i32)
        .i32(d.kv_heads as i32)
        .f32(scale)
        .i32(d.shared as i32);
    dev.launch(Kernel::new("flash_attn.cu", d.kernels().1), cfg, &mut a)?;
    cast(dev, &dq32, DType::F32, dq, DType::BF16, nq)
}

/// `delta[t, h] = Σ_d O·dO` (f32) with `kernel` (`fa_bwd_dot` for bf16, `fa_bwd_dot_f32`): the
/// first step of both backwards, one warp per (token, head).
fn bwd_delta(
    dev: &GpuDevice,
    d: &FlashDims,
    kernel: &'static str,
    o: &GpuBuffer,
    dout: &GpuBuffer,
) -> Result<GpuBuffer> {
    let rows = d.tokens * d.q_heads;
    let delta = dev.alloc(rows * 4)?;
    let mut a = KernelArgs::new();
    a.buf(o).buf(dout).buf(&delta).i64(rows as i64).i32(d.head_dim as i32);
    dev.launch(
        Kernel::new("flash_attn.cu", kernel),
        LaunchCfg::linear(rows.div_ceil(8) as u32, 256),
        &mut a,
    )?;
    Ok(delta)
}

/// Largest head dim of the f32 kernels (lanes split it, 8 elements each).
pub const F32_MAX_HEAD_DIM: usize = 256;

/// Checks shapes and buffer sizes of an f32 call: q-shaped buffers `qlike`, k-shaped `klike`.
fn check_f32(d: &FlashDims, qlike: &[&GpuBuffer], klike: &[&GpuBuffer], what: &str) -> Result<()> {
    ensure!(
        d.kv_heads > 0 && d.q_heads.is_multiple_of(d.kv_heads),
        "q_heads {} not a multiple of kv_heads {}",
        d.q_heads,
        d.kv_heads
    );
    ensure!(d.q_heads <= 65535 && d.n_seq <= 65535, "too many heads or sequences for one launch");
    ensure!(
        (1..=F32_MAX_HEAD_DIM).contains(&d.head_dim),
        "f32 attention supports head_dim 1..={F32_MAX_HEAD_DIM}, not {}",
        d.head_dim
    );
    let (nq, nk) = (d.tokens * d.q_heads * d.head_dim * 4, d.tokens * d.kv_heads * d.head_dim * 4);
    ensure!(qlike.iter().all(|b| b.bytes() >= nq), "{what}: a q-shaped f32 buffer is too small");
    ensure!(klike.iter().all(|b| b.bytes() >= nk), "{what}: a k-shaped f32 buffer is too small");
    Ok(())
}

/// Grid of the f32 kernels: 4 rows (one per warp) of `heads` heads of every sequence.
fn f32_grid(d: &FlashDims, heads: usize) -> LaunchCfg {
    LaunchCfg {
        grid: (d.max_len.div_ceil(4) as u32, heads as u32, d.n_seq as u32),
        block: (128, 1, 1),
        shared_bytes: 0,
    }
}

/// Causal GQA forward on f32 q/k/v (`fa_fwd_f32`): `o` (f32, like q) and `lse` (f32
/// `[tokens, q_heads]`), computed in f32 throughout. Any head dim up to 256, no padding.
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_fwd_f32(
    dev: &GpuDevice,
    d: &FlashDims,
    q: &GpuBuffer,
    k: &GpuBuffer,
    v: &GpuBuffer,
    cu_seqlens: &GpuBuffer,
    o: &GpuBuffer,
    lse: &GpuBuffer,
    scale: f32,
) -> Result<()> {
    check_f32(d, &[q, o], &[k, v], "flash_attn_fwd_f32")?;
    ensure!(
        lse.bytes() >= d.tokens * d.q_heads * 4 && cu_seqlens.bytes() >= d.table_len() * 4,
        "flash_attn_fwd_f32: lse/cu_seqlens too small"
    );
    if d.n_seq == 0 || d.max_len == 0 {
        return Ok(());
    }
    let mut a = KernelArgs::new();
    a.buf(q).buf(k).buf(v).buf(o).buf(lse).buf(cu_seqlens);
    a.i32(d.q_heads as i32).i32(d.kv_heads as i32).i32(d.head_dim as i32).f32(scale).i32(d.shared as i32);
    dev.launch(Kernel::new("flash_attn.cu", "fa_fwd_f32"), f32_grid(d, d.q_heads), &mut a)
}

/// Backward of [`flash_attn_fwd_f32`]: `dq`, `dk`, `dv` (f32) from `dout`, the forward's `o`
/// and `lse`. Deterministic: every gradient element is written by one warp, no atomics.
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_bwd_f32(
    dev: &GpuDevice,
    d: &FlashDims,
    q: &GpuBuffer,
    k: &GpuBuffer,
    v: &GpuBuffer,
    cu_seqlens: &GpuBuffer,
    o: &GpuBuffer,
    lse: &GpuBuffer,
    dout: &GpuBuffer,
    (dq, dk, dv): (&GpuBuffer, &GpuBuffer, &GpuBuffer),
    scale: f32,
) -> Result<()> {
    check_f32(d, &[q, o, dout, dq], &[k, v, dk, dv], "flash_attn_bwd_f32")?;
    ensure!(
        lse.bytes() >= d.tokens * d.q_heads * 4 && cu_seqlens.bytes() >= d.table_len() * 4,
        "flash_attn_bwd_f32: lse/cu_seqlens too small"
    );
    if d.n_seq == 0 || d.max_len == 0 {
        return Ok(());
    }
    let delta = bwd_delta(dev, d, "fa_bwd_dot_f32", o, dout)?;
    let dims = |a: &mut KernelArgs| {
        a.buf(cu_seqlens).i32(d.q_heads as i32).i32(d.kv_heads as i32).i32(d.head_dim as i32).f32(scale);
        a.i32(d.shared as i32);
    };
    let mut a = KernelArgs::new();
    a.buf(q).buf(k).buf(v).buf(dout).buf(lse).buf(&delta).buf(dq);
    dims(&mut a);
    dev.launch(Kernel::new("flash_attn.cu", "fa_bwd_dq_f32"), f32_grid(d, d.q_heads), &mut a)?;
    let mut a = KernelArgs::new();
    a.buf(q).buf(k).buf(v).buf(dout).buf(lse).buf(&delta).buf(dk).buf(dv);
    dims(&mut a);
    dev.launch(Kernel::new("flash_attn.cu", "fa_bwd_dkdv_f32"), f32_grid(d, d.kv_heads), &mut a)
}

/// Layout of a KV cache: element strides of a batch entry, a position and a kv head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheLayout {
    pub batch_stride: usize,
    pub pos_stride: usize,
    pub head_stride: usize,
}

impl CacheLayout {
    /// `[batch, max_len, kv_heads, head_dim]` (token-major, like the training layout).
    pub fn token_major(max_len: usize, kv_heads: usize, head_dim: usize) -> CacheLayout {
        CacheLayout {
            batch_stride: max_len * kv_heads * head_dim,
            pos_stride: kv_heads * head_dim,
            head_stride: head_dim,
        }
    }
    /// `[batch, kv_heads, max_len, head_dim]` (one head's keys contiguous, like the CPU cache).
    pub fn head_major(max_len: usize, kv_heads: usize, head_dim: usize) -> CacheLayout {
        CacheLayout {
            batch_stride: max_len * kv_heads * head_dim,
            pos_stride: head_dim,
            head_stride: max_len * head_dim,
        }
    }
}

/// One query token per sequence against the KV cache `[batch, max_len, kv_heads, head_dim]`
/// (bf16); `lens` (i32 `[batch]`) keys per sequence. Writes `o` `[batch, q_heads, head_dim]`.
#[allow(clippy::too_many_arguments)]
pub fn decode_attn(
    dev: &GpuDevice,
    q: &GpuBuffer,
    k_cache: &GpuBuffer,
    v_cache: &GpuBuffer,
    lens: &GpuBuffer,
    o: &GpuBuffer,
    batch: usize,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    max_len: usize,
) -> Result<()> {
    decode_attn_strided(
        dev,
        q,
        k_cache,
        v_cache,
        lens,
        o,
        batch,
        q_heads,
        kv_heads,
        head_dim,
        max_len,
        CacheLayout::token_major(max_len, kv_heads, head_dim),
        DType::BF16,
    )
}

/// [`decode_attn`] with any cache layout (see [`CacheLayout`]) and element dtype (bf16, or f32
/// for `--dtype f32`; q, caches and o share it).
#[allow(clippy::too_many_arguments)]
pub fn decode_attn_strided(
    dev: &GpuDevice,
    q: &GpuBuffer,
    k_cache: &GpuBuffer,
    v_cache: &GpuBuffer,
    lens: &GpuBuffer,
    o: &GpuBuffer,
    batch: usize,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    max_len: usize,
    layout: CacheLayout,
    dtype: DType,
) -> Result<()> {
    let es = dtype.size();
    ensure!(
        k_cache.bytes() >= batch * max_len * kv_heads * head_dim * es
            && v_cache.bytes() >= batch * max_len * kv_heads * head_dim * es,
        "decode_attn: cache too small"
    );
    ensure!(
        q.bytes() >= batch * q_heads * head_dim * es
            && o.bytes() >= batch * q_heads * head_dim * es
            && lens.bytes() >= batch * 4,
        "decode_attn: buffers too small"
    );
    // SAFETY: the sizes were checked above.
    unsafe {
        decode_attn_at(
            dev,
            q.ptr(),
            k_cache.ptr(),
            v_cache.ptr(),
            lens.ptr(),
            o.ptr(),
            batch,
            q_heads,
            kv_heads,
            head_dim,
            max_len,
            layout,
            dtype,
        )
    }
}

/// [`decode_attn_strided`] on raw device addresses (rows of larger buffers: the KV-cache decoder
/// attends one sequence at a time inside its packed q/o activations and its own cache).
///
/// # Safety
/// Every address lies in a live allocation of `dev` holding what the layout and sizes imply:
/// `q`/`o` `batch × q_heads × head_dim` of `dtype`, `lens` `batch` i32, the caches `batch` entries of
/// `max_len` positions under `layout`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn decode_attn_at(
    dev: &GpuDevice,
    q: u64,
    k_cache: u64,
    v_cache: u64,
    lens: u64,
    o: u64,
    batch: usize,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    max_len: usize,
    layout: CacheLayout,
    dtype: DType,
) -> Result<()> {
    ensure!(head_dim <= 256 && head_dim > 0, "decode attention supports head_dim up to 256");
    let kernel = match dtype {
        DType::BF16 => "decode_attn_bf16",
        DType::F32 => "decode_attn_f32",
        other => anyhow::bail!("decode attention runs on bf16 or f32, not {other:?}"),
    };
    ensure!(
        kv_heads > 0 && q_heads.is_multiple_of(kv_heads),
        "q_heads {q_heads} not a multiple of kv_heads {kv_heads}"
    );
    if batch == 0 {
        return Ok(());
    }
    let mut a = KernelArgs::new();
    a.ptr(q)
        .ptr(k_cache)
        .ptr(v_cache)
        .ptr(lens)
        .ptr(o)
        .i32(q_heads as i32)
        .i32(kv_heads as i32)
        .i32(head_dim as i32)
        .i32(max_len as i32)
        .i64(layout.batch_stride as i64)
        .i64(layout.pos_stride as i64)
        .i64(layout.head_stride as i64)
        .f32(1.0 / (head_dim as f32).sqrt());
    let cfg = LaunchCfg { grid: (q_heads as u32, batch as u32, 1), block: (128, 1, 1), shared_bytes: 0 };
    dev.launch(Kernel::new("decode_attn.cu", kernel), cfg, &mut a)
}
