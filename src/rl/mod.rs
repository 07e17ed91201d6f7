//! GRPO pieces (SPEC §3): group advantages with the entropy bonus, the clipped policy loss with
//! KL and its aggregation weights. Each has a CPU reference (with backward) and GPU wrappers.

pub mod advantage;
pub mod policy_loss;
