//! RoPE on a GPU device: launch wrapper for `kernels/rope.cu`.

use anyhow::{ensure, Result};

use crate::backend::{dtype_suffix, GpuBuffer, GpuDevice, Kernel, KernelArgs, LaunchCfg};
use crate::dtype::DType;

/// Rotate `x` `[tokens, heads, head_dim]` into `y` (may be `x` itself) with per-token
/// `cos`/`sin` `[tokens, head_dim/2]` (f32); `backward` rotates by −angle (the gradient).
#[allow(clippy::too_many_arguments)]
pub fn rope(
    dev: &GpuDevice,
    dtype: DType,
    x: &GpuBuffer,
    cos: &GpuBuffer,
    sin: &GpuBuffer,
    y: &GpuBuffer,
    tokens: usize,
    heads: usize,
    head_dim: usize,
    backward: bool,
) -> Result<()> {
    ensure!(head_dim.is_multiple_of(2), "rope: odd head_dim {head_dim}");
    let n = tokens * heads * head_dim;
    ensure!(x.bytes() >= n * dtype.size() && y.bytes() >= n * dtype.size(), "rope: buffers too small");
    ensure!(
        cos.bytes() >= tokens * head_dim / 2 * 4 && sin.bytes() >= tokens * head_dim / 2 * 4,
        "rope: cos/sin too small"
    );
    if n == 0 {
        return Ok(());
    }
    let name = if dtype_suffix(dtype)? == "bf16" { "rope_bf16" } else { "rope_f32" };
    let mut a = KernelArgs::new();
    a.buf(x)
        .buf(cos)
        .buf(sin)
        .buf(y)
        .i32(tokens as i32)
        .i32(heads as i32)
        .i32(head_dim as i32)
        .i32(backward as i32);
    dev.launch(Kernel::new("rope.cu", name), LaunchCfg::elementwise(n / 2), &mut a)
}
