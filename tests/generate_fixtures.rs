//! Greedy generation against transformers' `generate(do_sample=False)` on the reference
//! checkpoints (tests/fixtures/models, made by tools/make_reference.py), and the chat template
//! against transformers' `apply_chat_template`.

use std::path::{Path, PathBuf};

use fcgpu::model::tokenizer::Tokenizer;
use fcgpu::model::weights::load_all;
use fcgpu::model::Model;
use fcgpu::rollout::chat::ChatFormat;
use fcgpu::rollout::{generate, generate_indexed, FinishReason, SamplingConfig};

fn fixture_dirs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("reference.safetensors").exists() && p.join("config.json").exists())
        .collect();
    dirs.sort();
    dirs
}

fn ids(t: &fcgpu::Tensor) -> Vec<u32> {
    t.to_vec().iter().map(|&x| x as u32).collect()
}

#[test]
fn greedy_matches_transformers_on_every_fixture() {
    let dirs = fixture_dirs();
    assert!(dirs.len() >= 6, "expected the six reference checkpoints, found {}", dirs.len());
    let mut families = std::collections::BTreeSet::new();
    for dir in &dirs {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let m = Model::load(dir).unwrap();
        families.insert((m.config.arch.model_type(), m.config.dtype.hf_name()));
        let r = load_all(&dir.join("reference.safetensors")).unwrap();
        let mut prompts = Vec::new();
        let mut expect = Vec::new();
        for i in 0.. {
            let Some(p) = r.get(&format!("gen.prompt.{i}")) else { break };
            prompts.push(ids(p));
            let e = ids(&r[&format!("gen.greedy.{i}")]);
            assert_eq!(
                e,
                ids(&r[&format!("gen.greedy_batched.{i}")]),
                "{name}: fixture's batched and unbatched differ"
            );
            expect.push(e);
        }
        assert!(prompts.len() >= 3, "{name}: no gen.prompt.* in the fixture");
        let lens: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
        assert!(lens.windows(2).any(|w| w[0] != w[1]), "{name}: prompts of one length only");
        // transformers ran with eos_token_id=None: exactly 12 argmax steps.
        let cfg = SamplingConfig {
            n: 1,
            max_new_tokens: expect[0].len(),
            temperature: 0.0,
            ignore_eos: true,
            ..Default::default()
        };
        // One prompt at a time.
        for (i, p) in prompts.iter().enumerate() {
            let out = generate_indexed(&m, std::slice::from_ref(p), i, &cfg, None).unwrap();
            assert_eq!(out[0].new_ids, expect[i], "{name}: prompt {i} alone");
            assert_eq!(out[0].finish_reason, FinishReason::Length);
        }
        // All prompts (mixed lengths) in one batch, then with 2 samples per prompt sharing the
        // prefill, then a live batch of 2 so prompts join as others finish.
        for (label, c) in [
            ("batched", cfg.clone()),
            ("batched, n = 2", SamplingConfig { n: 2, ..cfg.clone() }),
            ("max_batch 2", SamplingConfig { max_batch: 2, ..cfg.clone() }),
        ] {
            let out = generate(&m, &prompts, &c, None).unwrap();
            for o in &out {
                assert_eq!(
                    o.new_ids, expect[o.prompt_index],
                    "{name}: {label}: prompt {} sample {}",
                    o.prompt_index, o.sample_index
                );
            }
        }
        eprintln!(
            "{name}: greedy = transformers on {} prompts (lengths {lens:?}), alone and batched",
            prompts.len()
        );
    }
    for fam in ["qwen2", "qwen3", "llama"] {
        assert!(families.iter().any(|(f, _)| *f == fam), "no {fam} fixture");
    }
    assert!(families.iter().any(|(_, d)| *d == "bfloat16"), "no bf16 fixture");
    assert!(families.iter().any(|(_, d)| *d == "float32"), "no f32 fixture");
}

#[test]
fn chat_prompt_matches_transformers_apply_chat_template() {
    for dir in fixture_dirs() {
        let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
        let r: serde_json::Value = serde_json::from_str(&text).unwrap();
        let ct = &r["chat_template"];
        let m = Model::load(&dir).unwrap();
        let tok = Tokenizer::load(&dir).unwrap();
        let f = ChatFormat::for_model(&m).unwrap();
        let rendered = f.render(ct["messages"].as_array().unwrap(), None).unwrap();
        assert_eq!(rendered, ct["text"].as_str().unwrap(), "{}", dir.display());
        let want: Vec<u32> =
            ct["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(tok.encode(&rendered, false).unwrap(), want, "{}", dir.display());
    }
}

#[test]
fn generate_command_on_a_fixture_checkpoint() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/qwen2-tiny");
    let r = load_all(&dir.join("reference.safetensors")).unwrap();
    let refj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    let lines = [
        serde_json::json!({"prompt_ids": ids(&r["gen.prompt.2"])}),
        serde_json::json!({"messages": refj["chat_template"]["messages"]}),
        serde_json::json!({"prompt": refj["texts"][0]}),
    ];
    std::fs::write(&input, lines.iter().map(|l| l.to_string() + "\n").collect::<String>()).unwrap();
    let run = |extra: &[&str]| -> Vec<serde_json::Value> {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_fcgpu"))
            .args([
                "generate",
                "--model",
                dir.to_str().unwrap(),
                "--input",
                input.to_str().unwrap(),
                "--device",
                "cpu",
            ])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let tok = Tokenizer::load(&dir).unwrap();
    // Greedy through the command = transformers' greedy for the prompt_ids line.
    let g = run(&["--temperature", "0", "--max-new-tokens", "12", "--ignore-eos"]);
    assert_eq!(g.len(), 3);
    assert_eq!(g[0]["new_ids"], serde_json::json!(ids(&r["gen.greedy.2"])));
    for l in &g {
        let new: Vec<u32> =
            l["new_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(l["text"].as_str().unwrap(), tok.decode(&new, true).unwrap());
    }
    // The chat line is the rendered template: greedy from it equals greedy from its ids.
    let m = Model::load(&dir).unwrap();
    let chat_ids: Vec<u32> =
        refj["chat_template"]["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    let cfg = SamplingConfig { max_new_tokens: 12, temperature: 0.0, ignore_eos: true, ..Default::default() };
    let lib = generate(&m, &[chat_ids], &cfg, None).unwrap();
    assert_eq!(g[1]["new_ids"], serde_json::json!(lib[0].new_ids));
    // Sampling with EOS on (<|im_end|> = 380 and 378 from generation_config.json): a sample
    // that stops ends with one of them; a stop string cuts the text.
    let s =
        run(&["--n", "4", "--temperature", "1.0", "--max-new-tokens", "40", "--seed", "3", "--stop", "e"]);
    assert_eq!(s.len(), 12);
    for l in &s {
        let new = l["new_ids"].as_array().unwrap();
        match l["finish_reason"].as_str().unwrap() {
            "length" => assert_eq!(new.len(), 40),
            "stop" => {
                let last = new.last().unwrap().as_u64().unwrap();
                assert!([378, 380].contains(&last) || !l["text"].as_str().unwrap().contains('e'), "{l}");
            }
            other => panic!("finish_reason {other}"),
        }
    }
    assert!(
        s.iter().any(|l| l["finish_reason"] == "stop"),
        "a stop string of one letter never hit in 12 samples"
    );
}
