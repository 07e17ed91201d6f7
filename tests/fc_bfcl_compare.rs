//! fcgpu's verdicts against BFCL's own checker (bfcl-eval 2026.3.23) on perturbed answers.
//! `tests/data/bfcl/cases.jsonl` was written by `tools/bfcl_compare.py`; every verdict must
//! match. Set FCGPU_BFCL_CASES to a larger file from the same tool (over the full data) to
//! measure the agreement rate there.

mod fc_common;

use fcgpu::data::{load_bfcl_dir, Sample};
use fcgpu::fc::{check_answer, strip_reasoning, AnswerFormat};
use std::collections::HashMap;
use std::path::Path;

struct Outcome {
    total: usize,
    agree: usize,
    mismatches: Vec<String>,
}

fn replay(cases: &Path, data: &Path) -> Outcome {
    let samples: HashMap<String, Sample> =
        load_bfcl_dir(data).expect("BFCL data").into_iter().map(|s| (s.id.clone(), s)).collect();
    let mut out = Outcome { total: 0, agree: 0, mismatches: vec![] };
    for c in fc_common::read_jsonl(cases) {
        let id = c["id"].as_str().unwrap();
        let Some(sample) = samples.get(id) else {
            continue;
        };
        let fmt = if c["format"] == "json" { AnswerFormat::Json } else { AnswerFormat::Python };
        let result = c["result"].as_str().unwrap();
        let v = check_answer(sample, strip_reasoning(result), fmt);
        let want_valid = c["valid"].as_bool().unwrap();
        let want_type = c["error_type"].as_str().unwrap();
        out.total += 1;
        if v.valid == want_valid && v.error_type == want_type {
            out.agree += 1;
        } else if out.mismatches.len() < 40 || std::env::var_os("FCGPU_BFCL_ALL_MISMATCHES").is_some() {
            out.mismatches.push(format!(
                "{id} [{}] {:?}: fcgpu {} {:?} vs BFCL {} {:?}",
                c["format"], result, v.valid, v.error_type, want_valid, want_type
            ));
        }
    }
    out
}

#[test]
fn committed_cases_match_bfcl_exactly() {
    let o = replay(&fc_common::data_file("cases.jsonl"), &fc_common::subset_dir());
    assert!(o.total > 1000, "only {} cases", o.total);
    assert!(
        o.mismatches.is_empty(),
        "{} of {} differ:\n{}",
        o.total - o.agree,
        o.total,
        o.mismatches.join("\n")
    );
}

/// Answers Python reads differently from a naive parser: identifiers that NFKC normalisation
/// makes valid (`ｍath.hypot`), `\N{...}` escapes, and JSON mode's `NaN`, `1e999`, long
/// integers and lone surrogates (`tools/bfcl_compare.py --unicode`, and hand-written ones).
#[test]
fn unicode_and_json_number_cases_match_bfcl_exactly() {
    let o = replay(&fc_common::data_file("cases_unicode.jsonl"), &fc_common::subset_dir());
    assert!(o.total > 300, "only {} cases", o.total);
    assert!(
        o.mismatches.is_empty(),
        "{} of {} differ:\n{}",
        o.total - o.agree,
        o.total,
        o.mismatches.join("\n")
    );
}

#[test]
fn full_cases_agree_at_least_999_per_mille() {
    let (Ok(cases), Some(dir)) = (std::env::var("FCGPU_BFCL_CASES"), fc_common::full_dir()) else {
        eprintln!("FCGPU_BFCL_CASES or the full BFCL data not available; skipped");
        return;
    };
    let o = replay(Path::new(&cases), &dir);
    let rate = o.agree as f64 / o.total.max(1) as f64;
    eprintln!("agreement {}/{} = {:.4}%", o.agree, o.total, 100.0 * rate);
    for m in &o.mismatches {
        eprintln!("{m}");
    }
    assert!(rate >= 0.999, "agreement {rate}");
}
