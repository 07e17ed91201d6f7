//! `fcgpu data prepare`: the two-stage data refinement of FunRL and FunReason (SPEC §5).
//! Input records ([`input`]) go through deterministic AST validation ([`ast`], stage 2) and an
//! iterative LLM judge ([`judge`], stage 1, backends in [`client`], answers cached in
//! [`cache`]); [`report`] writes `accepted.jsonl`, `rejected.jsonl` and `summary.json`.

pub mod ast;
pub mod cache;
pub mod client;
pub mod input;
pub mod judge;
pub mod report;

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Result;
use serde_json::{json, Value as Json};

use crate::data::Sample;

/// Which stages run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Stage 2 only: AST validation, no model.
    Ast,
    /// Stage 1 only: the LLM judge (its corrections are still AST-checked).
    Judge,
    /// Stage 2, then the judge; AST failures that a corrected call can fix go to the judge.
    All,
}

/// One input sample with where it came from.
#[derive(Debug, Clone)]
pub struct Record {
    pub file: String,
    pub line: usize,
    /// The record as read (for `rejected.jsonl`).
    pub raw: Json,
    pub sample: Sample,
}

/// Why a sample was dropped: a reason code (docs/data.md lists them) and a message.
#[derive(Debug, Clone, PartialEq)]
pub struct Reject {
    pub reason: &'static str,
    pub message: String,
}

impl Reject {
    pub fn new(reason: &'static str, message: impl Into<String>) -> Reject {
        Reject { reason, message: message.into() }
    }
}

/// One line of `rejected.jsonl`.
#[derive(Debug, Clone)]
pub struct Rejection {
    pub id: String,
    pub category: String,
    pub file: String,
    pub line: usize,
    /// `input`, `ast` or `judge`.
    pub stage: &'static str,
    /// The judge round (0 outside the judge).
    pub round: u32,
    pub reject: Reject,
    pub sample: Json,
}

impl Rejection {
    pub fn of(r: &Record, stage: &'static str, round: u32, reject: Reject) -> Rejection {
        Rejection {
            id: r.sample.id.clone(),
            category: r.sample.category.clone(),
            file: r.file.clone(),
            line: r.line,
            stage,
            round,
            reject,
            sample: r.raw.clone(),
        }
    }

    pub fn to_json(&self) -> Json {
        json!({"id": self.id, "category": self.category, "file": self.file, "line": self.line,
            "stage": self.stage, "round": self.round, "reason": self.reject.reason,
            "message": self.reject.message, "sample": self.sample})
    }
}

/// Everything `prepare` needs besides the judge backend.
#[derive(Debug, Clone)]
pub struct Config {
    pub input: PathBuf,
    pub format: input::Format,
    pub stage: Stage,
    pub ast: ast::Options,
    pub judge: judge::Options,
}

/// What a run produced, before it is written.
#[derive(Debug, Default)]
pub struct Outcome {
    pub accepted: Vec<Record>,
    pub rejected: Vec<Rejection>,
    pub judge: judge::Stats,
}

/// Stage 2 on every record: accepted ones, and the rejections. With `to_judge`, records whose
/// failure a corrected call could fix are kept, with the failure, for the judge.
fn stage_ast(
    records: Vec<Record>,
    opts: &ast::Options,
    to_judge: bool,
) -> (Vec<(Record, Option<Reject>)>, Vec<Rejection>) {
    let mut seen: HashMap<String, String> = HashMap::new();
    let (mut keep, mut rejected) = (Vec::new(), Vec::new());
    let bar = report::bar(records.len() as u64, "stage 2 (AST)");
    for r in records {
        bar.inc(1);
        let key = ast::duplicate_key(&r.sample);
        if let Some(first) = seen.get(&key) {
            let msg = format!("exact duplicate of {first}");
            rejected.push(Rejection::of(&r, "ast", 0, Reject::new("duplicate", msg)));
            continue;
        }
        seen.insert(key, format!("{} ({}:{})", r.sample.id, r.file, r.line));
        match ast::check(&r.sample, opts) {
            Ok(()) => keep.push((r, None)),
            Err(e) if to_judge && ast::correctable(e.reason) => keep.push((r, Some(e))),
            Err(e) => rejected.push(Rejection::of(&r, "ast", 0, e)),
        }
    }
    bar.finish_and_clear();
    (keep, rejected)
}

/// Samples are matched to model answers by id (`fcgpu eval`), so an id must be unique: a
/// later record with an id already seen is rejected, `duplicate` when it is an exact copy of
/// the first holder and `duplicate_id` otherwise, naming the first one's file and line.
fn unique_ids(records: Vec<Record>) -> (Vec<Record>, Vec<Rejection>) {
    let mut first: HashMap<String, (String, String)> = HashMap::new();
    let (mut keep, mut rejected) = (Vec::new(), Vec::new());
    for r in records {
        let key = ast::duplicate_key(&r.sample);
        let Some((where_, first_key)) = first.get(&r.sample.id) else {
            first.insert(r.sample.id.clone(), (format!("{}:{}", r.file, r.line), key));
            keep.push(r);
            continue;
        };
        let reject = if *first_key == key {
            Reject::new("duplicate", format!("exact duplicate of {} ({where_})", r.sample.id))
        } else {
            Reject::new("duplicate_id", format!("id {:?} is already the id of {where_}", r.sample.id))
        };
        rejected.push(Rejection::of(&r, "input", 0, reject));
    }
    (keep, rejected)
}

/// Runs the configured stages over the input. `backend` is needed unless the stage is `ast`.
pub fn prepare(cfg: &Config, backend: Option<&judge::Judge>) -> Result<Outcome> {
    let loaded = input::load(&cfg.input, cfg.format)?;
    let mut out = Outcome { rejected: loaded.rejected, ..Default::default() };
    let (records, rejected) = unique_ids(loaded.records);
    out.rejected.extend(rejected);
    let candidates: Vec<(Record, Option<Reject>)> = match cfg.stage {
        Stage::Judge => records.into_iter().map(|r| (r, None)).collect(),
        Stage::Ast | Stage::All => {
            let (keep, rejected) = stage_ast(records, &cfg.ast, cfg.stage == Stage::All);
            out.rejected.extend(rejected);
            keep
        }
    };
    if cfg.stage == Stage::Ast {
        out.accepted = candidates.into_iter().map(|(r, _)| r).collect();
        return Ok(in_input_order(out));
    }
    let Some(judge) = backend else { anyhow::bail!("stage {:?} needs a judge", cfg.stage) };
    let judged = judge.run(candidates, &cfg.ast)?;
    out.accepted = judged.accepted;
    out.rejected.extend(judged.rejected);
    out.judge = judged.stats;
    Ok(in_input_order(out))
}

/// Rejections sorted by file and line, as the input had them (stages reject in turn).
fn in_input_order(mut out: Outcome) -> Outcome {
    out.rejected.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
    out
}
