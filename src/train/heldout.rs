//! Held-out accuracy (`heldout_accuracy` in printed lines and metrics, `accuracy` in the
//! `eval-<tag>.json` files): the fraction of greedy answers to held-out prompts that are well
//! formed (the run's format rule: a think block when it trains reasoning, a decodable answer) AND accepted by the BFCL checker, overall and per
//! category. SFT and GRPO runs report it the same way, so their numbers compare (the ablation
//! in `tools/ablation.py` reads the `eval-<tag>.json` files this writes). docs/metrics.md.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::autograd::no_grad;
use crate::data::Sample;
use crate::fc::decode::AnswerFormat;
use crate::fc::reward::{reward_with, FormatRule, RewardKind};
use crate::model::tokenizer::Tokenizer;
use crate::model::Model;
use crate::rollout::{self, chat_eos_ids, SamplingConfig};

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct CategoryScore {
    pub category: String,
    /// Fraction of this category's answers that are `correct`.
    pub accuracy: f32,
    pub n: usize,
}

/// One held-out answer and the checker's verdict.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Answer {
    pub id: String,
    pub category: String,
    /// `format_ok` and `call_valid`: what `accuracy` counts.
    #[serde(alias = "valid")]
    pub correct: bool,
    /// The BFCL checker accepts the answer (format ignored; `fcgpu eval`'s verdict).
    #[serde(default)]
    pub call_valid: bool,
    /// The run's format rule holds (one non-empty think block first when it trains reasoning),
    /// and the answer decodes.
    #[serde(default)]
    pub format_ok: bool,
    pub output: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct HeldOut {
    /// Training step of the model that answered.
    pub step: u64,
    /// Fraction of answers that are `correct` (format and BFCL verdict).
    pub accuracy: f32,
    pub n: usize,
    /// Accuracy pooled over the samples that expect at least one call (every category but
    /// irrelevance): it shows whether a model calls functions, not only when to refrain.
    #[serde(default)]
    pub calls_accuracy: f32,
    #[serde(default)]
    pub calls_n: usize,
    pub categories: Vec<CategoryScore>,
    #[serde(skip)]
    pub answers: Vec<Answer>,
}

impl HeldOut {
    /// "calls 31% of 170; simple 40% of 33, multiple 25% of 12, …"
    pub fn summary(&self) -> String {
        let cats = self
            .categories
            .iter()
            .map(|c| format!("{} {:.0}% of {}", c.category, 100.0 * c.accuracy, c.n))
            .collect::<Vec<_>>()
            .join(", ");
        format!("calls {:.0}% of {}; {cats}", 100.0 * self.calls_accuracy, self.calls_n)
    }

    /// `<run_dir>/eval-<tag>.json` (scores) and `<run_dir>/eval-<tag>.jsonl` (every answer).
    pub fn write(&self, run_dir: &Path, tag: &str) -> Result<()> {
        let json = run_dir.join(format!("eval-{tag}.json"));
        crate::runfs::write_atomic(&json, (serde_json::to_string_pretty(self)? + "\n").as_bytes())?;
        let mut lines = String::new();
        for a in &self.answers {
            lines += &(serde_json::to_string(a)? + "\n");
        }
        let jsonl = run_dir.join(format!("eval-{tag}.jsonl"));
        crate::runfs::write_atomic(&jsonl, lines.as_bytes())
    }
}

/// Greedy answers of `model` to `samples` (prompt ids from `prompt_ids`), scored with the binary
/// reward: correct = well formed under `rule` and accepted by the BFCL checker.
pub fn evaluate(
    model: &Model,
    tok: &Tokenizer,
    samples: &[Sample],
    prompt_ids: &dyn Fn(&Sample) -> Result<Vec<u32>>,
    format: AnswerFormat,
    rule: FormatRule,
    max_new_tokens: usize,
) -> Result<HeldOut> {
    if samples.is_empty() {
        return Ok(HeldOut::default());
    }
    let prompts: Vec<Vec<u32>> = samples.iter().map(prompt_ids).collect::<Result<_>>()?;
    let sampling = SamplingConfig {
        n: 1,
        max_new_tokens,
        temperature: 0.0,
        stop_ids: chat_eos_ids(model, Some(tok)),
        ..Default::default()
    };
    let outs = no_grad(|| rollout::generate(model, &prompts, &sampling, Some(tok)))?;
    let mut texts = vec![String::new(); samples.len()];
    for c in &outs {
        texts[c.prompt_index] = c.text(tok)?;
    }
    Ok(score(samples, texts, format, rule))
}

/// Held-out accuracy of the answers `texts` (one per sample, in order): each scored with the
/// binary reward under `rule`.
pub fn score(samples: &[Sample], texts: Vec<String>, format: AnswerFormat, rule: FormatRule) -> HeldOut {
    if samples.is_empty() {
        return HeldOut::default();
    }
    let mut by_cat: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut answers = Vec::with_capacity(samples.len());
    for (s, text) in samples.iter().zip(texts) {
        let r = reward_with(s, &text, RewardKind::Binary, format, rule);
        let correct = r.reward == 1.0;
        let e = by_cat.entry(s.category.clone()).or_default();
        e.0 += correct as usize;
        e.1 += 1;
        answers.push(Answer {
            id: s.id.clone(),
            category: s.category.clone(),
            correct,
            call_valid: r.valid,
            format_ok: r.format_ok,
            output: text,
        });
    }
    let right = answers.iter().filter(|a| a.correct).count();
    let calls: Vec<bool> =
        samples.iter().zip(&answers).filter(|(s, _)| !s.expects_no_call()).map(|(_, a)| a.correct).collect();
    let calls_accuracy =
        if calls.is_empty() { 0.0 } else { calls.iter().filter(|c| **c).count() as f32 / calls.len() as f32 };
    let categories = by_cat
        .into_iter()
        .map(|(category, (r, n))| CategoryScore { category, accuracy: r as f32 / n as f32, n })
        .collect();
    HeldOut {
        step: 0,
        accuracy: right as f32 / answers.len() as f32,
        n: answers.len(),
        calls_accuracy,
        calls_n: calls.len(),
        categories,
        answers,
    }
}
