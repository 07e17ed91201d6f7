//! Launch wrappers for `kernels/cast.cu`: dtype casts and the deterministic sum of squares
//! (gradient norm).

use anyhow::{bail, ensure, Result};

use crate::backend::{GpuBuffer, GpuDevice, Kernel, KernelArgs, LaunchCfg};
use crate::dtype::DType;

/// `out = cast(input)` over `n` elements (f32, bf16, f16 in any pair; same dtype is a copy).
pub fn cast(
    dev: &GpuDevice,
    input: &GpuBuffer,
    from: DType,
    out: &GpuBuffer,
    to: DType,
    n: usize,
) -> Result<()> {
    ensure!(input.bytes() >= n * from.size() && out.bytes() >= n * to.size(), "cast: buffers too small");
    if n == 0 {
        return Ok(());
    }
    let name = match (from, to) {
        (DType::F32, DType::BF16) => "cast_f32_bf16",
        (DType::BF16, DType::F32) => "cast_bf16_f32",
        (DType::F32, DType::F16) => "cast_f32_f16",
        (DType::F16, DType::F32) => "cast_f16_f32",
        (DType::BF16, DType::F16) => "cast_bf16_f16",
        (DType::F16, DType::BF16) => "cast_f16_bf16",
        _ => {
            return unsafe { dev.dtod(input.ptr(), out.ptr(), n * from.size()) };
        }
    };
    let mut a = KernelArgs::new();
    a.buf(input).buf(out).i64(n as i64);
    dev.launch(Kernel::new("cast.cu", name), LaunchCfg::elementwise(n), &mut a)
}

/// `out[0] (f32) = Σ x²` (or `+=` with `accumulate`), in a fixed order: deterministic.
pub fn sum_squares(
    dev: &GpuDevice,
    x: &GpuBuffer,
    dtype: DType,
    n: usize,
    out: &GpuBuffer,
    accumulate: bool,
) -> Result<()> {
    ensure!(x.bytes() >= n * dtype.size() && out.bytes() >= 4, "sum_squares: buffers too small");
    let blocks = n.div_ceil(256).clamp(1, 1024);
    let partial = dev.zeros(blocks * 4)?;
    let name = match dtype {
        DType::F32 => "sumsq_partial_f32",
        DType::BF16 => "sumsq_partial_bf16",
        DType::F16 => bail!("sum_squares: f16 not supported"),
    };
    if n > 0 {
        let mut a = KernelArgs::new();
        a.buf(x).i64(n as i64).buf(&partial);
        dev.launch(Kernel::new("cast.cu", name), LaunchCfg::linear(blocks as u32, 256), &mut a)?;
    }
    let mut a = KernelArgs::new();
    a.buf(&partial).i32(blocks as i32).buf(out).i32(accumulate as i32);
    dev.launch(Kernel::new("cast.cu", "sum_f32"), LaunchCfg::linear(1, 1024), &mut a)
}
