//! Launch wrappers, one file per kernel source: `src/kernels/<op>.rs` launches the kernels of
//! `kernels/<op>.cu` (attention: `flash_attn.cu` and `decode_attn.cu`; decode_step: the batched
//! decode step's kernels of `decode_step.cu`, `decode_attn.cu` and `sample.cu`; logprob:
//! `logprob_entropy.cu` and `sample.cu`; matmul: cuBLAS plus the bias kernels of
//! `elementwise.cu`). Each builds a [`crate::backend::KernelArgs`] and calls
//! [`crate::backend::GpuDevice::launch`], the same code for `cuda` and `emu`. The device ops
//! (the device arms of `crate::ops::*`) call these; the RL kernels' wrappers sit with their CPU reference
//! in `crate::rl::{advantage, policy_loss}::gpu`.

pub mod adamw;
pub mod attention;
pub mod cast;
pub mod decode_step;
pub mod elementwise;
pub mod embedding;
pub mod logprob;
pub mod matmul;
pub mod rms_norm;
pub mod rope;
pub mod swiglu;
