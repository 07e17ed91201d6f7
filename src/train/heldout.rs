//! Held-out accuracy (`heldout_accuracy` in printed lines and metrics, `accuracy` in the
//! `eval-<tag>.json` files): the fraction of greedy answers to held-out prompts that are well
//! formed (think block, decodable answer) AND accepted by the BFCL checker, overall and per
//! category. SFT and GRPO runs report it the same way, so their numbers compare (the ablation
//! in `tools/ablation.py` reads the `eval-<tag>.json` files this writes). docs/metrics.md.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::autograd::no_grad;
use crate::data::Sample;
use crate::fc::decode::AnswerFormat;
use crate::fc::reward::{reward, RewardKind};
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
    /// One non-empty think block first, and an answer that decodes.
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
/// reward: correct = well formed and accepted by the BFCL checker.
pub fn evaluate(
    model: &Model,
    tok: &Tokenizer,
    samples: &[Sample],
    prompt_ids: &dyn Fn(&Sample) -> Result<Vec<u32>>,
    format: AnswerFormat,
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
    let mut by_cat: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut answers = Vec::with_capacity(outs.len());
    for c in &outs {
        let s = &samples[c.prompt_index];
        let text = c.text(tok)?;
        let r = reward(s, &text, RewardKind::Binary, format);
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
    let calls: Vec<bool> = outs
        .iter()
        .zip(&answers)
        .filter(|(c, _)| !samples[c.prompt_index].expects_no_call())
        .map(|(_, a)| a.correct)
        .collect();
    let calls_accuracy =
        if calls.is_empty() { 0.0 } else { calls.iter().filter(|c| **c).count() as f32 / calls.len() as f32 };
    let categories = by_cat
        .into_iter()
        .map(|(category, (r, n))| CategoryScore { category, accuracy: r as f32 / n as f32, n })
        .collect();
    Ok(HeldOut {
        step: 0,
        accuracy: right as f32 / answers.len() as f32,
        n: answers.len(),
        calls_accuracy,
        calls_n: calls.len(),
        categories,
        answers,
    })
}
