//! Every kernel on the emu device against the CPU ops, at awkward sizes (see tests/common/suite.rs
//! for the tests and their tolerances).

use fcgpu::backend::{GpuDevice, GpuKind};

mod common;

fn dev() -> Option<GpuDevice> {
    Some(GpuDevice::emu())
}

#[test]
fn emu_is_emu() {
    let d = GpuDevice::emu();
    assert_eq!(d.kind(), GpuKind::Emu);
    let names = fcgpu::backend::emu::kernel_names();
    for (name, file) in fcgpu::backend::sources::KERNEL_FUNCTIONS {
        assert!(names.contains(name), "{name} of {file} is not in the emu registry");
    }
}

suite_tests!(dev();
    swiglu_fwd_bwd,
    shared_memory_is_per_block_and_barriers_hold,
    warp_shuffles_votes_and_atomics,
    mma_and_ldmatrix_follow_the_ptx_fragment_layouts,
    swiglu_matches_cpu_op,
    rms_norm_matches_cpu_op,
    rope_matches_cpu_op,
    embedding_matches_cpu_op,
    logprob_entropy_rows_match_cpu_op,
    logprob_ignored_targets_and_masked_vocab,
    linear_logprob_entropy_matches_cpu_op,
    adamw_matches_reference,
    casts_round_like_the_half_crate,
    sum_of_squares_is_exactish_and_deterministic,
    group_advantages_match_cpu,
    token_advantages_and_row_means_match_cpu,
    policy_loss_matches_cpu,
    gemm_row_major,
    flash_attention_fwd_bwd,
    decode_attention,
    elementwise_ops,
    storage_round_trip,
    grad_clip_on_device,
);
