//! Hostile inputs a user can hand the commands: occupied output directories, absurd or invalid
//! configs, NaN weights, shard paths leaving the model directory, oversized inputs, broken
//! BFCL directories and result files, invalid UTF-8. Each was a crash, a silent wrong answer or
//! data loss (issue 11); each must now be a clear error naming what is wrong.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fcgpu_in(dir: Option<&Path>, args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fcgpu"));
    if let Some(d) = dir {
        c.current_dir(d);
    }
    c.args(args).output().unwrap()
}

fn fcgpu(args: &[&str]) -> Output {
    fcgpu_in(None, args)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A Qwen2 config.json small enough to init in milliseconds, with `edit` applied.
fn config(dir: &Path, edit: &[(&str, serde_json::Value)]) -> PathBuf {
    let mut v = serde_json::json!({
        "model_type": "qwen2", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": true, "torch_dtype": "float32"
    });
    for (k, x) in edit {
        v[*k] = x.clone();
    }
    let p = dir.join(format!("config-{}.json", edit.len() + std::fs::read_dir(dir).unwrap().count()));
    std::fs::write(&p, v.to_string()).unwrap();
    p
}

/// A fresh model directory `dir/name` from [`config`].
fn model(dir: &Path, name: &str) -> PathBuf {
    let out = dir.join(name);
    let o = fcgpu(&["init", "--config", config(dir, &[]).to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    out
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn init_refuses_a_non_empty_directory_unless_forced() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("precious");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("thesis.tex"), "years of work").unwrap();
    let cfg = config(d.path(), &[]);
    let o = fcgpu(&["init", "--config", cfg.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(!o.status.success(), "init overwrote a non-empty directory");
    assert!(stderr(&o).contains("not empty") && stderr(&o).contains("--force"), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(out.join("thesis.tex")).unwrap(), "years of work");

    let o = fcgpu(&["init", "--config", cfg.to_str().unwrap(), "--out", out.to_str().unwrap(), "--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.join("model.safetensors").exists() && !out.join("thesis.tex").exists());
    // No temporary or moved-aside directory is left next to it.
    assert!(entries(d.path()).iter().all(|e| !e.starts_with('.')), "{:?}", entries(d.path()));
}

#[test]
fn init_into_the_current_directory_is_refused_without_leftovers() {
    let d = tempfile::tempdir().unwrap();
    let cwd = d.path().join("work");
    std::fs::create_dir(&cwd).unwrap();
    std::fs::write(cwd.join("notes.txt"), "keep").unwrap();
    let cfg = config(d.path(), &[]);
    for force in [false, true] {
        let mut args = vec!["init", "--config", cfg.to_str().unwrap(), "--out", "."];
        if force {
            args.push("--force");
        }
        let o = fcgpu_in(Some(&cwd), &args);
        assert!(!o.status.success());
        assert!(stderr(&o).contains("current directory"), "{}", stderr(&o));
        assert_eq!(entries(&cwd), vec!["notes.txt"]);
        assert!(entries(d.path()).iter().all(|e| !e.starts_with('.')), "{:?}", entries(d.path()));
    }
}

#[test]
fn absurd_sizes_fail_before_allocating() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("m");
    for (field, value, expect) in [
        ("num_hidden_layers", serde_json::json!(1_000_000_000u64), "num_hidden_layers"),
        ("vocab_size", serde_json::json!(1_000_000_000_000u64), "vocab_size"),
        ("hidden_size", serde_json::json!(0), "hidden_size"),
        ("max_position_embeddings", serde_json::json!(0), "max_position_embeddings"),
        // Every size in range, but far more memory than any test machine has.
        ("intermediate_size", serde_json::json!(200_000), "memory"),
    ] {
        let mut edit = vec![(field, value)];
        if expect == "memory" {
            edit.push(("hidden_size", serde_json::json!(200_000)));
            edit.push(("num_hidden_layers", serde_json::json!(1)));
        }
        let cfg = config(d.path(), &edit);
        let o = fcgpu(&["init", "--config", cfg.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        assert!(!o.status.success() && o.status.code() == Some(1), "{field}: {:?} {}", o.status, stderr(&o));
        assert!(stderr(&o).contains(expect), "{field}: {}", stderr(&o));
    }
    assert!(!out.exists());
}

#[test]
fn a_config_larger_than_its_weights_is_named() {
    let d = tempfile::tempdir().unwrap();
    let m = model(d.path(), "m");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(m.join("config.json")).unwrap()).unwrap();
    v["num_hidden_layers"] = 4000.into();
    std::fs::write(m.join("config.json"), v.to_string()).unwrap();
    let input = d.path().join("in.jsonl");
    std::fs::write(&input, "{\"input_ids\": [1, 2, 3]}\n").unwrap();
    let o = fcgpu(&[
        "logprobs",
        "--model",
        m.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("parameters but the safetensors files hold only"), "{}", stderr(&o));
}

#[test]
fn invalid_numbers_in_config_are_named() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("m");
    for (field, value) in [
        ("rms_norm_eps", serde_json::json!(-1.0)),
        ("rope_theta", serde_json::json!(0.0)),
        ("rms_norm_eps", serde_json::json!(0.0)),
    ] {
        let cfg = config(d.path(), &[(field, value)]);
        let o = fcgpu(&["init", "--config", cfg.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        assert!(!o.status.success(), "{field} accepted");
        assert!(stderr(&o).contains(field), "{field}: {}", stderr(&o));
    }
}

#[test]
fn non_finite_weights_are_named_at_load() {
    let d = tempfile::tempdir().unwrap();
    let m = model(d.path(), "m");
    let path = m.join("model.safetensors");
    let mut all: Vec<(String, fcgpu::Tensor)> =
        fcgpu::model::weights::load_all(&path).unwrap().into_iter().collect();
    let (name, t) = all.iter_mut().find(|(n, _)| n.contains("layers.1.mlp.up_proj")).unwrap();
    let mut v = t.to_vec();
    v[5] = f32::NAN;
    *t = fcgpu::Tensor::from_vec(v, t.shape()).unwrap();
    let name = name.clone();
    fcgpu::model::weights::save(&path, &all, fcgpu::DType::F32).unwrap();
    let input = d.path().join("in.jsonl");
    std::fs::write(&input, "{\"input_ids\": [1, 2, 3]}\n").unwrap();
    let o = fcgpu(&[
        "logprobs",
        "--model",
        m.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert!(!o.status.success(), "NaN weights accepted: {}", String::from_utf8_lossy(&o.stdout));
    assert!(stderr(&o).contains(&name) && stderr(&o).contains("non-finite"), "{}", stderr(&o));
}

#[test]
fn shard_paths_must_stay_inside_the_model_directory() {
    let d = tempfile::tempdir().unwrap();
    let m = model(d.path(), "m");
    // A real safetensors file outside the model directory, reachable by `..` or a symlink.
    std::fs::copy(m.join("model.safetensors"), d.path().join("outside.safetensors")).unwrap();
    std::os::unix::fs::symlink(d.path().join("outside.safetensors"), m.join("link.safetensors")).unwrap();
    std::fs::remove_file(m.join("model.safetensors")).unwrap();
    for shard in ["/etc/passwd", "../outside.safetensors", "link.safetensors", ""] {
        let index = serde_json::json!({"weight_map": {"model.embed_tokens.weight": shard}});
        std::fs::write(m.join("model.safetensors.index.json"), index.to_string()).unwrap();
        let err = match fcgpu::model::Model::load(&m) {
            Ok(_) => panic!("shard {shard:?} was opened"),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            err.contains("model.safetensors.index.json") && err.contains("model directory"),
            "{shard}: {err}"
        );
    }
}

#[test]
fn logprobs_bounds_input_size_and_context() {
    let d = tempfile::tempdir().unwrap();
    let m = model(d.path(), "m");
    let run = |body: &str| {
        let input = d.path().join("in.jsonl");
        std::fs::write(&input, body).unwrap();
        fcgpu(&[
            "logprobs",
            "--model",
            m.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--device",
            "cpu",
        ])
    };
    // 100 tokens against a context of 64; the blank first line counts (errors name file lines).
    let ids: Vec<u32> = (0..100).map(|i| i % 60).collect();
    let o = run(&format!("\n{}\n", serde_json::json!({"input_ids": ids})));
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("in.jsonl:2") && stderr(&o).contains("max_position_embeddings = 64"),
        "{}",
        stderr(&o)
    );
    // A text past 16 bytes per position is refused before tokenizing (this model has no
    // tokenizer at all).
    let o = run(&format!("{}\n", serde_json::json!({"text": "a".repeat(1050)})));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("too long for the model's context"), "{}", stderr(&o));
    // A huge line is refused without reading it whole.
    let o = run(&format!("{{\"input_ids\": [{}1]}}\n", "1, ".repeat(2_000_000)));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("in.jsonl:1: line longer than"), "{}", stderr(&o));
    // At the limit it runs.
    let ids: Vec<u32> = (0..64).map(|i| i % 60).collect();
    let o = run(&format!("{}\n", serde_json::json!({"input_ids": ids})));
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn decoding_stops_at_the_context_and_refuses_longer_prompts() {
    use fcgpu::rollout::{generate, FinishReason, SamplingConfig};
    let d = tempfile::tempdir().unwrap();
    let m = fcgpu::model::Model::load(&model(d.path(), "m")).unwrap();
    let cfg = SamplingConfig {
        n: 1,
        max_new_tokens: 1000,
        temperature: 0.0,
        ignore_eos: true,
        ..Default::default()
    };
    let out = generate(&m, &[vec![1; 60]], &cfg, None).unwrap();
    assert_eq!(out[0].new_ids.len(), 4, "60 prompt tokens + 4 new = the 64-token context");
    assert_eq!(out[0].finish_reason, FinishReason::Length);
    let err = generate(&m, &[vec![1; 64]], &cfg, None).unwrap_err();
    assert!(format!("{err:#}").contains("max_position_embeddings"), "{err:#}");
}

/// A one-category BFCL v4 directory: two questions and their answers.
fn bfcl_dir(d: &Path) -> PathBuf {
    let dir = d.join("bfcl");
    std::fs::create_dir_all(dir.join("possible_answer")).unwrap();
    let f = serde_json::json!([{"name": "f", "description": "d", "parameters": {"type": "dict", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}]);
    let mut q = String::new();
    let mut a = String::new();
    for i in 0..2 {
        q += &format!(
            "{}\n",
            serde_json::json!({"id": format!("simple_python_{i}"), "question": [[{"role": "user", "content": "call f"}]], "function": f})
        );
        a += &format!(
            "{}\n",
            serde_json::json!({"id": format!("simple_python_{i}"), "ground_truth": [{"f": {"a": [i]}}]})
        );
    }
    std::fs::write(dir.join("BFCL_v4_simple_python.json"), q).unwrap();
    std::fs::write(dir.join("possible_answer/BFCL_v4_simple_python.json"), a).unwrap();
    dir
}

#[test]
fn eval_fails_on_a_missing_data_directory() {
    let d = tempfile::tempdir().unwrap();
    let results = d.path().join("r.jsonl");
    std::fs::write(&results, "{\"id\": \"simple_python_0\", \"result\": \"[f(a=0)]\"}\n").unwrap();
    let missing = d.path().join("nonexistent");
    let o = fcgpu(&[
        "eval",
        "--bfcl-dir",
        missing.to_str().unwrap(),
        "--category",
        "all",
        "--results",
        results.to_str().unwrap(),
    ]);
    assert!(!o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    assert!(stderr(&o).contains("nonexistent") && stderr(&o).contains("no such directory"), "{}", stderr(&o));
    // A directory with no category file at all.
    let o = fcgpu(&[
        "eval",
        "--bfcl-dir",
        d.path().to_str().unwrap(),
        "--category",
        "all",
        "--results",
        results.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no BFCL_v4_"), "{}", stderr(&o));
}

#[test]
fn eval_reports_duplicate_and_unknown_ids() {
    let d = tempfile::tempdir().unwrap();
    let bfcl = bfcl_dir(d.path());
    let results = d.path().join("r.jsonl");
    let line = |id: &str, r: &str| serde_json::json!({"id": id, "result": r}).to_string() + "\n";
    std::fs::write(
        &results,
        line("simple_python_0", "[f(a=0)]")
            + "\n"
            + &line("simple_python_1", "[f(a=1)]")
            + &line("simple_python_0", "[f(a=5)]"),
    )
    .unwrap();
    let o = fcgpu(&["eval", "--bfcl-dir", bfcl.to_str().unwrap(), "--results", results.to_str().unwrap()]);
    assert!(!o.status.success(), "duplicate ids scored: {}", String::from_utf8_lossy(&o.stdout));
    assert!(
        stderr(&o).contains("r.jsonl:4: duplicate id \"simple_python_0\" (first at ")
            && stderr(&o).contains("r.jsonl:1"),
        "{}",
        stderr(&o)
    );

    std::fs::write(
        &results,
        line("simple_python_0", "[f(a=0)]")
            + &line("simple_python_1", "[f(a=1)]")
            + &line("simple_python_77", "[f(a=1)]")
            + &line("typo", "[]"),
    )
    .unwrap();
    let o = fcgpu(&["eval", "--bfcl-dir", bfcl.to_str().unwrap(), "--results", results.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("2 result ids match no entry") && stderr(&o).contains("simple_python_77"),
        "{}",
        stderr(&o)
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("unknown ids (not scored): 2"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
}

#[test]
fn invalid_utf8_is_reported_with_its_line() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("data.jsonl");
    let good = serde_json::json!({"messages": [{"role": "user", "content": "hi"}], "tools": [], "calls": []})
        .to_string();
    let mut bytes = format!("{good}\n\n").into_bytes();
    bytes.extend_from_slice(
        b"{\"messages\": [{\"role\": \"user\", \"content\": \"\xc3\x28\"}], \"tools\": [], \"calls\": []}\n",
    );
    std::fs::write(&p, &bytes).unwrap();
    let err = format!("{:#}", fcgpu::data::load_jsonl(&p).unwrap_err());
    assert!(err.contains("data.jsonl:3: invalid UTF-8"), "{err}");
    let bfcl = bfcl_dir(d.path());
    let results = d.path().join("r.jsonl");
    std::fs::write(&results, b"{\"id\": \"simple_python_0\", \"result\": \"\xff\"}\n").unwrap();
    let o = fcgpu(&["eval", "--bfcl-dir", bfcl.to_str().unwrap(), "--results", results.to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("r.jsonl:1: invalid UTF-8"), "{}", stderr(&o));
}
