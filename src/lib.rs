//! fcgpu: train language models to call functions reliably.
//!
//! Layout (docs/architecture.md): `tensor` + `autograd` + `ops` are the runtime, `backend` the
//! GPU devices (cuda, emu) and `kernels` the launch wrappers of `kernels/*.cu`, `model` the
//! transformer, `fc` function calling (prompts, parsing, BFCL checker, rewards), `rl` GRPO
//! pieces, `train` the loops, `data` datasets, `cli` the commands, `roofline` the kernels'
//! performance model.

pub mod autograd;
pub mod backend;
pub mod chat_template;
pub mod cli;
pub mod data;
pub mod device;
pub mod dist;
pub mod dtype;
pub mod fc;
pub mod gguf;
pub mod jsonl;
pub mod kernels;
pub mod model;
pub mod ops;
pub mod plan;
pub mod rl;
pub mod rollout;
pub mod roofline;
pub mod runfs;
pub mod serve;
pub mod storage;
pub mod tensor;
pub mod train;

pub use tensor::{DType, Device, Tensor};
