//! Reading the input of `data prepare`: xLAM JSONL (or the xLAM-60k JSON array), fcgpu JSONL,
//! and BFCL question files with their possible answers. A bad line is a rejection naming its
//! file and line (`malformed_line`, or `parse_error` when only the reference is bad), never
//! an error: one broken record must not cost the rest.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value as Json};

use super::{Record, Reject, Rejection};
use crate::data::{category_of_id, parse_fcgpu_line, parse_xlam_line, Sample, BFCL_CATEGORIES};

/// `--format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// A directory or a `BFCL_v4_<category>.json` file means BFCL; otherwise per line
    /// (`query` means xLAM, else fcgpu).
    Auto,
    Xlam,
    Bfcl,
    Fcgpu,
}

/// The records read, and the lines rejected on the way.
#[derive(Debug, Default)]
pub struct Loaded {
    pub records: Vec<Record>,
    pub rejected: Vec<Rejection>,
}

/// The input errors that can be told before anything is read or written: a device, FIFO or
/// socket (read without end, or blocking), and BFCL's answer files given for its questions.
pub fn check(path: &Path) -> Result<()> {
    if std::fs::metadata(path).is_ok_and(|m| !m.is_file() && !m.is_dir()) {
        bail!("--input {}: not a regular file or a directory", path.display());
    }
    let answers_dir = |p: &Path| p.file_name().is_some_and(|n| n == "possible_answer");
    if answers_dir(path) || path.parent().is_some_and(answers_dir) {
        bail!(
            "--input {}: these are BFCL's possible answers; pass the question files' directory (its parent)",
            path.display()
        );
    }
    Ok(())
}

/// Reads `path` in `format`. Only an unreadable input is an error.
pub fn load(path: &Path, format: Format) -> Result<Loaded> {
    check(path)?;
    if is_bfcl(path, format) {
        return load_bfcl(path);
    }
    if path.is_dir() {
        bail!("--input {}: a directory is read as BFCL data only (--format bfcl)", path.display());
    }
    let mut out = Loaded::default();
    for (line, item) in items(path)? {
        match item.and_then(|v| parse_jsonl_record(&v, format, &default_id(path, line)).map(|s| (v, s))) {
            Ok((raw, sample)) => {
                out.records.push(Record { file: path.display().to_string(), line, raw, sample })
            }
            Err((reject, raw)) => out.rejected.push(input_rejection(path, line, reject, raw)),
        }
    }
    Ok(out)
}

type Item = Result<Json, (Reject, Json)>;

/// The JSON items of a file with their line numbers: one per non-blank line, or, for a file
/// that is one JSON array (the xLAM-60k release), one per element (numbered from 1).
fn items(path: &Path) -> Result<Vec<(usize, Item)>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read --input {}", path.display()))?;
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        // One JSON array; a file that does not parse as one is read as lines (each bad line
        // then rejected on its own).
        if let Ok(Json::Array(arr)) = serde_json::from_slice::<Json>(&bytes) {
            return Ok(arr.into_iter().enumerate().map(|(i, v)| (i + 1, Ok(v))).collect());
        }
    }
    let mut out = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        out.push((i + 1, json_line(raw)));
    }
    Ok(out)
}

fn json_line(raw: &[u8]) -> Item {
    let text = String::from_utf8_lossy(raw);
    let Ok(s) = std::str::from_utf8(raw) else {
        return Err((Reject::new("malformed_line", "invalid UTF-8"), json!(text)));
    };
    serde_json::from_str(s)
        .map_err(|e| (Reject::new("malformed_line", format!("invalid JSON: {e}")), json!(text)))
}

fn default_id(path: &Path, line: usize) -> String {
    format!("{}_{line}", path.file_stem().and_then(|s| s.to_str()).unwrap_or("line"))
}

fn input_rejection(path: &Path, line: usize, reject: Reject, raw: Json) -> Rejection {
    let id = raw.get("id").map(|x| x.as_str().map(str::to_string).unwrap_or_else(|| x.to_string()));
    Rejection {
        id: id.unwrap_or_else(|| default_id(path, line)),
        category: String::new(),
        file: path.display().to_string(),
        line,
        stage: "input",
        round: 0,
        reject,
        sample: raw,
    }
}

/// One xLAM or fcgpu record as a sample.
fn parse_jsonl_record(v: &Json, format: Format, default_id: &str) -> Result<Sample, (Reject, Json)> {
    let bad = |reason, m: String| (Reject::new(reason, m), v.clone());
    if !v.is_object() {
        return Err(bad("malformed_line", "a record must be a JSON object".into()));
    }
    let xlam = match format {
        Format::Xlam => true,
        Format::Fcgpu => false,
        _ => v.get("query").is_some(),
    };
    if xlam {
        let fixed = xlam_answers(v).map_err(|m| bad("parse_error", m))?;
        parse_xlam_line(&fixed, default_id).map_err(|m| bad("malformed_line", m))
    } else {
        let calls = v.get("calls").or_else(|| v.get("ground_truth"));
        if let Some(c) = calls {
            super::ast::check_shape(c.as_array().map(Vec::as_slice).unwrap_or(std::slice::from_ref(c)))
                .map_err(|r| (r, v.clone()))?;
        }
        parse_fcgpu_line(v, default_id).map_err(|m| bad("malformed_line", m))
    }
}

/// The record with `answers` parsed into `[{name, arguments: {..}}]` (xLAM stores JSON text,
/// and some copies store `arguments` as JSON text too); an error says why the reference does
/// not parse.
fn xlam_answers(v: &Json) -> Result<Json, String> {
    let answers = match v.get("answers") {
        Some(Json::String(s)) => {
            serde_json::from_str(s).map_err(|e| format!("\"answers\" is not valid JSON: {e}"))?
        }
        Some(other) => other.clone(),
        None => return Err("missing field \"answers\"".into()),
    };
    let Json::Array(list) = answers else { return Err("\"answers\" must be a list".into()) };
    let mut fixed = Vec::new();
    for (i, a) in list.iter().enumerate() {
        let name =
            a.get("name").and_then(Json::as_str).ok_or(format!("answer {i} has no string \"name\""))?;
        let args = match a.get("arguments") {
            None | Some(Json::Null) => json!({}),
            Some(Json::String(s)) => serde_json::from_str(s)
                .map_err(|e| format!("answer {i} ({name}): \"arguments\" is not valid JSON: {e}"))?,
            Some(o) => o.clone(),
        };
        if !args.is_object() {
            return Err(format!("answer {i} ({name}): \"arguments\" must be an object"));
        }
        fixed.push(json!({"name": name, "arguments": args}));
    }
    let mut out = v.clone();
    out["answers"] = Json::Array(fixed);
    Ok(out)
}

/// The category of a `BFCL_v4_<category>.json` file name.
fn bfcl_category(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    let cat = name.strip_prefix("BFCL_v4_")?.strip_suffix(".json")?;
    Some(cat.to_string())
}

/// The BFCL question files of `path`: a directory's files of every known category, or the file.
fn bfcl_files(path: &Path) -> Result<Vec<PathBuf>> {
    let files: Vec<PathBuf> = if path.is_dir() {
        BFCL_CATEGORIES
            .iter()
            .map(|c| path.join(format!("BFCL_v4_{c}.json")))
            .filter(|p| p.exists())
            .collect()
    } else {
        vec![path.to_path_buf()]
    };
    if files.is_empty() {
        bail!("--input {}: no BFCL_v4_<category>.json file of any known category", path.display());
    }
    Ok(files)
}

/// The possible-answer file of a BFCL question file.
fn answers_path(qpath: &Path) -> PathBuf {
    qpath
        .parent()
        .unwrap_or(Path::new("."))
        .join("possible_answer")
        .join(qpath.file_name().unwrap_or_default())
}

fn is_bfcl(path: &Path, format: Format) -> bool {
    match format {
        Format::Bfcl => true,
        Format::Auto => path.is_dir() || bfcl_category(path).is_some(),
        _ => false,
    }
}

/// The sha256 of everything `load` reads for `path` (hex): the file, or each BFCL question
/// file and its answer file, each named and length-prefixed so no two inputs hash alike.
pub fn fingerprint(path: &Path, format: Format) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut files = vec![path.to_path_buf()];
    if is_bfcl(path, format) {
        files = bfcl_files(path)?
            .into_iter()
            .flat_map(|q| [answers_path(&q), q])
            .filter(|p| p.exists())
            .collect();
    }
    let mut h = Sha256::new();
    for f in files {
        let name = f.strip_prefix(path).unwrap_or(&f).to_string_lossy().into_owned();
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        let mut file =
            std::fs::File::open(&f).with_context(|| format!("cannot read --input {}", f.display()))?;
        h.update(file.metadata().map(|m| m.len()).unwrap_or(0).to_le_bytes());
        std::io::copy(&mut file, &mut h).with_context(|| format!("cannot read --input {}", f.display()))?;
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// BFCL: a directory (every known category in it) or one question file; answers come from
/// `possible_answer/` next to the questions.
fn load_bfcl(path: &Path) -> Result<Loaded> {
    let files = bfcl_files(path)?;
    let mut out = Loaded::default();
    for f in files {
        load_bfcl_file(&f, &mut out)?;
    }
    Ok(out)
}

fn load_bfcl_file(qpath: &Path, out: &mut Loaded) -> Result<()> {
    let apath = answers_path(qpath);
    let answers = if apath.exists() { Some(bfcl_answers(&apath, out)?) } else { None };
    let cat = bfcl_category(qpath);
    for (line, item) in items(qpath)? {
        let parsed = item.and_then(|v| {
            let cat = cat.clone().unwrap_or_else(|| category_of_id(v["id"].as_str().unwrap_or_default()));
            let s = crate::data::parse_bfcl_question(&v, &cat)
                .map_err(|m| (Reject::new("malformed_line", m), v.clone()))?;
            Ok((v, s))
        });
        let (mut raw, mut sample) = match parsed {
            Ok(x) => x,
            Err((reject, raw)) => {
                out.rejected.push(input_rejection(qpath, line, reject, raw));
                continue;
            }
        };
        let gt = answers.as_ref().map(|a| a.get(&sample.id).cloned());
        let record =
            |raw: Json, sample: Sample| Record { file: qpath.display().to_string(), line, raw, sample };
        match gt {
            Some(Some(gt)) => {
                raw["ground_truth"] = gt.clone();
                sample.ground_truth = gt.as_array().cloned().unwrap_or_else(|| vec![gt.clone()]);
                out.records.push(record(raw, sample));
            }
            Some(None) => {
                let msg = format!("no possible answer for id {} in {}", sample.id, apath.display());
                let r = record(raw, sample);
                out.rejected.push(Rejection::of(&r, "input", 0, Reject::new("parse_error", msg)));
            }
            // No answer file: irrelevance and relevance categories have none, by design.
            None if sample.expects_no_call() || sample.expects_any_call() => {
                out.records.push(record(raw, sample))
            }
            None => {
                let msg = format!("no possible-answer file {}", apath.display());
                let r = record(raw, sample);
                out.rejected.push(Rejection::of(&r, "input", 0, Reject::new("parse_error", msg)));
            }
        }
    }
    Ok(())
}

/// id → `ground_truth` of a possible-answer file; bad lines are rejected.
fn bfcl_answers(apath: &Path, out: &mut Loaded) -> Result<HashMap<String, Json>> {
    let mut map = HashMap::new();
    for (line, item) in items(apath)? {
        let got = item.and_then(|v| match (v.get("id").and_then(Json::as_str), v.get("ground_truth")) {
            (Some(id), Some(gt)) => Ok((id.to_string(), gt.clone())),
            _ => Err((Reject::new("malformed_line", "needs string \"id\" and \"ground_truth\""), v.clone())),
        });
        match got {
            Ok((id, gt)) => {
                map.insert(id, gt);
            }
            Err((reject, raw)) => out.rejected.push(input_rejection(apath, line, reject, raw)),
        }
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file that opens with `[` but is not one JSON array is read line by line: every bad line
    /// is rejected with its number, never a fatal error.
    #[test]
    fn a_broken_array_file_is_read_as_lines() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.jsonl");
        let good = r#"{"query": "Weather in Paris", "tools": [{"name": "w", "parameters": {"city": {"type": "str"}}}], "answers": [{"name": "w", "arguments": {"city": "Paris"}}]}"#;
        std::fs::write(&p, format!("{}\n[1, 2\n{good}\n", "[".repeat(10_000))).unwrap();
        let l = load(&p, Format::Auto).unwrap();
        assert_eq!(l.records.len(), 1);
        assert_eq!(l.rejected.iter().map(|r| r.line).collect::<Vec<_>>(), vec![1, 2]);
        assert!(l.rejected.iter().all(|r| r.reject.reason == "malformed_line"));
    }
}
