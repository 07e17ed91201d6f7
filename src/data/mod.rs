//! Datasets: BFCL v4 single-turn entries with their possible answers, xLAM-style JSONL and
//! fcgpu's own JSONL, all loaded into one [`Sample`] type. A malformed line is an error that
//! names the file and the line.

mod bfcl;
mod jsonl;
pub mod prepare;
pub mod synth;

pub use bfcl::{category_of_id, load_bfcl_category, load_bfcl_dir, parse_bfcl_question, BFCL_CATEGORIES};
pub use jsonl::{
    answer_to_ground_truth, load_jsonl, load_jsonl_unique_ids, parse_fcgpu_line, parse_xlam_line,
};

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// One function-calling example, whatever file it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub id: String,
    /// A BFCL category name (`simple_python`, `parallel`, `live_irrelevance`, ...); it picks
    /// the checker, the language and the prompt hint.
    pub category: String,
    pub messages: Vec<Message>,
    /// Function docs in BFCL's shape (`{name, description, parameters: {type, properties, required}}`).
    pub functions: Vec<Json>,
    /// Expected calls in BFCL ground-truth shape: `[{name: {param: [allowed values]}}]`;
    /// empty for irrelevance/relevance samples.
    pub ground_truth: Vec<Json>,
    /// Optional reference reasoning (for SFT targets).
    pub reasoning: Option<String>,
}

impl Sample {
    /// The model must not call anything (BFCL irrelevance categories).
    pub fn expects_no_call(&self) -> bool {
        self.category.contains("irrelevance")
    }

    /// Any call counts as correct (BFCL live_relevance).
    pub fn expects_any_call(&self) -> bool {
        self.category.contains("relevance") && !self.category.contains("irrelevance")
    }
}

/// A data error with its location, e.g. `data.jsonl:12: missing field "tools"`.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {msg}")]
pub struct DataError {
    pub file: String,
    pub line: usize,
    pub msg: String,
}

pub(crate) fn data_err(file: &std::path::Path, line: usize, msg: impl std::fmt::Display) -> anyhow::Error {
    DataError { file: file.display().to_string(), line, msg: msg.to_string() }.into()
}

/// A category for a sample from its expected calls (for formats that do not name one).
pub fn infer_category(n_functions: usize, calls: &[Json]) -> String {
    let names: Vec<&str> = calls
        .iter()
        .filter_map(|c| c.as_object().and_then(|o| o.keys().next()).map(String::as_str))
        .collect();
    match names.len() {
        0 => "irrelevance".into(),
        1 if n_functions <= 1 => "simple_python".into(),
        1 => "multiple".into(),
        _ if n_functions <= 1 => "parallel".into(),
        _ => "parallel_multiple".into(),
    }
}
