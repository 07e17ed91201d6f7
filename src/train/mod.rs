//! Training: the SFT (`sft`, `srml`) and GRPO (`grpo`) trainers, their optimizer, schedule,
//! checkpoints, metrics and held-out evaluation, and the embedded tiny model (`tiny`).

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
