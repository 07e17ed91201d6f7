//! Held-out accuracy: greedy answers to held-out prompts, scored by the BFCL checker, overall
//! and per category. SFT and GRPO runs report it the same way, so their numbers compare
//! (the ablation in `tools/ablation.py` reads the `eval-<tag>.json` files this writes).

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
    pub accuracy: f32,
    pub n: usize,
}

/// One held-out answer and the checker's verdict.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Answer {
    pub id: String,
    pub category: String,
    pub valid: bool,
    pub output: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct HeldOut {
    /// Training step of the model that answered.
    pub step: u64,
    pub accuracy: f32,
    pub n: usize,
    pub categories: Vec<CategoryScore>,
    #[serde(skip)]
    pub answers: Vec<Answer>,
}

impl HeldOut {
    /// "simple 40% of 33, multiple 25% of 12, …"
    pub fn summary(&self) -> String {
        self.categories.iter().map(|c| format!("{} {:.0}% of {}", c.category, 100.0 * c.accuracy, c.n)).collect::<Vec<_>>().join(", ")
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
/// BFCL reward.
pub fn evaluate(model: &Model, tok: &Tokenizer, samples: &[Sample], prompt_ids: &dyn Fn(&Sample) -> Result<Vec<u32>>,
                format: AnswerFormat, max_new_tokens: usize) -> Result<HeldOut> {
    if samples.is_empty() {
        return Ok(HeldOut::default());
    }
    let prompts: Vec<Vec<u32>> = samples.iter().map(prompt_ids).collect::<Result<_>>()?;
    let sampling = SamplingConfig { n: 1, max_new_tokens, temperature: 0.0, stop_ids: chat_eos_ids(model, Some(tok)), ..Default::default() };
    let outs = no_grad(|| rollout::generate(model, &prompts, &sampling, Some(tok)))?;
    let mut by_cat: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut answers = Vec::with_capacity(outs.len());
    for c in &outs {
        let s = &samples[c.prompt_index];
        let text = c.text(tok)?;
        let valid = reward(s, &text, RewardKind::Binary, format).reward == 1.0;
        let e = by_cat.entry(s.category.clone()).or_default();
        e.0 += valid as usize;
        e.1 += 1;
        answers.push(Answer { id: s.id.clone(), category: s.category.clone(), valid, output: text });
    }
    let right = answers.iter().filter(|a| a.valid).count();
    let categories = by_cat.into_iter().map(|(category, (r, n))| CategoryScore { category, accuracy: r as f32 / n as f32, n }).collect();
    Ok(HeldOut { step: 0, accuracy: right as f32 / answers.len() as f32, n: answers.len(), categories, answers })
}
