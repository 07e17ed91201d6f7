//! SwiGLU on a GPU device (cuda or emu): launch wrappers for `kernels/swiglu.cu`.

use anyhow::{ensure, Result};

use crate::backend::{dtype_suffix, GpuBuffer, GpuDevice, Kernel, KernelArgs, LaunchCfg};
use crate::dtype::DType;

const FILE: &str = "swiglu.cu";

fn kernel(op: &str, dtype: DType) -> Result<Kernel> {
    let name = match (op, dtype_suffix(dtype)?) {
        ("fwd", "bf16") => "swiglu_fwd_bf16",
        ("fwd", _) => "swiglu_fwd_f32",
        ("bwd", "bf16") => "swiglu_bwd_bf16",
        _ => "swiglu_bwd_f32",
    };
    Ok(Kernel::new(FILE, name))
}

fn check(bufs: &[&GpuBuffer], n: usize, dtype: DType) -> Result<()> {
    for b in bufs {
        ensure!(
            b.bytes() >= n * dtype.size(),
            "swiglu: buffer of {} bytes for {n} {:?} elements",
            b.bytes(),
            dtype
        );
    }
    Ok(())
}

/// `out = silu(gate) * up` over `n` elements of `dtype`.
pub fn swiglu_fwd(
    dev: &GpuDevice,
    dtype: DType,
    gate: &GpuBuffer,
    up: &GpuBuffer,
    out: &GpuBuffer,
    n: usize,
) -> Result<()> {
    check(&[gate, up, out], n, dtype)?;
    if n == 0 {
        return Ok(());
    }
    let mut a = KernelArgs::new();
    a.buf(gate).buf(up).buf(out).i64(n as i64);
    dev.launch(kernel("fwd", dtype)?, LaunchCfg::elementwise(n), &mut a)
}

/// Gradients of `swiglu_fwd` given `dout`: writes `dgate`, `dup`.
#[allow(clippy::too_many_arguments)]
pub fn swiglu_bwd(
    dev: &GpuDevice,
    dtype: DType,
    gate: &GpuBuffer,
    up: &GpuBuffer,
    dout: &GpuBuffer,
    dgate: &GpuBuffer,
    dup: &GpuBuffer,
    n: usize,
) -> Result<()> {
    check(&[gate, up, dout, dgate, dup], n, dtype)?;
    if n == 0 {
        return Ok(());
    }
    let mut a = KernelArgs::new();
    a.buf(gate).buf(up).buf(dout).buf(dgate).buf(dup).i64(n as i64);
    dev.launch(kernel("bwd", dtype)?, LaunchCfg::elementwise(n), &mut a)
}
