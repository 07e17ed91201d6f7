//! Training: optimizer and schedules (the SFT and GRPO loops build on these).

pub mod checkpoint;
pub mod grpo;
pub mod heldout;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod probe;
pub mod schedule;
pub mod sft;
pub mod srml;
pub mod tiny;
