//! `fcgpu plan`: the Qwen2.5-7B figures docs/devices.md quotes come from the command, and bad
//! input is a clear error.

use std::process::Command;

fn plan(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fcgpu")).arg("plan").args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn json(args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.push("--json");
    let (ok, out, err) = plan(&a);
    assert!(ok, "fcgpu plan {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap()
}

const Q7B: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/models/qwen2.5-7b.json");

#[test]
fn seven_b_grpo_fits_one_h100_only_with_lora() {
    let full = json(&["--model", Q7B, "--device", "h100"]);
    assert_eq!(full["grpo_fits"], false);
    let both =
        json(&["--model", Q7B, "--device", "h100", "--lora-rank", "16", "--checkpoint-activations", "layer"]);
    assert_eq!(both["grpo_fits"], true);
    let total = both["grpo"]["total"].as_u64().unwrap();
    assert!(total <= 60_000_000_000, "LoRA + checkpointing 7B GRPO plans {total} bytes");
    // The split adds up, and LoRA keeps no base optimizer state.
    let sum: u64 = [
        "weights",
        "adapters",
        "gradients",
        "optimizer",
        "kv_cache",
        "activations",
        "logits_chunks",
        "workspace",
    ]
    .iter()
    .map(|k| both["grpo"][k].as_u64().unwrap())
    .sum();
    assert_eq!(sum, total);
    assert!(both["grpo"]["optimizer"].as_u64().unwrap() < full["grpo"]["optimizer"].as_u64().unwrap() / 100);
}

#[test]
fn the_table_names_every_category_and_the_verdict() {
    let (ok, out, err) = plan(&["--model", Q7B, "--device", "h200", "--lora-rank", "16"]);
    assert!(ok, "{err}");
    for k in [
        "weights",
        "adapters",
        "gradients",
        "optimizer",
        "kv_cache",
        "activations",
        "logits_chunks",
        "workspace",
        "H200 141 GB",
        "largest GRPO --micro-batch",
    ] {
        assert!(out.contains(k), "no `{k}` in:\n{out}");
    }
}

#[test]
fn measuring_on_emu_agrees_with_the_plan() {
    let tiny = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/models/qwen2-tiny");
    let (ok, out, err) = plan(&[
        "--model",
        tiny,
        "--device",
        "emu",
        "--measure",
        "emu",
        "--prompts-per-step",
        "2",
        "--group-size",
        "2",
        "--prompt-len",
        "8",
        "--max-new-tokens",
        "4",
        "--max-len",
        "16",
        "--batch-size",
        "2",
        "--micro-batch",
        "2",
    ]);
    assert!(ok, "{err}\n{out}");
    assert!(out.contains("within 1%"), "{out}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("config.json");
    std::fs::write(&bad, "{ not json").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--model".into(), Q7B.into(), "--device".into(), "a100".into()], "expected h100, h200 or emu"),
        (vec!["--model".into(), bad.display().to_string()], "not valid JSON"),
        (vec!["--model".into(), tmp.path().join("none").display().to_string()], "--model"),
        (vec!["--model".into(), Q7B.into(), "--max-new-tokens".into(), "100000000".into()], "above"),
        (vec!["--model".into(), Q7B.into(), "--lora-rank".into(), "9999".into()], "LoRA rank 9999 is larger"),
        (
            vec![
                "--model".into(),
                Q7B.into(),
                "--lora-rank".into(),
                "8".into(),
                "--lora-targets".into(),
                "q_proj,x".into(),
            ],
            "unknown LoRA target `x`",
        ),
        (
            vec!["--model".into(), Q7B.into(), "--micro-batch".into(), "0".into()],
            "--micro-batch must be at least 1",
        ),
    ];
    for (args, want) in cases {
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let (ok, _, err) = plan(&a);
        assert!(!ok && err.contains(want), "fcgpu plan {a:?}: wanted an error with `{want}`, got: {err}");
    }
}

#[test]
fn meta_is_not_a_device_for_training() {
    let out = Command::new(env!("CARGO_BIN_EXE_fcgpu"))
        .args(["train", "--device", "meta", "--steps", "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--device meta has no data"), "{err}");
}
