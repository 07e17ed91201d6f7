//! Hostile inputs to the trainers, `eval` and the model loaders (issue 27), as families:
//! every output flag against special files (a FIFO, a link, a full device), every numeric
//! option against NaN, infinities, negatives and zeros (flag and config file), run-directory
//! reuse, tampered or diverged checkpoints, over-long training prompts, and model files that
//! are devices, FIFOs or oversized.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use fcgpu::data::synth;

fn fcgpu(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fcgpu")).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models").join(name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo {}", p.display());
}

fn file_type(p: &Path) -> std::fs::FileType {
    std::fs::symlink_metadata(p).unwrap().file_type()
}

/// A micro SFT config file in `dir` (seconds per run on 2 cores).
fn micro_cfg(dir: &Path) -> PathBuf {
    let p = dir.join("micro.toml");
    std::fs::write(
        &p,
        "batch_size = 3\nbucket_window = 6\n[run]\npreset = \"micro\"\ntask_train = 40\ntask_eval = 6\nvocab_size = 400\n\
         eval_samples = 0\nsave_every = 1\nsteps = 1\n",
    )
    .unwrap();
    p
}

/// `fcgpu sft` with the micro config on `run` plus `extra` flags.
fn sft(dir: &Path, run: &Path, extra: &[&str]) -> Output {
    let cfg = micro_cfg(dir);
    let mut args = vec!["sft", "--config", s(&cfg), "--run-dir", s(run), "--device", "cpu"];
    args.extend_from_slice(extra);
    fcgpu(&args)
}

/// Data of the embedded task and a results file answering each entry with its own call.
fn eval_inputs(dir: &Path) -> (PathBuf, PathBuf) {
    let (_, eval) = synth::generate(3, 1, 4);
    let data = dir.join("data.jsonl");
    synth::write_jsonl(&data, &eval).unwrap();
    let results = dir.join("results.jsonl");
    let lines: String =
        eval.iter().map(|e| format!("{}\n", serde_json::json!({"id": e.id, "result": "[f(x=1)]"}))).collect();
    std::fs::write(&results, lines).unwrap();
    (data, results)
}

/// Every output flag of every command, as the arguments that write `out`: `eval --verdicts`,
/// `eval --save-results`, `logprobs --counters`, `generate --counters`, `sft --counters`.
fn output_commands(dir: &Path, out: &Path) -> Vec<(&'static str, Vec<String>)> {
    let (data, results) = eval_inputs(dir);
    let model = fixture("qwen2-tiny");
    let input = dir.join("in.jsonl");
    std::fs::write(&input, "{\"input_ids\": [34, 303, 75, 220]}\n").unwrap();
    let gen_input = dir.join("gen.jsonl");
    std::fs::write(&gen_input, "{\"prompt_ids\": [34, 303, 75]}\n").unwrap();
    let cfg = micro_cfg(dir);
    let v = |a: &[&str]| a.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    vec![
        ("eval --verdicts", v(&["eval", "--data", s(&data), "--results", s(&results), "--verdicts", s(out)])),
        (
            "eval --save-results",
            v(&[
                "eval",
                "--data",
                s(&data),
                "--model",
                s(&model),
                "--style",
                "compact",
                "--max-new-tokens",
                "4",
                "--device",
                "cpu",
                "--save-results",
                s(out),
            ]),
        ),
        (
            "logprobs --counters",
            v(&[
                "logprobs",
                "--model",
                s(&model),
                "--input",
                s(&input),
                "--device",
                "emu",
                "--counters",
                s(out),
            ]),
        ),
        (
            "generate --counters",
            v(&[
                "generate",
                "--model",
                s(&model),
                "--input",
                s(&gen_input),
                "--max-new-tokens",
                "3",
                "--device",
                "emu",
                "--counters",
                s(out),
            ]),
        ),
        (
            "sft --counters",
            v(&[
                "sft",
                "--config",
                s(&cfg),
                "--run-dir",
                s(&dir.join(format!("run-{}", out.file_name().unwrap().to_string_lossy()))),
                "--device",
                "emu",
                "--counters",
                s(out),
            ]),
        ),
    ]
}

fn run_args(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fcgpu")).args(args).output().unwrap()
}

#[test]
fn every_output_flag_writes_through_a_fifo_a_link_and_fails_on_a_full_device() {
    let d = tempfile::tempdir().unwrap();
    // A link to /dev/full: code that replaced the path would replace only the link, never the
    // device itself.
    let full = d.path().join("full.out");
    std::os::unix::fs::symlink("/dev/full", &full).unwrap();
    for (what, args) in output_commands(d.path(), &full) {
        let o = run_args(&args);
        assert!(!o.status.success(), "{what} to /dev/full exited 0");
        assert!(stderr(&o).contains("No space left"), "{what}: {}", stderr(&o));
        assert!(file_type(&full).is_symlink(), "{what} replaced the link to /dev/full");
    }
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::metadata("/dev/full").unwrap().file_type().is_char_device());

    // A link to a regular file: the file gets the output, the link stays.
    let target = d.path().join("target.out");
    let link = d.path().join("link.out");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    for (what, args) in output_commands(d.path(), &link) {
        let _ = std::fs::remove_file(&target);
        let o = run_args(&args);
        assert!(o.status.success(), "{what}: {}", stderr(&o));
        assert!(file_type(&link).is_symlink(), "{what} replaced the link");
        assert!(std::fs::metadata(&target).unwrap().len() > 0, "{what} wrote nothing through the link");
    }

    // A FIFO: a reader gets the output, and the FIFO stays one.
    let fifo = d.path().join("pipe.out");
    mkfifo(&fifo);
    for (what, args) in output_commands(d.path(), &fifo) {
        let reader = {
            let p = fifo.clone();
            std::thread::spawn(move || {
                let mut all = Vec::new();
                // sft appends one line per step, opening the FIFO once per line: read until
                // the test's own end-of-run writer below closes.
                loop {
                    let got = std::fs::read(&p).unwrap();
                    if got == b"END" || got.ends_with(b"END") {
                        all.extend_from_slice(&got[..got.len() - 3]);
                        return all;
                    }
                    all.extend(got);
                }
            })
        };
        let o = run_args(&args);
        // Unblocks the reader whatever the command did.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&fifo)
            .and_then(|mut f| {
                use std::io::Write;
                f.write_all(b"END")
            })
            .unwrap();
        let got = reader.join().unwrap();
        assert!(o.status.success(), "{what}: {}", stderr(&o));
        assert!(!got.is_empty(), "{what} wrote nothing into the FIFO");
        assert!(file_type(&fifo).is_fifo(), "{what} replaced the FIFO");
    }
}

/// Fields that are set in a config file only (no flag).
const FILE_ONLY: [&str; 2] = ["min_lr_ratio", "weight_decay"];

/// (command, flag and config-file field, in the `[run]` table, bad values).
const BAD: &[(&str, &str, bool, &[&str])] = &[
    ("train", "lr", true, &["nan", "inf", "-0.01", "0", "-inf"]),
    ("sft", "lr", true, &["nan", "inf", "-0.01", "0"]),
    ("train", "max_grad_norm", true, &["-1", "nan", "0", "inf"]),
    ("sft", "max_grad_norm", true, &["-1", "nan", "0"]),
    ("sft", "min_lr_ratio", true, &["-0.5", "nan", "2"]),
    ("train", "weight_decay", true, &["-0.1", "nan", "inf"]),
    ("train", "beta", false, &["-1", "nan", "inf"]),
    ("train", "entropy_alpha", false, &["nan", "0", "-2", "inf"]),
    ("train", "entropy_lambda", false, &["-5", "inf", "nan"]),
    ("train", "eps_low", false, &["-0.2", "nan", "1", "inf"]),
    ("train", "eps_high", false, &["-0.2", "nan", "inf"]),
    ("train", "temperature", false, &["0", "-1", "nan", "inf"]),
    ("train", "top_p", false, &["0", "1.5", "nan"]),
    ("train", "srml_alpha", false, &["-0.1", "1.5", "nan"]),
    ("train", "group_size", false, &["0", "1"]),
    ("train", "prompts_per_step", false, &["0"]),
    ("train", "ppo_epochs", false, &["0"]),
    ("train", "max_new_tokens", false, &["0"]),
    ("train", "micro_batch", false, &["0"]),
    ("sft", "alpha", false, &["-0.1", "1.5", "nan", "inf"]),
    ("sft", "batch_size", false, &["0"]),
    ("sft", "grad_accum", false, &["0"]),
    ("sft", "max_len", false, &["0", "1"]),
];

#[test]
fn every_numeric_option_refuses_nan_infinities_and_out_of_range_values() {
    let d = tempfile::tempdir().unwrap();
    // The defaults pass.
    for cmd in ["train", "sft"] {
        let o = fcgpu(&[cmd, "--print-config"]);
        assert!(o.status.success(), "{cmd}: {}", stderr(&o));
    }
    for &(cmd, field, in_run, values) in BAD {
        let flag = format!("--{}", field.replace('_', "-"));
        for v in values {
            // As a flag (`--lr=-0.01`: a value that starts with '-'); the error names it.
            if !FILE_ONLY.contains(&field) {
                let o = fcgpu(&[cmd, &format!("{flag}={v}"), "--print-config"]);
                let e = stderr(&o);
                assert!(!o.status.success(), "{cmd} {flag}={v} accepted");
                assert!(e.contains(&format!("`{field}` ({flag})")), "{cmd} {flag}={v}: {e}");
            }
            // In a config file (TOML spells them nan, inf, -inf).
            let toml_v = v;
            let text =
                if in_run { format!("[run]\n{field} = {toml_v}\n") } else { format!("{field} = {toml_v}\n") };
            let p = d.path().join(format!("{cmd}-{field}.toml"));
            std::fs::write(&p, text).unwrap();
            let o = fcgpu(&[cmd, "--config", s(&p), "--print-config"]);
            let e = stderr(&o);
            assert!(!o.status.success(), "{cmd} config {field} = {toml_v} accepted");
            assert!(e.contains(&format!("`{field}`")), "{cmd} config {field} = {toml_v}: {e}");
        }
    }
    // eval's own numbers.
    let (data, results) = eval_inputs(d.path());
    for (flag, v) in
        [("--limit", "0"), ("--max-new-tokens", "0"), ("--batch-size", "0"), ("--temperature", "nan")]
    {
        let o = fcgpu(&["eval", "--data", s(&data), "--results", s(&results), flag, v]);
        assert!(!o.status.success(), "eval {flag} {v} accepted");
        assert!(stderr(&o).contains(flag), "eval {flag} {v}: {}", stderr(&o));
    }
}

#[test]
fn max_new_tokens_is_bounded_by_the_models_context() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    let cfg = d.path().join("t.toml");
    std::fs::write(
        &cfg,
        "max_new_tokens = 1000000000\n[run]\ntask_train = 20\ntask_eval = 2\neval_samples = 0\n",
    )
    .unwrap();
    let o = fcgpu(&["train", "--config", s(&cfg), "--run-dir", s(&run), "--steps", "1", "--device", "cpu"]);
    assert!(!o.status.success(), "train accepted max_new_tokens 1e9");
    let e = stderr(&o);
    assert!(e.contains("max_new_tokens") && e.contains("context"), "{e}");
    assert!(!run.join("checkpoint-1").exists());
    let (data, _) = eval_inputs(d.path());
    let model = fixture("qwen2-tiny");
    let o = fcgpu(&[
        "eval",
        "--data",
        s(&data),
        "--model",
        s(&model),
        "--max-new-tokens",
        "100000",
        "--device",
        "cpu",
    ]);
    assert!(!o.status.success() && stderr(&o).contains("--max-new-tokens"), "{}", stderr(&o));
}

#[test]
fn a_used_run_dir_is_refused_without_resume_or_force() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    let seed = |r: &Path| std::fs::read_to_string(r.join("config.toml")).unwrap();
    assert!(sft(d.path(), &run, &["--seed", "1", "--steps", "2"]).status.success());
    // A second run with another seed: refused, the first run untouched.
    let o = sft(d.path(), &run, &["--seed", "2"]);
    assert!(!o.status.success(), "a used run directory was overwritten");
    let e = stderr(&o);
    assert!(e.contains("holds an earlier run") && e.contains("--resume") && e.contains("--force"), "{e}");
    assert!(seed(&run).contains("seed = 1") && run.join("checkpoint-2").exists());
    // --force deletes the earlier run: none of its checkpoints is left to mix with.
    let o = sft(d.path(), &run, &["--seed", "2", "--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(seed(&run).contains("seed = 2"));
    assert!(run.join("checkpoint-1").exists() && !run.join("checkpoint-2").exists());
    // --force leaves a directory with files no run writes alone.
    std::fs::write(run.join("notes.txt"), "mine").unwrap();
    let o = sft(d.path(), &run, &["--seed", "3", "--force"]);
    assert!(!o.status.success() && stderr(&o).contains("notes.txt"), "{}", stderr(&o));
    assert!(run.join("notes.txt").exists() && run.join("checkpoint-1").exists());
    std::fs::remove_file(run.join("notes.txt")).unwrap();
    // train refuses the same way, before any work.
    let o = fcgpu(&["train", "--run-dir", s(&run), "--steps", "1", "--device", "cpu"]);
    assert!(!o.status.success() && stderr(&o).contains("holds an earlier run"), "{}", stderr(&o));
    assert!(!run.join("sft").exists());
    // `--run-dir .` is refused like init's `--out .`, leaving nothing behind.
    let here = d.path().join("here");
    std::fs::create_dir(&here).unwrap();
    for cmd in ["sft", "train"] {
        let o = Command::new(env!("CARGO_BIN_EXE_fcgpu"))
            .args([cmd, "--run-dir", ".", "--steps", "1", "--device", "cpu"])
            .current_dir(&here)
            .output()
            .unwrap();
        assert!(!o.status.success() && stderr(&o).contains("current directory"), "{cmd}: {}", stderr(&o));
        assert_eq!(std::fs::read_dir(&here).unwrap().count(), 0, "{cmd} wrote into .");
    }
}

#[test]
fn resume_compares_the_config_with_the_checkpoints_own() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    assert!(sft(d.path(), &run, &["--seed", "1", "--steps", "2"]).status.success());
    // config.toml says seed 2 (as a second run that replaced it once left it), the checkpoint 1.
    let c = run.join("config.toml");
    std::fs::write(&c, std::fs::read_to_string(&c).unwrap().replace("seed = 1", "seed = 2")).unwrap();
    let o = sft(d.path(), &run, &["--seed", "2", "--steps", "3", "--resume"]);
    assert!(!o.status.success(), "resumed seed 1's weights under seed 2");
    let e = stderr(&o);
    assert!(e.contains("run_config.toml") && e.contains("seed: 1 -> 2"), "{e}");
    // A checkpoint from before run_config.toml: its trainer state still says seed 1.
    std::fs::remove_file(run.join("checkpoint-2/run_config.toml")).unwrap();
    let o = sft(d.path(), &run, &["--seed", "2", "--steps", "3", "--resume"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("trainer_state.json") && stderr(&o).contains("run.seed: 1 -> 2"),
        "{}",
        stderr(&o)
    );
    assert!(!run.join("checkpoint-3").exists());
}

/// Rewrites `checkpoint/optimizer.safetensors` with `edit` applied to its tensors.
fn tamper(ckpt: &Path, edit: impl Fn(&mut Vec<(String, fcgpu::tensor::Tensor)>)) {
    let p = ckpt.join("optimizer.safetensors");
    let mut t: Vec<(String, fcgpu::tensor::Tensor)> =
        fcgpu::model::weights::load_all(&p).unwrap().into_iter().collect();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    edit(&mut t);
    fcgpu::model::weights::save(&p, &t, fcgpu::tensor::DType::F32).unwrap();
}

#[test]
fn a_tampered_optimizer_checkpoint_falls_back_to_the_previous_one() {
    let d = tempfile::tempdir().unwrap();
    let cases: [(&str, fn(&mut Vec<(String, fcgpu::tensor::Tensor)>)); 3] = [
        // Two first moments of different sizes swapped (the embedding and a norm).
        ("swap", |t| {
            let a = t.iter().position(|(n, _)| n == "m.model.embed_tokens.weight").unwrap();
            let b = t.iter().position(|(n, _)| n == "m.model.norm.weight").unwrap();
            let (x, y) = (t[a].1.clone(), t[b].1.clone());
            (t[a].1, t[b].1) = (y, x);
        }),
        // A parameter's m and v swapped: the second moment goes negative.
        ("m-v", |t| {
            let a = t.iter().position(|(n, _)| n == "m.model.embed_tokens.weight").unwrap();
            let b = t.iter().position(|(n, _)| n == "v.model.embed_tokens.weight").unwrap();
            let (x, y) = (t[a].1.clone(), t[b].1.clone());
            (t[a].1, t[b].1) = (y, x);
        }),
        // A renamed state tensor: no parameter has it.
        ("rename", |t| {
            let a = t.iter().position(|(n, _)| n == "v.model.norm.weight").unwrap();
            t[a].0 = "v.model.nope.weight".into();
        }),
    ];
    for (what, edit) in cases {
        let run = d.path().join(what);
        assert!(sft(d.path(), &run, &["--steps", "2"]).status.success());
        tamper(&run.join("checkpoint-2"), edit);
        let o = sft(d.path(), &run, &["--steps", "3", "--resume"]);
        assert!(o.status.success(), "{what}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(
            e.contains("checkpoint-2 cannot be loaded")
                && e.contains("optimizer.safetensors")
                && e.contains("falling back"),
            "{what}: {e}"
        );
        assert!(e.contains("resuming from") && e.contains("checkpoint-1"), "{what}: {e}");
    }
}

#[test]
fn non_finite_weights_or_moments_are_never_written_as_a_checkpoint() {
    use fcgpu::train::checkpoint;
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    assert!(sft(d.path(), &run, &[]).status.success());
    let (mut model, opt, mut state) = checkpoint::load(&run.join("checkpoint-1")).unwrap();
    let format = fcgpu::train::prompt::recorded(&run.join("checkpoint-1")).unwrap().unwrap();
    state.step = 7;
    let mut bad_opt = fcgpu::train::optim::AdamW { m: opt.m.clone(), v: opt.v.clone(), ..Default::default() };
    bad_opt.m.values_mut().next().unwrap()[0] = f32::INFINITY;
    let e = format!("{:#}", checkpoint::save(&run, &model, &bad_opt, &state, &format, "").unwrap_err());
    assert!(e.contains("not all finite") && e.contains("checkpoint-7"), "{e}");
    let mut first = true;
    model.visit_mut(&mut |_, p| {
        if first {
            let mut v = p.to_vec();
            v[0] = f32::NAN;
            p.replace_data(v).unwrap();
            first = false;
        }
    });
    let e = format!("{:#}", checkpoint::save(&run, &model, &opt, &state, &format, "").unwrap_err());
    assert!(e.contains("not all finite"), "{e}");
    assert!(!run.join("checkpoint-7").exists());
    let names: Vec<_> = std::fs::read_dir(&run).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(names.iter().all(|n| !n.to_string_lossy().contains("partial")), "{names:?}");
}

#[test]
fn an_over_long_training_prompt_is_dropped_at_load_naming_its_line() {
    use fcgpu::tensor::Device;
    use fcgpu::train::checkpoint::Start;
    use fcgpu::train::grpo::{GrpoConfig, GrpoTrainer};
    use fcgpu::train::run_config::RunConfig;
    let d = tempfile::tempdir().unwrap();
    let (mut train, _) = synth::generate(5, 4, 1);
    // fc-tiny's context is 2048 tokens: this prompt has tens of thousands.
    train[2].messages[0].content = "please call the tool ".repeat(4000);
    let data = d.path().join("long.jsonl");
    synth::write_jsonl(&data, &train).unwrap();
    let cfg = |run: &str, data: &Path| GrpoConfig {
        run: RunConfig {
            data: Some(data.to_path_buf()),
            run_dir: d.path().join(run),
            steps: 1,
            eval_samples: 0,
            ..RunConfig::grpo()
        },
        max_new_tokens: 16,
        ..Default::default()
    };
    let t = GrpoTrainer::new(cfg("a", &data), Start::FRESH, Device::Cpu).unwrap();
    assert_eq!(t.train.len(), 3, "the long prompt was not dropped");
    assert!(t.train.iter().all(|s| s.id != train[2].id));
    drop(t);
    // Only long prompts: an error naming the file and the line.
    let only = d.path().join("only.jsonl");
    synth::write_jsonl(&only, &train[2..3]).unwrap();
    let e = GrpoTrainer::new(cfg("b", &only), Start::FRESH, Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("only.jsonl") && e.contains("line 1") && e.contains("no prompt is left"), "{e}");
}

/// Runs `f` on another thread and fails the test if it takes longer than a minute (a FIFO
/// read blocks forever).
fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("{what}: still reading after a minute"))
}

#[test]
fn model_files_that_are_devices_fifos_or_oversized_are_refused_naming_them() {
    let d = tempfile::tempdir().unwrap();
    let src = fixture("qwen2-tiny");
    for file in ["config.json", "tokenizer.json", "generation_config.json"] {
        for kind in ["zero", "fifo", "big", "dir"] {
            let m = d.path().join(format!("{file}-{kind}"));
            std::fs::create_dir(&m).unwrap();
            for e in std::fs::read_dir(&src).unwrap() {
                let e = e.unwrap();
                std::fs::copy(e.path(), m.join(e.file_name())).unwrap();
            }
            let p = m.join(file);
            std::fs::remove_file(&p).unwrap();
            match kind {
                "zero" => std::os::unix::fs::symlink("/dev/zero", &p).unwrap(),
                "fifo" => mkfifo(&p),
                // Sparse: larger than every cap without using the disk.
                "big" => std::fs::File::create(&p).unwrap().set_len(200 << 20).unwrap(),
                _ => std::fs::create_dir(&p).unwrap(),
            }
            let dir = m.clone();
            let r = bounded(&format!("{file} {kind}"), move || {
                let model = fcgpu::model::Model::load(&dir).map(|_| ());
                model.and_then(|_| fcgpu::model::tokenizer::Tokenizer::load(&dir).map(|_| ()))
            });
            let e = format!("{:#}", r.expect_err(&format!("{file} as {kind} loaded")));
            assert!(e.contains(file), "{file} {kind}: {e}");
            if kind == "big" {
                std::fs::remove_file(&p).unwrap();
            }
        }
    }
}
