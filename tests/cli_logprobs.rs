//! `fcgpu logprobs` end to end on a transformers-made checkpoint.

use std::path::Path;
use std::process::Command;

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models").join(name)
}

fn run(model: &Path, input: &str, extra: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("in.jsonl");
    std::fs::write(&f, input).unwrap();
    Command::new(env!("CARGO_BIN_EXE_fcgpu"))
        .args(["logprobs", "--model", model.to_str().unwrap(), "--input", f.to_str().unwrap()])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn logprobs_command_matches_reference_in_order() {
    for name in ["qwen3-tiny", "llama-tiny-bf16"] {
        let dir = fixture(name);
        let r = fcgpu::model::weights::load_all(&dir.join("reference.safetensors")).unwrap();
        let seqs: Vec<Vec<u32>> = (0..3)
            .map(|i| r[&format!("input_ids.{i}")].to_vec().iter().map(|&x| x as u32).collect())
            .collect();
        // Reversed order and batch size 2: output order must follow the input.
        let input: String = seqs.iter().rev().map(|s| format!("{{\"input_ids\": {s:?}}}\n")).collect();
        let out = run(&dir, &input, &["--batch-size", "2", "--device", "cpu"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        for (k, line) in lines.iter().enumerate() {
            let i = 2 - k;
            let lp: Vec<f64> =
                line["logprobs"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
            let ent: Vec<f64> =
                line["entropy"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
            let (elp, eent) = (r[&format!("logprobs.{i}")].to_vec(), r[&format!("entropy.{i}")].to_vec());
            assert_eq!(lp.len(), seqs[i].len() - 1);
            for t in 0..lp.len() {
                assert!(
                    (lp[t] - elp[t] as f64).abs() < 2e-4 && (ent[t] - eent[t] as f64).abs() < 2e-4,
                    "{name} seq {i} t {t}"
                );
            }
        }
    }
}

#[test]
fn text_input_is_tokenized_with_the_model_tokenizer() {
    let dir = fixture("qwen2-tiny");
    let out = run(&dir, "{\"text\": \"def add(a, b):\"}\n", &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(String::from_utf8(out.stdout).unwrap().trim()).unwrap();
    let tok = fcgpu::model::tokenizer::Tokenizer::load(&dir).unwrap();
    let n = tok.encode("def add(a, b):", true).unwrap().len();
    assert_eq!(v["logprobs"].as_array().unwrap().len(), n - 1);
    assert!(v["logprobs"].as_array().unwrap().iter().all(|x| x.as_f64().unwrap() <= 0.0));
}

#[test]
fn bad_input_names_file_and_line() {
    let dir = fixture("qwen2-tiny");
    let out = run(&dir, "{\"input_ids\": [1, 2]}\n{\"input_ids\": [1, \n", &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in.jsonl:2"), "{err}");
    let out = run(&dir, "{\"input_ids\": [1, 99999]}\n", &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("99999") && err.contains("vocabulary"), "{err}");
    let out = run(Path::new("/nonexistent/model"), "{\"input_ids\": [1]}\n", &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("/nonexistent/model"), "{err}");
}

/// `--counters` on emu: one entry per batch of sequences with the forward pass's device work;
/// refused on the cpu.
#[test]
fn counters_record_each_batch_on_a_gpu_device() {
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("c.json");
    let input = "{\"input_ids\": [1, 2, 3]}\n{\"input_ids\": [4, 5]}\n{\"input_ids\": [6, 7, 8, 9]}\n";
    let m = fixture("qwen2-tiny");
    let args = ["--device", "emu", "--batch-size", "2", "--counters", c.to_str().unwrap()];
    let out = run(&m, input, &args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&c).unwrap()).unwrap();
    let b = v["batches"].as_array().unwrap();
    assert_eq!(b.iter().map(|x| x["sequences"].as_u64().unwrap()).collect::<Vec<_>>(), vec![2, 1]);
    assert_eq!(b.iter().map(|x| x["tokens"].as_u64().unwrap()).collect::<Vec<_>>(), vec![5, 4]);
    assert!(b.iter().all(|x| x["launches"].as_u64().unwrap() > 0 && x["d2h_bytes"].as_u64().unwrap() > 0));
    let out = run(&m, input, &["--device", "cpu", "--counters", c.to_str().unwrap()]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--counters"));
}
