//! Training: optimizer and schedules (the SFT and GRPO loops build on these).

pub mod optim;
pub mod checkpoint;
pub mod metrics;
pub mod schedule;
pub mod sft;
pub mod srml;
pub mod tiny;
pub mod grpo;
pub mod heldout;
pub mod plot;
pub mod probe;
