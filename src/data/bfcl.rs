//! BFCL v4 files: `BFCL_v4_<category>.json` (one question per line) and
//! `possible_answer/BFCL_v4_<category>.json` (one ground truth per line), matched by id.

use super::{data_err, Message, Sample};
use anyhow::Result;
use serde_json::Value as Json;
use std::collections::HashMap;
use std::path::Path;

/// The single-turn categories fcgpu scores, in BFCL's table order.
pub const BFCL_CATEGORIES: [&str; 13] = [
    "simple_python",
    "simple_java",
    "simple_javascript",
    "multiple",
    "parallel",
    "parallel_multiple",
    "live_simple",
    "live_multiple",
    "live_parallel",
    "live_parallel_multiple",
    "irrelevance",
    "live_irrelevance",
    "live_relevance",
];

/// BFCL's `extract_test_category_from_id`: everything before the last underscore.
pub fn category_of_id(id: &str) -> String {
    let id = id.split(':').next().unwrap_or(id);
    match id.rfind('_') {
        Some(i) => id[..i].to_string(),
        None => id.to_string(),
    }
}

fn read_lines(path: &Path) -> Result<Vec<(usize, Json)>> {
    let text = crate::jsonl::read_text(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Json = serde_json::from_str(line).map_err(|e| data_err(path, i + 1, e))?;
        out.push((i + 1, v));
    }
    Ok(out)
}

fn parse_question(path: &Path, line: usize, v: &Json, cat: &str) -> Result<Sample> {
    parse_bfcl_question(v, cat).map_err(|m| data_err(path, line, m))
}

/// One BFCL question record (`id`, `question`, `function`) as a sample of category `cat`,
/// without its answer; the error says which field is wrong.
pub fn parse_bfcl_question(v: &Json, cat: &str) -> Result<Sample, String> {
    let id = v.get("id").and_then(Json::as_str).ok_or("missing string field \"id\"")?;
    let turns = v.get("question").and_then(Json::as_array).ok_or("missing array field \"question\"")?;
    let first = turns.first().and_then(Json::as_array).ok_or("\"question\" has no turn")?;
    let messages = first
        .iter()
        .map(|m| serde_json::from_value::<Message>(m.clone()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad message: {e}"))?;
    let functions =
        v.get("function").and_then(Json::as_array).cloned().ok_or("missing array field \"function\"")?;
    Ok(Sample {
        id: id.to_string(),
        category: cat.to_string(),
        messages,
        functions,
        ground_truth: vec![],
        reasoning: None,
    })
}

/// Loads one category; answers are attached when the answer file exists.
pub fn load_bfcl_category(dir: &Path, cat: &str) -> Result<Vec<Sample>> {
    let qpath = dir.join(format!("BFCL_v4_{cat}.json"));
    let mut samples = Vec::new();
    for (line, v) in read_lines(&qpath)? {
        samples.push(parse_question(&qpath, line, &v, cat)?);
    }
    let apath = dir.join("possible_answer").join(format!("BFCL_v4_{cat}.json"));
    if apath.exists() {
        let mut answers: HashMap<String, Vec<Json>> = HashMap::new();
        for (line, v) in read_lines(&apath)? {
            let id = v
                .get("id")
                .and_then(Json::as_str)
                .ok_or_else(|| data_err(&apath, line, "missing string field \"id\""))?;
            let gt = v
                .get("ground_truth")
                .and_then(Json::as_array)
                .ok_or_else(|| data_err(&apath, line, "missing array field \"ground_truth\""))?;
            answers.insert(id.to_string(), gt.clone());
        }
        for s in &mut samples {
            s.ground_truth = answers
                .remove(&s.id)
                .ok_or_else(|| anyhow::anyhow!("{}: no possible answer for id {}", apath.display(), s.id))?;
        }
    }
    Ok(samples)
}

/// Loads every category present in `dir` (in [`BFCL_CATEGORIES`] order).
pub fn load_bfcl_dir(dir: &Path) -> Result<Vec<Sample>> {
    let mut all = Vec::new();
    for cat in BFCL_CATEGORIES {
        if dir.join(format!("BFCL_v4_{cat}.json")).exists() {
            all.extend(load_bfcl_category(dir, cat)?);
        }
    }
    Ok(all)
}
