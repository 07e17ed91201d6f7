//! `fcgpu train` end to end through the binary, on the micro preset of the embedded task.

use std::process::Command;

fn fcgpu(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fcgpu")).args(args).output().unwrap()
}

#[test]
fn train_runs_from_a_config_file_with_flag_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("micro.toml");
    std::fs::write(
        &cfg,
        "preset = \"micro\"\nbase = \"scratch\"\ntask_train = 40\ntask_eval = 4\nwarmup_sft_steps = 2\nsteps = 1\n\
        group_size = 2\nprompts_per_step = 2\nmax_new_tokens = 8\neval_samples = 2\nseed = 1\n",
    )
    .unwrap();
    let run = dir.path().join("run");
    let out = fcgpu(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--run-dir",
        run.to_str().unwrap(),
        "--seed",
        "3",
        "--beta",
        "0",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("heldout_accuracy_before"));
    let resolved = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(
        resolved.contains("seed = 3") && resolved.contains("beta = 0.0"),
        "flags override the file:\n{resolved}"
    );
    let lines: Vec<serde_json::Value> = fcgpu::jsonl::read(&run.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.iter().map(|l| l["step"].as_u64().unwrap()).collect::<Vec<_>>(), vec![0, 1]);
    assert!(
        run.join("checkpoint-1/model.safetensors").exists()
            && run.join("checkpoint-1/trainer_state.json").exists()
    );
    assert!(run.join("curves.svg").exists());
}

#[test]
fn bad_options_are_named() {
    let out = fcgpu(&["train", "--temperature", "0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--temperature"));
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "stepz = 3\n").unwrap();
    let out = fcgpu(&["train", "--config", cfg.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("bad.toml") && err.contains("stepz"), "{err}");
}

#[test]
fn dynamic_sampling_flags_parse_and_show_in_print_config() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("dyn.toml");
    std::fs::write(&cfg, "dynamic_sampling = false\nmax_resample = 7\n").unwrap();
    let print = |args: &[&str]| -> toml::Table {
        let out = fcgpu(&[&["train", "--print-config"], args].concat());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        toml::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap()
    };
    // On by default.
    let on = print(&[]);
    assert_eq!((on["dynamic_sampling"].as_bool(), on["max_resample"].as_integer()), (Some(true), Some(4)));
    let off = print(&["--dynamic-sampling", "false", "--max-resample", "2"]);
    assert_eq!((off["dynamic_sampling"].as_bool(), off["max_resample"].as_integer()), (Some(false), Some(2)));
    let file = print(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(
        (file["dynamic_sampling"].as_bool(), file["max_resample"].as_integer()),
        (Some(false), Some(7))
    );
    let file_on = print(&["--config", cfg.to_str().unwrap(), "--dynamic-sampling"]);
    assert_eq!(file_on["dynamic_sampling"].as_bool(), Some(true), "the flag overrides the file");
    let out = fcgpu(&["train", "--print-config", "--dynamic-sampling", "--max-resample", "0"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--max-resample"));
}

#[test]
fn fresh_model_options_with_the_shipped_base_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let out = fcgpu(&["train", "--preset", "small", "--run-dir", run.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("preset") && err.contains("--base scratch"), "{err}");
    let out = fcgpu(&["train", "--base", "fc-huge", "--run-dir", run.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("fc-huge") && err.contains("fc-tiny"), "{err}");
    assert!(
        !run.join("sft/base-model").exists() && !run.join("sft/task").exists(),
        "work done before the options were checked"
    );
}

fn micro_run(run: &std::path::Path, extra: &[&str]) -> Vec<serde_json::Value> {
    let r = run.to_str().unwrap();
    let base = [
        "train",
        "--run-dir",
        r,
        "--preset",
        "micro",
        "--base",
        "scratch",
        "--task-train",
        "40",
        "--warmup-sft-steps",
        "2",
        "--group-size",
        "4",
        "--prompts-per-step",
        "2",
        "--max-new-tokens",
        "8",
        "--eval-samples",
        "0",
        "--steps",
        "1",
        "--dynamic-sampling",
        "false",
    ];
    let out = fcgpu(&[&base[..], extra].concat());
    assert!(out.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&out.stderr));
    fcgpu::jsonl::read(&run.join("metrics.jsonl")).unwrap()
}

/// `--log-mismatch` on the CPU: the sampler's log-probs and the training forward's agree to
/// float rounding (both f32), and every mismatch metric is logged.
#[test]
fn rollout_mismatch_is_logged_and_about_zero_on_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let lines = micro_run(&dir.path().join("run"), &["--log-mismatch", "--device", "cpu"]);
    let last = lines.last().unwrap();
    for k in ["mismatch_mean_abs", "mismatch_max_abs", "mismatch_kl", "mismatch_ratio_above_2"] {
        assert!(last[k].is_number(), "{k} missing: {last}");
    }
    assert!(last["mismatch_max_abs"].as_f64().unwrap() < 1e-3, "{last}");
    assert_eq!(last["mismatch_ratio_above_2"].as_f64(), Some(0.0));
    assert!(last.get("rollout_masked_frac").is_none(), "no correction, no correction metrics");
}

/// Each rollout correction runs on emu in bf16 (sampler: the KV-cache decode kernels; π_old:
/// the flash training forward) and logs its masked and capped fractions and the mismatch.
#[test]
fn every_rollout_correction_runs_on_emu_bf16_and_logs_its_fractions() {
    let dir = tempfile::tempdir().unwrap();
    for mode in ["token-tis", "token-mis", "seq-tis", "seq-mis"] {
        // A cap of 1 makes every ratio above 1 count, so the fractions are not trivially 0.
        let run = dir.path().join(mode);
        let lines = micro_run(
            &run,
            &["--rollout-correction", mode, "--rollout-correction-cap", "1", "--device", "emu"],
        );
        let last = lines.last().unwrap();
        let (masked, capped) = (last["rollout_masked_frac"].as_f64(), last["rollout_capped_frac"].as_f64());
        assert!(masked.is_some() && capped.is_some(), "{mode}: {last}");
        assert!(
            last["mismatch_mean_abs"].as_f64().unwrap() > 0.0,
            "{mode}: bf16 differs from the sampler: {last}"
        );
        let acted = if mode.ends_with("mis") { masked.unwrap() } else { capped.unwrap() };
        assert!(acted > 0.0 && acted < 1.0, "{mode} acted on some tokens, not all: {last}");
    }
}

#[test]
fn gspo_and_correction_flags_show_in_print_config_and_bad_caps_are_refused() {
    let out = fcgpu(&[
        "train",
        "--print-config",
        "--importance-level",
        "sequence",
        "--rollout-correction",
        "seq-tis",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("importance_level = \"sequence\"") && text.contains("rollout_correction = \"seq-tis\""),
        "{text}"
    );
    let out = fcgpu(&["train", "--rollout-correction-cap", "0.5"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("rollout_correction_cap"));
}
