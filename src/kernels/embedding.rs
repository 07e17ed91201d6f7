//! Embedding on a GPU device: launch wrappers for `kernels/embedding.cu`.

use anyhow::{ensure, Result};

use crate::backend::{dtype_suffix, GpuBuffer, GpuDevice, Kernel, KernelArgs, LaunchCfg};
use crate::dtype::DType;

/// Threads per token: enough warps to cover `dim` once, at most 256.
fn row_block(dim: usize) -> u32 {
    (dim.div_ceil(32) * 32).clamp(32, 256) as u32
}

/// `out[t] = table[ids[t]]` (`ids`: i32 on the device; out-of-range ids give zero rows).
#[allow(clippy::too_many_arguments)]
pub fn embedding_fwd(
    dev: &GpuDevice,
    dtype: DType,
    ids: &GpuBuffer,
    table: &GpuBuffer,
    out: &GpuBuffer,
    tokens: usize,
    vocab: usize,
    dim: usize,
) -> Result<()> {
    ensure!(
        ids.bytes() >= tokens * 4
            && table.bytes() >= vocab * dim * dtype.size()
            && out.bytes() >= tokens * dim * dtype.size(),
        "embedding_fwd: buffers too small"
    );
    if tokens == 0 {
        return Ok(());
    }
    let name = if dtype_suffix(dtype)? == "bf16" { "embedding_fwd_bf16" } else { "embedding_fwd_f32" };
    let mut a = KernelArgs::new();
    a.buf(ids).buf(table).buf(out).i32(vocab as i32).i32(dim as i32);
    dev.launch(Kernel::new("embedding.cu", name), LaunchCfg::linear(tokens as u32, row_block(dim)), &mut a)
}

/// `dtable[ids[t]] += dout[t]` (dtable f32, not zeroed here).
#[allow(clippy::too_many_arguments)]
pub fn embedding_bwd(
    dev: &GpuDevice,
    dtype: DType,
    ids: &GpuBuffer,
    dout: &GpuBuffer,
    dtable: &GpuBuffer,
    tokens: usize,
    vocab: usize,
    dim: usize,
) -> Result<()> {
    ensure!(
        dtable.bytes() >= vocab * dim * 4 && dout.bytes() >= tokens * dim * dtype.size(),
        "embedding_bwd: buffers too small"
    );
    if tokens == 0 {
        return Ok(());
    }
    let name = if dtype_suffix(dtype)? == "bf16" { "embedding_bwd_bf16" } else { "embedding_bwd_f32" };
    let mut a = KernelArgs::new();
    a.buf(ids).buf(dout).buf(dtable).i32(vocab as i32).i32(dim as i32);
    dev.launch(Kernel::new("embedding.cu", name), LaunchCfg::linear(tokens as u32, row_block(dim)), &mut a)
}
