//! Training: optimizer and schedules (the SFT and GRPO loops build on these).

pub mod optim;
