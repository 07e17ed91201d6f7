//! JSON-lines files: every malformed line is reported with its file and line number.

use std::io::BufRead;
use std::path::Path;

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;

/// Parses every non-blank line of `path` as a `T`.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("{}:{}: cannot read line", path.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let v = serde_json::from_str(&line).with_context(|| format!("{}:{}: malformed line", path.display(), i + 1))?;
        out.push(v);
    }
    Ok(out)
}
