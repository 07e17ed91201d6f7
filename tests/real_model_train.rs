//! `fcgpu sft` and `fcgpu train` on a real pretrained model, SmolLM2-135M-Instruct, whose
//! tokenizer has no `</think>` token: the SRML boundary, plain and SRML steps, the recorded
//! style. Runs when the converted model is present (`$FCGPU_REAL_MODEL`, else
//! `${FCGPU_CACHE:-$HOME/.cache/fcgpu}/models/smollm2-135m`); otherwise each test says how
//! to get it and returns. tests/train_format.rs checks the same on a fixture in every run.

use std::path::Path;

use fcgpu::data::{load_bfcl_category, synth, Sample};
use fcgpu::fc::prompt::{render_calls, PromptStyle};
use fcgpu::model::tokenizer::Tokenizer;
use fcgpu::train::checkpoint::Start;
use fcgpu::train::grpo::{GrpoConfig, GrpoTrainer};
use fcgpu::train::prompt::{self, TrainFormat};
use fcgpu::train::run_config::RunConfig;
use fcgpu::train::sft::{encode_completion, SftConfig, Trainer};
use fcgpu::train::srml::LossKind;
use fcgpu::Device;

#[path = "common/real_model.rs"]
mod real_model;
use real_model::real_model_dir;

/// The first `n` BFCL simple_python entries of the test subset, with reasoning if asked.
fn simple(n: usize, reasoning: bool) -> Vec<Sample> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/bfcl/v4");
    let mut v = load_bfcl_category(&dir, "simple_python").unwrap();
    v.truncate(n);
    for s in &mut v {
        if reasoning {
            s.reasoning =
                Some(format!("The request fits {}; its values are in the question.", s.functions[0]["name"]));
        }
    }
    v
}

#[test]
fn the_think_boundary_on_smollm2s_tokenizer() {
    let Some(model) = real_model_dir() else { return };
    let tok = Tokenizer::load(&model).unwrap();
    assert_eq!(tok.token_id("</think>"), None, "SmolLM2 has no single </think> token");
    let fmt = TrainFormat { style: PromptStyle::Reasoning, think: true };
    for s in simple(13, true) {
        let (think, answer) = prompt::target_parts(&s, fmt).unwrap();
        let (ids, n) = encode_completion(&tok, &think, &format!("{answer}<|im_end|>")).unwrap();
        let text = |k: usize| tok.decode(&ids[..k], false).unwrap();
        assert!(text(n).ends_with("</think>") || text(n).contains("</think>"), "{:?}", text(n));
        assert!(!text(n - 1).contains("</think>"), "{:?}", text(n - 1));
    }
}

fn sft_cfg(model: &Path, run: &Path, data: &Path, style: PromptStyle, loss: LossKind) -> SftConfig {
    SftConfig {
        run: RunConfig {
            model: Some(model.to_path_buf()),
            data: Some(data.to_path_buf()),
            eval_data: Some(data.to_path_buf()),
            run_dir: run.to_path_buf(),
            steps: 1,
            lr: 5e-5,
            warmup_steps: 0,
            eval_samples: 0,
            ..RunConfig::sft()
        },
        batch_size: 1,
        max_len: 1024,
        loss,
        style: Some(style),
        ..Default::default()
    }
}

#[test]
fn sft_steps_and_the_recorded_style_on_smollm2() {
    let Some(model) = real_model_dir() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let plain = tmp.path().join("plain.jsonl");
    synth::write_jsonl(&plain, &simple(4, false)).unwrap();
    let reasoned = tmp.path().join("reasoned.jsonl");
    synth::write_jsonl(&reasoned, &simple(4, true)).unwrap();
    // SRML on reasoning targets: both segments carry loss.
    let run = tmp.path().join("srml");
    let mut t = Trainer::new(
        sft_cfg(&model, &run, &reasoned, PromptStyle::Reasoning, LossKind::Srml),
        Start::FRESH,
        Device::Cpu,
    )
    .unwrap();
    assert!(t.train.iter().all(|e| e.think_len > 0));
    let m = t.step().unwrap();
    assert!(m.loss.is_finite() && m.l_think > 0.0 && m.l_result > 0.0, "{m:?}");
    drop(t);
    // Plain loss, bfcl style, no reasoning in the data: plain targets; the checkpoint records it.
    let run = tmp.path().join("plain");
    let mut t = Trainer::new(
        sft_cfg(&model, &run, &plain, PromptStyle::Bfcl, LossKind::Plain),
        Start::FRESH,
        Device::Cpu,
    )
    .unwrap();
    assert!(t.train.iter().all(|e| e.think_len == 0));
    let m = t.step().unwrap();
    assert!(m.loss.is_finite() && m.l_result > 0.0, "{m:?}");
    let ckpt = t.save_checkpoint().unwrap();
    drop(t);
    let bfcl_plain = TrainFormat { style: PromptStyle::Bfcl, think: false };
    assert_eq!(prompt::recorded(&ckpt).unwrap(), Some(bfcl_plain));
    assert_eq!(prompt::eval_style(None, Some(&ckpt)).unwrap(), PromptStyle::Bfcl);
    // train --model <checkpoint> takes its style and rewards valid plain calls.
    let grpo = GrpoConfig {
        run: RunConfig {
            model: Some(ckpt),
            data: Some(plain),
            run_dir: tmp.path().join("grpo"),
            steps: 1,
            eval_samples: 0,
            ..RunConfig::grpo()
        },
        beta: 0.0,
        ..Default::default()
    };
    let t = GrpoTrainer::new(grpo, Start::FRESH, Device::Cpu).unwrap();
    assert_eq!(t.format, bfcl_plain);
    let s = t.train[0].clone();
    assert_eq!(t.reward_of(&s, &format!("{}<|im_end|>", render_calls(&s))).reward, 1.0);
    assert_eq!(t.reward_of(&s, "<think>unclosed").reward, 0.0);
}
