//! `fcgpu train` end to end through the binary, on the micro preset of the embedded task.

use std::process::Command;

fn fcgpu(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fcgpu")).args(args).output().unwrap()
}

#[test]
fn train_runs_from_a_config_file_with_flag_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("micro.toml");
    std::fs::write(&cfg, "preset = \"micro\"\ntask_train = 40\ntask_eval = 4\nwarmup_sft_steps = 2\nsteps = 1\n\
        group_size = 2\nprompts_per_step = 2\nmax_new_tokens = 8\neval_samples = 2\nseed = 1\n").unwrap();
    let run = dir.path().join("run");
    let out = fcgpu(&["train", "--config", cfg.to_str().unwrap(), "--run-dir", run.to_str().unwrap(), "--seed", "3", "--beta", "0"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("eval_accuracy_before"));
    let resolved = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(resolved.contains("seed = 3") && resolved.contains("beta = 0.0"), "flags override the file:\n{resolved}");
    let lines: Vec<serde_json::Value> = fcgpu::jsonl::read(&run.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.iter().map(|l| l["step"].as_u64().unwrap()).collect::<Vec<_>>(), vec![0, 1]);
    assert!(run.join("checkpoint-1/model.safetensors").exists() && run.join("checkpoint-1/trainer_state.json").exists());
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
