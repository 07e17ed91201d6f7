//! `fcgpu data prepare` end to end: stage 2 on xLAM and BFCL files, and the judge against a
//! real `fcgpu serve` on loopback (rounds, caching, resume after SIGKILL) and against a
//! scripted loopback judge (corrections over rounds, written reasoning, 5xx retries, 4xx).

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod serve_common;
use serve_common::Server;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn xlam() -> PathBuf {
    root().join("tests/data/prepare/xlam_small.jsonl")
}

fn prepare(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fcgpu")).args(["data", "prepare"]).args(args).output().unwrap()
}

fn ok(o: &Output) -> String {
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "failed: {out}\n{err}");
    out.into_owned()
}

fn lines(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn summary(out: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap()
}

/// line → reason of rejected.jsonl.
fn reasons_by_line(out: &Path) -> BTreeMap<u64, String> {
    lines(&out.join("rejected.jsonl"))
        .iter()
        .map(|r| (r["line"].as_u64().unwrap(), r["reason"].as_str().unwrap().to_string()))
        .collect()
}

#[test]
fn ast_stage_on_xlam_writes_the_three_outputs() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let o = out.to_str().unwrap();
    let table = ok(&prepare(&["--input", xlam().to_str().unwrap(), "--out", o]));
    let acc = lines(&out.join("accepted.jsonl"));
    let ids: Vec<&str> = acc.iter().map(|a| a["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["1", "2", "3", "13"]);
    let expected: BTreeMap<u64, String> = [
        (4, "unknown_function"),
        (5, "unknown_parameter"),
        (6, "type_mismatch"),
        (7, "malformed_line"),
        (8, "parse_error"),
        (9, "duplicate"),
        (10, "empty_query"),
        (11, "missing_required"),
        (12, "enum_violation"),
    ]
    .into_iter()
    .map(|(l, r)| (l, r.to_string()))
    .collect();
    assert_eq!(reasons_by_line(&out), expected);
    for r in lines(&out.join("rejected.jsonl")) {
        for k in ["id", "line", "stage", "round", "reason", "message", "sample"] {
            assert!(r.get(k).is_some(), "{k} missing in {r}");
        }
    }
    let s = summary(&out);
    assert_eq!((s["total"].as_u64(), s["accepted"].as_u64()), (Some(13), Some(4)));
    assert_eq!(s["reasons"]["duplicate"], 1);
    assert!(table.contains("enum_violation") && table.contains("parallel"), "{table}");

    // Nothing is overwritten without --force; --grounding adds `ungrounded_value`.
    let again = prepare(&["--input", xlam().to_str().unwrap(), "--out", o, "--grounding"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    ok(&prepare(&["--input", xlam().to_str().unwrap(), "--out", o, "--grounding", "--force"]));
    assert_eq!(reasons_by_line(&out)[&13], "ungrounded_value");

    // accepted.jsonl trains with `fcgpu sft` as it is.
    let run = d.path().join("sft");
    let model = root().join("assets/fc-tiny");
    let o = Command::new(env!("CARGO_BIN_EXE_fcgpu"))
        .args(["sft", "--model", model.to_str().unwrap(), "--data"])
        .arg(out.join("accepted.jsonl"))
        .args(["--run-dir", run.to_str().unwrap(), "--steps", "2", "--batch-size", "2", "--grad-accum", "1"])
        .args(["--eval-samples", "0", "--device", "cpu"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("sft: 2 steps"));
}

#[test]
fn judge_local_runs_the_model_in_process() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let model = root().join("assets/fc-tiny");
    ok(&prepare(&[
        "--input",
        xlam().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--stage",
        "all",
        "--judge-local",
        model.to_str().unwrap(),
        "--device",
        "cpu",
        "--judge-max-tokens",
        "3",
        "--judge-retries",
        "0",
    ]));
    let s = summary(&out);
    assert_eq!(s["judge"]["model"], "local:fc-tiny");
    // Lines 1, 2, 3 and 13 pass stage 2 and reach the judge, whose 3 tokens hold no verdict.
    assert_eq!(s["reasons"]["judge_unparsed"], 4, "{s}");
    // Stage-2 failures sent for correction keep their reason when none comes.
    assert_eq!(s["reasons"]["enum_violation"], 1, "{s}");
    assert_eq!(s["judge"]["requests"], 9, "{s}");
}

#[test]
fn ast_stage_on_bfcl_files() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let q = root().join("tests/data/bfcl/v4/BFCL_v4_live_parallel.json");
    ok(&prepare(&["--input", q.to_str().unwrap(), "--out", out.to_str().unwrap()]));
    let s = summary(&out);
    let n = std::fs::read_to_string(&q).unwrap().lines().count() as u64;
    assert_eq!(s["total"].as_u64(), Some(n));
    assert!(s["accepted"].as_u64().unwrap() > 0, "{s}");
    let acc = lines(&out.join("accepted.jsonl"));
    assert!(acc.iter().all(|a| a["category"] == "live_parallel" && a["calls"].is_array()));
    // The accepted file loads as fcgpu JSONL, ids kept.
    let loaded = fcgpu::data::load_jsonl(&out.join("accepted.jsonl")).unwrap();
    assert_eq!(loaded.len(), acc.len());
    assert!(loaded[0].id.starts_with("live_parallel_"));
    // A whole directory: every category; irrelevance ones have no answer file, by design.
    let out2 = d.path().join("all");
    ok(&prepare(&[
        "--input",
        root().join("tests/data/bfcl/v4").to_str().unwrap(),
        "--out",
        out2.to_str().unwrap(),
    ]));
    let s = summary(&out2);
    assert_eq!(s["categories"].as_object().unwrap().len(), 13, "{s}");
    assert!(s["categories"]["irrelevance"]["accepted"].as_u64().unwrap() > 0, "{s}");
    // The test data's edge cases include gold answers outside their schema's enums.
    assert!(s["reasons"]["enum_violation"].as_u64().unwrap() > 0, "{s}");
    let rejected = lines(&out2.join("rejected.jsonl"));
    assert!(rejected.iter().all(|r| r["stage"] == "ast" && r["sample"]["ground_truth"].is_array()));
    // The answer files given as the input: a clear error, nothing written.
    let answers = root().join("tests/data/bfcl/v4/possible_answer");
    for input in [answers.clone(), answers.join("BFCL_v4_parallel.json")] {
        let out3 = d.path().join("answers");
        let o = prepare(&["--input", input.to_str().unwrap(), "--out", out3.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains("possible answers"), "{err}");
        assert!(!out3.exists());
    }
}

fn judge_args<'a>(url: &'a str, out: &'a str, model: &'a str) -> Vec<&'a str> {
    vec![
        "--input",
        "",
        "--out",
        out,
        "--stage",
        "judge",
        "--judge-url",
        url,
        "--judge-model",
        model,
        "--judge-max-tokens",
        "3",
        "--judge-retries",
        "1",
        "--rounds",
        "2",
        "--concurrency",
        "2",
    ]
}

fn cache_keys(out: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(out.join("judge_cache.jsonl")).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| v["key"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn judge_against_fcgpu_serve_caches_and_resumes_after_sigkill() {
    let serve = Server::start(&root().join("assets/fc-tiny"), &[]);
    let url = serve.url();
    let d = tempfile::tempdir().unwrap();
    let input = xlam();
    let out = d.path().join("out");
    let o = out.to_str().unwrap();
    let mut args = judge_args(&url, o, "fc-tiny");
    args[1] = input.to_str().unwrap();

    // Killed mid-run, as soon as some answers are cached.
    let mut kill_args = args.clone();
    *kill_args.last_mut().unwrap() = "1";
    let mut child = Command::new(env!("CARGO_BIN_EXE_fcgpu"))
        .args(["data", "prepare"])
        .args(&kill_args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while cache_keys(&out).len() < 3 && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
    let before = cache_keys(&out).len();
    assert!(before >= 3, "no answers cached before the kill");
    assert!(!out.join("summary.json").exists());

    // Without --resume the earlier run's cache is protected.
    assert!(!prepare(&args).status.success());
    args.push("--resume");
    ok(&prepare(&args));
    let s = summary(&out);
    let keys = cache_keys(&out);
    let unique: HashSet<&String> = keys.iter().collect();
    assert_eq!(unique.len(), keys.len(), "an answer was asked for twice");
    let j = &s["judge"];
    assert_eq!(j["cache_hits"].as_u64().unwrap() as usize, before, "{s}");
    assert_eq!(j["requests"].as_u64().unwrap() as usize + before, keys.len(), "{s}");
    // A 3-token answer from a random tiny model holds no verdict: re-asked once, then rejected.
    let rejected = lines(&out.join("rejected.jsonl"));
    let unparsed = rejected.iter().filter(|r| r["reason"] == "judge_unparsed").count();
    // 11 parseable records; line 9 repeats line 1 (id included): rejected before the judge.
    assert_eq!(unparsed, 10, "{s}");
    assert_eq!(s["reasons"]["duplicate"], 1, "{s}");
    assert_eq!(keys.len(), 20, "two answers per distinct sample");
    assert!(rejected
        .iter()
        .any(|r| r["reason"] == "judge_unparsed" && r["stage"] == "judge" && r["round"] == 1));

    // Again: everything from the cache, same outputs.
    let first = std::fs::read(out.join("rejected.jsonl")).unwrap();
    ok(&prepare(&args));
    let s = summary(&out);
    assert_eq!((s["judge"]["requests"].as_u64(), s["judge"]["cache_hits"].as_u64()), (Some(0), Some(20)));
    assert_eq!(std::fs::read(out.join("rejected.jsonl")).unwrap(), first);

    // A model the server does not serve: a 4xx, not retried; a judge that answers nothing stops
    // the run with the reason instead of rejecting every sample, and writes no outputs.
    let out2 = d.path().join("out2");
    let mut args = judge_args(&url, out2.to_str().unwrap(), "no-such-model");
    args[1] = input.to_str().unwrap();
    let t = Instant::now();
    let o = prepare(&args);
    assert!(t.elapsed() < Duration::from_secs(20));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("answered none") && err.contains("HTTP 404"), "{err}");
    assert!(!out2.join("accepted.jsonl").exists() && !out2.join("rejected.jsonl").exists());
    // Nothing listening: the same, after the retries.
    let dead = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let out3 = d.path().join("out3");
    let url3 = format!("http://{dead}/v1");
    let mut args = judge_args(&url3, out3.to_str().unwrap(), "fc-tiny");
    args[1] = input.to_str().unwrap();
    args.extend(["--http-retries", "1"]);
    let o = prepare(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("answered none"), "{err}");
}

/// A scripted judge on loopback: answers by the check each prompt asks for. The call check
/// fails with a correction in round 1 and passes after it; the first request gets a 500.
fn scripted_judge() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    scripted_judge_with(judge_text)
}

/// A loopback judge answering each prompt with `script(prompt)` (the first request gets a 500).
fn scripted_judge_with(
    script: fn(&str) -> String,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = count.clone();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(s) = s else { continue };
            let n = c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::thread::spawn(move || answer(s, n, script));
        }
    });
    (format!("http://{addr}/v1"), count)
}

fn answer(mut s: std::net::TcpStream, n: usize, script: fn(&str) -> String) {
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut len = 0;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).unwrap();
    let req: Value = serde_json::from_slice(&body).unwrap();
    let prompt = req["messages"][0]["content"].as_str().unwrap().to_string();
    let (status, text) = if n == 0 { (500, "overloaded".to_string()) } else { (200, script(&prompt)) };
    let body = if status == 200 {
        json!({"choices": [{"message": {"role": "assistant", "content": text}}]}).to_string()
    } else {
        text
    };
    let _ = write!(s, "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
}

fn judge_text(prompt: &str) -> String {
    let v = |b: bool| format!("<think>checked</think><judge>{}</judge>", if b { "True" } else { "False" });
    if prompt.starts_with("### Judge task: write the reasoning") {
        return "<reasoning>The user wants the weather; get_weather fits.</reasoning>".into();
    }
    if prompt.starts_with("### Judge check: function and parameters") {
        // Barcelona is wrong for a question about Madrid: correct it once.
        if prompt.contains("city='Barcelona'") {
            return format!("{}<NewFC>[get_weather(city='Madrid')]</NewFC>", v(false));
        }
        // Line 6's days='five' is a stage-2 failure: a correction that still fails stage 2.
        if prompt.contains("Kyiv") {
            return format!("{}<NewFC>[get_weather(city='Kyiv', days='five')]</NewFC>", v(false));
        }
        return v(true);
    }
    if prompt.starts_with("### Judge check: solvable") {
        return v(!prompt.contains("giveaways"));
    }
    v(true)
}

#[test]
fn scripted_judge_corrects_over_rounds_and_writes_reasoning() {
    let (url, count) = scripted_judge();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let input = xlam();
    let mut args = judge_args(&url, out.to_str().unwrap(), "scripted");
    args[1] = input.to_str().unwrap();
    args[5] = "all";
    let i = args.iter().position(|a| *a == "--rounds").unwrap();
    args[i + 1] = "3";
    ok(&prepare(&args));
    let acc = lines(&out.join("accepted.jsonl"));
    let by_id: BTreeMap<&str, &Value> = acc.iter().map(|a| (a["id"].as_str().unwrap(), a)).collect();
    // Corrected in round 1, verified in round 2.
    let madrid = by_id["13"];
    assert_eq!(madrid["calls"][0]["get_weather"]["city"], json!(["Madrid"]), "{madrid}");
    assert!(madrid["reasoning"].as_str().unwrap().contains("get_weather"));
    assert!(by_id.contains_key("2") && by_id.contains_key("3"));
    let rej = lines(&out.join("rejected.jsonl"));
    let find = |line: u64| rej.iter().find(|r| r["line"] == line).unwrap();
    assert_eq!(find(1)["reason"], "judge_unsolvable");
    // The judge's correction of line 6 fails stage 2 again: after 3 rounds, rejected with
    // its stage-2 reason, the judge's verdict in the message.
    assert_eq!(
        (&find(6)["reason"], &find(6)["stage"], &find(6)["round"]),
        (&json!("type_mismatch"), &json!("ast"), &json!(3))
    );
    assert!(find(6)["message"].as_str().unwrap().contains("judge_call"), "{}", find(6));
    // Stage-2 failures the judge passed as right keep their stage-2 reason.
    assert_eq!(find(4)["reason"], "unknown_function");
    assert_eq!(find(9)["reason"], "duplicate");
    let s = summary(&out);
    assert_eq!(s["judge"]["corrected"], 1, "{s}");
    assert_eq!(s["judge"]["accepted_in_round"], json!([2, 1]), "{s}");
    // The 500 was retried; a second run asks nothing.
    let asked = count.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(s["judge"]["requests"].as_u64().unwrap() as usize + 1, asked);
    args.push("--resume");
    ok(&prepare(&args));
    assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), asked);
}

#[test]
fn xlam_60k_json_array_is_read_item_by_item() {
    let d = tempfile::tempdir().unwrap();
    let items: Vec<Value> = std::fs::read_to_string(xlam())
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let input = d.path().join("xlam60k.json");
    std::fs::write(&input, serde_json::to_string_pretty(&items).unwrap()).unwrap();
    let out = d.path().join("out");
    ok(&prepare(&["--input", input.to_str().unwrap(), "--out", out.to_str().unwrap(), "--format", "xlam"]));
    let s = summary(&out);
    // The file's 12 JSON records (line 7 is cut): the same 4 accepted, item numbers for lines.
    assert_eq!((s["total"].as_u64(), s["accepted"].as_u64()), (Some(12), Some(4)), "{s}");
    assert_eq!(reasons_by_line(&out).get(&7).map(String::as_str), Some("parse_error"));
}

// ---- Hostile data: every case is a clear refusal or a rejection with a reason code, never a
// silently replaced run, a mixed-up id or a sample accepted without its call.

/// An xLAM record asking for the weather in `city`, with id `id`.
fn weather(id: Value, city: &str) -> String {
    let tools = r#"[{"name": "get_weather", "description": "Weather.", "parameters": {"city": {"description": "City.", "type": "str"}}}]"#;
    let answers = json!([{"name": "get_weather", "arguments": {"city": city}}]).to_string();
    json!({"id": id, "query": format!("Weather in {city}?"), "tools": tools, "answers": answers}).to_string()
}

fn err_of(o: &Output) -> String {
    assert!(!o.status.success(), "expected a refusal: {}", String::from_utf8_lossy(&o.stdout));
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The bytes of every file in `dir` (to show that a refused run touched nothing).
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            out.insert(p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap());
        }
    }
    out
}

#[test]
fn hostile_repeated_ids_are_rejected_and_refused_by_eval() {
    let d = tempfile::tempdir().unwrap();
    let input = d.path().join("ids.jsonl");
    // 200 different samples, all with id 7, then an exact copy of the first.
    let mut text: String = (0..200).map(|i| weather(json!(7), &format!("City{i}")) + "\n").collect();
    text.push_str(&(weather(json!(7), "City0") + "\n"));
    std::fs::write(&input, &text).unwrap();
    let out = d.path().join("out");
    ok(&prepare(&["--input", input.to_str().unwrap(), "--out", out.to_str().unwrap()]));
    let acc = lines(&out.join("accepted.jsonl"));
    assert_eq!(acc.len(), 1);
    assert_eq!(acc[0]["id"], "7");
    let rej = lines(&out.join("rejected.jsonl"));
    let count = |reason: &str| rej.iter().filter(|r| r["reason"] == reason).count();
    assert_eq!((count("duplicate_id"), count("duplicate")), (199, 1), "{:?}", summary(&out)["reasons"]);
    let second = rej.iter().find(|r| r["line"] == 2).unwrap();
    assert_eq!((&second["reason"], &second["stage"]), (&json!("duplicate_id"), &json!("input")));
    assert!(second["message"].as_str().unwrap().contains(&format!("{}:1", input.display())), "{second}");

    // `eval --data` scores answers by id: a repeated id is an error naming the file, both lines
    // and the id.
    let results = d.path().join("results.jsonl");
    std::fs::write(&results, "{\"id\": \"7\", \"result\": \"[get_weather(city='City0')]\"}\n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_fcgpu"))
        .args(["eval", "--data", input.to_str().unwrap(), "--results", results.to_str().unwrap()])
        .output()
        .unwrap();
    let err = err_of(&o);
    assert!(
        err.contains(input.to_str().unwrap()) && err.contains("lines 1 and 2") && err.contains("\"7\""),
        "{err}"
    );
    // The prepared file has unique ids and scores.
    let o = Command::new(env!("CARGO_BIN_EXE_fcgpu"))
        .args(["eval", "--data"])
        .arg(out.join("accepted.jsonl"))
        .args(["--results", results.to_str().unwrap()])
        .output()
        .unwrap();
    ok(&o);
}

#[test]
fn hostile_resume_of_another_input_or_options_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let o = out.to_str().unwrap();
    let x = xlam();
    let input = x.to_str().unwrap();
    ok(&prepare(&["--input", input, "--out", o]));
    let record: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(record["input_sha256"].as_str().unwrap().len(), 64, "{record}");
    let before = snapshot(&out);

    // Another input (one byte changed), and each option that decides the outputs.
    let other = d.path().join("other.jsonl");
    std::fs::write(&other, std::fs::read_to_string(&x).unwrap().replacen("Paris", "Parma", 1)).unwrap();
    let judge = ["--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "m"];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--input", other.to_str().unwrap()], "the input differs"),
        (vec!["--input", input, "--grounding"], "--grounding true (the earlier run: false)"),
        (vec!["--input", input, "--format", "xlam"], "--format xlam (the earlier run: auto)"),
        (
            [&["--input", input, "--stage", "judge"][..], &judge[..]].concat(),
            "--stage judge (the earlier run: ast)",
        ),
    ];
    for (args, says) in cases {
        let err = err_of(&prepare(&[&args[..], &["--out", o, "--resume"]].concat()));
        assert!(err.contains(says) && err.contains("--force"), "{args:?}: {err}");
        assert_eq!(snapshot(&out), before, "{args:?} changed the earlier run");
    }
    // The same bytes under another name continue the run.
    let copy = d.path().join("copy.jsonl");
    std::fs::copy(&x, &copy).unwrap();
    ok(&prepare(&["--input", copy.to_str().unwrap(), "--out", o, "--resume"]));
    // A run without its record (an older fcgpu) cannot be checked: refused.
    std::fs::remove_file(out.join("run.json")).unwrap();
    let err = err_of(&prepare(&["--input", input, "--out", o, "--resume"]));
    assert!(err.contains("run.json") && err.contains("--force"), "{err}");
    // --force replaces it, with the new input's record.
    ok(&prepare(&["--input", other.to_str().unwrap(), "--out", o, "--force"]));
    let record2: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_ne!(record2["input_sha256"], record["input_sha256"]);
}

#[test]
fn hostile_output_that_is_the_input_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("in.jsonl");
    std::fs::copy(xlam(), &file).unwrap();
    let bytes = std::fs::read(&file).unwrap();
    let f = file.to_str().unwrap();
    let err = err_of(&prepare(&["--input", f, "--out", f]));
    assert!(err.contains("must be a directory other than the input"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), bytes);
    for force in [&["--force"][..], &["--resume"][..]] {
        let err = err_of(&prepare(&[&["--input", f, "--out", f][..], force].concat()));
        assert!(err.contains("must be a directory other than the input"), "{err}");
    }
    // Another existing file as --out.
    let other = d.path().join("other.txt");
    std::fs::write(&other, "keep").unwrap();
    let err = err_of(&prepare(&["--input", f, "--out", other.to_str().unwrap()]));
    assert!(err.contains("is not a directory") && err.contains("must be a directory"), "{err}");
    assert_eq!(std::fs::read(&other).unwrap(), b"keep");
    // A BFCL directory as both: nothing written into it.
    let bfcl = d.path().join("bfcl");
    std::fs::create_dir(&bfcl).unwrap();
    std::fs::copy(
        root().join("tests/data/bfcl/v4/BFCL_v4_irrelevance.json"),
        bfcl.join("BFCL_v4_irrelevance.json"),
    )
    .unwrap();
    let b = bfcl.to_str().unwrap();
    let err = err_of(&prepare(&["--input", b, "--out", b]));
    assert!(err.contains("must be a directory other than the input"), "{err}");
    assert_eq!(std::fs::read_dir(&bfcl).unwrap().count(), 1);
    // A device or a FIFO as the input: refused at once, not read without end.
    let fifo = d.path().join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for input in [Path::new("/dev/zero"), fifo.as_path()] {
        let out = d.path().join("out-special");
        let err = err_of(&prepare(&["--input", input.to_str().unwrap(), "--out", out.to_str().unwrap()]));
        assert!(err.contains("not a regular file"), "{err}");
        assert!(!out.exists());
    }
}

/// The call check fails with a correction that holds no call: empty, `[]`, or not a call.
fn empty_rewrite_judge(prompt: &str) -> String {
    if prompt.starts_with("### Judge task: write the reasoning") {
        return "<reasoning>The user asks for the weather.</reasoning>".into();
    }
    if prompt.starts_with("### Judge check: function and parameters") {
        let fc = if prompt.contains("City0") {
            ""
        } else if prompt.contains("City1") {
            "[]"
        } else {
            "no call here("
        };
        return format!("<think>x</think><judge>False</judge><NewFC>{fc}</NewFC>");
    }
    "<think>x</think><judge>True</judge>".into()
}

#[test]
fn hostile_judge_empty_rewrite_rejects_the_sample() {
    let (url, _) = scripted_judge_with(empty_rewrite_judge);
    let d = tempfile::tempdir().unwrap();
    let input = d.path().join("in.jsonl");
    let text: String = (0..3).map(|i| weather(json!(i), &format!("City{i}")) + "\n").collect();
    std::fs::write(&input, text).unwrap();
    let out = d.path().join("out");
    let mut args = judge_args(&url, out.to_str().unwrap(), "scripted");
    args[1] = input.to_str().unwrap();
    ok(&prepare(&args));
    assert!(lines(&out.join("accepted.jsonl")).is_empty(), "{}", summary(&out));
    let rej = lines(&out.join("rejected.jsonl"));
    assert_eq!(rej.len(), 3);
    for r in &rej {
        // Rejected after the rounds (2 here) with the call check's reason and the parse failure.
        assert_eq!(
            (&r["reason"], &r["stage"], &r["round"]),
            (&json!("judge_call"), &json!("judge"), &json!(2)),
            "{r}"
        );
        assert!(r["message"].as_str().unwrap().contains("parse_error"), "{r}");
    }
    let empty: Vec<&Value> =
        rej.iter().filter(|r| r["message"].as_str().unwrap().contains("holds no call")).collect();
    assert_eq!(empty.len(), 2, "{rej:?}");
    assert_eq!(summary(&out)["judge"]["corrected"], 0);
}
