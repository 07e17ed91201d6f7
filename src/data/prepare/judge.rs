//! Stage 1: the LLM judge (SPEC §5), iterative over up to K rounds. Each round asks, in order:
//! is the reference the right kind (call or statement); can the tools solve the query with
//! values from it; does the reasoning lead to the reference; are function and parameters
//! right; is the format right. A failed check with a correction (`<NewFC>[…]</NewFC>`) that
//! passes stage 2 replaces the reference and starts the next round; samples without
//! reasoning get one written by the judge first (FunReason).
//!
//! All samples advance together, one step per wave, so every wave is one batch for the
//! backend (N requests in flight over HTTP, one decode batch locally).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value as Json};

use super::ast::{self, check_calls};
use super::cache::{self, Cache};
use super::client::{Answer, Backend, Request};
use super::{report, Record, Reject, Rejection};
use crate::data::{answer_to_ground_truth, Sample};
use crate::fc::decode::{decode, AnswerFormat, Lang};

/// The judge's prompt templates (`{tools}`, `{query}`, `{reference}`, `{reasoning}`, `{note}`).
#[derive(Debug, Clone)]
pub struct Prompts {
    pub kind: String,
    pub solvable: String,
    pub reasoning: String,
    pub call: String,
    pub format: String,
    pub write_reasoning: String,
}

/// The shipped defaults, by file name.
const DEFAULTS: [(&str, &str); 6] = [
    ("kind.txt", include_str!("../../../prompts/judge/kind.txt")),
    ("solvable.txt", include_str!("../../../prompts/judge/solvable.txt")),
    ("reasoning.txt", include_str!("../../../prompts/judge/reasoning.txt")),
    ("call.txt", include_str!("../../../prompts/judge/call.txt")),
    ("format.txt", include_str!("../../../prompts/judge/format.txt")),
    ("write_reasoning.txt", include_str!("../../../prompts/judge/write_reasoning.txt")),
];

impl Prompts {
    /// The defaults, each replaced by the file of the same name in `dir` when there is one.
    pub fn load(dir: Option<&Path>) -> Result<Prompts> {
        if let Some(d) = dir.filter(|d| !d.is_dir()) {
            anyhow::bail!("--prompts {}: not a directory", d.display());
        }
        let mut got = Vec::new();
        for (name, default) in DEFAULTS {
            let p = dir.map(|d| d.join(name)).filter(|p| p.exists());
            got.push(match p {
                Some(p) => std::fs::read_to_string(&p)
                    .with_context(|| format!("--prompts: cannot read {}", p.display()))?,
                None => default.to_string(),
            });
        }
        let mut it = got.into_iter();
        let mut next = || it.next().expect("six prompts");
        Ok(Prompts {
            kind: next(),
            solvable: next(),
            reasoning: next(),
            call: next(),
            format: next(),
            write_reasoning: next(),
        })
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    /// K: most rounds per sample.
    pub rounds: u32,
    /// Re-asks after an unparseable answer (then `judge_unparsed`).
    pub retries: u32,
    /// Have the judge write missing reasoning (FunReason's refinement).
    pub write_reasoning: bool,
    pub prompts: Prompts,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            rounds: 3,
            retries: 2,
            write_reasoning: true,
            prompts: Prompts::load(None).expect("defaults"),
        }
    }
}

/// Counts for `summary.json`.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Stats {
    pub model: String,
    /// Requests sent to the backend by this run.
    pub requests: usize,
    /// Answers taken from the cache.
    pub cache_hits: usize,
    /// Answers that held no verdict (each re-asked or, at the end, `judge_unparsed`).
    pub unparsed: usize,
    /// Accepted samples whose reference the judge corrected.
    pub corrected: usize,
    /// Accepted samples whose reasoning the judge wrote.
    pub reasoning_written: usize,
    /// Accepted samples per round of acceptance (index 0: round 1).
    pub accepted_in_round: Vec<usize>,
}

/// The judge: a backend, the answer cache, the options.
pub struct Judge {
    pub backend: Box<dyn Backend>,
    pub cache: Cache,
    pub opts: Options,
}

/// What the judge decided.
#[derive(Debug, Default)]
pub struct Judged {
    pub accepted: Vec<Record>,
    pub rejected: Vec<Rejection>,
    pub stats: Stats,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Write,
    Kind,
    Solvable,
    Reasoning,
    Call,
    Format,
}

/// One sample on its way through the rounds.
struct Job {
    rec: Record,
    round: u32,
    step: Step,
    attempt: u32,
    /// A stage-2 failure the judge has to correct (`--stage all`).
    note: Option<Reject>,
    wrote: bool,
    corrected: bool,
    done: Option<Result<(), Reject>>,
}

/// A parsed verdict: pass or not, and a corrected call list if one was given.
#[derive(Debug, PartialEq)]
pub struct Verdict {
    pub ok: bool,
    pub new_fc: Option<String>,
}

fn re(pattern: &str) -> regex::Regex {
    regex::Regex::new(pattern).expect("valid regex")
}

/// The text after the judge's last `</think>` (its thoughts may quote the tags).
fn after_think(text: &str) -> &str {
    text.rfind("</think>").map(|i| &text[i + "</think>".len()..]).unwrap_or(text)
}

/// `<judge>True|False</judge>` (the last one), and `<NewFC>[…]</NewFC>`; None if no verdict.
pub fn parse_verdict(text: &str) -> Option<Verdict> {
    let tail = after_think(text);
    let v = re(r"(?i)<judge>\s*(true|false)\s*</judge>").captures_iter(tail).last()?;
    let ok = v[1].eq_ignore_ascii_case("true");
    let new_fc = re(r"(?is)<NewFC>(.*?)</NewFC>").captures(tail).map(|c| c[1].trim().to_string());
    Some(Verdict { ok, new_fc })
}

/// `<reasoning>…</reasoning>`, non-empty.
pub fn parse_reasoning(text: &str) -> Option<String> {
    let tail = after_think(text);
    let c = re(r"(?is)<reasoning>(.*?)</reasoning>").captures(tail)?;
    Some(c[1].trim().to_string()).filter(|r| !r.is_empty())
}

/// A corrected call list (`[f(a=1)]` in the category's language, or a JSON list of
/// `{name, arguments}`) in BFCL ground-truth shape. The call and format checks only run on
/// samples with a call, so a correction without one (`<NewFC></NewFC>`, `[]`) is no correction.
pub fn parse_correction(text: &str, s: &Sample) -> Result<Vec<Json>, Reject> {
    let calls = parse_calls(text, s)?;
    if calls.is_empty() {
        return Err(Reject::new("parse_error", format!("corrected call {text:?}: holds no call")));
    }
    Ok(calls)
}

fn parse_calls(text: &str, s: &Sample) -> Result<Vec<Json>, Reject> {
    let bad = |m: String| Reject::new("parse_error", format!("corrected call {text:?}: {m}"));
    let func = |n: &str| s.functions.iter().find(|f| f["name"] == n);
    if let Ok(Json::Array(list)) = serde_json::from_str::<Json>(text) {
        let mut out = Vec::new();
        for c in &list {
            let name = c["name"].as_str().ok_or_else(|| bad("a call without \"name\"".into()))?;
            let args = c["arguments"].as_object().cloned().unwrap_or_default();
            out.push(answer_to_ground_truth(name, &args, func(name)));
        }
        return Ok(out);
    }
    let calls = decode(text, Lang::of_category(&s.category), AnswerFormat::Python)
        .map_err(|e| bad(format!("{e:?}")))?;
    let mut out = Vec::new();
    for c in calls {
        let mut args = Map::new();
        for (k, v) in &c.args {
            let k = k.as_ref().ok_or_else(|| bad(format!("{}: a positional argument", c.name)))?;
            args.insert(k.clone(), v.to_json());
        }
        out.push(answer_to_ground_truth(&c.name, &args, func(&c.name)));
    }
    Ok(out)
}

/// The conversation as plain lines.
fn conversation(s: &Sample) -> String {
    s.messages.iter().map(|m| format!("{}: {}", m.role, m.content)).collect::<Vec<_>>().join("\n")
}

impl Job {
    fn new(rec: Record, note: Option<Reject>, opts: &Options) -> Job {
        let mut j = Job {
            rec,
            round: 1,
            step: Step::Kind,
            attempt: 0,
            note,
            wrote: false,
            corrected: false,
            done: None,
        };
        j.step = j.first_step(opts);
        j
    }

    fn no_call(&self) -> bool {
        self.rec.sample.ground_truth.is_empty()
    }

    fn first_step(&self, opts: &Options) -> Step {
        if opts.write_reasoning && self.rec.sample.reasoning.is_none() && !self.no_call() {
            Step::Write
        } else {
            Step::Kind
        }
    }

    fn prompt(&self, p: &Prompts) -> String {
        let s = &self.rec.sample;
        let template = match self.step {
            Step::Write => &p.write_reasoning,
            Step::Kind => &p.kind,
            Step::Solvable => &p.solvable,
            Step::Reasoning => &p.reasoning,
            Step::Call => &p.call,
            Step::Format => &p.format,
        };
        let reference = if self.no_call() {
            "(no call: a plain-text answer)".to_string()
        } else {
            crate::fc::prompt::render_calls(s)
        };
        let note = match &self.note {
            Some(n) => {
                format!("\nAn automatic schema check of the reference failed ({}): {}\n", n.reason, n.message)
            }
            None => String::new(),
        };
        let tools = serde_json::to_string_pretty(&s.functions).unwrap_or_default();
        template
            .replace("{tools}", &tools)
            .replace("{query}", &conversation(s))
            .replace("{reference}", &reference)
            .replace("{reasoning}", s.reasoning.as_deref().unwrap_or(""))
            .replace("{note}", &note)
    }

    fn request(&self, p: &Prompts) -> Request {
        // A re-ask of the same prompt must be able to differ: sample, with a seed per attempt.
        let temperature = if self.attempt == 0 { 0.0 } else { 0.7 };
        Request { prompt: self.prompt(p), temperature, seed: self.attempt as u64 }
    }

    fn next_step(&self) -> Option<Step> {
        match self.step {
            Step::Write => Some(Step::Kind),
            _ if self.no_call() => None,
            Step::Kind => Some(Step::Solvable),
            Step::Solvable if self.rec.sample.reasoning.is_some() => Some(Step::Reasoning),
            Step::Solvable | Step::Reasoning => Some(Step::Call),
            Step::Call => Some(Step::Format),
            Step::Format => None,
        }
    }

    /// A check failed in a way another round can fix; after the last round it is final.
    fn fail_round(&mut self, r: Reject, opts: &Options) {
        if self.round >= opts.rounds {
            self.done = Some(Err(r));
        } else {
            self.round += 1;
            self.step = self.first_step(opts);
        }
    }

    fn feed(&mut self, answer: &Answer, opts: &Options, stats: &mut Stats, ast_opts: &ast::Options) {
        let text = match answer {
            Ok(t) => t,
            Err(e) => return self.done = Some(Err(Reject::new("judge_error", e.clone()))),
        };
        if self.step == Step::Write {
            match parse_reasoning(text) {
                Some(r) => {
                    self.rec.sample.reasoning = Some(r);
                    self.wrote = true;
                    self.attempt = 0;
                    self.step = Step::Kind;
                }
                None => self.unparsed(text, opts, stats),
            }
            return;
        }
        let Some(v) = parse_verdict(text) else { return self.unparsed(text, opts, stats) };
        self.attempt = 0;
        self.verdict(v, opts, ast_opts);
    }

    fn unparsed(&mut self, text: &str, opts: &Options, stats: &mut Stats) {
        stats.unparsed += 1;
        self.attempt += 1;
        if self.attempt > opts.retries {
            let what = if self.step == Step::Write {
                "<reasoning>…</reasoning>"
            } else {
                "<judge>True|False</judge>"
            };
            let m = format!("no {what} in {} answers; the last: {:?}", opts.retries + 1, clip(text));
            self.done = Some(Err(Reject::new("judge_unparsed", m)));
        }
    }

    fn verdict(&mut self, v: Verdict, opts: &Options, ast_opts: &ast::Options) {
        let final_reject = |r: &'static str, m: &str| Some(Err(Reject::new(r, m)));
        match (self.step, v.ok) {
            (Step::Kind, false) => {
                self.done = final_reject("judge_kind", "the reference is the wrong kind (call vs statement)")
            }
            (Step::Solvable, false) => {
                self.done =
                    final_reject("judge_unsolvable", "the tools cannot solve the query with values from it")
            }
            (Step::Reasoning, false) => {
                let r = Reject::new("judge_reasoning", "the reasoning does not lead to the reference");
                if !opts.write_reasoning {
                    return self.done = Some(Err(r));
                }
                // The next round has the judge write a new one.
                self.rec.sample.reasoning = None;
                self.wrote = false;
                self.fail_round(r, opts);
            }
            (Step::Call | Step::Format, ok) if !ok || self.note.is_some() => self.correct(v, opts, ast_opts),
            _ => match self.next_step() {
                Some(s) => self.step = s,
                None => self.done = Some(Ok(())),
            },
        }
    }

    /// The judge found fault (or passed a reference stage 2 rejects): take its correction if
    /// it passes stage 2, else try another round.
    fn correct(&mut self, v: Verdict, opts: &Options, ast_opts: &ast::Options) {
        let reason = if self.step == Step::Call { "judge_call" } else { "judge_format" };
        let fail = match (&v.new_fc, v.ok) {
            (None, true) => self.note.clone().expect("a stage-2 note"),
            (None, false) => Reject::new(reason, "the judge found fault and proposed no correction"),
            (Some(fc), _) => match parse_correction(fc, &self.rec.sample)
                .and_then(|gt| check_calls(&self.rec.sample, &gt, ast_opts).map(|_| gt))
            {
                Ok(gt) => {
                    self.rec.sample.ground_truth = gt;
                    self.corrected = true;
                    self.note = None;
                    let r = Reject::new(reason, "corrected in the last round; no round left to verify it");
                    return self.fail_round(r, opts);
                }
                Err(e) => {
                    Reject::new(reason, format!("the correction fails stage 2 ({}): {}", e.reason, e.message))
                }
            },
        };
        self.fail_round(fail, opts);
    }
}

fn clip(s: &str) -> String {
    s.chars().take(200).collect()
}

impl Judge {
    /// Runs every candidate (with its stage-2 failure, if any) through the rounds.
    pub fn run(&self, candidates: Vec<(Record, Option<Reject>)>, ast_opts: &ast::Options) -> Result<Judged> {
        let mut jobs: Vec<Job> = candidates.into_iter().map(|(r, n)| Job::new(r, n, &self.opts)).collect();
        let mut stats = Stats { model: self.backend.model().to_string(), ..Default::default() };
        let mut wave = 0;
        loop {
            let open: Vec<usize> = (0..jobs.len()).filter(|&i| jobs[i].done.is_none()).collect();
            if open.is_empty() {
                break;
            }
            wave += 1;
            let answers = self.ask(&jobs, &open, wave, &mut stats)?;
            for (&i, a) in open.iter().zip(&answers) {
                jobs[i].feed(a, &self.opts, &mut stats, ast_opts);
            }
        }
        Ok(finish(jobs, stats))
    }

    /// One wave: the open jobs' requests, from the cache or the backend. Identical requests
    /// (exact duplicate samples) are asked once.
    fn ask(&self, jobs: &[Job], open: &[usize], wave: usize, stats: &mut Stats) -> Result<Vec<Answer>> {
        let model = self.backend.model();
        let mut unique: Vec<(String, u32, Request)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        let slot: Vec<usize> = open
            .iter()
            .map(|&i| {
                let j = &jobs[i];
                let r = j.request(&self.opts.prompts);
                let key = cache::key(&r.prompt, model, j.round, j.attempt);
                *index.entry(key.clone()).or_insert_with(|| {
                    unique.push((key, j.round, r));
                    unique.len() - 1
                })
            })
            .collect();
        let mut answers: Vec<Option<Answer>> =
            unique.iter().map(|(k, _, _)| self.cache.get(k).map(Ok)).collect();
        let missing: Vec<usize> = (0..unique.len()).filter(|&i| answers[i].is_none()).collect();
        stats.cache_hits += unique.len() - missing.len();
        stats.requests += missing.len();
        if !missing.is_empty() {
            let send: Vec<Request> = missing.iter().map(|&i| unique[i].2.clone()).collect();
            let got = self.send(&send, &missing, &unique, wave)?;
            for (m, a) in missing.into_iter().zip(got) {
                answers[m] = Some(a);
            }
        }
        Ok(slot.into_iter().map(|u| answers[u].clone().expect("answered")).collect())
    }

    /// Sends requests to the backend, caching each answer as it arrives.
    fn send(
        &self,
        send: &[Request],
        missing: &[usize],
        unique: &[(String, u32, Request)],
        wave: usize,
    ) -> Result<Vec<Answer>> {
        let model = self.backend.model();
        let bar = report::bar(send.len() as u64, &format!("judge wave {wave}"));
        let failed = std::sync::Mutex::new(None);
        let cache = &self.cache;
        let got = self.backend.complete(send, &|m, a| {
            bar.inc(1);
            // Only answers are cached: an error is asked again by a later run.
            if let Ok(text) = a {
                let (key, round, _) = &unique[missing[m]];
                if let Err(e) = cache.put(key, model, *round, text) {
                    failed.lock().expect("lock").get_or_insert(e);
                }
            }
        });
        bar.finish_and_clear();
        if let Some(e) = failed.into_inner().expect("lock") {
            return Err(e);
        }
        // A judge that answers nothing (down, unreachable, a wrong model name) says nothing about
        // the samples: stop rather than reject them all. What it did answer is cached.
        if let (false, Some(Err(first))) = (got.iter().any(Result::is_ok), got.first()) {
            bail!(
                "the judge answered none of {} requests (first error: {first}); no sample was judged \
                 in this wave. Fix the judge and rerun with --resume: answers so far are cached",
                got.len()
            );
        }
        Ok(got)
    }
}

fn finish(jobs: Vec<Job>, mut stats: Stats) -> Judged {
    let mut out = Judged::default();
    for j in jobs {
        match j.done.expect("every job finishes") {
            Ok(()) => {
                stats.corrected += j.corrected as usize;
                stats.reasoning_written += j.wrote as usize;
                let r = j.round as usize;
                if stats.accepted_in_round.len() < r {
                    stats.accepted_in_round.resize(r, 0);
                }
                stats.accepted_in_round[r - 1] += 1;
                out.accepted.push(j.rec);
            }
            Err(reject) => {
                // A stage-2 failure the judge did not fix keeps its stage-2 reason.
                let (stage, reject) = match j.note {
                    Some(n) if n.reason != reject.reason => {
                        let m = format!("{} (judge: {}: {})", n.message, reject.reason, reject.message);
                        ("ast", Reject::new(n.reason, m))
                    }
                    Some(n) => ("ast", n),
                    None => ("judge", reject),
                };
                out.rejected.push(Rejection::of(&j.rec, stage, j.round, reject));
            }
        }
    }
    out.stats = stats;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_parse_after_the_thoughts() {
        let v = parse_verdict("<think>maybe <judge>False</judge></think> <judge> true </judge>").unwrap();
        assert_eq!(v, Verdict { ok: true, new_fc: None });
        let v = parse_verdict("<think>x</think><judge>False</judge><NewFC>[f(a=1)]</NewFC>").unwrap();
        assert_eq!(v.new_fc.as_deref(), Some("[f(a=1)]"));
        assert!(parse_verdict("True").is_none());
        assert!(parse_verdict("<think><judge>True</judge></think>").is_none());
        assert_eq!(parse_reasoning("<reasoning> r </reasoning>").as_deref(), Some("r"));
        assert!(parse_reasoning("<reasoning> </reasoning>").is_none());
    }

    #[test]
    fn corrections_become_ground_truth() {
        let s = Sample {
            id: "x".into(),
            category: "simple_python".into(),
            messages: vec![],
            functions: vec![serde_json::json!({"name": "f", "parameters": {"type": "dict",
                "properties": {"a": {"type": "integer"}, "b": {"type": "string", "default": "z"}}, "required": ["a"]}})],
            ground_truth: vec![],
            reasoning: None,
        };
        let gt = parse_correction("[f(a=2)]", &s).unwrap();
        assert_eq!(gt, vec![serde_json::json!({"f": {"a": [2], "b": ["z", ""]}})]);
        let gt = parse_correction(r#"[{"name": "f", "arguments": {"a": 3}}]"#, &s).unwrap();
        assert_eq!(gt[0]["f"]["a"], serde_json::json!([3]));
        assert_eq!(parse_correction("[f(", &s).unwrap_err().reason, "parse_error");
        for empty in ["", " ", "[]", "[ ]"] {
            let e = parse_correction(empty, &s).unwrap_err();
            assert_eq!((e.reason, e.message.contains("holds no call")), ("parse_error", true), "{empty:?}");
        }
    }

    #[test]
    fn shipped_prompts_use_only_known_placeholders() {
        let p = Prompts::load(None).unwrap();
        let known = ["{tools}", "{query}", "{reference}", "{reasoning}", "{note}"];
        for t in [&p.kind, &p.solvable, &p.reasoning, &p.call, &p.format, &p.write_reasoning] {
            for m in re(r"\{[a-z_]+\}").find_iter(t) {
                assert!(known.contains(&m.as_str()), "{}", m.as_str());
            }
        }
    }
}
