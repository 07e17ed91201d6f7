//! The outputs of `data prepare`: `accepted.jsonl` (fcgpu JSONL, ready for `sft` and
//! `train`), `rejected.jsonl`, `summary.json`, and the table of counts printed at the end.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::Path;

use anyhow::Result;
use serde_json::{json, Value as Json};

use super::{Config, Outcome};

pub const ACCEPTED: &str = "accepted.jsonl";
pub const REJECTED: &str = "rejected.jsonl";
pub const SUMMARY: &str = "summary.json";
/// What the run in a directory was made from: written before any work, checked by `--resume`.
pub const RUN: &str = "run.json";

/// The input's hash and the options that decide the outputs, as recorded in [`RUN`].
pub fn run_record(cfg: &Config, input_sha256: &str) -> Json {
    json!({"input": cfg.input.display().to_string(), "input_sha256": input_sha256,
        "format": cfg.format, "stage": cfg.stage, "grounding": cfg.ast.grounding})
}

/// What differs between the run recorded in `old` and this one (`new`), one phrase per field;
/// empty when `--resume` may continue it.
pub fn run_differences(old: &Json, new: &Json) -> Vec<String> {
    let mut out = Vec::new();
    if old["input_sha256"] != new["input_sha256"] {
        out.push(format!(
            "the input differs (sha256 {} of {}; the earlier run read {} of {})",
            short(&new["input_sha256"]),
            new["input"].as_str().unwrap_or("?"),
            short(&old["input_sha256"]),
            old["input"].as_str().unwrap_or("?")
        ));
    }
    for (field, flag) in [("format", "--format"), ("stage", "--stage"), ("grounding", "--grounding")] {
        if old[field] != new[field] {
            let show = |v: &Json| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
            out.push(format!("{flag} {} (the earlier run: {})", show(&new[field]), show(&old[field])));
        }
    }
    out
}

fn short(v: &Json) -> String {
    v.as_str().map(|s| s.chars().take(12).collect()).unwrap_or_else(|| "(none)".into())
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn bar(total: u64, what: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(total);
    let style = indicatif::ProgressStyle::with_template(
        "{msg} [{elapsed_precise}] {bar:30} {pos}/{len} ({per_sec}, eta {eta})",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    b.set_style(style);
    b.set_message(what.to_string());
    b
}

/// One accepted sample as an fcgpu JSONL line.
pub fn sample_line(s: &crate::data::Sample) -> Json {
    let mut v = json!({"id": s.id, "category": s.category, "messages": s.messages, "tools": s.functions,
        "calls": s.ground_truth});
    if let Some(r) = &s.reasoning {
        v["reasoning"] = json!(r);
    }
    v
}

fn jsonl(lines: impl Iterator<Item = Json>) -> Vec<u8> {
    let mut out = Vec::new();
    for l in lines {
        out.extend_from_slice(l.to_string().as_bytes());
        out.push(b'\n');
    }
    out
}

/// Counts per reason and per category.
pub fn summary(cfg: &Config, out: &Outcome) -> Json {
    let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
    let mut cats: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for r in &out.rejected {
        *reasons.entry(r.reject.reason).or_default() += 1;
        let cat = if r.category.is_empty() { "(unparsed)".to_string() } else { r.category.clone() };
        cats.entry(cat).or_default().1 += 1;
    }
    for a in &out.accepted {
        cats.entry(a.sample.category.clone()).or_default().0 += 1;
    }
    let categories: serde_json::Map<String, Json> =
        cats.into_iter().map(|(c, (a, r))| (c, json!({"accepted": a, "rejected": r}))).collect();
    let mut s = json!({
        "input": cfg.input.display().to_string(), "format": cfg.format, "stage": cfg.stage,
        "grounding": cfg.ast.grounding,
        "total": out.accepted.len() + out.rejected.len(), "accepted": out.accepted.len(),
        "rejected": out.rejected.len(), "reasons": reasons, "categories": categories,
    });
    if cfg.stage != super::Stage::Ast {
        s["judge"] = json!(out.judge);
        s["rounds"] = json!(cfg.judge.rounds);
    }
    s
}

/// Writes the three outputs into `dir`, each atomically.
pub fn write(dir: &Path, summary: &Json, out: &Outcome) -> Result<()> {
    let acc = jsonl(out.accepted.iter().map(|r| sample_line(&r.sample)));
    crate::runfs::write_atomic(&dir.join(ACCEPTED), &acc)?;
    crate::runfs::write_atomic(&dir.join(REJECTED), &jsonl(out.rejected.iter().map(|r| r.to_json())))?;
    let mut s = serde_json::to_vec_pretty(summary)?;
    s.push(b'\n');
    crate::runfs::write_atomic(&dir.join(SUMMARY), &s)
}

/// The printed table: totals, then reasons, then categories.
pub fn table(summary: &Json) -> String {
    let n = |v: &Json| v.as_u64().unwrap_or(0);
    let mut t = format!(
        "{} samples: {} accepted, {} rejected\n\n{:<24} {:>8}\n",
        n(&summary["total"]),
        n(&summary["accepted"]),
        n(&summary["rejected"]),
        "reason",
        "count"
    );
    for (k, v) in summary["reasons"].as_object().into_iter().flatten() {
        t.push_str(&format!("{k:<24} {:>8}\n", n(v)));
    }
    t.push_str(&format!("\n{:<26} {:>8} {:>8}\n", "category", "accepted", "rejected"));
    for (k, v) in summary["categories"].as_object().into_iter().flatten() {
        t.push_str(&format!("{k:<26} {:>8} {:>8}\n", n(&v["accepted"]), n(&v["rejected"])));
    }
    if let Some(j) = summary.get("judge") {
        t.push_str(&format!(
            "\njudge {}: {} requests, {} from the cache, {} unparsed answers, {} corrected, {} reasoning written\n",
            j["model"].as_str().unwrap_or(""),
            n(&j["requests"]),
            n(&j["cache_hits"]),
            n(&j["unparsed"]),
            n(&j["corrected"]),
            n(&j["reasoning_written"])
        ));
    }
    t
}
