//! Every gold answer passes BFCL's checker, except the data quirks BFCL itself rejects.

mod fc_common;

use fcgpu::data::load_bfcl_dir;
use fcgpu::fc::prompt::render_calls;
use fcgpu::fc::{check_answer, AnswerFormat};
use std::path::Path;

const QUIRKS: [&str; 5] = [
    "parallel_178",
    "live_simple_106-63-0",
    "live_multiple_964-207-0",
    "live_multiple_507-149-4",
    "live_multiple_862-181-3",
];

/// Returns (passed, checked, failing ids).
fn gold_run(dir: &Path) -> (usize, usize, Vec<String>) {
    let samples = load_bfcl_dir(dir).unwrap();
    let mut failing = Vec::new();
    let mut checked = 0;
    let mut dump = String::new();
    for s in samples.iter().filter(|s| !s.ground_truth.is_empty()) {
        checked += 1;
        let text = render_calls(s);
        dump.push_str(&format!(
            "{}\n",
            serde_json::json!({"id": s.id, "category": s.category, "format": "python", "result": text})
        ));
        let v = check_answer(s, &text, AnswerFormat::Python);
        if !v.valid {
            failing.push(format!("{} ({})", s.id, v.error_type));
        }
    }
    // FCGPU_GOLD_DUMP: write the rendered gold answers, to be judged by BFCL itself
    // (`tools/bfcl_compare.py --replay`).
    if let Ok(p) = std::env::var("FCGPU_GOLD_DUMP") {
        std::fs::write(p, dump).unwrap();
    }
    (checked - failing.len(), checked, failing)
}

/// Gold answers BFCL itself also rejects as fcgpu renders them (checked with
/// `FCGPU_GOLD_DUMP=… cargo test --test fc_gold` then `tools/bfcl_compare.py --replay`):
/// answers with an ambiguous empty list or a missing required value, and Java/JavaScript
/// values BFCL's tree-sitter parsers cannot read back (HashMap bodies are dropped, String
/// array elements keep their quotes, unquoted text with spaces or dots does not parse).
const BFCL_REJECTS_TOO: [&str; 17] = [
    "parallel_multiple_26",
    "live_simple_112-68-0",
    "simple_java_1",
    "simple_java_33",
    "simple_java_35",
    "simple_java_36",
    "simple_java_65",
    "simple_java_67",
    "simple_java_68",
    "simple_java_78",
    "simple_java_83",
    "simple_java_85",
    "simple_java_86",
    "simple_java_89",
    "simple_java_90",
    "simple_java_91",
    "simple_javascript_43",
];
const BFCL_REJECTS_JS: [&str; 1] = ["simple_javascript_46"];

fn assert_only_quirks(failing: &[String]) {
    for f in failing {
        let known = QUIRKS.iter().chain(&BFCL_REJECTS_TOO).chain(&BFCL_REJECTS_JS);
        assert!(known.clone().any(|q| f.starts_with(&format!("{q} "))), "gold answer fails: {f}");
    }
}

#[test]
fn gold_answers_pass_on_the_committed_subset() {
    let (passed, checked, failing) = gold_run(&fc_common::subset_dir());
    assert!(checked > 80);
    assert_only_quirks(&failing);
    assert!(passed > checked * 9 / 10, "{passed}/{checked}");
}

#[test]
fn gold_answers_pass_on_the_full_data() {
    let Some(dir) = fc_common::full_dir() else {
        eprintln!("full BFCL data not found; skipped");
        return;
    };
    let (passed, checked, failing) = gold_run(&dir);
    eprintln!("gold: {passed}/{checked} pass; failing: {failing:?}");
    assert_only_quirks(&failing);
}
