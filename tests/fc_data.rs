//! Dataset loading, error locations, `fcgpu eval` end to end, and rewards.

mod fc_common;

use fcgpu::cli::eval as eval_cli;
use fcgpu::data::{category_of_id, load_bfcl_category, load_jsonl};
use fcgpu::fc::prompt::render_calls;
use fcgpu::fc::{reward, AnswerFormat, RewardKind};
use std::io::Write;

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.path().join(name);
    std::fs::File::create(&p).unwrap().write_all(text.as_bytes()).unwrap();
    p
}

#[test]
fn category_from_id_like_bfcl() {
    assert_eq!(category_of_id("live_simple_106-63-0"), "live_simple");
    assert_eq!(category_of_id("simple_python_12"), "simple_python");
    assert_eq!(category_of_id("parallel_multiple_3"), "parallel_multiple");
}

#[test]
fn malformed_data_line_names_file_and_line() {
    let d = tempfile::tempdir().unwrap();
    let good = r#"{"messages": [{"role": "user", "content": "hi"}], "tools": [], "calls": []}"#;
    let p = write(&d, "x.jsonl", &format!("{good}\n{{not json\n"));
    let e = load_jsonl(&p).unwrap_err().to_string();
    assert!(e.contains("x.jsonl:2"), "{e}");
    let p = write(&d, "y.jsonl", &format!("{good}\n\n{{\"messages\": []}}\n"));
    let e = load_jsonl(&p).unwrap_err().to_string();
    assert!(e.contains("y.jsonl:3") && e.contains("tools"), "{e}");
    std::fs::create_dir_all(d.path().join("bfcl")).unwrap();
    write(&d, "bfcl/BFCL_v4_simple_python.json", "{\"id\": \"simple_python_0\"}\n");
    let e = load_bfcl_category(&d.path().join("bfcl"), "simple_python").unwrap_err().to_string();
    assert!(e.contains("BFCL_v4_simple_python.json:1"), "{e}");
}

#[test]
fn xlam_and_fcgpu_lines_load_into_samples() {
    let d = tempfile::tempdir().unwrap();
    let xlam = serde_json::json!({
        "id": 7,
        "query": "Weather in Paris?",
        "tools": serde_json::to_string(&serde_json::json!([{"name": "get_weather", "description": "d",
            "parameters": {"city": {"type": "str", "description": "c"}, "unit": {"type": "str, optional", "description": "u", "default": "c"}}}])).unwrap(),
        "answers": serde_json::to_string(&serde_json::json!([{"name": "get_weather", "arguments": {"city": "Paris"}}])).unwrap(),
    });
    let own = serde_json::json!({"id": "a", "messages": [{"role": "user", "content": "q"}],
        "tools": [{"name": "f", "description": "", "parameters": {"type": "dict", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}],
        "calls": [{"f": {"x": [1]}}], "reasoning": "because"});
    let p = write(&d, "mix.jsonl", &format!("{xlam}\n{own}\n"));
    let s = load_jsonl(&p).unwrap();
    assert_eq!(s[0].id, "7");
    assert_eq!(s[0].category, "simple_python");
    assert_eq!(s[0].functions[0]["parameters"]["required"], serde_json::json!(["city"]));
    let r = reward(
        &s[0],
        "<think>Paris</think>\n\n[get_weather(city='Paris')]",
        RewardKind::Binary,
        AnswerFormat::Python,
    );
    assert_eq!(r.reward, 1.0, "{r:?}");
    assert_eq!(s[1].reasoning.as_deref(), Some("because"));
    assert_eq!(render_calls(&s[1]), "[f(x=1)]");
}

#[test]
fn rewards_follow_spec() {
    let samples = load_bfcl_category(&fc_common::subset_dir(), "parallel").unwrap();
    let s = &samples[0];
    let gold = render_calls(s);
    let good = format!("<think>reason</think>\n\n{gold}");
    assert_eq!(reward(s, &good, RewardKind::Binary, AnswerFormat::Python).reward, 1.0);
    assert_eq!(reward(s, &format!("{good}<|im_end|>"), RewardKind::Binary, AnswerFormat::Python).reward, 1.0);
    // No think block, empty think, two think blocks: format fails.
    for bad in
        [gold.clone(), format!("<think> </think>{gold}"), format!("<think>a</think><think>b</think>{gold}")]
    {
        let r = reward(s, &bad, RewardKind::Binary, AnswerFormat::Python);
        assert!(!r.format_ok && r.reward == 0.0, "{bad}");
    }
    // Partial: one of the expected calls dropped.
    let first_call_only = format!(
        "<think>r</think>\n\n[{}]",
        gold[1..gold.len() - 1].split("), ").next().unwrap().trim_end_matches(')').to_string() + ")"
    );
    let r = reward(s, &first_call_only, RewardKind::Partial, AnswerFormat::Python);
    let want = 0.1 + 0.9 * r.calls_matched as f64 / r.calls_expected as f64;
    assert!(r.calls_expected >= 2 && r.calls_matched >= 1 && (r.reward - want).abs() < 1e-9, "{r:?}");
    let irr = &load_bfcl_category(&fc_common::subset_dir(), "irrelevance").unwrap()[0];
    assert_eq!(
        reward(irr, "<think>none apply</think>\n\nI cannot help.", RewardKind::Binary, AnswerFormat::Python)
            .reward,
        1.0
    );
    let call = format!("<think>x</think>\n\n[{}(a=1)]", irr.functions[0]["name"].as_str().unwrap());
    assert_eq!(reward(irr, &call, RewardKind::Binary, AnswerFormat::Python).reward, 0.0);
}

#[test]
fn eval_scores_results_and_writes_verdicts() {
    let d = tempfile::tempdir().unwrap();
    let dir = fc_common::subset_dir();
    let samples = load_bfcl_category(&dir, "simple_python").unwrap();
    // First answer right, second wrong, the rest missing.
    let lines = [
        serde_json::json!({"id": samples[0].id, "result": format!("<think>t</think>\n\n{}", render_calls(&samples[0]))}),
        serde_json::json!({"id": samples[1].id, "result": "no idea"}),
    ];
    let res = write(&d, "r.jsonl", &lines.iter().map(|l| format!("{l}\n")).collect::<String>());
    let verdicts = d.path().join("v.jsonl");
    eval_cli::run(eval_cli::Args {
        bfcl_dir: Some(dir.clone()),
        category: "simple_python".into(),
        results: Some(res),
        format: Some(eval_cli::Format::Python),
        verdicts: Some(verdicts.clone()),
        ..Default::default()
    })
    .unwrap();
    let v = fc_common::read_jsonl(&verdicts);
    assert_eq!(v.len(), samples.len());
    assert_eq!(v[0]["valid"], true);
    assert_eq!(v[1]["error_type"], "ast_decoder:decoder_failed");
    assert_eq!(v[2]["error_type"], "missing_result");
    let bad = write(&d, "bad.jsonl", "{\"id\": \"a\", \"result\": \"x\"}\n{oops\n");
    let e = eval_cli::run(eval_cli::Args {
        bfcl_dir: Some(dir),
        category: "simple_python".into(),
        results: Some(bad),
        format: Some(eval_cli::Format::Python),
        verdicts: None,
        ..Default::default()
    })
    .unwrap_err();
    assert!(format!("{e:#}").contains("bad.jsonl:2"), "{e:#}");
}
