//! Fused log-prob + entropy on a GPU device: launch wrappers for `kernels/logprob_entropy.cu`,
//! and the chunked LM-head path (GEMM for a chunk of rows, then the fused row kernel), so full
//! `T × V` logits never exist.

use anyhow::{ensure, Result};

use crate::backend::{dtype_suffix, Gemm, GpuBuffer, GpuDevice, Kernel, KernelArgs, LaunchCfg};
use crate::dtype::DType;

/// Rows of logits per chunk in [`linear_lpe_fwd`] / [`linear_lpe_bwd`].
pub const CHUNK: usize = 1024;

fn name(fwd: bool, dtype: DType) -> Result<&'static str> {
    Ok(match (fwd, dtype_suffix(dtype)?) {
        (true, "bf16") => "lpe_fwd_bf16",
        (true, _) => "lpe_fwd_f32",
        (false, "bf16") => "lpe_bwd_bf16",
        (false, _) => "lpe_bwd_f32",
    })
}

/// Per row of `logits` (`rows × vocab`, row stride `ld` elements): log p(target) (0 where the
/// target is < 0), entropy and log Z of softmax(z / temperature). Outputs are f32, optional.
#[allow(clippy::too_many_arguments)]
pub fn lpe_fwd(
    dev: &GpuDevice,
    dtype: DType,
    logits: &GpuBuffer,
    ld: usize,
    targets: Option<&GpuBuffer>,
    rows: usize,
    vocab: usize,
    temperature: f32,
    logp: Option<&GpuBuffer>,
    entropy: Option<&GpuBuffer>,
    logz: Option<&GpuBuffer>,
) -> Result<()> {
    lpe_fwd_at(
        dev,
        dtype,
        logits.ptr(),
        ld,
        targets.map(|t| t.ptr()),
        rows,
        vocab,
        temperature,
        logp.map(|b| b.ptr()),
        entropy.map(|b| b.ptr()),
        logz.map(|b| b.ptr()),
    )
}

#[allow(clippy::too_many_arguments)]
fn lpe_fwd_at(
    dev: &GpuDevice,
    dtype: DType,
    logits: u64,
    ld: usize,
    targets: Option<u64>,
    rows: usize,
    vocab: usize,
    temperature: f32,
    logp: Option<u64>,
    entropy: Option<u64>,
    logz: Option<u64>,
) -> Result<()> {
    ensure!(temperature > 0.0, "temperature must be > 0");
    if rows == 0 {
        return Ok(());
    }
    let mut a = KernelArgs::new();
    a.ptr(logits)
        .i64(ld as i64)
        .ptr(targets.unwrap_or(0))
        .i32(vocab as i32)
        .f32(1.0 / temperature)
        .ptr(logp.unwrap_or(0))
        .ptr(entropy.unwrap_or(0))
        .ptr(logz.unwrap_or(0));
    dev.launch(
        Kernel::new("logprob_entropy.cu", name(true, dtype)?),
        LaunchCfg::linear(rows as u32, 256),
        &mut a,
    )
}

/// `dlogits = ∂(Σ dlogp·logp + dent·H)/∂z` per row (1/T included). `dlogits` may be `logits`.
#[allow(clippy::too_many_arguments)]
pub fn lpe_bwd(
    dev: &GpuDevice,
    dtype: DType,
    logits: &GpuBuffer,
    ld: usize,
    targets: Option<&GpuBuffer>,
    rows: usize,
    vocab: usize,
    temperature: f32,
    logz: &GpuBuffer,
    entropy: &GpuBuffer,
    dlogp: Option<&GpuBuffer>,
    dent: Option<&GpuBuffer>,
    dlogits: &GpuBuffer,
    ldd: usize,
) -> Result<()> {
    lpe_bwd_at(
        dev,
        dtype,
        logits.ptr(),
        ld,
        targets.map(|t| t.ptr()),
        rows,
        vocab,
        temperature,
        logz.ptr(),
        entropy.ptr(),
        dlogp.map(|b| b.ptr()),
        dent.map(|b| b.ptr()),
        dlogits.ptr(),
        ldd,
    )
}

#[allow(clippy::too_many_arguments)]
fn lpe_bwd_at(
    dev: &GpuDevice,
    dtype: DType,
    logits: u64,
    ld: usize,
    targets: Option<u64>,
    rows: usize,
    vocab: usize,
    temperature: f32,
    logz: u64,
    entropy: u64,
    dlogp: Option<u64>,
    dent: Option<u64>,
    dlogits: u64,
    ldd: usize,
) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    let mut a = KernelArgs::new();
    a.ptr(logits)
        .i64(ld as i64)
        .ptr(targets.unwrap_or(0))
        .i32(vocab as i32)
        .f32(1.0 / temperature)
        .ptr(logz)
        .ptr(entropy)
        .ptr(dlogp.unwrap_or(0))
        .ptr(dent.unwrap_or(0))
        .ptr(dlogits)
        .i64(ldd as i64);
    dev.launch(
        Kernel::new("logprob_entropy.cu", name(false, dtype)?),
        LaunchCfg::linear(rows as u32, 256),
        &mut a,
    )
}

/// LM head + fused stats: for `h` `[rows, hidden]` and `w` `[vocab, hidden]` (both `dtype`),
/// logits = h·wᵀ chunk by chunk (`chunk` rows, a `chunk × vocab` scratch), then logp/H/logZ (f32).
#[allow(clippy::too_many_arguments)]
pub fn linear_lpe_fwd(
    dev: &GpuDevice,
    dtype: DType,
    h: &GpuBuffer,
    w: &GpuBuffer,
    targets: &GpuBuffer,
    rows: usize,
    hidden: usize,
    vocab: usize,
    temperature: f32,
    chunk: usize,
    logp: &GpuBuffer,
    entropy: &GpuBuffer,
    logz: &GpuBuffer,
) -> Result<()> {
    let es = dtype.size();
    let chunk = chunk.clamp(1, rows.max(1));
    let scratch = crate::backend::memory::scope(crate::backend::memory::Category::LogitsChunks, || {
        dev.alloc(chunk * vocab * es)
    })?;
    for r0 in (0..rows).step_by(chunk) {
        let n = chunk.min(rows - r0);
        let g = Gemm::simple(
            dtype,
            n,
            vocab,
            hidden,
            h.ptr() + (r0 * hidden * es) as u64,
            w.ptr(),
            true,
            scratch.ptr(),
        );
        dev.gemm(&g)?;
        lpe_fwd_at(
            dev,
            dtype,
            scratch.ptr(),
            vocab,
            Some(targets.ptr() + (r0 * 4) as u64),
            n,
            vocab,
            temperature,
            Some(logp.ptr() + (r0 * 4) as u64),
            Some(entropy.ptr() + (r0 * 4) as u64),
            Some(logz.ptr() + (r0 * 4) as u64),
        )?;
    }
    Ok(())
}

/// Backward of [`linear_lpe_fwd`]: recomputes each logits chunk, turns it into dlogits in place,
/// then `dh = dz·w` and `dw += dzᵀ·h` (`dw` of `dtype`, accumulated; zero it first).
#[allow(clippy::too_many_arguments)]
pub fn linear_lpe_bwd(
    dev: &GpuDevice,
    dtype: DType,
    h: &GpuBuffer,
    w: &GpuBuffer,
    targets: &GpuBuffer,
    rows: usize,
    hidden: usize,
    vocab: usize,
    temperature: f32,
    chunk: usize,
    logz: &GpuBuffer,
    entropy: &GpuBuffer,
    dlogp: Option<&GpuBuffer>,
    dent: Option<&GpuBuffer>,
    dh: &GpuBuffer,
    dw: Option<&GpuBuffer>,
) -> Result<()> {
    let es = dtype.size();
    let chunk = chunk.clamp(1, rows.max(1));
    let scratch = crate::backend::memory::scope(crate::backend::memory::Category::LogitsChunks, || {
        dev.alloc(chunk * vocab * es)
    })?;
    for r0 in (0..rows).step_by(chunk) {
        let n = chunk.min(rows - r0);
        let hc = h.ptr() + (r0 * hidden * es) as u64;
        dev.gemm(&Gemm::simple(dtype, n, vocab, hidden, hc, w.ptr(), true, scratch.ptr()))?;
        let off = (r0 * 4) as u64;
        lpe_bwd_at(
            dev,
            dtype,
            scratch.ptr(),
            vocab,
            Some(targets.ptr() + off),
            n,
            vocab,
            temperature,
            logz.ptr() + off,
            entropy.ptr() + off,
            dlogp.map(|b| b.ptr() + off),
            dent.map(|b| b.ptr() + off),
            scratch.ptr(),
            vocab,
        )?;
        // dh[r0..r0+n] = dz (n x V) · w (V x hidden)
        dev.gemm(&Gemm::simple(
            dtype,
            n,
            hidden,
            vocab,
            scratch.ptr(),
            w.ptr(),
            false,
            dh.ptr() + (r0 * hidden * es) as u64,
        ))?;
        if let Some(dw) = dw {
            // dw (V x hidden) += dzᵀ (V x n) · h_chunk (n x hidden)
            let mut g = Gemm::simple(dtype, vocab, hidden, n, scratch.ptr(), hc, false, dw.ptr());
            g.trans_a = true;
            g.lda = vocab;
            g.beta = 1.0;
            dev.gemm(&g)?;
        }
    }
    Ok(())
}

/// Next token per row of `logits` on the device: greedy (`temperature <= 0`: first argmax), or
/// temperature with optional nucleus `top_p` by inverse CDF with the uniform `u[row]` (f32 in
/// [0, 1), drawn by the caller's RNG). Writes `tokens` (i32). `top_k` is not supported here.
#[allow(clippy::too_many_arguments)]
pub fn sample_rows(
    dev: &GpuDevice,
    dtype: DType,
    logits: &GpuBuffer,
    ld: usize,
    rows: usize,
    vocab: usize,
    temperature: f32,
    top_p: f32,
    u: &GpuBuffer,
    tokens: &GpuBuffer,
) -> Result<()> {
    ensure!(tokens.bytes() >= rows * 4 && u.bytes() >= rows * 4, "sample_rows: buffers too small");
    ensure!(top_p > 0.0 && top_p <= 1.0, "top_p must be in (0, 1]");
    if rows == 0 || vocab == 0 {
        return Ok(());
    }
    let block = vocab.div_ceil(32).clamp(1, 8) as u32 * 32;
    let sfx = dtype_suffix(dtype)?;
    let mut a = KernelArgs::new();
    if temperature <= 0.0 {
        a.buf(logits).i64(ld as i64).i32(vocab as i32).buf(tokens);
        let name = if sfx == "bf16" { "argmax_rows_bf16" } else { "argmax_rows_f32" };
        return dev.launch(Kernel::new("sample.cu", name), LaunchCfg::linear(rows as u32, block), &mut a);
    }
    a.buf(logits).i64(ld as i64).i32(vocab as i32).f32(1.0 / temperature).f32(top_p).buf(u).buf(tokens);
    let name = if sfx == "bf16" { "sample_rows_bf16" } else { "sample_rows_f32" };
    dev.launch(Kernel::new("sample.cu", name), LaunchCfg::linear(rows as u32, block), &mut a)
}
