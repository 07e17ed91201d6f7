//! Hostile model answers (issue 11, item 2): each once crashed, hung or exhausted the decoder
//! that the GRPO reward runs on every sampled completion. Each must now be an invalid answer
//! with error type `ast_decoder:decoder_bounds_exceeded`, quickly and in bounded memory, and a
//! GRPO step fed such completions must go on with reward 0 for them.

mod fc_common;

use fcgpu::data::{load_bfcl_category, Sample};
use fcgpu::fc::prompt::render_calls;
use fcgpu::fc::{check_answer, decode, reward, AnswerFormat, Lang, RewardKind};
use fcgpu::rl::advantage::{group_advantages, AdvScale, EntropyBonus};
use fcgpu::rl::policy_loss::{policy_loss, LossAgg, PolicyLossCfg, PolicyLossInput};

const BOUNDS: &str = "ast_decoder:decoder_bounds_exceeded";

fn sample(category: &str) -> Sample {
    load_bfcl_category(&fc_common::subset_dir(), category).unwrap().remove(0)
}

/// The first sample of `category` whose gold answer BFCL accepts (a few are data quirks).
fn gold_sample(category: &str) -> Sample {
    load_bfcl_category(&fc_common::subset_dir(), category)
        .unwrap()
        .into_iter()
        .find(|s| check_answer(s, &render_calls(s), AnswerFormat::Python).valid)
        .unwrap()
}

/// The error type of decoding `answer`, which must fail.
fn refusal(answer: &str, lang: Lang) -> &'static str {
    match decode(answer, lang, AnswerFormat::Python) {
        Ok(calls) => panic!("decoded {} calls", calls.len()),
        Err(e) => e.error_type(),
    }
}

fn long_sum(terms: usize) -> String {
    vec!["\"a\"*1000000"; terms].join(" + ")
}

fn deep_java() -> String {
    format!("foo(a={}1{})", "(".repeat(20_000), ")".repeat(20_000))
}

fn deep_js() -> String {
    format!("foo(a={}", "[".repeat(20_000))
}

/// Every hostile answer of the issue, with the language it is decoded as.
fn hostile() -> Vec<(String, Lang)> {
    vec![
        (r#"[f(base="%.65536f" % 1.0)]"#.to_string(), Lang::Python),
        (r#"[f(x=["a"*1048576]*1048576)]"#.to_string(), Lang::Python),
        ("[f(x=[[[0]*1000]*1000]*1000)]".to_string(), Lang::Python),
        (format!("[f(x={})]", long_sum(800)), Lang::Python),
        (deep_java(), Lang::Java),
        (deep_js(), Lang::JavaScript),
    ]
}

#[test]
fn huge_format_precision_is_refused() {
    assert_eq!(refusal(r#"[f(base="%.65536f" % 1.0)]"#, Lang::Python), BOUNDS);
    assert_eq!(refusal(r#"[f(base="%.99999999999999999999f" % 1.0)]"#, Lang::Python), BOUNDS);
    // Ordinary precisions still format like Python.
    let c = decode(r#"[f(base="%.3f" % 2.0)]"#, Lang::Python, AnswerFormat::Python).unwrap();
    assert_eq!(c[0].arg("base").unwrap().repr(), "'2.000'");
}

#[test]
fn nested_repetition_is_refused() {
    assert_eq!(refusal(r#"[f(x=["a"*1048576]*1048576)]"#, Lang::Python), BOUNDS);
    assert_eq!(refusal("[f(x=[[[0]*1000]*1000]*1000)]", Lang::Python), BOUNDS);
    // Small repetitions still evaluate.
    let c = decode("[f(x=[[0]*2]*2)]", Lang::Python, AnswerFormat::Python).unwrap();
    assert_eq!(c[0].arg("x").unwrap().repr(), "[[0, 0], [0, 0]]");
}

#[test]
fn long_concatenation_is_refused() {
    assert_eq!(refusal(&format!("[f(x={})]", long_sum(800)), Lang::Python), BOUNDS);
    let c = decode("[f(x='ab' + 'c' * 2)]", Lang::Python, AnswerFormat::Python).unwrap();
    assert_eq!(c[0].arg("x").unwrap().repr(), "'abcc'");
}

#[test]
fn deep_java_is_refused_before_tree_sitter() {
    assert_eq!(refusal(&deep_java(), Lang::Java), BOUNDS);
    // A long operator chain nests the syntax tree without any bracket.
    let chain = format!("foo(a={})", vec!["1"; 20_000].join("+"));
    assert_eq!(refusal(&chain, Lang::Java), BOUNDS);
}

#[test]
fn deep_javascript_is_refused_before_tree_sitter() {
    assert_eq!(refusal(&deep_js(), Lang::JavaScript), BOUNDS);
    assert_eq!(refusal(&"[".repeat(20_000), Lang::JavaScript), BOUNDS);
    let chain = format!("foo(a={})", vec!["1"; 20_000].join("+"));
    assert_eq!(refusal(&chain, Lang::JavaScript), BOUNDS);
    // Moderate nesting still parses (BFCL keeps the value's text).
    let ok = format!("foo(a={}1{})", "[".repeat(50), "]".repeat(50));
    assert!(decode(&ok, Lang::JavaScript, AnswerFormat::Python).is_ok());
}

#[test]
fn an_oversized_answer_is_refused_in_every_mode() {
    let big = format!("[f(x='{}')]", "a".repeat(300 << 10));
    for lang in [Lang::Python, Lang::Java, Lang::JavaScript] {
        assert_eq!(refusal(&big, lang), BOUNDS);
    }
    let err = decode(&big, Lang::Python, AnswerFormat::Json).unwrap_err();
    assert_eq!(err.error_type(), BOUNDS);
}

#[test]
fn many_distinct_keys_are_refused_not_quadratic() {
    // 20,000 distinct keyword names: finding duplicates would compare 2e8 pairs.
    let kw: Vec<String> = (0..20_000).map(|i| format!("a{i}=0")).collect();
    assert_eq!(refusal(&format!("[f({})]", kw.join(",")), Lang::Python), BOUNDS);
    let keys: Vec<String> = (0..20_000).map(|i| format!("'{i}':0")).collect();
    assert_eq!(refusal(&format!("[f(x={{{}}})]", keys.join(",")), Lang::Python), BOUNDS);
}

#[test]
fn long_malformed_java_and_javascript_are_refused() {
    // tree-sitter's error recovery took 80 s of CPU on this 170 KB answer.
    let keys: Vec<String> = (0..20_000).map(|i| format!("'{i}':0")).collect();
    let answer = format!("[f(x={{{}}})]", keys.join(","));
    for lang in [Lang::Java, Lang::JavaScript] {
        assert_eq!(refusal(&answer, lang), BOUNDS);
    }
}

#[test]
fn hostile_answers_are_invalid_in_every_category() {
    // An irrelevance sample accepts any answer that does not decode; one over the bounds is
    // still invalid, since BFCL might have decoded it.
    for cat in ["simple_python", "irrelevance", "live_relevance"] {
        let s = sample(cat);
        let v = check_answer(&s, r#"[f(x=["a"*1048576]*1048576)]"#, AnswerFormat::Python);
        assert!(!v.valid, "{cat}");
        assert_eq!(v.error_type, BOUNDS, "{cat}");
    }
}

/// The reward → advantage → policy-loss path of a GRPO step, on groups that each hold the
/// gold completion and a hostile one: the hostile ones get 0, the update stays finite.
#[test]
fn grpo_step_on_hostile_completions() {
    let mut rewards = Vec::new();
    for (answer, lang) in hostile() {
        let cat = match lang {
            Lang::Python => "simple_python",
            Lang::Java => "simple_java",
            Lang::JavaScript => "simple_javascript",
        };
        let s = gold_sample(cat);
        let gold = format!("<think>gold</think>\n\n{}", render_calls(&s));
        let bad = format!("<think>x</think>\n\n{answer}<|im_end|>");
        for (text, want) in [(&gold, 1.0), (&bad, 0.0)] {
            for kind in [RewardKind::Binary, RewardKind::Partial] {
                let r = reward(&s, text, kind, AnswerFormat::Python);
                assert_eq!(r.reward, want, "{cat} {kind:?}: {r:?}");
                if want == 0.0 {
                    assert_eq!(r.error_type, BOUNDS, "{cat}");
                }
            }
            rewards.push(reward(&s, text, RewardKind::Binary, AnswerFormat::Python).reward as f32);
        }
    }
    let group_size = 2;
    let adv = group_advantages(&rewards, group_size, AdvScale::Group, None, EntropyBonus::default()).unwrap();
    assert!(adv.adv.iter().all(|a| a.is_finite()));
    assert!(adv.adv[0] > 0.0 && adv.adv[1] < 0.0, "{:?}", adv.adv);
    let (n, t) = (rewards.len(), 4);
    let logp: Vec<f32> = (0..n * t).map(|k| -1.0 - (k % 5) as f32 * 0.1).collect();
    let mask = vec![1.0; n * t];
    let input = PolicyLossInput {
        logp: &logp,
        old_logp: &logp,
        ref_logp: None,
        adv: &adv.adv,
        adv_per_token: false,
        mask: &mask,
        seg: None,
        n_seq: n,
        t,
    };
    let cfg =
        PolicyLossCfg { eps_low: 0.2, eps_high: 0.28, beta: 0.0, agg: LossAgg::TokenMean, srml_alpha: 0.5 };
    let (stats, grad) = policy_loss(&input, &cfg, 1.0).unwrap();
    assert!(stats.loss.is_finite() && grad.iter().all(|g| g.is_finite()));
    // The gold completion is pushed up, the hostile ones down.
    assert!(grad[0] < 0.0 && grad[t] > 0.0, "{:?}", &grad[..2 * t]);
}

#[test]
fn generate_refuses_an_empty_stop_string() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fcgpu"))
        .args(["generate", "--model", "/nonexistent", "--input", "/nonexistent", "--stop", "x", "--stop", ""])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--stop") && err.contains("empty"), "{err}");
}
