//! RMSNorm on a GPU device: launch wrappers for `kernels/rmsnorm.cu`.

use anyhow::{ensure, Result};

use crate::backend::{dtype_suffix, GpuBuffer, GpuDevice, Kernel, KernelArgs, LaunchCfg};
use crate::dtype::DType;
use crate::kernels::elementwise::{col_chunks, col_grid, col_reduce};

fn k(stem: &str, dtype: DType) -> Result<Kernel> {
    let name: &'static str = match (stem, dtype_suffix(dtype)?) {
        ("fwd", "bf16") => "rmsnorm_fwd_bf16",
        ("fwd", _) => "rmsnorm_fwd_f32",
        ("dx", "bf16") => "rmsnorm_bwd_dx_bf16",
        ("dx", _) => "rmsnorm_bwd_dx_f32",
        ("dw", "bf16") => "rmsnorm_bwd_dw_bf16",
        _ => "rmsnorm_bwd_dw_f32",
    };
    Ok(Kernel::new("rmsnorm.cu", name))
}

/// Threads per row: enough warps to cover `d` once, at most 256 (idle threads of a small row
/// would only wait at the block reductions; the emu device runs every one as a fiber).
fn row_block(d: usize) -> u32 {
    (d.div_ceil(32) * 32).clamp(32, 256) as u32
}

/// `y = x·rstd·w` over rows of `d`; writes `rstd` (f32, one per row) for the backward.
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_fwd(
    dev: &GpuDevice,
    dtype: DType,
    x: &GpuBuffer,
    w: &GpuBuffer,
    y: &GpuBuffer,
    rstd: &GpuBuffer,
    rows: usize,
    d: usize,
    eps: f32,
) -> Result<()> {
    ensure!(
        x.bytes() >= rows * d * dtype.size()
            && y.bytes() >= rows * d * dtype.size()
            && rstd.bytes() >= rows * 4,
        "rms_norm_fwd: buffers too small"
    );
    if rows == 0 {
        return Ok(());
    }
    let mut a = KernelArgs::new();
    a.buf(x).buf(w).buf(y).buf(rstd).i32(d as i32).f32(eps);
    dev.launch(k("fwd", dtype)?, LaunchCfg::linear(rows as u32, row_block(d)), &mut a)
}

/// `dx` (dtype) and `dw` (f32; added to when `accumulate`) from `dy` and the saved `rstd`.
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_bwd(
    dev: &GpuDevice,
    dtype: DType,
    x: &GpuBuffer,
    w: &GpuBuffer,
    dy: &GpuBuffer,
    rstd: &GpuBuffer,
    dx: &GpuBuffer,
    dw: &GpuBuffer,
    rows: usize,
    d: usize,
    accumulate: bool,
) -> Result<()> {
    ensure!(dw.bytes() >= d * 4 && dx.bytes() >= rows * d * dtype.size(), "rms_norm_bwd: buffers too small");
    if rows == 0 {
        return Ok(());
    }
    let mut a = KernelArgs::new();
    a.buf(x).buf(w).buf(dy).buf(rstd).buf(dx).i32(d as i32);
    dev.launch(k("dx", dtype)?, LaunchCfg::linear(rows as u32, row_block(d)), &mut a)?;
    // dw: a two-pass column sum of dy·x·rstd (see `elementwise::col_sum`), deterministic.
    let (chunk, chunks) = col_chunks(rows);
    let partial = dev.alloc(chunks * d * 4)?;
    let mut a = KernelArgs::new();
    a.buf(x).buf(dy).buf(rstd).buf(&partial).i64(rows as i64).i32(d as i32).i32(chunk as i32);
    dev.launch(k("dw", dtype)?, col_grid(d, chunks), &mut a)?;
    col_reduce(dev, &partial, dw, chunks, d, accumulate)
}
