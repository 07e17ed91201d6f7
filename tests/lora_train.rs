//! LoRA runs end to end: GRPO with adapters (frozen base, adapters-off reference, PEFT
//! checkpoints, exact resume), `fcgpu sft --lora-*` through the binary, `--adapter` on the
//! model commands, `fcgpu merge`, and `--lora-*` flags refused where they do not belong.

use std::path::Path;
use std::process::{Command, Output};

use fcgpu::device::Device;
use fcgpu::model::lora::{LoraConfig, CONFIG_FILE, WEIGHTS_FILE};
use fcgpu::model::Model;
use fcgpu::train::checkpoint::Start;
use fcgpu::train::grpo::{self, GrpoConfig};
use fcgpu::train::run_config::RunConfig;

fn fcgpu(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fcgpu")).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn micro_lora(run_dir: &Path) -> GrpoConfig {
    GrpoConfig {
        run: RunConfig {
            run_dir: run_dir.to_path_buf(),
            steps: 2,
            lr: 1e-2,
            task_train: 60,
            task_eval: 8,
            eval_samples: 0,
            save_every: 1,
            preset: "micro".into(),
            base: "scratch".into(),
            lora: Some(LoraConfig::new(2, 4.0, 0.0, "q_proj,v_proj,down_proj").unwrap()),
            ..RunConfig::grpo()
        },
        prompts_per_step: 2,
        group_size: 3,
        max_new_tokens: 12,
        warmup_sft_steps: 0,
        // Not 0: the reference pass runs, as the policy with its adapters off.
        beta: 0.05,
        micro_batch: 4,
        dynamic_sampling: false,
        ..Default::default()
    }
}

/// A LoRA GRPO run writes PEFT checkpoints (adapters only, optimizer state only for them),
/// leaves the base untouched, and resumed after step 1 ends where an uninterrupted run does.
#[test]
fn lora_grpo_trains_adapters_only_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    grpo::run(micro_lora(&straight), Start::FRESH, Device::Cpu).unwrap();
    let ck = straight.join("checkpoint-2");
    assert!(ck.join(CONFIG_FILE).exists() && ck.join(WEIGHTS_FILE).exists());
    assert!(!ck.join("model.safetensors").exists(), "a LoRA checkpoint holds no copy of the base");
    let opt = fcgpu::model::weights::load_all(&ck.join("optimizer.safetensors")).unwrap();
    assert!(!opt.is_empty());
    for k in opt.keys().filter(|k| !k.contains("srml")) {
        assert!(k.contains(".lora_A.") || k.contains(".lora_B."), "optimizer state for `{k}`");
    }
    let trained = Model::load_with_adapter(&ck, None).unwrap();
    let base = Model::load(&straight.join("sft/base-model")).unwrap();
    for ((n, a), (_, b)) in trained.named_params().iter().zip(&base.named_params()) {
        assert_eq!(a.to_vec(), b.to_vec(), "base weight `{n}` changed");
    }
    let moved = trained
        .trainable_params()
        .iter()
        .filter(|(n, _)| n.contains("lora_B"))
        .any(|(_, t)| t.to_vec().iter().any(|&x| x != 0.0));
    assert!(moved, "two steps must move some B away from 0");
    // The same run stopped after step 1 and resumed.
    let split = dir.path().join("split");
    for sub in ["sft/task", "sft/base-model"] {
        let to = split.join(sub);
        std::fs::create_dir_all(&to).unwrap();
        for e in std::fs::read_dir(straight.join(sub)).unwrap() {
            let e = e.unwrap();
            if e.path().is_file() {
                std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
            }
        }
    }
    let mut first = micro_lora(&split);
    first.run.steps = 1;
    grpo::run(first, Start::FRESH, Device::Cpu).unwrap();
    grpo::run(micro_lora(&split), Start::RESUME, Device::Cpu).unwrap();
    let resumed = Model::load_with_adapter(&split.join("checkpoint-2"), None).unwrap();
    for ((n, a), (_, b)) in trained.trainable_params().iter().zip(&resumed.trainable_params()) {
        assert_eq!(a.to_vec(), b.to_vec(), "adapter `{n}` differs after resume");
    }
}

fn micro_cfg(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("micro.toml");
    std::fs::write(&p, "preset = \"micro\"\ntask_train = 40\ntask_eval = 6\nvocab_size = 400\nbatch_size = 3\nbucket_window = 6\n\
        eval_samples = 0\nsave_every = 2\nsteps = 2\nlr = 0.01\n").unwrap();
    p
}

fn logprobs(model: &Path, input: &Path, extra: &[&str]) -> Vec<serde_json::Value> {
    let m = model.to_str().unwrap();
    let out = fcgpu(
        &[&["logprobs", "--model", m, "--input", input.to_str().unwrap(), "--device", "cpu"], extra].concat(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn max_diff(a: &serde_json::Value, b: &serde_json::Value) -> f64 {
    let (a, b) = (a["logprobs"].as_array().unwrap(), b["logprobs"].as_array().unwrap());
    a.iter().zip(b).map(|(x, y)| (x.as_f64().unwrap() - y.as_f64().unwrap()).abs()).fold(0.0, f64::max)
}

/// `fcgpu sft --lora-rank` writes a PEFT adapter; `logprobs --adapter` scores with it, `merge`
/// folds it into a plain model that scores the same, and refuses to overwrite without --force.
#[test]
fn sft_lora_adapter_logprobs_and_merge_through_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let cfg = micro_cfg(dir.path());
    let out = fcgpu(&[
        "sft",
        "--config",
        cfg.to_str().unwrap(),
        "--run-dir",
        run.to_str().unwrap(),
        "--device",
        "cpu",
        "--lora-rank",
        "4",
        "--lora-alpha",
        "8",
        "--lora-dropout",
        "0.1",
        "--lora-targets",
        "q_proj,k_proj,gate_proj",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ad = run.join("checkpoint-2");
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ad.join(CONFIG_FILE)).unwrap()).unwrap();
    assert_eq!(
        (c["r"].as_u64(), c["lora_alpha"].as_f64(), c["lora_dropout"].as_f64()),
        (Some(4), Some(8.0), Some(0.1))
    );
    assert_eq!(c["target_modules"], serde_json::json!(["q_proj", "k_proj", "gate_proj"]));
    let base = std::path::PathBuf::from(c["base_model_name_or_path"].as_str().unwrap());
    assert!(base.join("config.json").exists(), "the adapter names its base: {}", base.display());
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, "{\"input_ids\": [5, 17, 40, 9, 33, 2]}\n{\"input_ids\": [100, 3, 250, 7]}\n")
        .unwrap();
    let plain = logprobs(&base, &input, &[]);
    let adapted = logprobs(&base, &input, &["--adapter", ad.to_str().unwrap()]);
    assert!(max_diff(&plain[0], &adapted[0]) > 1e-5, "the adapter changes the scores");
    let merged = dir.path().join("merged");
    let m = |extra: &[&str]| {
        fcgpu(
            &[
                &[
                    "merge",
                    "--model",
                    base.to_str().unwrap(),
                    "--adapter",
                    ad.to_str().unwrap(),
                    "--out",
                    merged.to_str().unwrap(),
                ],
                extra,
            ]
            .concat(),
        )
    };
    let out = m(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(merged.join("model.safetensors").exists() && !merged.join(CONFIG_FILE).exists());
    let folded = logprobs(&merged, &input, &[]);
    for (a, b) in adapted.iter().zip(&folded) {
        assert!(max_diff(a, b) < 1e-4, "merged vs adapter: {}", max_diff(a, b));
    }
    let out = m(&[]);
    assert!(!out.status.success() && stderr(&out).contains("already exists"), "{}", stderr(&out));
    assert!(m(&["--force"]).status.success());
    // generate with the adapter runs.
    let prompts = dir.path().join("p.jsonl");
    std::fs::write(&prompts, "{\"prompt_ids\": [5, 17, 40]}\n").unwrap();
    let out = fcgpu(&[
        "generate",
        "--model",
        base.to_str().unwrap(),
        "--adapter",
        ad.to_str().unwrap(),
        "--input",
        prompts.to_str().unwrap(),
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn lora_flags_are_checked_and_refused_where_they_do_not_belong() {
    let print = |args: &[&str]| fcgpu(&[&["sft", "--print-config"], args].concat());
    let out = print(&["--lora-rank", "8"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let t: toml::Table = toml::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
    let l = &t["run"]["lora"];
    assert_eq!((l["rank"].as_integer(), l["alpha"].as_float()), (Some(8), Some(8.0)), "{t}");
    for (args, want) in [
        (&["--lora-alpha", "4"][..], "need --lora-rank"),
        (&["--lora-rank", "0"][..], "rank 0"),
        (&["--lora-rank", "4", "--lora-targets", "q_proj,wq"][..], "unknown LoRA target `wq`"),
        (&["--lora-rank", "4", "--lora-dropout", "1.5"][..], "dropout"),
        (
            &["--lora-rank", "4", "--lora-dropout", "0.1", "--checkpoint-activations", "layer"][..],
            "another dropout mask",
        ),
    ] {
        let out = print(args);
        assert!(!out.status.success() && stderr(&out).contains(want), "{args:?}: {}", stderr(&out));
        let out = fcgpu(&[&["train", "--print-config"], args].concat());
        assert!(!out.status.success() && stderr(&out).contains(want), "train {args:?}: {}", stderr(&out));
    }
    // Commands that train nothing take no --lora-* flag (an error, not ignored).
    for cmd in ["eval", "generate", "logprobs", "serve", "merge"] {
        let out = fcgpu(&[cmd, "--lora-rank", "4"]);
        assert!(!out.status.success() && stderr(&out).contains("--lora-rank"), "{cmd}: {}", stderr(&out));
    }
    // A rank wider than the model's layers is refused before any training (micro: 32 wide).
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let cfg = micro_cfg(dir.path());
    let out = fcgpu(&[
        "sft",
        "--config",
        cfg.to_str().unwrap(),
        "--run-dir",
        run.to_str().unwrap(),
        "--device",
        "cpu",
        "--lora-rank",
        "100000",
    ]);
    assert!(!out.status.success() && stderr(&out).contains("rank 100000 is larger"), "{}", stderr(&out));
    assert!(!run.join("checkpoint-2").exists() && !run.join("metrics.jsonl").exists());
}

/// On emu (the GPU code path: bf16 base, f32 master weights and AdamW state on the device for
/// the adapters only, batched decode with the adapter GEMM pair, the reference with adapters
/// off): `sft` and `train` with `--lora-rank` run, and their checkpoints hold trained adapters.
#[test]
fn lora_sft_and_grpo_run_on_emu() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = micro_cfg(dir.path());
    let run = dir.path().join("sft");
    let out = fcgpu(&[
        "sft",
        "--config",
        cfg.to_str().unwrap(),
        "--run-dir",
        run.to_str().unwrap(),
        "--device",
        "emu",
        "--lora-rank",
        "2",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let grpo = dir.path().join("grpo");
    let out = fcgpu(&[
        "train",
        "--run-dir",
        grpo.to_str().unwrap(),
        "--preset",
        "micro",
        "--base",
        "scratch",
        "--task-train",
        "40",
        "--warmup-sft-steps",
        "0",
        "--group-size",
        "3",
        "--prompts-per-step",
        "2",
        "--max-new-tokens",
        "8",
        "--eval-samples",
        "0",
        "--steps",
        "2",
        "--save-every",
        "2",
        "--lr",
        "0.01",
        "--beta",
        "0.05",
        "--dynamic-sampling",
        "false",
        "--device",
        "emu",
        "--lora-rank",
        "2",
        "--lora-targets",
        "q_proj,v_proj,up_proj",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    for ck in [run.join("checkpoint-2"), grpo.join("checkpoint-2")] {
        let m = Model::load_with_adapter(&ck, None).unwrap_or_else(|e| panic!("{}: {e:#}", ck.display()));
        let opt = fcgpu::model::weights::load_all(&ck.join("optimizer.safetensors")).unwrap();
        assert!(opt.keys().filter(|k| !k.contains("srml")).all(|k| k.contains(".lora_")), "{}", ck.display());
        let moved = m
            .trainable_params()
            .iter()
            .any(|(n, t)| n.contains("lora_B") && t.to_vec().iter().any(|&x| x != 0.0));
        assert!(moved, "{}: the adapters did not train", ck.display());
    }
}

/// `--adapter` with an adapter made for another base is an error naming the tensor, before any
/// sequence is scored.
#[test]
fn adapter_for_another_base_is_refused_by_the_model_commands() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let qwen3 = root.join("tests/fixtures/models/qwen3-tiny");
    let adapter = root.join("tests/fixtures/lora/qwen2-tiny-r4");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, "{\"input_ids\": [5, 17, 40]}\n").unwrap();
    let (m, a, i) = (qwen3.to_str().unwrap(), adapter.to_str().unwrap(), input.to_str().unwrap());
    let out = fcgpu(&["logprobs", "--model", m, "--adapter", a, "--input", i, "--device", "cpu"]);
    let err = stderr(&out);
    assert!(!out.status.success() && err.contains("has shape") && err.contains("another model"), "{err}");
    assert!(out.stdout.is_empty(), "nothing scored");
}
