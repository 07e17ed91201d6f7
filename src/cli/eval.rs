//! `fcgpu eval`: score model answers per BFCL category (BFCL's AST checker semantics).

use crate::data::{load_bfcl_category, Sample, BFCL_CATEGORIES};
use crate::fc::decode::AnswerFormat;
use crate::fc::score::score;
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// BFCL prompting mode: a Python call list (after any `<think>…</think>`).
    Python,
    /// Qwen JSON mode: `<tool_call>` blocks.
    Json,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// BFCL v4 data directory (falls back to $FCGPU_BFCL_DIR).
    #[arg(long)]
    pub bfcl_dir: Option<PathBuf>,
    /// A category name, or `all`.
    #[arg(long, default_value = "all")]
    pub category: String,
    /// JSON lines `{"id": .., "result": "<raw model text>"}`: a file, or (with `all`) a folder.
    #[arg(long)]
    pub results: PathBuf,
    #[arg(long, value_enum, default_value = "python")]
    pub format: Format,
    /// Write one line per entry: `{"id", "category", "valid", "error_type"}`.
    #[arg(long)]
    pub verdicts: Option<PathBuf>,
}

/// `--bfcl-dir`, or else `$FCGPU_BFCL_DIR`.
pub fn resolve_bfcl_dir(arg: Option<PathBuf>) -> Result<PathBuf> {
    match arg.or_else(|| std::env::var_os("FCGPU_BFCL_DIR").map(PathBuf::from)) {
        Some(p) => Ok(p),
        None => bail!("--bfcl-dir is required (or set FCGPU_BFCL_DIR)"),
    }
}

/// Reads result lines into id → text; a malformed line is an error naming file and line.
pub fn read_results(path: &Path, into: &mut HashMap<String, String>) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: invalid JSON", path.display(), i + 1))?;
        let id = v.get("id").and_then(|x| x.as_str());
        let Some(id) = id else {
            bail!("{}:{}: missing string field \"id\"", path.display(), i + 1)
        };
        // BFCL result files hold a string; anything else is kept as its JSON text.
        let result = match v.get("result") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => bail!("{}:{}: missing field \"result\"", path.display(), i + 1),
        };
        into.insert(id.to_string(), result);
    }
    Ok(())
}

fn load_results(path: &Path) -> Result<HashMap<String, String>> {
    let mut out = HashMap::new();
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        for f in files {
            read_results(&f, &mut out)?;
        }
    } else {
        read_results(path, &mut out)?;
    }
    Ok(out)
}

fn load_samples(dir: &Path, category: &str) -> Result<Vec<Sample>> {
    if category != "all" {
        return load_bfcl_category(dir, category);
    }
    let mut all = Vec::new();
    for c in BFCL_CATEGORIES {
        if dir.join(format!("BFCL_v4_{c}.json")).exists() {
            all.extend(load_bfcl_category(dir, c)?);
        }
    }
    Ok(all)
}

pub fn run(a: Args) -> Result<()> {
    let bfcl_dir = crate::cli::eval::resolve_bfcl_dir(a.bfcl_dir.clone())?;
    let samples = load_samples(&bfcl_dir, &a.category)?;
    let results = load_results(&a.results)?;
    let fmt = match a.format {
        Format::Python => AnswerFormat::Python,
        Format::Json => AnswerFormat::Json,
    };
    let report = score(&samples, &results, fmt);
    print!("{}", report.table());
    if let Some(p) = a.verdicts {
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(&p).with_context(|| format!("creating {}", p.display()))?,
        );
        for v in &report.verdicts {
            serde_json::to_writer(&mut f, v)?;
            f.write_all(b"\n")?;
        }
    }
    Ok(())
}
