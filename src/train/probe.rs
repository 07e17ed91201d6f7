//! The induction (copy) probe of issue 10: the embedded `tiny` Qwen2 shape trained on random
//! token strings shown twice, with the loss on the second copy. Copying needs an induction
//! head, and small transformers learn one in a sudden phase change; the probe compares when
//! that happens in fcgpu and in PyTorch from identical inits and batches.
//!
//! Both engines get their data from [`copy_sequence`], a counter-based hash (splitmix64) that
//! `tools/induction_probe.py` reimplements in a few lines, so no batch file is exchanged; the
//! initial weights are written once by fcgpu ([`probe_model`] + `Model::save`) and loaded by
//! both.

use std::path::Path;

use anyhow::Result;

use crate::model::tokenizer::Tokenizer;
use crate::model::{Batch, Model, ModelConfig};
use crate::train::run_config::RunConfig;
use crate::train::sft::{SftConfig, Trainer};
use crate::train::srml::LossKind;
use crate::train::tiny::{self, TinySize};

/// Vocabulary of the probe model (the embedded task's default).
pub const VOCAB: usize = 1536;
/// Random tokens are drawn from `FIRST_TOKEN..VOCAB`.
pub const FIRST_TOKEN: u32 = 3;

/// splitmix64: one 64-bit hash step (public domain constants by Steele, Lea and Flood).
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Sequence `seq` of optimizer step `step` (1-based): `len` random tokens, then the same
/// tokens again (`2·len` ids; the first `len` are the prompt).
pub fn copy_sequence(seed: u64, step: u64, seq: u64, len: usize) -> Vec<u32> {
    let base = splitmix64(splitmix64(seed) ^ step);
    let span = VOCAB as u64 - FIRST_TOKEN as u64;
    let half: Vec<u32> = (0..len as u64)
        .map(|pos| FIRST_TOKEN + (splitmix64(base ^ (seq << 32 | pos)) % span) as u32)
        .collect();
    half.iter().chain(half.iter()).copied().collect()
}

/// The batch of step `step`: `n` copy sequences, each with its prompt length (`len`).
pub fn copy_batch(seed: u64, step: u64, n: usize, len: usize) -> (Batch, Vec<usize>) {
    let seqs: Vec<Vec<u32>> = (0..n as u64).map(|s| copy_sequence(seed, step, s, len)).collect();
    (Batch::from_sequences(&seqs), vec![len; n])
}

/// A fresh model of shape `size` (fcgpu's own random init, seeded) with the probe vocabulary.
pub fn probe_model(size: TinySize, seed: u64) -> Result<Model> {
    let raw = tiny::config_json(size, VOCAB, 0, 1);
    let config = ModelConfig::from_json(raw, Path::new("<induction probe>/config.json"))?;
    Model::init_random(config, seed)
}

/// An SFT trainer on `model` with the probe's recipe: plain cross-entropy on the second copy,
/// AdamW at `lr` (warm-up 10 steps, cosine to 0.1·lr over `steps`), weight decay 0.01,
/// clipping at 1.0.
pub fn probe_trainer(model: Model, lr: f32, steps: u64) -> Trainer {
    let cfg = SftConfig {
        run: RunConfig {
            steps,
            lr,
            warmup_steps: 10,
            min_lr_ratio: 0.1,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
            ..RunConfig::sft()
        },
        loss: LossKind::Plain,
        ..Default::default()
    };
    // The probe feeds ids directly; the trainer's tokenizer is never used.
    let tok = Tokenizer::from_inner(tokenizers::Tokenizer::new(tokenizers::models::bpe::BPE::default()));
    Trainer::from_model(cfg, model, tok, u32::MAX)
}

/// Steps whose mean loss is the level before the phase change: after the 10 warm-up steps, when
/// the model has only learnt that the tokens are uniform (loss ≈ ln 1533 ≈ 7.3).
pub const PLATEAU: (usize, usize) = (11, 30);
/// Trailing window of the phase-change test.
pub const WINDOW: usize = 10;

/// The first step whose trailing `window`-step mean loss is below half the plateau (the mean
/// loss over steps `plateau.0..=plateau.1`), or None. `losses[i]` is the loss of step i+1.
pub fn phase_change_step(losses: &[f32], plateau: (usize, usize), window: usize) -> Option<usize> {
    let (a, b) = (plateau.0.max(1), plateau.1.min(losses.len()));
    if a > b || window == 0 {
        return None;
    }
    let level = losses[a - 1..b].iter().sum::<f32>() / (b - a + 1) as f32;
    (window..=losses.len())
        .find(|&end| losses[end - window..end].iter().sum::<f32>() / (window as f32) < level / 2.0)
}

/// Copy pre-training of a fresh model (`SftConfig::copy_warmup_steps`): `steps` steps of the
/// probe's recipe (16 strings of 24 random tokens shown twice, loss on the second copy, AdamW
/// 3e-3 with warm-up and cosine decay) over the model's own vocabulary, special tokens aside.
pub fn copy_pretrain(model: Model, tok: &Tokenizer, steps: u64, seed: u64) -> Result<Model> {
    anyhow::ensure!(
        model.config.vocab_size >= VOCAB,
        "copy pre-training needs a vocabulary of at least {VOCAB} tokens, the model has {}",
        model.config.vocab_size
    );
    let mut t = probe_trainer(model, 3e-3, steps);
    t.tok = tok.clone();
    let pb = crate::train::step_bar(steps);
    let mut last = f32::NAN;
    for step in 1..=steps {
        last = t.step_on(&[copy_batch(seed, step, 16, 24)])?.loss;
        pb.set_position(step);
    }
    pb.finish_and_clear();
    eprintln!("copy pre-training: {steps} steps, loss on the second copy {last:.3}");
    Ok(t.model)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_reference_values() {
        // First outputs of the reference generator seeded with 0 (state advanced by the golden
        // gamma each call): splitmix64(0) and splitmix64(0x9E37_79B9_7F4A_7C15).
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
        assert_eq!(splitmix64(0x9E37_79B9_7F4A_7C15), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn copy_sequences_repeat_and_differ() {
        let s = copy_sequence(0, 1, 0, 16);
        assert_eq!(s.len(), 32);
        assert_eq!(s[..16], s[16..]);
        assert!(s.iter().all(|&t| (FIRST_TOKEN..VOCAB as u32).contains(&t)));
        assert_ne!(s, copy_sequence(0, 1, 1, 16));
        assert_ne!(s, copy_sequence(0, 2, 0, 16));
        assert_ne!(s, copy_sequence(1, 1, 0, 16));
    }

    #[test]
    fn phase_change_is_found_after_the_plateau() {
        let mut l = vec![6.0f32; 100];
        l.extend(vec![1.0f32; 50]);
        assert_eq!(phase_change_step(&l, (20, 80), 5), Some(104));
        assert_eq!(phase_change_step(&l[..100], (20, 80), 5), None);
    }
}
