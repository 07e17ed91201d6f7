//! Rewards (SPEC §2): binary format-and-answer reward, or `partial`
//! `0.1·format + 0.9·matched / max(expected, emitted)` (docs/training.md "Reward"): every call
//! emitted beyond the expected number, a duplicate included, lowers the score.

use crate::data::Sample;
use crate::fc::checker::simple;
use crate::fc::decode::{decode, strip_reasoning, AnswerFormat, Call, DecodeError, Lang};
use crate::fc::score::check_answer;
use crate::fc::value::Value;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum RewardKind {
    #[default]
    Binary,
    Partial,
}

/// What a well-formed completion looks like, besides an answer that decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FormatRule {
    /// One non-empty `<think>…</think>` first ([`think_ok`]): reasoning styles and data.
    #[default]
    Think,
    /// A plain answer ([`plain_ok`]): no think block required (styles and data without
    /// reasoning).
    Plain,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RewardDetails {
    pub reward: f64,
    /// The [`FormatRule`] holds (by default: exactly one non-empty `<think>…</think>` first),
    /// and the answer decodes (for samples expecting no call, any answer text).
    pub format_ok: bool,
    /// BFCL's verdict on the answer.
    pub valid: bool,
    pub error_type: String,
    pub calls_matched: usize,
    pub calls_expected: usize,
    /// Calls the answer decodes to (0 when it does not decode).
    pub calls_emitted: usize,
    /// The decoder or checker panicked on this completion (a bug; the reward is 0).
    pub panicked: bool,
}

/// Error type of a completion whose reward computation panicked.
pub const PANIC_ERROR_TYPE: &str = "fcgpu:reward_panic";

static REWARD_PANICS: AtomicU64 = AtomicU64::new(0);

/// Panics caught at the reward boundary since the process started.
pub fn reward_panics() -> u64 {
    REWARD_PANICS.load(Ordering::Relaxed)
}

/// Runs one completion's reward computation; a panic in it (a decoder or checker bug) must
/// not take a training run down, so it becomes reward 0, is counted, and the run goes on.
/// The panic message still reaches stderr through the panic hook.
pub fn guarded(calls_expected: usize, f: impl FnOnce() -> RewardDetails) -> RewardDetails {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| {
        REWARD_PANICS.fetch_add(1, Ordering::Relaxed);
        RewardDetails {
            reward: 0.0,
            format_ok: false,
            valid: false,
            error_type: PANIC_ERROR_TYPE.to_string(),
            calls_matched: 0,
            calls_expected,
            calls_emitted: 0,
            panicked: true,
        }
    })
}

/// End-of-turn tokens a sampler may leave at the end of a completion.
const END_TOKENS: [&str; 3] = ["<|im_end|>", "<|endoftext|>", "<|eot_id|>"];

fn trim_end_tokens(mut s: &str) -> &str {
    loop {
        let t = s.trim_end();
        match END_TOKENS.iter().find_map(|e| t.strip_suffix(e)) {
            Some(rest) => s = rest,
            None => return s,
        }
    }
}

/// The think-block rule: the completion opens with `<think>`, has exactly one `<think>` and
/// one `</think>`, and the reasoning between them is not blank.
pub fn think_ok(completion: &str) -> bool {
    let c = completion.trim_start();
    if !c.starts_with("<think>") || c.matches("<think>").count() != 1 || c.matches("</think>").count() != 1 {
        return false;
    }
    let end = c.find("</think>").unwrap_or(0);
    end > 7 && !c[7..end].trim().is_empty()
}

/// The plain-answer rule: no think tags at all, or one `<think>…</think>` pair first (its
/// content may be empty, as a model's non-thinking mode writes it). Stray, repeated or
/// unclosed tags break it.
pub fn plain_ok(completion: &str) -> bool {
    let c = completion.trim_start();
    match (c.matches("<think>").count(), c.matches("</think>").count()) {
        (0, 0) => true,
        (1, 1) => c.starts_with("<think>"),
        _ => false,
    }
}

/// Reward of one completion for one sample, under the think rule ([`reward_with`]).
pub fn reward(sample: &Sample, completion: &str, kind: RewardKind, fmt: AnswerFormat) -> RewardDetails {
    reward_with(sample, completion, kind, fmt, FormatRule::Think)
}

/// Reward of one completion for one sample under a format rule. Never panics (see
/// [`guarded`]); an answer over the decoder's bounds (`fc::budget`) gets 0 with error type
/// `ast_decoder:decoder_bounds_exceeded`.
pub fn reward_with(
    sample: &Sample,
    completion: &str,
    kind: RewardKind,
    fmt: AnswerFormat,
    rule: FormatRule,
) -> RewardDetails {
    guarded(sample.ground_truth.len(), || reward_unguarded(sample, completion, kind, fmt, rule))
}

fn reward_unguarded(
    sample: &Sample,
    completion: &str,
    kind: RewardKind,
    fmt: AnswerFormat,
    rule: FormatRule,
) -> RewardDetails {
    let completion = trim_end_tokens(completion);
    let answer = strip_reasoning(completion);
    let lang = Lang::of_category(&sample.category);
    let decoded = decode(
        answer,
        if sample.expects_no_call() || sample.expects_any_call() { Lang::Python } else { lang },
        fmt,
    );
    let verdict = check_answer(sample, answer, fmt);
    let decodes = decoded.is_ok();
    let over_bounds = matches!(decoded, Err(DecodeError::Bounds(_)));
    let shape_ok = match rule {
        FormatRule::Think => think_ok(completion),
        FormatRule::Plain => plain_ok(completion),
    };
    let format_ok = shape_ok && !over_bounds && (sample.expects_no_call() || decodes);
    let expected = sample.ground_truth.len();
    let matched = match &decoded {
        Ok(calls) if !sample.expects_no_call() && !sample.expects_any_call() => {
            count_matched(sample, calls, lang)
        }
        _ => 0,
    };
    let emitted = decoded.as_ref().map_or(0, |calls| calls.len());
    let answer_score = if sample.expects_no_call() || sample.expects_any_call() || expected == 0 {
        if verdict.valid {
            1.0
        } else {
            0.0
        }
    } else {
        partial_score(matched, expected, emitted)
    };
    let reward = match kind {
        RewardKind::Binary => (format_ok && verdict.valid) as u8 as f64,
        RewardKind::Partial => 0.1 * format_ok as u8 as f64 + 0.9 * answer_score,
    };
    RewardDetails {
        reward,
        format_ok,
        valid: verdict.valid,
        error_type: verdict.error_type,
        calls_matched: matched,
        calls_expected: expected,
        calls_emitted: emitted,
        panicked: false,
    }
}

/// The answer part of the `partial` reward: `matched / max(expected, emitted)`, i.e.
/// min(recall, precision). Dividing by the expected count alone paid for emitting every
/// plausible call; with the larger of the two counts each extra or duplicated call costs, and
/// an answer with no extra calls scores its plain recall as before.
fn partial_score(matched: usize, expected: usize, emitted: usize) -> f64 {
    matched as f64 / expected.max(emitted).max(1) as f64
}

/// Greedy matching like BFCL's parallel checker, but counting instead of failing.
fn count_matched(sample: &Sample, calls: &[Call], lang: Lang) -> usize {
    let mut used = vec![false; calls.len()];
    let mut n = 0;
    for gt in &sample.ground_truth {
        let ans = Value::from_json(gt);
        let Some(name) = gt.as_object().and_then(|o| o.keys().next()) else {
            continue;
        };
        let Some(desc) = sample.functions.iter().find(|f| f["name"] == name.as_str()) else {
            continue;
        };
        for (j, c) in calls.iter().enumerate() {
            if !used[j] && simple(desc, c, &ans, lang).is_ok_and(|v| v.valid) {
                used[j] = true;
                n += 1;
                break;
            }
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_is_reward_zero_and_counted() {
        let before = reward_panics();
        let r = guarded(2, || panic!("a decoder bug"));
        assert!(r.panicked && !r.valid && r.reward == 0.0);
        assert_eq!(r.error_type, PANIC_ERROR_TYPE);
        assert_eq!(r.calls_expected, 2);
        // Other tests may panic concurrently in this process: at least this one counted.
        assert!(reward_panics() > before);
    }

    fn simple() -> Sample {
        Sample {
            id: "simple_1".into(),
            category: "simple_python".into(),
            messages: vec![],
            functions: vec![
                serde_json::json!({"name": "area", "description": "d", "parameters": {"type": "dict",
                "properties": {"w": {"type": "integer"}}, "required": ["w"]}}),
            ],
            ground_truth: vec![serde_json::json!({"area": {"w": [3]}})],
            reasoning: None,
        }
    }

    #[test]
    fn the_plain_rule_scores_plain_answers_and_refuses_broken_ones() {
        let s = simple();
        let score = |text: &str, rule| {
            let r = reward_with(&s, text, RewardKind::Binary, AnswerFormat::Python, rule);
            (r.reward, r.format_ok)
        };
        // A valid plain call: full reward under the plain rule, none under the think rule.
        assert_eq!(score("[area(w=3)]<|im_end|>", FormatRule::Plain), (1.0, true));
        assert_eq!(score("[area(w=3)]", FormatRule::Think), (0.0, false));
        // A think block is allowed (also empty) when plain answers are asked for.
        assert_eq!(score("<think></think>\n\n[area(w=3)]", FormatRule::Plain), (1.0, true));
        assert_eq!(score("<think>w is 3</think>\n\n[area(w=3)]", FormatRule::Think), (1.0, true));
        // Real violations score 0 under both rules.
        for bad in [
            "[area(w=3)]</think>",
            "<think>a</think><think>b</think>[area(w=3)]",
            "Sure! [area(w=3)] <think>",
            "The area is 12.",
        ] {
            assert_eq!(score(bad, FormatRule::Plain).0, 0.0, "{bad}");
            assert_eq!(score(bad, FormatRule::Think).0, 0.0, "{bad}");
        }
        // A well-formed plain answer with the wrong value: format fine, reward 0.
        assert_eq!(score("[area(w=4)]", FormatRule::Plain), (0.0, true));
    }

    fn partial(s: &Sample, text: &str) -> RewardDetails {
        reward_with(s, text, RewardKind::Partial, AnswerFormat::Python, FormatRule::Plain)
    }

    /// Emitting every plausible call, or the right call twice, must score below the right call
    /// alone (it used to score the same: the answer part divided by the expected count only).
    #[test]
    fn partial_reward_charges_extra_and_duplicated_calls() {
        let s = simple();
        let right = partial(&s, "[area(w=3)]");
        assert_eq!((right.reward, right.calls_matched, right.calls_emitted), (1.0, 1, 1));
        let spam = partial(&s, "[area(w=1), area(w=2), area(w=3), area(w=4)]");
        assert_eq!((spam.calls_matched, spam.calls_emitted), (1, 4), "{spam:?}");
        assert!((spam.reward - (0.1 + 0.9 / 4.0)).abs() < 1e-12, "{spam:?}");
        let dup = partial(&s, "[area(w=3), area(w=3)]");
        assert_eq!((dup.calls_matched, dup.calls_emitted), (1, 2), "{dup:?}");
        assert!((dup.reward - (0.1 + 0.9 / 2.0)).abs() < 1e-12, "{dup:?}");
        assert!(spam.reward < dup.reward && dup.reward < right.reward);
        // A wrong single call keeps only the format part.
        assert!((partial(&s, "[area(w=4)]").reward - 0.1).abs() < 1e-12);
    }

    /// With two expected calls: a missing call costs as before (recall), an extra one costs
    /// like a missing one (matched / max(expected, emitted)).
    #[test]
    fn partial_reward_over_two_expected_calls() {
        let mut s = simple();
        s.ground_truth.push(serde_json::json!({"area": {"w": [5]}}));
        let score = |text: &str| partial(&s, text).reward;
        assert!((score("[area(w=3), area(w=5)]") - 1.0).abs() < 1e-12);
        assert!((score("[area(w=5), area(w=3)]") - 1.0).abs() < 1e-12, "order does not matter");
        assert!((score("[area(w=3)]") - 0.55).abs() < 1e-12);
        assert!((score("[area(w=3), area(w=5), area(w=7)]") - (0.1 + 0.9 * 2.0 / 3.0)).abs() < 1e-12);
        assert!((score("[area(w=3), area(w=3)]") - 0.55).abs() < 1e-12, "a duplicate matches once");
    }
}
