//! Per-op launch wrappers. Each lives next to its CPU op (`src/ops/<op>/gpu.rs`) and is compiled
//! here, so it does not depend on the op's `mod.rs`; every wrapper names items by absolute
//! `crate::` paths only.

#[path = "../ops/swiglu/gpu.rs"]
pub mod swiglu;
