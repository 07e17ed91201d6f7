//! Hostile things that happen to run directories: two trainers at once, stale locks and
//! temporaries after a kill, resuming with another config or a corrupt checkpoint, a torn
//! metrics line, a failing disk, a closed log pipe, an empty data file (issue 11). Each runs the
//! binary on the micro preset for one or two steps.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn fcgpu(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fcgpu")).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A micro SFT config file in `dir` (seconds per run on 2 cores).
fn micro_cfg(dir: &Path) -> PathBuf {
    let p = dir.join("micro.toml");
    std::fs::write(&p, "preset = \"micro\"\ntask_train = 40\ntask_eval = 6\nvocab_size = 400\nbatch_size = 3\nbucket_window = 6\n\
        eval_samples = 0\nsave_every = 1\nsteps = 1\n").unwrap();
    p
}

/// `fcgpu sft` with the micro config on `run` plus `extra` flags.
fn sft(dir: &Path, run: &Path, extra: &[&str]) -> Output {
    let cfg = micro_cfg(dir);
    let mut args =
        vec!["sft", "--config", cfg.to_str().unwrap(), "--run-dir", run.to_str().unwrap(), "--device", "cpu"];
    args.extend_from_slice(extra);
    fcgpu(&args)
}

/// The pid of a process that has exited (so no process has it, short of pid reuse).
fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

fn steps(run: &Path) -> Vec<u64> {
    let lines: Vec<serde_json::Value> = fcgpu::jsonl::read(&run.join("metrics.jsonl")).unwrap();
    lines.iter().map(|l| l["step"].as_u64().unwrap()).collect()
}

#[test]
fn a_second_trainer_on_a_locked_run_dir_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    // This test process holds the lock, as a running trainer would.
    let lock = fcgpu::runfs::RunLock::acquire(&run).unwrap();
    let o = sft(d.path(), &run, &[]);
    assert!(!o.status.success(), "a second trainer ran on a locked run directory");
    assert!(stderr(&o).contains(&format!("in use by process {}", std::process::id())), "{}", stderr(&o));
    assert!(!run.join("metrics.jsonl").exists());
    drop(lock);
    let o = sft(d.path(), &run, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn a_stale_lock_and_stale_temporaries_are_cleaned_at_start() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    let dead = dead_pid();
    let mine = std::process::id();
    std::fs::create_dir_all(run.join("task")).unwrap();
    std::fs::write(run.join(".lock"), format!("{dead}\n")).unwrap();
    // What a kill mid-checkpoint, mid-model-replace or mid-task-write leaves behind.
    let stale = [
        run.join(format!(".checkpoint-4.partial-{dead}")),
        run.join(format!("..checkpoint-4.partial-{dead}.tmp-{dead}")),
        run.join(format!(".base-model.old-{dead}")),
    ];
    for s in &stale {
        std::fs::create_dir_all(s).unwrap();
        std::fs::write(s.join("model.safetensors"), "partial").unwrap();
    }
    let stale_task = run.join(format!("task/.train.jsonl.tmp-{dead}"));
    std::fs::write(&stale_task, "{\"truncated").unwrap();
    // A live process's temporary (this test's own pid) is not touched.
    let live = run.join(format!(".other.tmp-{mine}"));
    std::fs::write(&live, "in use").unwrap();
    let o = sft(d.path(), &run, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("left by process {dead}")),
        "stale lock not reported: {}",
        stderr(&o)
    );
    for s in stale.iter().chain([&stale_task]) {
        assert!(!s.exists(), "{} survived", s.display());
    }
    assert!(live.exists());
    assert!(run.join("checkpoint-1/trainer_state.json").exists());
}

#[test]
fn resume_refuses_a_changed_config_unless_forced() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    assert!(sft(d.path(), &run, &["--seed", "1"]).status.success());
    let o = sft(d.path(), &run, &["--resume", "--steps", "2", "--seed", "2", "--lr", "0.01"]);
    assert!(!o.status.success(), "resumed with another seed");
    let e = stderr(&o);
    assert!(e.contains("seed: 1 -> 2") && e.contains("lr: ") && e.contains("--force"), "{e}");
    assert!(!run.join("checkpoint-2").exists());
    assert!(
        std::fs::read_to_string(run.join("config.toml")).unwrap().contains("seed = 1"),
        "config.toml overwritten by a refused resume"
    );
    // More steps is not a drift.
    let o = sft(d.path(), &run, &["--resume", "--steps", "2", "--seed", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = sft(d.path(), &run, &["--resume", "--steps", "3", "--seed", "2", "--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("warning") && stderr(&o).contains("seed: 1 -> 2"), "{}", stderr(&o));
    assert_eq!(steps(&run), vec![1, 2, 3]);
}

#[test]
fn resume_past_the_configured_steps_says_so() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    assert!(sft(d.path(), &run, &[]).status.success());
    let st = run.join("checkpoint-1/trainer_state.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&st).unwrap()).unwrap();
    v["step"] = 1_000_000.into();
    std::fs::write(&st, v.to_string()).unwrap();
    let o = sft(d.path(), &run, &["--resume", "--steps", "2"]);
    assert!(!o.status.success(), "a checkpoint past --steps resumed silently");
    assert!(stderr(&o).contains("step 1000000, past the configured 2 steps"), "{}", stderr(&o));
}

#[test]
fn a_corrupt_latest_checkpoint_falls_back_to_the_previous_one() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    assert!(sft(d.path(), &run, &["--steps", "2"]).status.success());
    let w = run.join("checkpoint-2/model.safetensors");
    let len = std::fs::metadata(&w).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&w).unwrap().set_len(len / 2).unwrap();
    let o = sft(d.path(), &run, &["--resume", "--steps", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("checkpoint-2 cannot be loaded")
            && e.contains("falling back")
            && e.contains("checkpoint-1"),
        "{e}"
    );
    assert_eq!(steps(&run), vec![1, 2, 3]);
    assert!(run.join("checkpoint-3/trainer_state.json").exists());
}

#[test]
fn a_torn_last_metrics_line_is_dropped_on_resume() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    assert!(sft(d.path(), &run, &[]).status.success());
    let m = run.join("metrics.jsonl");
    let mut text = std::fs::read_to_string(&m).unwrap();
    text += "{\"step\": 2, \"loss\": 1.2";
    std::fs::write(&m, text).unwrap();
    let o = sft(d.path(), &run, &["--resume", "--steps", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(steps(&run), vec![1, 2]);
}

#[test]
fn write_failures_name_the_path_and_leave_no_temporaries() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    // The task file's place is taken by a directory: its write must fail, naming it.
    std::fs::create_dir_all(run.join("task/train.jsonl/x")).unwrap();
    let o = sft(d.path(), &run, &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("task/train.jsonl"), "{}", stderr(&o));
    let left: Vec<_> = std::fs::read_dir(run.join("task"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with('.'))
        .collect();
    assert!(left.is_empty(), "temporaries left: {left:?}");
}

/// A real full disk: a 64 KiB tmpfs, where root may mount one (skipped otherwise).
#[test]
fn a_full_disk_keeps_the_old_file_and_names_the_path() {
    let d = tempfile::tempdir().unwrap();
    let mnt = d.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs", mnt.to_str().unwrap()])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    }
    let p = mnt.join("train.jsonl");
    fcgpu::runfs::write_atomic(&p, b"old contents\n").unwrap();
    let err = fcgpu::runfs::write_atomic(&p, &vec![b'x'; 1 << 20]).unwrap_err();
    let kept = std::fs::read_to_string(&p).unwrap();
    let names: Vec<_> = std::fs::read_dir(&mnt).unwrap().map(|e| e.unwrap().file_name()).collect();
    let _ = Command::new("umount").arg(&mnt).status();
    assert!(
        format!("{err:#}").contains("train.jsonl") && format!("{err:#}").contains("No space left"),
        "{err:#}"
    );
    assert_eq!(kept, "old contents\n");
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn a_closed_stderr_pipe_ends_training_without_a_panic() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    let cfg = micro_cfg(d.path());
    let mut child = Command::new(env!("CARGO_BIN_EXE_fcgpu"))
        .args([
            "sft",
            "--config",
            cfg.to_str().unwrap(),
            "--run-dir",
            run.to_str().unwrap(),
            "--device",
            "cpu",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The reader goes away before the first line, as `| head -0` would.
    drop(child.stderr.take());
    let status = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_ne!(status.code(), Some(101), "panicked on a closed pipe");
    assert!(status.success() || status.signal() == Some(libc_sigpipe()), "{status:?}");
}

fn libc_sigpipe() -> i32 {
    13
}

#[test]
fn empty_training_data_fails_before_any_training() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    let data = d.path().join("empty.jsonl");
    std::fs::write(&data, "\n\n").unwrap();
    let o = fcgpu(&[
        "train",
        "--base",
        "scratch",
        "--preset",
        "micro",
        "--steps",
        "1",
        "--run-dir",
        run.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--warmup-sft-steps",
        "3",
        "--device",
        "cpu",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("empty.jsonl: no examples"), "{}", stderr(&o));
    assert!(
        !run.join("sft/task").exists() && !run.join("sft/base-model").exists(),
        "work done before the data was checked"
    );
}

#[test]
fn absurd_task_sizes_are_refused_before_anything_is_built() {
    let tmp = tempfile::tempdir().unwrap();
    for n in ["0", "1000000000000"] {
        let dir = tmp.path().join(format!("t{n}"));
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_fcgpu"))
            .args(["sft", "--run-dir", dir.to_str().unwrap(), "--task-train", n, "--steps", "1"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "--task-train {n}: {err}");
        assert!(err.contains("--task-train"), "--task-train {n}: {err}");
        assert!(!dir.join("base-model").exists(), "--task-train {n} built a model first");
    }
}
