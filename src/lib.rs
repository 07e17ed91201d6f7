//! fcgpu: train language models to call functions reliably.
//!
//! Layout (see README "Architecture"): `tensor` + `autograd` + `ops` are the runtime,
//! `model` the transformer, `fc` function calling (prompts, parsing, BFCL checker, rewards),
//! `rl` GRPO pieces, `train` the loops, `data` datasets, `cli` the commands.

pub mod autograd;
pub mod backend;
pub mod cli;
pub mod data;
pub mod fc;
pub mod jsonl;
pub mod model;
pub mod ops;
pub mod rl;
pub mod rollout;
pub mod runfs;
pub mod tensor;
pub mod train;

pub use tensor::{DType, Device, Tensor};
