//! Launch wrappers for `kernels/adamw.cu`: the fused AdamW step, optionally with the gradient
//! scaled by a clip factor computed on the device.

use anyhow::{bail, ensure, Result};

use crate::backend::{GpuBuffer, GpuDevice, Kernel, KernelArgs, LaunchCfg};
use crate::dtype::DType;

/// AdamW hyper-parameters of one step (`step` counts from 1).
#[derive(Clone, Copy, Debug)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub step: u32,
    /// Multiplies the gradient (global-norm clipping).
    pub grad_scale: f32,
}

/// `scale[0] = min(1, max_norm / (sqrt(sumsq[0]) + 1e-6))` and `norm[0] = sqrt(sumsq[0])` on the
/// device (max_norm <= 0: no clipping), for [`adamw_step_scaled`] without a host round trip.
pub fn grad_clip_scale(
    dev: &GpuDevice,
    sumsq: &GpuBuffer,
    max_norm: f32,
    scale: &GpuBuffer,
    norm: Option<&GpuBuffer>,
) -> Result<()> {
    ensure!(sumsq.bytes() >= 4 && scale.bytes() >= 4, "grad_clip_scale: one float each");
    let mut a = KernelArgs::new();
    a.buf(sumsq).f32(max_norm).buf(scale).opt(norm);
    dev.launch(Kernel::new("adamw.cu", "grad_clip_scale"), LaunchCfg::linear(1, 32), &mut a)
}

/// One fused AdamW step on f32 `params`/`m`/`v` with `grad` (f32 or bf16), optionally writing a
/// bf16 copy of the new weights into `copy`.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    dev: &GpuDevice,
    h: &AdamW,
    params: &GpuBuffer,
    m: &GpuBuffer,
    v: &GpuBuffer,
    grad: &GpuBuffer,
    grad_dtype: DType,
    copy: Option<&GpuBuffer>,
    n: usize,
) -> Result<()> {
    adamw_step_scaled(dev, h, params, m, v, grad, grad_dtype, copy, None, n)
}

/// [`adamw_step`] with the gradient also multiplied by the device float `scale[0]` (from
/// [`grad_clip_scale`]).
#[allow(clippy::too_many_arguments)]
pub fn adamw_step_scaled(
    dev: &GpuDevice,
    h: &AdamW,
    params: &GpuBuffer,
    m: &GpuBuffer,
    v: &GpuBuffer,
    grad: &GpuBuffer,
    grad_dtype: DType,
    copy: Option<&GpuBuffer>,
    scale: Option<&GpuBuffer>,
    n: usize,
) -> Result<()> {
    ensure!(
        params.bytes() >= n * 4 && m.bytes() >= n * 4 && v.bytes() >= n * 4,
        "adamw: state buffers too small"
    );
    ensure!(grad.bytes() >= n * grad_dtype.size(), "adamw: grad too small");
    ensure!(h.step >= 1, "adamw: step counts from 1");
    if n == 0 {
        return Ok(());
    }
    let name = match grad_dtype {
        DType::F32 => "adamw_f32",
        DType::BF16 => "adamw_bf16grad",
        DType::F16 => bail!("adamw: f16 gradients are not supported"),
    };
    let bc1 = 1.0 - (h.beta1 as f64).powi(h.step as i32);
    let bc2 = 1.0 - (h.beta2 as f64).powi(h.step as i32);
    let mut a = KernelArgs::new();
    a.buf(params)
        .buf(m)
        .buf(v)
        .buf(grad)
        .opt(copy)
        .i64(n as i64)
        .f32(h.lr)
        .f32(h.beta1)
        .f32(h.beta2)
        .f32(h.eps)
        .f32(h.weight_decay)
        .f32(bc1 as f32)
        .f32(bc2 as f32)
        .f32(h.grad_scale)
        .opt(scale);
    dev.launch(Kernel::new("adamw.cu", name), LaunchCfg::elementwise(n), &mut a)
}
