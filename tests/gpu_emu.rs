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

/// The device counters count each kind of work exactly: an allocation, an upload's bytes (staged:
/// no synchronisation), a memset and a kernel launch, a download and its synchronisation; an
/// upload larger than the staging area is a blocking copy (one synchronisation), and one that
/// finds the area full synchronises first.
#[test]
fn counters_count_each_kind_of_device_work() {
    use fcgpu::backend::counters::Counts;
    use fcgpu::backend::{Kernel, KernelArgs, LaunchCfg};
    let d = GpuDevice::emu();
    let c0 = d.counts();
    let x = d.upload_f32(&[1.0; 25]).unwrap();
    assert_eq!(d.counts() - c0, Counts { launches: 0, h2d_bytes: 100, d2h_bytes: 0, syncs: 0, allocs: 1 });
    let c1 = d.counts();
    let y = d.zeros(100).unwrap();
    let mut a = KernelArgs::new();
    a.buf(&x).buf(&x).buf(&y).i64(25);
    d.launch(Kernel::new("swiglu.cu", "swiglu_fwd_f32"), LaunchCfg::elementwise(25), &mut a).unwrap();
    let _ = y.download_f32().unwrap();
    d.synchronize().unwrap();
    assert_eq!(d.counts() - c1, Counts { launches: 2, h2d_bytes: 0, d2h_bytes: 100, syncs: 2, allocs: 1 });
    use fcgpu::backend::STAGE_BYTES;
    let big = d.alloc(STAGE_BYTES + 4).unwrap();
    let c2 = d.counts();
    big.write_bytes(&vec![1u8; STAGE_BYTES + 4]).unwrap();
    assert_eq!((d.counts() - c2).syncs, 1, "a blocking upload");
    let c3 = d.counts();
    for _ in 0..4 {
        big.write_at(0, &vec![2u8; STAGE_BYTES / 3]).unwrap();
    }
    assert_eq!((d.counts() - c3).syncs, 1, "three staged uploads fill the area; the fourth waits once");
    assert_eq!(big.download_bytes().unwrap()[..4], [2, 2, 2, 2]);
}

/// `fcgpu generate --counters` on emu: one entry per decode step with its batch, the prefill
/// steps summed. The device sampler brings back 12 bytes per sequence (token, log-prob,
/// entropy); `--host-sampler` downloads the whole logits block (batch × vocab, bf16) instead.
/// On every device it also records the paged KV cache's prefill and block figures.
#[test]
fn generate_counters_record_every_decode_step() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("tests/fixtures/models/qwen2-tiny");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    let vocab = cfg["vocab_size"].as_u64().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (input, counters) = (tmp.path().join("in.jsonl"), tmp.path().join("c.json"));
    std::fs::write(&input, "{\"prompt_ids\": [1, 2, 3, 4, 5]}\n{\"prompt_ids\": [7, 8, 9]}\n").unwrap();
    let run = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_fcgpu"))
            .args(["generate", "--model", model.to_str().unwrap(), "--input", input.to_str().unwrap()])
            .args([
                "--n",
                "2",
                "--max-new-tokens",
                "5",
                "--ignore-eos",
                "--counters",
                counters.to_str().unwrap(),
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&["--device", "emu"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&counters).unwrap()).unwrap();
    assert_eq!(c["prefill_steps"], 1, "{c}");
    assert!(c["prefill"]["launches"].as_u64().unwrap() > 0, "{c}");
    let steps = c["decode_steps"].as_array().unwrap();
    assert_eq!(steps.len(), 4, "5 new tokens: the prefill step samples the first, 4 decode steps the rest");
    for s in steps {
        assert_eq!(s["batch"], 4, "{s}");
        assert_eq!(s["d2h_bytes"].as_u64().unwrap(), 4 * 12, "token, log-prob and entropy come back: {s}");
        assert!(s["launches"].as_u64().unwrap() > 0 && s["syncs"].as_u64().unwrap() == 1, "{s}");
    }
    let out = run(&["--device", "emu", "--host-sampler"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&counters).unwrap()).unwrap();
    for s in c["decode_steps"].as_array().unwrap() {
        assert_eq!(s["d2h_bytes"].as_u64().unwrap(), 4 * vocab * 2, "the bf16 logits block comes back: {s}");
    }
    // On every device: the KV cache's figures (2 prompts of 5 and 3 tokens, prefilled once for
    // their 2 samples each); on the cpu nothing else.
    for device in ["emu", "cpu"] {
        let out = run(&["--device", device]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let c: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&counters).unwrap()).unwrap();
        let kv = &c["kv"];
        assert_eq!(
            (kv["prefill_tokens"].as_u64(), kv["prefill_tokens_unshared"].as_u64()),
            (Some(8), Some(16)),
            "{c}"
        );
        assert_eq!(kv["block_size"], 16, "{c}");
        let (peak, unshared) =
            (kv["peak_blocks"].as_u64().unwrap(), kv["peak_blocks_unshared"].as_u64().unwrap());
        assert!(peak >= 4 && peak <= unshared, "{c}");
        assert_eq!(kv["peak_bytes"].as_u64().unwrap(), peak * kv["block_bytes"].as_u64().unwrap());
        if device == "cpu" {
            assert!(c["decode_steps"].as_array().unwrap().is_empty() && c["prefill_steps"] == 0, "{c}");
        }
    }
}

/// A graph on emu: the captured work (a launch, a GEMM, a memset, a device copy) is recorded,
/// not run and not counted; each replay runs all of it, in order, on whatever the buffers then
/// hold, and counts as one launch. Work that cannot be captured (an allocation, an upload, a
/// download, a synchronisation, a replay, a nested capture, dropping a buffer) is an error
/// inside a capture, and the device works as before after one.
#[test]
fn graphs_record_launches_and_refuse_what_cannot_be_captured() {
    use fcgpu::backend::counters::Counts;
    use fcgpu::backend::Gemm;
    use fcgpu::kernels::elementwise::scale;
    use fcgpu::DType;
    let d = GpuDevice::emu();
    let x = d.upload_f32(&[1.0, 2.0, 3.0, 4.0]).unwrap();
    let y = d.zeros(16).unwrap();
    let z = d.zeros(16).unwrap();
    let w = d.upload_f32(&[0.0, 1.0, 1.0, 0.0]).unwrap(); // 2x2 swap
    let c0 = d.counts();
    let g = d
        .capture(|| {
            // y = 2x; z = y·w (the columns swapped); x = 0; then y = z.
            scale(&d, DType::F32, &x, 2.0, &y, 4)?;
            d.gemm(&Gemm::simple(DType::F32, 2, 2, 2, y.ptr(), w.ptr(), false, z.ptr()))?;
            x.zero()?;
            unsafe { d.dtod(z.ptr(), y.ptr(), 16) }
        })
        .unwrap();
    assert_eq!(g.nodes(), 4);
    assert_eq!(d.counts() - c0, Counts::default(), "capturing runs and counts nothing");
    assert_eq!(x.download_f32().unwrap(), [1.0, 2.0, 3.0, 4.0], "nothing ran");
    let c1 = d.counts();
    unsafe { g.replay().unwrap() };
    assert_eq!((d.counts() - c1).launches, 1, "a replay is one launch");
    assert_eq!(y.download_f32().unwrap(), [4.0, 2.0, 8.0, 6.0]);
    assert_eq!(x.download_f32().unwrap(), [0.0; 4]);
    // Replays read the buffers as they are then (x was zeroed by the first).
    x.write_bytes(bytemuck::cast_slice(&[1.0f32, 1.0, 0.5, 0.5])).unwrap();
    unsafe { g.replay().unwrap() };
    assert_eq!(y.download_f32().unwrap(), [2.0, 2.0, 1.0, 1.0]);

    let refused = |what: &str, f: &dyn Fn() -> anyhow::Result<()>| {
        let e = format!("{:#}", d.capture(f).unwrap_err());
        assert!(e.contains("inside a graph capture"), "{what}: {e}");
        eprintln!("{what}: {e}");
    };
    refused("alloc", &|| d.alloc(4).map(|_| ()));
    refused("upload", &|| d.upload_f32(&[1.0]).map(|_| ()));
    refused("write", &|| x.write_bytes(&[0u8; 16]));
    refused("download", &|| x.download_f32().map(|_| ()));
    refused("synchronize", &|| d.synchronize());
    refused("replay", &|| unsafe { g.replay() });
    refused("nested capture", &|| d.capture(|| Ok(())).map(|_| ()));
    // A launch before the refused call does not leak out of the failed capture.
    refused("launch then sync", &|| {
        scale(&d, DType::F32, &x, 2.0, &y, 4)?;
        d.synchronize()
    });
    let dropped = d.zeros(4).unwrap();
    let e = format!("{:#}", d.capture(move || Ok(drop(dropped))).unwrap_err());
    assert!(e.contains("dropped inside a graph capture"), "{e}");
    // Other threads' work on the device runs as usual during a capture.
    let g = d
        .capture(|| {
            std::thread::scope(|s| {
                s.spawn(|| {
                    let t = d.upload_f32(&[5.0]).unwrap();
                    assert_eq!(t.download_f32().unwrap(), [5.0]);
                });
            });
            Ok(())
        })
        .unwrap();
    assert_eq!(g.nodes(), 0);
    // And after all of that the device works (the launch recorded before a refusal never ran).
    assert_eq!(y.download_f32().unwrap(), [2.0, 2.0, 1.0, 1.0]);
    x.write_bytes(bytemuck::cast_slice(&[1.0f32, 2.0, 3.0, 4.0])).unwrap();
    let c2 = d.counts();
    scale(&d, DType::F32, &x, 2.0, &y, 4).unwrap();
    assert_eq!(y.download_f32().unwrap(), [2.0, 4.0, 6.0, 8.0]);
    assert_eq!((d.counts() - c2).launches, 1);
}
