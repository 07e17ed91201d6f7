//! Shared helpers for the fc tests (included with `mod fc_common;`).
#![allow(dead_code)]

use std::path::PathBuf;

pub mod hostile;

/// The committed BFCL subset.
pub fn subset_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/bfcl/v4")
}

/// The full BFCL v4 data when this checkout sits next to it (skipped otherwise).
pub fn full_dir() -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    [root.join("../shared/bfcl/v4"), PathBuf::from("/work/shared/bfcl/v4")]
        .into_iter()
        .find(|p| p.join("BFCL_v4_simple_python.json").exists())
}

pub fn data_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/bfcl").join(name)
}

pub fn read_jsonl(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("valid JSON line"))
        .collect()
}
