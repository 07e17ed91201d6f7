//! The kernels on a real GPU against the CPU references. Built to run only with
//! `FCGPU_TEST_CUDA=1` (`cfg(fcgpu_test_cuda)`, set by build.rs); otherwise every suite test is
//! #[ignore] and reported as ignored, and with it a missing device fails them. The no-driver
//! path is tested unconditionally: asking for the cuda device without one is a clear error,
//! never a panic.

use fcgpu::backend::{GpuDevice, GpuKind};

mod common;

fn cuda() -> Option<GpuDevice> {
    match GpuDevice::cuda(0) {
        Ok(d) => Some(d),
        Err(e) => panic!("FCGPU_TEST_CUDA=1 but no usable CUDA device: {e:#}"),
    }
}

#[test]
fn device_names() {
    assert_eq!(GpuDevice::open("emu").unwrap().kind(), GpuKind::Emu);
    assert!(GpuDevice::open("tpu").is_err());
    assert!(GpuDevice::shared_emu().same(&GpuDevice::shared_emu()));
    assert!(!GpuDevice::shared_emu().same(&GpuDevice::emu()));
    assert_eq!(GpuDevice::shared_cuda(0).is_ok(), GpuDevice::cuda_available());
    assert!(GpuDevice::open("cuda:x").is_err());
    if !GpuDevice::cuda_available() {
        let e = format!("{:#}", GpuDevice::open("cuda:1").unwrap_err());
        assert!(!e.is_empty());
    }
}

#[test]
fn no_driver_is_a_clear_error_not_a_panic() {
    let r = std::panic::catch_unwind(|| GpuDevice::cuda(0).map(|d| d.kind()));
    let r = r.expect("asking for the cuda device must not panic");
    if GpuDevice::cuda_available() {
        assert_eq!(r.unwrap(), GpuKind::Cuda);
    } else {
        let msg = format!("{:#}", r.unwrap_err());
        assert!(
            msg.contains("CUDA") || msg.contains("NVRTC") || msg.contains("cuBLAS") || msg.contains("GPU"),
            "unclear error: {msg}"
        );
    }
}

suite_tests!(needs_gpu cuda();
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
    flash_attention_f32_matches_cpu,
    flash_attention_shared_prefix,
    decode_attention,
    paged_decode_attention,
    elementwise_ops,
    col_sum_is_exactish_over_many_rows_and_deterministic,
    storage_round_trip,
    grad_clip_on_device,
    linear_matches_cpu_op,
    sampling_matches_cpu_distribution,
    sampling_rows_without_mass_draw_token_zero,
    draw_rows_matches_cpu_sampler,
    draw_rows_without_a_distribution,
);
