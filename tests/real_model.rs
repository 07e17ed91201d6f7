//! A real pretrained model against transformers: SmolLM2-135M-Instruct, converted from the GGUF
//! that `scripts/get-model.sh smollm2-135m` fetches. The references in
//! tests/fixtures/real/smollm2/ were made by `tools/make_real_reference.py` (transformers' own
//! GGUF loader, float64). The model directory is `$FCGPU_REAL_MODEL`, else
//! `${FCGPU_CACHE:-$HOME/.cache/fcgpu}/models/smollm2-135m`; when neither holds a model the tests
//! say so and pass (CI fetches the model first, so CI always runs them).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use fcgpu::autograd::no_grad;
use fcgpu::model::weights::load_all;
use fcgpu::model::{Batch, Model};
use fcgpu::rollout::{generate, SamplingConfig};
use serde_json::Value;

#[path = "common/real_model.rs"]
mod real_model;
use real_model::real_model_dir;

/// Log-probs and entropies: within this of transformers' float64 values.
const TOL: f32 = 2e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/real/smollm2")
}

/// The model, checked to be the one the references were made from.
fn load(dir: &Path) -> Model {
    let m = Model::load(dir).unwrap_or_else(|e| panic!("loading {}: {e:#}", dir.display()));
    let c = &m.config;
    assert!(
        (c.vocab_size, c.num_layers, c.hidden_size, c.num_kv_heads) == (49152, 30, 576, 3)
            && m.lm_head.is_none(),
        "{} is not SmolLM2-135M (vocab {}, {} layers, hidden {})",
        dir.display(),
        c.vocab_size,
        c.num_layers,
        c.hidden_size
    );
    m
}

fn fcgpu(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_fcgpu")).args(args).output().unwrap();
    assert!(out.status.success(), "fcgpu {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

/// Largest |Δ| between fcgpu's `[2, tokens]` log-prob/entropy rows of packed `seqs` and the
/// reference's per-sequence values.
fn worst_diff(out: &[f32], seqs: &[Vec<u32>], lp: &[Vec<f32>], ent: &[Vec<f32>]) -> f32 {
    let n: usize = seqs.iter().map(|s| s.len()).sum();
    let (mut off, mut worst) = (0, 0.0f32);
    for (i, s) in seqs.iter().enumerate() {
        assert_eq!(lp[i].len(), s.len() - 1, "reference {i} has the wrong length");
        for t in 0..s.len() - 1 {
            worst = worst.max((out[off + t] - lp[i][t]).abs()).max((out[n + off + t] - ent[i][t]).abs());
        }
        off += s.len();
    }
    worst
}

fn logprobs(m: &Model, seqs: &[Vec<u32>]) -> Vec<f32> {
    no_grad(|| m.token_logprobs(&Batch::from_sequences(seqs), 1.0)).unwrap().to_vec()
}

#[test]
fn logprobs_and_entropies_match_transformers() {
    let Some(dir) = real_model_dir() else { return };
    let m = load(&dir);
    let r = load_all(&fixtures().join("logprobs.safetensors")).unwrap();
    let seqs: Vec<Vec<u32>> = (0..)
        .map_while(|i| r.get(&format!("input_ids.{i}")))
        .map(|t| t.to_vec().iter().map(|&x| x as u32).collect())
        .collect();
    assert_eq!(seqs.len(), 8);
    assert!(seqs.iter().any(|s| s.len() == 1024), "a sequence of 1,024 tokens");
    let get = |k: &str| -> Vec<Vec<f32>> { (0..8).map(|i| r[&format!("{k}.{i}")].to_vec()).collect() };
    // Packed, as the trainer runs them.
    let worst = worst_diff(&logprobs(&m, &seqs), &seqs, &get("logprobs"), &get("entropy"));
    eprintln!("SmolLM2, 8 sequences ({} tokens): max |Δ log-prob/entropy| = {worst:.2e}", {
        seqs.iter().map(|s| s.len()).sum::<usize>()
    });
    assert!(worst < TOL, "max |Δ| {worst} against transformers");
}

fn greedy_reference() -> Vec<Value> {
    let text = std::fs::read_to_string(fixtures().join("greedy.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn greedy_decoding_matches_transformers() {
    let Some(dir) = real_model_dir() else { return };
    let m = load(&dir);
    let refs = greedy_reference();
    assert_eq!(refs.len(), 8);
    let prompts: Vec<Vec<u32>> = refs.iter().map(|r| ids(&r["prompt_ids"])).collect();
    let want: Vec<Vec<u32>> = refs.iter().map(|r| ids(&r["new_ids"])).collect();
    let cfg = SamplingConfig {
        max_new_tokens: want[0].len(),
        temperature: 0.0,
        ignore_eos: true,
        ..SamplingConfig::default()
    };
    let got = generate(&m, &prompts, &cfg, None).unwrap();
    assert_eq!(got.len(), 8);
    for (i, c) in got.iter().enumerate() {
        assert_eq!(c.prompt_index, i);
        let first = c.new_ids.iter().zip(&want[i]).position(|(a, b)| a != b);
        assert!(
            c.new_ids == want[i],
            "prompt {i}: tokens differ from transformers from position {first:?}\n fcgpu: {:?}\n want:  {:?}",
            c.new_ids,
            want[i]
        );
    }
}

/// `fcgpu generate` from chat messages and from the reference prompt ids, `fcgpu eval --model`
/// on BFCL entries: each runs on the real model and writes what it should.
#[test]
fn generate_and_eval_commands_run_on_the_real_model() {
    let Some(dir) = real_model_dir() else { return };
    let m = dir.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let refs = greedy_reference();
    let input = tmp.path().join("prompts.jsonl");
    let lines = [
        serde_json::json!({"messages": refs[0]["messages"]}),
        serde_json::json!({"messages": refs[2]["messages"]}),
        serde_json::json!({"prompt_ids": refs[3]["prompt_ids"]}),
    ];
    std::fs::write(&input, lines.iter().map(|l| l.to_string() + "\n").collect::<String>()).unwrap();
    let out = fcgpu(&[
        "generate",
        "--model",
        m,
        "--input",
        input.to_str().unwrap(),
        "--max-new-tokens",
        "16",
        "--temperature",
        "0",
        "--ignore-eos",
        "--device",
        "cpu",
    ]);
    let rows: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(rows.len(), 3, "{out}");
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r["index"], i);
        let text = r["text"].as_str().unwrap();
        assert!(text.chars().any(char::is_alphanumeric), "prompt {i}: no text: {r}");
        assert_eq!(ids(&r["new_ids"]).len(), 16);
        assert_eq!(floats(&r["logprobs"]).len(), 16);
    }
    // From the same prompt ids, the command decodes what transformers does.
    assert_eq!(ids(&rows[2]["new_ids"])[..], ids(&refs[3]["new_ids"])[..16]);

    let bfcl = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/bfcl/v4");
    let verdicts = tmp.path().join("verdicts.jsonl");
    let table = fcgpu(&[
        "eval",
        "--model",
        m,
        "--bfcl-dir",
        bfcl.to_str().unwrap(),
        "--category",
        "simple_python",
        "--limit",
        "3",
        "--max-new-tokens",
        "40",
        "--device",
        "cpu",
        "--verdicts",
        verdicts.to_str().unwrap(),
    ]);
    assert!(table.contains("simple_python") && table.contains("bfcl_accuracy"), "{table}");
    let v: Vec<Value> = std::fs::read_to_string(&verdicts)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(v.len(), 3, "a verdict for every entry");
    for x in &v {
        assert!(x["id"].as_str().unwrap().starts_with("simple_python_") && x["valid"].is_boolean(), "{x}");
    }
}

fn sha256_hex(path: &Path) -> String {
    use sha2::Digest;
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The names, dtypes and shapes in a safetensors file's header.
fn header(path: &Path) -> BTreeMap<String, (String, Vec<usize>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().into_iter().map(|(n, v)| (n, (format!("{:?}", v.dtype()), v.shape().to_vec()))).collect()
}

/// `fcgpu sft` on the real model: the checkpoint it writes has the tensors and config fields
/// transformers loaded from the reference run's checkpoint, and fcgpu's log-probs on it match
/// transformers' on that checkpoint. (The reference script ran the same command; if sft's data
/// rendering or loss changes on purpose, rerun `tools/make_real_reference.py --only sft`.)
#[test]
fn sft_checkpoint_matches_transformers() {
    let Some(dir) = real_model_dir() else { return };
    let path = fixtures().join("sft.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; make it with `tools/make_real_reference.py --only sft --fcgpu target/debug/fcgpu --model DIR`",
            path.display()
        )
    });
    let r: Value = serde_json::from_str(&text).unwrap();
    let tok_sha = sha256_hex(&dir.join("tokenizer.json"));
    assert_eq!(
        tok_sha,
        r["model_tokenizer_sha256"].as_str().unwrap(),
        "{}: sft.json was made from a model with another tokenizer.json (sft tokenizes its data with \
         it); make it again from this model: tools/make_real_reference.py --only sft",
        dir.display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let args: Vec<String> = r["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let a = a.as_str().unwrap();
            // Repository paths in the recorded arguments are relative to its root.
            if a.starts_with("tests/") {
                root.join(a).to_str().unwrap().to_string()
            } else {
                a.to_string()
            }
        })
        .collect();
    let mut cmd = vec!["sft", "--model", dir.to_str().unwrap(), "--run-dir", run.to_str().unwrap()];
    cmd.extend(args.iter().map(String::as_str));
    fcgpu(&cmd);
    let ckpt = run.join(r["checkpoint"].as_str().unwrap());

    let got = header(&ckpt.join("model.safetensors"));
    let want: BTreeMap<String, (String, Vec<usize>)> = r["tensors"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(n, t)| {
            let shape = t["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
            (n.clone(), (t["dtype"].as_str().unwrap().to_uppercase(), shape))
        })
        .collect();
    assert_eq!(got, want, "the checkpoint's tensors differ from what transformers loaded");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("config.json")).unwrap()).unwrap();
    for (k, v) in r["config"].as_object().unwrap() {
        let same = match (config[k].as_f64(), v.as_f64()) {
            // Floats such as rms_norm_eps: a GGUF stores them in f32, written as 1e-5 or as
            // its f64 value 9.999999747378752e-06 by different converters.
            (Some(a), Some(b)) if !v.is_u64() => (a - b).abs() <= 1e-6 * b.abs(),
            _ => &config[k] == v,
        };
        assert!(same, "config.json field `{k}`: {} where transformers loaded {v}", config[k]);
    }

    let m = load(&ckpt);
    let seqs: Vec<Vec<u32>> = r["sequences"].as_array().unwrap().iter().map(ids).collect();
    let per = |k: &str| -> Vec<Vec<f32>> { r[k].as_array().unwrap().iter().map(floats).collect() };
    let out = logprobs(&m, &seqs);
    let worst = worst_diff(&out, &seqs, &per("logprobs"), &per("entropy"));
    // The steps moved the model well beyond the tolerance, so a checkpoint of the base (or of a
    // different update) would fail.
    let moved = worst_diff(&out, &seqs, &per("base_logprobs"), &per("base_entropy"));
    eprintln!("sft checkpoint: max |Δ| against transformers {worst:.2e}; the base differs by {moved:.2e}");
    assert!(worst < TOL, "max |Δ| {worst} against transformers on the reference checkpoint");
    assert!(moved > 10.0 * TOL, "the SFT steps moved the log-probs by only {moved}");
}
