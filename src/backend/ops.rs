//! Per-op launch wrappers. Each lives next to its CPU op (`src/ops/<op>/gpu.rs`) and is compiled
//! here, so it does not depend on the op's `mod.rs`; every wrapper names items by absolute
//! `crate::` paths only. (The RL kernels' wrappers are in `crate::rl::{advantage, policy_loss}`,
//! AdamW / casts / grad-norm in `crate::backend::misc`.)

#[path = "../ops/attention/gpu.rs"]
pub mod attention;
#[path = "../ops/elementwise/gpu.rs"]
pub mod elementwise;
#[path = "../ops/embedding/gpu.rs"]
pub mod embedding;
#[path = "../ops/logprob/gpu.rs"]
pub mod logprob;
#[path = "../ops/matmul/gpu.rs"]
pub mod matmul;
#[path = "../ops/rms_norm/gpu.rs"]
pub mod rms_norm;
#[path = "../ops/rope/gpu.rs"]
pub mod rope;
#[path = "../ops/swiglu/gpu.rs"]
pub mod swiglu;
