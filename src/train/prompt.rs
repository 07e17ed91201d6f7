//! What the trainers turn a sample into, in one place: the prompt (every prompt `sft` and
//! `train` render goes through [`Prompter`], in the model's own chat template), the SFT target, and the answer format a run trains
//! and scores ([`TrainFormat`]: the prompt style and whether answers open with a think block).
//! A run records its format in every model directory it writes (`fcgpu.json`, beside
//! `config.json`), so `eval --model`, `train --model` and `sft --model` default to it.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::chat_template::ChatTemplate;
use crate::data::Sample;
use crate::fc::decode::{decode, AnswerFormat, Lang};
use crate::fc::prompt::{render_calls, PromptStyle, NO_CALL_TEXT};
use crate::fc::reward::FormatRule;
use crate::model::tokenizer::Tokenizer;

/// The file in a model directory that records the format it was trained with.
pub const FORMAT_FILE: &str = "fcgpu.json";

/// How a run's prompts and answers look.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainFormat {
    pub style: PromptStyle,
    /// Answers open with one non-empty `<think>…</think>` (SFT targets carry the sample's
    /// reasoning there; the format rule requires it). False: plain answers.
    pub think: bool,
}

impl TrainFormat {
    /// The answer syntax of the style: JSON `<tool_call>` blocks for `qwen-fc`, else a Python
    /// call list.
    pub fn answer_format(&self) -> AnswerFormat {
        answer_format(self.style)
    }

    /// The format rule rewards and held-out accuracy apply.
    pub fn rule(&self) -> FormatRule {
        if self.think {
            FormatRule::Think
        } else {
            FormatRule::Plain
        }
    }

    /// The format of a trainer built around a model with no data (tests, probes): the style
    /// given, else `compact`; think as given, else what the style implies (data-free).
    pub fn or_defaults(style: Option<PromptStyle>, think: Option<bool>) -> TrainFormat {
        let style = style.unwrap_or(PromptStyle::Compact);
        TrainFormat {
            style,
            think: think.unwrap_or(style != PromptStyle::Bfcl && style != PromptStyle::QwenFc),
        }
    }
}

/// JSON `<tool_call>` blocks for `qwen-fc`, a Python call list otherwise.
pub fn answer_format(style: PromptStyle) -> AnswerFormat {
    if style == PromptStyle::QwenFc {
        AnswerFormat::Json
    } else {
        AnswerFormat::Python
    }
}

/// A trainer's prompt renderer: the run's style and the chat template of the model it trains,
/// read once. Every prompt `sft` and `train` render goes through [`Prompter::text`]. A model
/// with no chat template (the embedded task's, a fresh one) gets the built-in Qwen ChatML one.
#[derive(Clone, Debug)]
pub struct Prompter {
    pub template: Option<Arc<ChatTemplate>>,
    pub style: PromptStyle,
}

impl Prompter {
    /// The renderer for the model in `model_dir` (None: a model being built, with no template).
    pub fn new(model_dir: Option<&Path>, style: PromptStyle) -> Result<Prompter> {
        let template = match (model_dir, style) {
            (Some(dir), s) if s != PromptStyle::Compact => ChatTemplate::find(dir)?.map(Arc::new),
            _ => None,
        };
        Ok(Prompter { template, style })
    }

    pub fn text(&self, sample: &Sample) -> Result<String> {
        crate::fc::prompt::render_prompt_with(self.template.as_deref(), sample, self.style)
            .with_context(|| format!("prompt of sample {}", sample.id))
    }

    pub fn ids(&self, tok: &Tokenizer, sample: &Sample) -> Result<Vec<u32>> {
        tok.encode(&self.text(sample)?, false).with_context(|| format!("prompt of sample {}", sample.id))
    }
}

/// The sample has reasoning for a think block (not blank).
pub fn has_reasoning(s: &Sample) -> bool {
    s.reasoning.as_deref().is_some_and(|r| !r.trim().is_empty())
}

/// The SFT target of `sample` split in two: the think block (empty when `fmt.think` is false)
/// and the answer. Their concatenation is the completion; the split is SRML's boundary.
pub fn target_parts(sample: &Sample, fmt: TrainFormat) -> Result<(String, String)> {
    let answer = if sample.expects_no_call() {
        NO_CALL_TEXT.to_string()
    } else if fmt.style == PromptStyle::QwenFc {
        json_calls(sample)?
    } else {
        render_calls(sample)
    };
    if !fmt.think {
        return Ok((String::new(), answer));
    }
    let reasoning = sample.reasoning.clone().unwrap_or_default();
    Ok((format!("<think>{reasoning}</think>"), format!("\n\n{answer}")))
}

/// The reference calls as Qwen's `<tool_call>` JSON blocks: the call list `render_calls`
/// writes, read back by the decoder, so the values are the ones the Python target has.
fn json_calls(sample: &Sample) -> Result<String> {
    let lang = Lang::of_category(&sample.category);
    let calls = decode(&render_calls(sample), lang, AnswerFormat::Python)
        .map_err(|e| anyhow::anyhow!("sample {}: cannot write its calls as JSON: {e:?}", sample.id))?;
    let blocks: Vec<String> = calls
        .iter()
        .map(|c| {
            let args: serde_json::Map<String, serde_json::Value> =
                c.args.iter().map(|(k, v)| (k.clone().unwrap_or_default(), v.to_json())).collect();
            let call = serde_json::json!({"name": c.name, "arguments": args});
            format!("<tool_call>\n{call}\n</tool_call>")
        })
        .collect();
    Ok(blocks.join("\n"))
}

/// The format recorded in `model_dir` (`fcgpu.json`), if the directory has one. A malformed
/// file is an error naming it.
pub fn recorded(model_dir: &Path) -> Result<Option<TrainFormat>> {
    let p = model_dir.join(FORMAT_FILE);
    if !p.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    let f: TrainFormat = serde_json::from_str(&text).with_context(|| {
        format!("{}: malformed (expected {{\"style\": \"compact|bfcl|reasoning|qwen-fc\", \"think\": true|false}})", p.display())
    })?;
    Ok(Some(f))
}

/// Writes `fmt` as `dir/fcgpu.json` (atomically).
pub fn record(dir: &Path, fmt: &TrainFormat) -> Result<()> {
    let text = serde_json::to_string_pretty(fmt)? + "\n";
    crate::runfs::write_atomic(&dir.join(FORMAT_FILE), text.as_bytes())
}

/// The style `eval --model` uses: the flag, else the one recorded in the model directory, else
/// `bfcl`.
pub fn eval_style(flag: Option<PromptStyle>, model_dir: Option<&Path>) -> Result<PromptStyle> {
    if let Some(s) = flag {
        return Ok(s);
    }
    let rec = match model_dir {
        Some(d) => recorded(d)?,
        None => None,
    };
    Ok(rec.map_or(PromptStyle::Bfcl, |f| f.style))
}

/// A run's format from its options (`style`, `think`; None = not given), the model it starts
/// from and its training samples. Style: given, else recorded in the model, else `compact`.
/// Think: given, else recorded with that style, else what the style implies (`reasoning`:
/// yes; `bfcl`, `qwen-fc`: no; `compact`: whether the data has reasoning). `sft` (`targets`)
/// also needs reasoning in every training sample when think is on.
pub fn resolve(
    style: Option<PromptStyle>,
    think: Option<bool>,
    model_dir: &Path,
    train: &[Sample],
    targets: bool,
) -> Result<TrainFormat> {
    let rec = recorded(model_dir)?;
    let style = style.or(rec.map(|f| f.style)).unwrap_or(PromptStyle::Compact);
    let with_reasoning = train.iter().filter(|s| has_reasoning(s)).count();
    let think = match (think, rec.filter(|f| f.style == style)) {
        (Some(t), _) => t,
        (None, Some(f)) => f.think,
        (None, None) => match style {
            PromptStyle::Reasoning => true,
            PromptStyle::Bfcl | PromptStyle::QwenFc => false,
            PromptStyle::Compact => with_reasoning > 0,
        },
    };
    let fmt = TrainFormat { style, think };
    check(&fmt, train, with_reasoning, targets)?;
    Ok(fmt)
}

fn style_name(s: PromptStyle) -> &'static str {
    match s {
        PromptStyle::Compact => "compact",
        PromptStyle::Bfcl => "bfcl",
        PromptStyle::Reasoning => "reasoning",
        PromptStyle::QwenFc => "qwen-fc",
    }
}

/// Combinations that cannot train what they say.
fn check(fmt: &TrainFormat, train: &[Sample], with_reasoning: usize, targets: bool) -> Result<()> {
    let name = style_name(fmt.style);
    match (fmt.style, fmt.think) {
        (PromptStyle::Bfcl | PromptStyle::QwenFc, true) => bail!(
            "--style {name} asks the model for the calls only, but think = true asks for a <think> block first; \
             use --style reasoning (or compact) for answers that reason first, or --think false"
        ),
        (PromptStyle::Reasoning, false) => bail!(
            "--style reasoning asks the model to reason inside <think></think>, but think = false trains plain answers; \
             use --style bfcl for plain answers, or --think true"
        ),
        _ => {}
    }
    if targets && fmt.think && with_reasoning < train.len() {
        let first = train.iter().find(|s| !has_reasoning(s)).map_or("", |s| s.id.as_str());
        bail!(
            "think = true (--style {name}) trains answers that open with <think>reasoning</think>, but {} of {} training samples \
             have no reasoning (first: {first}); their target would be an empty <think></think>, which the format rule refuses. \
             Add a `reasoning` field to the data, or train plain answers (--think false, or --style bfcl)",
            train.len() - with_reasoning,
            train.len()
        );
    }
    if targets && !fmt.think && with_reasoning > 0 {
        eprintln!(
            "note: think = false: the reasoning of {with_reasoning} training samples is left out of the targets (--think true keeps it)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(reasoning: Option<&str>) -> Sample {
        Sample {
            id: "s1".into(),
            category: "simple_python".into(),
            messages: vec![crate::data::Message { role: "user".into(), content: "area of a 3x4 box".into() }],
            functions: vec![
                serde_json::json!({"name": "area", "description": "d", "parameters": {"type": "dict",
                "properties": {"w": {"type": "integer"}, "h": {"type": "integer"}}, "required": ["w", "h"]}}),
            ],
            ground_truth: vec![serde_json::json!({"area": {"w": [3], "h": [4]}})],
            reasoning: reasoning.map(String::from),
        }
    }

    #[test]
    fn targets_follow_the_format() {
        let s = sample(Some("two sides"));
        let think = TrainFormat { style: PromptStyle::Compact, think: true };
        assert_eq!(
            target_parts(&s, think).unwrap(),
            ("<think>two sides</think>".to_string(), "\n\n[area(w=3, h=4)]".to_string())
        );
        let plain = TrainFormat { style: PromptStyle::Bfcl, think: false };
        assert_eq!(target_parts(&s, plain).unwrap(), (String::new(), "[area(w=3, h=4)]".to_string()));
        let json = TrainFormat { style: PromptStyle::QwenFc, think: false };
        let (_, a) = target_parts(&s, json).unwrap();
        let call = serde_json::json!({"name": "area", "arguments": {"w": 3, "h": 4}});
        assert_eq!(a, format!("<tool_call>\n{call}\n</tool_call>"));
        let r = crate::fc::reward::reward_with(
            &s,
            &a,
            crate::fc::reward::RewardKind::Binary,
            AnswerFormat::Json,
            FormatRule::Plain,
        );
        assert_eq!(r.reward, 1.0, "{r:?}");
    }

    #[test]
    fn the_format_follows_style_and_data() {
        let dir = tempfile::tempdir().unwrap();
        let (with, without) = (vec![sample(Some("r"))], vec![sample(None)]);
        let r = |st, th, data: &[Sample], targets| resolve(st, th, dir.path(), data, targets);
        let f = |style, think| TrainFormat { style, think };
        assert_eq!(r(None, None, &with, true).unwrap(), f(PromptStyle::Compact, true));
        assert_eq!(r(None, None, &without, true).unwrap(), f(PromptStyle::Compact, false));
        assert_eq!(r(Some(PromptStyle::Bfcl), None, &with, true).unwrap(), f(PromptStyle::Bfcl, false));
        assert_eq!(
            r(Some(PromptStyle::Reasoning), None, &without, false).unwrap(),
            f(PromptStyle::Reasoning, true)
        );
        // SFT of a reasoning style needs reasoning in the data; GRPO does not.
        let e = r(Some(PromptStyle::Reasoning), None, &without, true).unwrap_err().to_string();
        assert!(e.contains("1 of 1 training samples") && e.contains("s1"), "{e}");
        for (st, th) in
            [(PromptStyle::Bfcl, true), (PromptStyle::QwenFc, true), (PromptStyle::Reasoning, false)]
        {
            assert!(r(Some(st), Some(th), &with, false).is_err(), "{st:?} think {th}");
        }
        // A recorded format is the default, think included when the style is the same.
        record(dir.path(), &f(PromptStyle::Compact, false)).unwrap();
        assert_eq!(r(None, None, &with, false).unwrap(), f(PromptStyle::Compact, false));
        assert_eq!(
            r(Some(PromptStyle::Reasoning), None, &with, false).unwrap(),
            f(PromptStyle::Reasoning, true)
        );
        assert_eq!(eval_style(None, Some(dir.path())).unwrap(), PromptStyle::Compact);
        assert_eq!(eval_style(Some(PromptStyle::QwenFc), Some(dir.path())).unwrap(), PromptStyle::QwenFc);
        assert_eq!(eval_style(None, None).unwrap(), PromptStyle::Bfcl);
        std::fs::write(dir.path().join(FORMAT_FILE), "{\"style\": \"chatml\"}").unwrap();
        let e = format!("{:#}", eval_style(None, Some(dir.path())).unwrap_err());
        assert!(e.contains(FORMAT_FILE) && e.contains("malformed"), "{e}");
    }
}
