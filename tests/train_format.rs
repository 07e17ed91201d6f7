//! The trainers on a model whose tokenizer has no `</think>` token (the fixture models', like
//! SmolLM2's, Qwen2's and Llama 3's): SRML's think/result boundary, one `--style` recorded in
//! the run and its checkpoints, and a format rule that follows the style and the data (plain
//! answers score when no reasoning is trained). tests/real_model_train.rs repeats the main
//! checks on SmolLM2 when it is cached.

use std::path::{Path, PathBuf};

use fcgpu::data::{load_bfcl_category, synth, Sample};
use fcgpu::fc::decode::AnswerFormat;
use fcgpu::fc::prompt::{render_calls, PromptStyle};
use fcgpu::fc::reward::FormatRule;
use fcgpu::model::tokenizer::Tokenizer;
use fcgpu::train::checkpoint::Start;
use fcgpu::train::grpo::{GrpoConfig, GrpoTrainer};
use fcgpu::train::heldout;
use fcgpu::train::prompt::{self, TrainFormat};
use fcgpu::train::run_config::RunConfig;
use fcgpu::train::sft::{self, encode_completion, SftConfig, Trainer};
use fcgpu::train::srml::LossKind;
use fcgpu::Device;

fn fixture_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/qwen2-tiny")
}

/// The fixture model copied into `dir` with a context long enough for BFCL's prompts (its
/// tokenizer has few merges, so they take a few thousand tokens; RoPE needs no table).
fn long_context_model(dir: &Path) -> PathBuf {
    let out = dir.join("model");
    std::fs::create_dir_all(&out).unwrap();
    for e in std::fs::read_dir(fixture_model()).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, out.join(p.file_name().unwrap())).unwrap();
    }
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    c["max_position_embeddings"] = serde_json::json!(8192);
    std::fs::write(out.join("config.json"), c.to_string()).unwrap();
    out
}

/// BFCL simple_python entries of the test subset (no reasoning in them).
fn bfcl_simple() -> Vec<Sample> {
    load_bfcl_category(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/bfcl/v4"), "simple_python")
        .unwrap()
}

fn with_reasoning(samples: &[Sample]) -> Vec<Sample> {
    samples
        .iter()
        .map(|s| Sample {
            reasoning: Some(format!("The request fits {}.", s.functions[0]["name"])),
            ..s.clone()
        })
        .collect()
}

/// `think_len` covers exactly the tokens up to the one that completes `</think>`.
fn assert_boundary(tok: &Tokenizer, think: &str, rest: &str) -> usize {
    let (ids, n) = encode_completion(tok, think, rest).unwrap();
    let text = |k: usize| tok.decode(&ids[..k], false).unwrap();
    assert!(text(n).contains("</think>"), "think segment {:?} lacks </think>", text(n));
    assert!(!text(n - 1).contains("</think>"), "think segment one token too long: {:?}", text(n - 1));
    assert_eq!(tok.decode(&ids, false).unwrap(), format!("{think}{rest}"));
    n
}

#[test]
fn srml_boundary_without_a_single_think_token() {
    let tok = Tokenizer::load(&fixture_model()).unwrap();
    assert_eq!(tok.token_id("</think>"), None, "the fixture must not have </think> as one token");
    let fmt = TrainFormat { style: PromptStyle::Reasoning, think: true };
    for s in with_reasoning(&bfcl_simple()) {
        let (think, answer) = prompt::target_parts(&s, fmt).unwrap();
        let n = assert_boundary(&tok, &think, &format!("{answer}<|im_end|>"));
        assert!(n > 3, "</think> alone is several tokens here");
    }
    // No think block: no think segment.
    let (ids, n) = encode_completion(&tok, "", "[f(a=1)]<|im_end|>").unwrap();
    assert_eq!((n, ids.is_empty()), (0, false));
}

/// A byte-level BPE whose pre-tokenizer keeps `>` with the newlines after it, trained so that
/// `>\n\n` is one token: the token that completes `</think>` also holds the answer's first
/// characters, and belongs to the think segment.
#[test]
fn srml_boundary_when_bpe_merges_across_it() {
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::normalizers::NormalizerWrapper;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::sequence::Sequence;
    use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
    use tokenizers::{SplitDelimiterBehavior, TokenizerBuilder};
    let split = Split::new(
        SplitPattern::Regex(r"[^\s\p{L}\p{N}]+\s*|\p{L}+|\p{N}+|\s+".into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .unwrap();
    let pre = Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]);
    let mut tk = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None::<NormalizerWrapper>)
        .with_pre_tokenizer(Some(pre))
        .with_post_processor(Some(ByteLevel::new(false, true, true)))
        .with_decoder(Some(ByteLevel::new(false, true, true)))
        .build()
        .unwrap();
    let texts: Vec<String> =
        (0..200).map(|i| format!("<think>case {i}</think>\n\n[f(a={i})] and >\n\n more")).collect();
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(400)
        .min_frequency(2)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    tk.train(&mut trainer, texts.iter()).unwrap();
    let tok = Tokenizer::from_inner(tk.into());
    assert_eq!(tok.token_id("</think>"), None);
    let merged = tok.token_id(">ĊĊ").expect("the trained BPE has `>\\n\\n` as one token");
    let (ids, n) = encode_completion(&tok, "<think>case 7</think>", "\n\n[f(a=7)]").unwrap();
    assert_eq!(ids[n - 1], merged, "the merged token closes the think segment");
    assert_boundary(&tok, "<think>case 7</think>", "\n\n[f(a=7)]");
}

fn sft_cfg(model: &Path, dir: &Path, data: &Path, style: Option<PromptStyle>, loss: LossKind) -> SftConfig {
    SftConfig {
        run: RunConfig {
            model: Some(model.to_path_buf()),
            data: Some(data.to_path_buf()),
            run_dir: dir.to_path_buf(),
            steps: 2,
            lr: 1e-3,
            warmup_steps: 0,
            save_every: 0,
            eval_samples: 2,
            ..RunConfig::sft()
        },
        batch_size: 2,
        max_len: 4096,
        eval_fraction: 0.2,
        loss,
        style,
        ..Default::default()
    }
}

#[test]
fn one_style_from_sft_to_its_checkpoint_to_train_and_eval() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("simple.jsonl");
    synth::write_jsonl(&data, &bfcl_simple()).unwrap();
    let run = tmp.path().join("sft");
    let model = long_context_model(tmp.path());
    // Plain loss, bfcl style, data without reasoning: plain targets, no marker needed.
    let s = sft::run(
        sft_cfg(&model, &run, &data, Some(PromptStyle::Bfcl), LossKind::Plain),
        Start::FRESH,
        Device::Cpu,
    )
    .unwrap();
    assert_eq!(s.steps_run, 2);
    assert!(s.last_loss.is_finite());
    let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(config.contains("style = \"bfcl\"") && config.contains("think = false"), "{config}");
    let ckpt = run.join("checkpoint-2");
    let bfcl_plain = TrainFormat { style: PromptStyle::Bfcl, think: false };
    assert_eq!(prompt::recorded(&ckpt).unwrap(), Some(bfcl_plain));
    assert!(ckpt.join("config.json").exists());
    // eval --model and train --model default to the recorded style.
    assert_eq!(prompt::eval_style(None, Some(&ckpt)).unwrap(), PromptStyle::Bfcl);
    let grpo = GrpoConfig {
        run: RunConfig {
            model: Some(ckpt.clone()),
            data: Some(data.clone()),
            run_dir: tmp.path().join("grpo"),
            steps: 1,
            eval_samples: 0,
            ..RunConfig::grpo()
        },
        beta: 0.0,
        ..Default::default()
    };
    let t = GrpoTrainer::new(grpo.clone(), Start::FRESH, Device::Cpu).unwrap();
    assert_eq!(t.format, bfcl_plain);
    // The GRPO reward follows the format: a valid plain call earns 1, broken formats 0.
    let sample = &t.train[0].clone();
    let call = render_calls(sample);
    assert_eq!(t.reward_of(sample, &format!("{call}<|im_end|>")).reward, 1.0);
    assert_eq!(t.reward_of(sample, &format!("{call}</think>")).reward, 0.0);
    assert_eq!(t.reward_of(sample, "I would call a function.").reward, 0.0);
    drop(t);
    // --style reasoning for GRPO: the think block is required.
    let reasoning = GrpoConfig {
        style: Some(PromptStyle::Reasoning),
        run: RunConfig { run_dir: tmp.path().join("grpo-r"), ..grpo.run.clone() },
        ..grpo.clone()
    };
    let t = GrpoTrainer::new(reasoning, Start::FRESH, Device::Cpu).unwrap();
    assert_eq!(t.format, TrainFormat { style: PromptStyle::Reasoning, think: true });
    assert_eq!(t.reward_of(sample, &call).reward, 0.0);
    assert_eq!(t.reward_of(sample, &format!("<think>it fits</think>\n\n{call}")).reward, 1.0);
    drop(t);
    // A combination that cannot work is an error naming the options.
    let bad = GrpoConfig {
        think: Some(true),
        run: RunConfig { run_dir: tmp.path().join("grpo-bad"), ..grpo.run.clone() },
        ..grpo
    };
    let e = GrpoTrainer::new(bad, Start::FRESH, Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("--style bfcl") && e.contains("think"), "{e}");
}

#[test]
fn srml_on_reasoning_data_and_its_refusal_without_reasoning() {
    let tmp = tempfile::tempdir().unwrap();
    let model = long_context_model(tmp.path());
    let plain = tmp.path().join("plain.jsonl");
    synth::write_jsonl(&plain, &bfcl_simple()).unwrap();
    let e = Trainer::new(
        sft_cfg(&model, &tmp.path().join("r0"), &plain, Some(PromptStyle::Reasoning), LossKind::Srml),
        Start::FRESH,
        Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("have no reasoning") && e.contains("--think false"), "{e}");
    let reasoned = tmp.path().join("reasoned.jsonl");
    synth::write_jsonl(&reasoned, &with_reasoning(&bfcl_simple())).unwrap();
    let mut t = Trainer::new(
        sft_cfg(&model, &tmp.path().join("r1"), &reasoned, Some(PromptStyle::Reasoning), LossKind::Srml),
        Start::FRESH,
        Device::Cpu,
    )
    .unwrap();
    assert_eq!(t.format, TrainFormat { style: PromptStyle::Reasoning, think: true });
    for e in &t.train {
        let think = t.tok.decode(&e.ids[e.prompt_len..e.prompt_len + e.think_len], false).unwrap();
        assert!(think.starts_with("<think>") && think.contains("</think>"), "{think:?}");
    }
    let m = t.step().unwrap();
    assert!(m.l_think > 0.0 && m.l_result > 0.0 && m.loss.is_finite(), "{m:?}");
    assert!((m.alpha - 0.7).abs() < 1e-6, "both segments present: the configured α");
}

#[test]
fn heldout_accuracy_follows_the_format_rule() {
    let samples = bfcl_simple();
    let plain: Vec<String> = samples.iter().map(|s| format!("{}<|im_end|>", render_calls(s))).collect();
    let py = AnswerFormat::Python;
    let h = heldout::score(&samples, plain.clone(), py, FormatRule::Plain);
    assert_eq!((h.accuracy, h.calls_accuracy), (1.0, 1.0), "{:?}", h.answers.iter().find(|a| !a.correct));
    assert_eq!(heldout::score(&samples, plain.clone(), py, FormatRule::Think).accuracy, 0.0);
    let thought: Vec<String> = plain.iter().map(|t| format!("<think>fits</think>\n\n{t}")).collect();
    assert_eq!(heldout::score(&samples, thought, py, FormatRule::Think).accuracy, 1.0);
    let broken: Vec<String> = plain.iter().map(|t| format!("<think>{t}")).collect();
    let h = heldout::score(&samples, broken, py, FormatRule::Plain);
    assert_eq!(h.accuracy, 0.0);
    assert!(h.answers.iter().all(|a| !a.format_ok));
}
