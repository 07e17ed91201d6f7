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
    for (name, file, _) in fcgpu::backend::sources::KERNEL_FUNCTIONS {
        assert!(names.contains(name), "{name} of {file} is not in the emu registry");
    }
}

#[test]
fn launch_checks_arguments_against_the_signature() {
    use fcgpu::backend::{Kernel, KernelArgs, LaunchCfg};
    let d = GpuDevice::emu();
    let x = d.zeros(64).unwrap();
    let k = Kernel::new("swiglu.cu", "swiglu_fwd_f32");
    assert_eq!(fcgpu::backend::sources::signature("swiglu_fwd_f32"), Some("pppl"));
    // n as int instead of long long: refused before anything runs
    let mut a = KernelArgs::new();
    a.buf(&x).buf(&x).buf(&x).i32(16);
    let e = format!("{:#}", d.launch(k, LaunchCfg::linear(1, 32), &mut a).unwrap_err());
    assert!(e.contains("(pppi)") && e.contains("(pppl)"), "{e}");
    // one argument missing
    let mut a = KernelArgs::new();
    a.buf(&x).buf(&x).i64(16);
    assert!(d.launch(k, LaunchCfg::linear(1, 32), &mut a).is_err());
    // unknown kernel
    let mut a = KernelArgs::new();
    assert!(d.launch(Kernel::new("swiglu.cu", "nope"), LaunchCfg::linear(1, 32), &mut a).is_err());
    let mut a = KernelArgs::new();
    a.buf(&x).buf(&x).buf(&x).i64(16);
    d.launch(k, LaunchCfg::linear(1, 32), &mut a).unwrap();
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
    flash_attention_f32_matches_cpu,
    decode_attention,
    elementwise_ops,
    storage_round_trip,
    grad_clip_on_device,
    linear_matches_cpu_op,
    sampling_matches_cpu_distribution,
    sampling_rows_without_mass_draw_token_zero,
);

/// The decoder's one-row wrapper refuses rows, cache ranges and length entries outside their
/// buffers instead of launching on them.
#[test]
fn decode_attn_row_checks_every_range() {
    use fcgpu::kernels::attention::{decode_attn_row, CacheRows};
    let d = GpuDevice::emu();
    let (nh, nkv, hd, max_len) = (2usize, 1usize, 16usize, 4usize);
    let q = d.zeros(3 * nh * hd * 2).unwrap(); // 3 rows of bf16
    let o = d.zeros(3 * nh * hd * 2).unwrap();
    let kv = d.zeros(2 * max_len * nkv * hd * 2).unwrap(); // 2 layers
    let lens = d.upload_i32(&[1, 2]).unwrap();
    let cache =
        |at, entry| CacheRows { k: &kv, v: &kv, at, max_len, lens: &lens, entry, dtype: fcgpu::DType::BF16 };
    let layer1 = max_len * nkv * hd * 2;
    decode_attn_row(&d, &q, &o, 2, &cache(layer1, 1), (nh, nkv, hd)).unwrap();
    let err = |r: anyhow::Result<()>| format!("{:#}", r.unwrap_err());
    assert!(err(decode_attn_row(&d, &q, &o, 3, &cache(0, 0), (nh, nkv, hd))).contains("row 3"));
    assert!(err(decode_attn_row(&d, &q, &o, 0, &cache(layer1 + 2, 0), (nh, nkv, hd))).contains("cache"));
    assert!(err(decode_attn_row(&d, &q, &o, 0, &cache(0, 2), (nh, nkv, hd))).contains("entry 2"));
}
