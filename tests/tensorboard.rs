//! `--log tensorboard`: the event files `train` and `sft` write hold every per-step metric of
//! metrics.jsonl (same step, same value), the per-step histograms and the held-out results,
//! each record's checksums intact. (scripts/test.sh also reads a run's files with TensorBoard's
//! own `EventAccumulator`: tools/check_tensorboard.py.)

use std::path::Path;
use std::process::Command;

use fcgpu::train::tensorboard::{read, EventLog};

fn fcgpu(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fcgpu")).args(args).output().unwrap()
}

fn event_files(run: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(run)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().contains("tfevents"))
        .collect();
    v.sort();
    v
}

fn merged(run: &Path) -> EventLog {
    let mut all = EventLog::default();
    for f in event_files(run) {
        let log = read(&f).unwrap();
        assert_eq!(log.version.as_deref(), Some("brain.Event:2"), "{}", f.display());
        all.scalars.extend(log.scalars);
        all.histograms.extend(log.histograms);
    }
    all
}

/// Every number of every metrics.jsonl line is a scalar of the event files at its step.
fn assert_scalars_match_jsonl(run: &Path, log: &EventLog) {
    let lines: Vec<serde_json::Value> = fcgpu::jsonl::read(&run.join("metrics.jsonl")).unwrap();
    assert!(!lines.is_empty());
    for line in &lines {
        let step = line["step"].as_u64().unwrap();
        for (k, v) in line.as_object().unwrap() {
            let Some(x) = v.as_f64().filter(|_| k != "step") else { continue };
            let group = if k.starts_with("heldout") { "eval" } else { "train" };
            let tag = format!("{group}/{k}");
            let found: Vec<f32> =
                log.scalars.iter().filter(|(t, s, _)| *t == tag && *s == step).map(|e| e.2).collect();
            assert!(found.contains(&(x as f32)), "{tag} at step {step}: {x} in jsonl, {found:?} in events");
        }
    }
}

#[test]
fn train_writes_every_metric_and_histogram_and_a_resume_adds_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let r = run.to_str().unwrap();
    let common = [
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
        "3",
        "--prompts-per-step",
        "2",
        "--max-new-tokens",
        "8",
        "--eval-samples",
        "2",
        "--log",
        "tensorboard",
        "--dynamic-sampling",
        "false",
    ];
    let out = fcgpu(&[&common[..], &["--steps", "2"]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(event_files(&run).len(), 1);
    let log = merged(&run);
    assert_scalars_match_jsonl(&run, &log);
    assert!(log.scalars.iter().any(|(t, s, _)| t == "eval/heldout_accuracy" && *s == 0));
    for tag in ["train/reward", "train/advantage", "train/completion_length"] {
        for step in [1, 2] {
            let n: Vec<f64> =
                log.histograms.iter().filter(|(t, s, _)| t == tag && *s == step).map(|h| h.2).collect();
            assert_eq!(n, vec![6.0], "{tag} at step {step}: one histogram of 2 prompts x 3 rollouts");
        }
    }
    let out = fcgpu(&[&common[..], &["--steps", "3", "--resume"]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(event_files(&run).len(), 2, "a resumed run writes its own event file");
    assert_scalars_match_jsonl(&run, &merged(&run));
    // Event files are a run's own: --force deletes them with the rest of the earlier run.
    let out = fcgpu(&[&common[..], &["--steps", "1", "--force"]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(event_files(&run).len(), 1, "only the new run's file is left");
    assert_scalars_match_jsonl(&run, &merged(&run));
}

/// A micro `fcgpu sft` run from scratch in `run` with `extra` flags; panics naming stderr.
fn micro_sft(run: &Path, extra: &[&str]) {
    let base = [
        "sft",
        "--run-dir",
        run.to_str().unwrap(),
        "--preset",
        "micro",
        "--base",
        "scratch",
        "--task-train",
        "40",
    ];
    let out = fcgpu(&[&base[..], extra].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn sft_writes_its_metrics_and_held_out_results() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("sft");
    micro_sft(&run, &["--steps", "2", "--eval-samples", "2", "--log", "tensorboard"]);
    let log = merged(&run);
    assert_scalars_match_jsonl(&run, &log);
    for tag in ["eval/heldout_accuracy", "eval/result_token_accuracy"] {
        assert!(log.scalars.iter().any(|(t, s, _)| t == tag && *s == 2), "{tag} at the last step");
    }
}

#[test]
fn jsonl_only_is_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("sft");
    micro_sft(&run, &["--steps", "1", "--eval-samples", "0"]);
    assert!(run.join("metrics.jsonl").exists() && event_files(&run).is_empty());
}
