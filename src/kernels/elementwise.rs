//! Elementwise ops on a GPU device: launch wrappers for `kernels/elementwise.cu`.

use anyhow::{ensure, Result};

use crate::backend::{dtype_suffix, GpuBuffer, GpuDevice, Kernel, KernelArgs, LaunchCfg};
use crate::dtype::DType;

fn name(stem: &str, dtype: DType) -> Result<&'static str> {
    Ok(match (stem, dtype_suffix(dtype)?) {
        ("add", "bf16") => "ew_add_bf16",
        ("add", _) => "ew_add_f32",
        ("mul", "bf16") => "ew_mul_bf16",
        ("mul", _) => "ew_mul_f32",
        ("scale", "bf16") => "ew_scale_bf16",
        ("scale", _) => "ew_scale_f32",
        ("axpy", "bf16") => "axpy_bf16_f32",
        ("axpy", _) => "axpy_f32_f32",
        ("bias", "bf16") => "bias_add_bf16",
        ("bias", _) => "bias_add_f32",
        ("colsum", "bf16") => "col_sum_bf16",
        _ => "col_sum_f32",
    })
}

fn launch_n(dev: &GpuDevice, k: &'static str, n: usize, a: &mut KernelArgs) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    dev.launch(Kernel::new("elementwise.cu", k), LaunchCfg::elementwise(n), a)
}

fn need(bufs: &[&GpuBuffer], bytes: usize, what: &str) -> Result<()> {
    ensure!(bufs.iter().all(|b| b.bytes() >= bytes), "{what}: buffers smaller than {bytes} bytes");
    Ok(())
}

/// `out = a + b` over `n` elements of `dtype`.
pub fn add(
    dev: &GpuDevice,
    dtype: DType,
    a: &GpuBuffer,
    b: &GpuBuffer,
    out: &GpuBuffer,
    n: usize,
) -> Result<()> {
    need(&[a, b, out], n * dtype.size(), "add")?;
    let mut k = KernelArgs::new();
    k.buf(a).buf(b).buf(out).i64(n as i64);
    launch_n(dev, name("add", dtype)?, n, &mut k)
}

/// `out = a ⊙ b`.
pub fn mul(
    dev: &GpuDevice,
    dtype: DType,
    a: &GpuBuffer,
    b: &GpuBuffer,
    out: &GpuBuffer,
    n: usize,
) -> Result<()> {
    need(&[a, b, out], n * dtype.size(), "mul")?;
    let mut k = KernelArgs::new();
    k.buf(a).buf(b).buf(out).i64(n as i64);
    launch_n(dev, name("mul", dtype)?, n, &mut k)
}

/// `out = s·a` (`out` may be `a`).
pub fn scale(dev: &GpuDevice, dtype: DType, a: &GpuBuffer, s: f32, out: &GpuBuffer, n: usize) -> Result<()> {
    need(&[a, out], n * dtype.size(), "scale")?;
    let mut k = KernelArgs::new();
    k.buf(a).f32(s).buf(out).i64(n as i64);
    launch_n(dev, name("scale", dtype)?, n, &mut k)
}

/// `y (f32) += alpha·x (dtype)`: gradient accumulation.
pub fn axpy(dev: &GpuDevice, dtype: DType, x: &GpuBuffer, alpha: f32, y: &GpuBuffer, n: usize) -> Result<()> {
    need(&[x], n * dtype.size(), "axpy")?;
    need(&[y], n * 4, "axpy")?;
    let mut k = KernelArgs::new();
    k.buf(x).f32(alpha).buf(y).i64(n as i64);
    launch_n(dev, name("axpy", dtype)?, n, &mut k)
}

/// `out[r, c] = x[r, c] + bias[c]`.
pub fn bias_add(
    dev: &GpuDevice,
    dtype: DType,
    x: &GpuBuffer,
    bias: &GpuBuffer,
    out: &GpuBuffer,
    rows: usize,
    cols: usize,
) -> Result<()> {
    need(&[x, out], rows * cols * dtype.size(), "bias_add")?;
    need(&[bias], cols * dtype.size(), "bias_add")?;
    let mut k = KernelArgs::new();
    k.buf(x).buf(bias).buf(out).i64(rows as i64).i32(cols as i32);
    launch_n(dev, name("bias", dtype)?, rows * cols, &mut k)
}

/// Row chunk and chunk count of a two-pass column sum over `rows` rows: chunks of at least 64
/// rows, at most 1,024 of them (the second pass walks them per column).
pub(crate) fn col_chunks(rows: usize) -> (usize, usize) {
    let chunk = rows.div_ceil(1024).max(64);
    (chunk, rows.div_ceil(chunk).max(1))
}

/// The first pass's grid: 32 columns × one row chunk per block of (32, 8) threads.
pub(crate) fn col_grid(cols: usize, chunks: usize) -> LaunchCfg {
    LaunchCfg { grid: (cols.div_ceil(32) as u32, chunks as u32, 1), block: (32, 8, 1), shared_bytes: 0 }
}

/// The second pass: `out[c] = Σ_k partial[k, c]` over the chunks in order (`+=` with `accumulate`).
pub(crate) fn col_reduce(
    dev: &GpuDevice,
    partial: &GpuBuffer,
    out: &GpuBuffer,
    chunks: usize,
    cols: usize,
    accumulate: bool,
) -> Result<()> {
    let mut k = KernelArgs::new();
    k.buf(partial).buf(out).i32(chunks as i32).i32(cols as i32).i32(accumulate as i32);
    let cfg = LaunchCfg::linear(cols.div_ceil(256) as u32, 256);
    dev.launch(Kernel::new("elementwise.cu", "col_reduce_f32"), cfg, &mut k)
}

/// `out[c] (f32) = Σ_r x[r, c]` (`+=` with `accumulate`): the bias gradient. Two passes (partial
/// sums per row chunk on a 2-D grid, then per column in chunk order): deterministic, and a few
/// columns over many rows still use many blocks.
pub fn col_sum(
    dev: &GpuDevice,
    dtype: DType,
    x: &GpuBuffer,
    out: &GpuBuffer,
    rows: usize,
    cols: usize,
    accumulate: bool,
) -> Result<()> {
    need(&[x], rows * cols * dtype.size(), "col_sum")?;
    need(&[out], cols * 4, "col_sum")?;
    if cols == 0 {
        return Ok(());
    }
    let (chunk, chunks) = col_chunks(rows);
    let partial = dev.zeros(chunks * cols * 4)?;
    if rows > 0 {
        let mut k = KernelArgs::new();
        k.buf(x).buf(&partial).i64(rows as i64).i32(cols as i32).i32(chunk as i32);
        dev.launch(Kernel::new("elementwise.cu", name("colsum", dtype)?), col_grid(cols, chunks), &mut k)?;
    }
    col_reduce(dev, &partial, out, chunks, cols, accumulate)
}

/// Strided block copy: `y[y_off + r·ldy + c] = x[x_off + r·ldx + c]` for `r < rows`, `c < cols`
/// (offsets and strides in elements). Zero-pads or un-pads head dims around flash attention and
/// does `narrow` and its backward.
#[allow(clippy::too_many_arguments)]
pub fn copy_2d(
    dev: &GpuDevice,
    dtype: DType,
    x: &GpuBuffer,
    x_off: usize,
    ldx: usize,
    y: &GpuBuffer,
    y_off: usize,
    ldy: usize,
    rows: usize,
    cols: usize,
) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let es = dtype.size();
    ensure!(cols <= ldx && cols <= ldy, "copy_2d: {cols} columns in rows of {ldx} / {ldy}");
    need(&[x], (x_off + (rows - 1) * ldx + cols) * es, "copy_2d source")?;
    need(&[y], (y_off + (rows - 1) * ldy + cols) * es, "copy_2d destination")?;
    let name = if dtype_suffix(dtype)? == "bf16" { "copy_2d_bf16" } else { "copy_2d_f32" };
    let mut k = KernelArgs::new();
    k.buf_at(x, x_off * es)
        .i64(ldx as i64)
        .buf_at(y, y_off * es)
        .i64(ldy as i64)
        .i64(rows as i64)
        .i64(cols as i64);
    launch_n(dev, name, rows * cols, &mut k)
}
