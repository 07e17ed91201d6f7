//! Ops. Each lives in its own folder: `mod.rs` has the tensor-level op and its one backward rule,
//! `cpu.rs` the f32 CPU kernel on slices (the reference every other device is tested against).
//! Forward and backward both dispatch below autograd on the device of their tensors: the CPU
//! kernel, or the launch wrappers of `crate::kernels` on a GPU device (cuda or emu).

pub mod attention;
pub(crate) mod device;
pub mod elementwise;
pub mod embedding;
pub mod fastmath;
pub mod gradcheck;
pub mod logprob;
pub mod matmul;
pub mod rms_norm;
pub mod rope;
pub mod swiglu;

pub use attention::attention;
pub use elementwise::{add, mul, narrow, scalar_with_grad, scale, sum, weighted_sum};
pub use embedding::embedding;
pub use logprob::linear_logprob_entropy;
pub use matmul::{linear, lora_linear, matmul};
pub use rms_norm::rms_norm;
pub use rope::{rope, RopeTable};
pub use swiglu::swiglu;

use std::sync::Arc;

use crate::autograd::GradFn;

pub(crate) fn grad_fn<T: GradFn + 'static>(g: T) -> Option<Arc<dyn GradFn>> {
    Some(Arc::new(g))
}

/// A raw pointer that parallel workers may share because each writes a disjoint range.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
