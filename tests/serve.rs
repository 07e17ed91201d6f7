//! `fcgpu serve` end to end: the binary on a fixture model, spoken to over loopback HTTP.
//! (The official `openai` client and the load test are in tools/serve_openai_test.py.)

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod serve_common;
use serve_common::Server;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models").join(name)
}

impl Server {
    fn connect(&self) -> TcpStream {
        TcpStream::connect(&self.addr).unwrap()
    }

    fn send(&self, method: &str, path: &str, body: &str) -> TcpStream {
        let mut s = self.connect();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        s
    }

    /// (status, body) of one request.
    fn request(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        read_response(self.send(method, path, body))
    }

    fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let (status, text) = self.request("POST", path, &body.to_string());
        (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")))
    }

    /// SIGINT, then the exit status.
    fn interrupt(mut self) -> std::process::ExitStatus {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        self.child.wait().unwrap()
    }
}

fn read_response(mut s: TcpStream) -> (u16, String) {
    let mut raw = Vec::new();
    // The server closes its side after the response; a reset that arrives once the response is
    // in (seen under load in CI) ends the read like EOF. Before that, it is a failure.
    if let Err(e) = s.read_to_end(&mut raw) {
        let complete = String::from_utf8_lossy(&raw).contains("\r\n\r\n");
        assert!(e.kind() == std::io::ErrorKind::ConnectionReset && complete, "{e}: read {} bytes", raw.len());
    }
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no header end in {raw:?}"));
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
    (status, if chunked { dechunk(body) } else { body.to_string() })
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

/// The `data:` payloads of an SSE body.
fn sse_data(body: &str) -> Vec<String> {
    body.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

#[test]
fn bad_requests_get_openai_error_objects_and_the_server_stays_up() {
    let s = Server::start(&fixture("qwen2-tiny"), &[]);
    let long = "hello ".repeat(600);
    let cases: Vec<(&str, String, u16, Option<&str>, &str)> = vec![
        ("/v1/chat/completions", "{\"messages\": [".into(), 400, None, "not valid JSON"),
        ("/v1/chat/completions", "[1, 2]".into(), 400, None, "JSON object"),
        (
            "/v1/chat/completions",
            json!({"messages": user("hi"), "temperature": "hot"}).to_string(),
            400,
            Some("temperature"),
            "temperature",
        ),
        ("/v1/chat/completions", json!({"messages": user("hi"), "n": 0}).to_string(), 400, Some("n"), "`n`"),
        ("/v1/chat/completions", json!({"messages": "hi"}).to_string(), 400, Some("messages"), "messages"),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "robot", "content": "x"}]}).to_string(),
            400,
            Some("messages[0]"),
            "role",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": user("hi"), "tool_choice": 3}).to_string(),
            400,
            Some("tool_choice"),
            "tool_choice",
        ),
        // The fixture's chat template never reads `tools`: the model would not see them.
        (
            "/v1/chat/completions",
            json!({"messages": user("hi"), "tools": [{"type": "function", "function": {"name": "f"}}]})
                .to_string(),
            400,
            Some("tools"),
            "never reads `tools`",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "gpt-4", "messages": user("hi")}).to_string(),
            404,
            Some("model"),
            "gpt-4",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": user("hi"), "max_tokens": 100000}).to_string(),
            400,
            Some("messages"),
            "512",
        ),
        (
            "/v1/completions",
            json!({"prompt": long}).to_string(),
            400,
            Some("prompt"),
            "maximum context length is 512",
        ),
        ("/v1/completions", json!({"prompt": [1, 99999]}).to_string(), 400, Some("prompt"), "vocabulary"),
        ("/v1/completions", json!({"prompt": "x", "stop": ["", "a"]}).to_string(), 400, Some("stop"), "stop"),
        ("/v1/nothing", "{}".into(), 404, None, "route"),
    ];
    for (path, body, status, param, words) in cases {
        let (got, text) = s.request("POST", path, &body);
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} {body}: {e}: {text}"));
        assert_eq!(got, status, "{body}: {text}");
        let e = &v["error"];
        assert!(e["message"].as_str().unwrap().contains(words), "{body}: {text}");
        assert!(e["type"].is_string(), "{text}");
        assert_eq!(e["param"].as_str(), param, "{body}: {text}");
    }
    assert_eq!(s.request("GET", "/health", "").0, 200);
    let (status, models) = s.request("GET", "/v1/models", "");
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&models).unwrap()["data"][0]["id"], "qwen2-tiny");
}

#[test]
fn chat_completions_stream_and_seeds_repeat() {
    let s = Server::start(&fixture("qwen2-tiny"), &["--served-model-name", "tiny"]);
    let req = json!({"model": "tiny", "messages": user("hi"), "max_tokens": 6, "n": 2, "seed": 7, "temperature": 1.0});
    let (status, a) = s.post("/v1/chat/completions", req.clone());
    assert_eq!(status, 200, "{a}");
    let (_, b) = s.post("/v1/chat/completions", req);
    assert_eq!(a["choices"], b["choices"], "the same seed gives the same samples");
    assert_eq!(a["choices"].as_array().unwrap().len(), 2);
    assert_eq!(a["usage"]["completion_tokens"].as_u64().unwrap(), 12, "{a}");
    assert_eq!(a["choices"][0]["finish_reason"], "length");

    let greedy = json!({"messages": user("hi"), "max_tokens": 6, "temperature": 0});
    let (_, whole) = s.post("/v1/chat/completions", greedy.clone());
    let mut streamed = greedy;
    streamed["stream"] = json!(true);
    let (status, body) = s.request("POST", "/v1/chat/completions", &streamed.to_string());
    assert_eq!(status, 200);
    let data = sse_data(&body);
    assert_eq!(data.last().unwrap(), "[DONE]", "{body}");
    let chunks: Vec<Value> =
        data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, whole["choices"][0]["message"]["content"].as_str().unwrap());
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "length");

    let (status, c) =
        s.post("/v1/completions", json!({"prompt": "def add(a, b):", "max_tokens": 4, "temperature": 0}));
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["object"], "text_completion");
    assert_eq!(c["usage"]["completion_tokens"], 4);
}

#[test]
fn a_full_queue_answers_429_and_later_requests_succeed() {
    // One slot and one queue place: while a long request runs, one more waits and the rest are
    // refused at once.
    let s = Server::start(&fixture("qwen2-tiny"), &["--max-batch", "1", "--max-queue", "1"]);
    let long = json!({"prompt": "a", "max_tokens": 500, "stream": true}).to_string();
    let mut first = s.send("POST", "/v1/completions", &long);
    // A first streamed piece means the long request holds the slot.
    let mut buf = [0u8; 512];
    let mut seen = String::new();
    while !seen.contains("data: ") {
        let n = first.read(&mut buf).unwrap();
        assert!(n > 0, "{seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let short = json!({"prompt": "a", "max_tokens": 2}).to_string();
    let pending: Vec<TcpStream> = (0..5).map(|_| s.send("POST", "/v1/completions", &short)).collect();
    let statuses: Vec<u16> = pending.into_iter().map(|c| read_response(c).0).collect();
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(statuses.iter().all(|&x| x == 429 || x == 200), "{statuses:?}");
    drop(first);
    let (status, v) = s.post("/v1/completions", json!({"prompt": "a", "max_tokens": 2}));
    assert_eq!(status, 200, "{v}");
}

#[test]
fn ctrl_c_finishes_the_request_in_flight_then_exits() {
    let s = Server::start(&fixture("qwen2-tiny"), &[]);
    let mut c = s.send(
        "POST",
        "/v1/completions",
        &json!({"prompt": "a", "max_tokens": 200, "stream": true}).to_string(),
    );
    let mut buf = [0u8; 256];
    let n = c.read(&mut buf).unwrap();
    assert!(n > 0);
    let status = s.interrupt();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    assert!(String::from_utf8_lossy(&rest).contains("data: [DONE]"), "the stream was cut");
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_client_that_disconnects_mid_stream_frees_its_slots() {
    let s = Server::start(&fixture("qwen2-tiny"), &["--max-batch", "32"]);
    // 32 samples of up to 480 tokens: far more work than the time the server needs to notice.
    let body = json!({"prompt": "a", "max_tokens": 480, "n": 32, "stream": true}).to_string();
    let mut c = s.send("POST", "/v1/completions", &body);
    let mut buf = [0u8; 256];
    assert!(c.read(&mut buf).unwrap() > 0);
    drop(c);
    let health = || -> Value { serde_json::from_str(&s.request("GET", "/health", "").1).unwrap() };
    // Every sample ends one way or the other; polled, as the server notices in its own time.
    let ended = |h: &Value| h["cancelled"].as_u64().unwrap() + h["finished"].as_u64().unwrap();
    let mut h = health();
    while ended(&h) < 32 {
        h = health();
    }
    // A sample may reach EOS before the server notices; most must have been cut short.
    assert!(h["cancelled"].as_u64().unwrap() >= 24, "{h}");
    let (status, v) = s.post("/v1/completions", json!({"prompt": "a", "max_tokens": 2}));
    assert_eq!(status, 200, "{v}");
}

/// 64 streams cut by their clients right after their first bytes: each one's KV blocks go back
/// to the pool, so the blocks in use return to those the prefix cache keeps of the prompt (and
/// to zero without the cache), and a later request runs.
#[test]
fn aborted_streams_give_their_kv_blocks_back() {
    for prefix in ["0", "4096"] {
        let s =
            Server::start(&fixture("qwen2-tiny"), &["--max-batch", "16", "--prefix-cache-tokens", prefix]);
        let health = || -> Value { serde_json::from_str(&s.request("GET", "/health", "").1).unwrap() };
        assert_eq!(health()["kv_blocks_in_use"], 0);
        let body =
            json!({"prompt": "a b c d e f g h i j k l m n o p q r s", "max_tokens": 400, "stream": true});
        for _ in 0..4 {
            let mut cs: Vec<_> =
                (0..16).map(|_| s.send("POST", "/v1/completions", &body.to_string())).collect();
            let mut buf = [0u8; 64];
            for c in &mut cs {
                assert!(c.read(&mut buf).unwrap() > 0);
            }
            assert!(health()["kv_blocks_in_use"].as_u64().unwrap() > 0 || health()["running"] == 0);
            drop(cs);
        }
        let ended = |h: &Value| h["cancelled"].as_u64().unwrap() + h["finished"].as_u64().unwrap();
        let mut h = health();
        while ended(&h) < 64 || h["running"] != 0 {
            h = health();
        }
        assert_eq!(h["kv_blocks_in_use"], h["prefix_cache_blocks"], "prefix cache {prefix}: {h}");
        if prefix == "0" {
            assert_eq!(h["kv_blocks_in_use"], 0, "{h}");
        } else {
            assert!(h["prefix_cache_hits"].as_u64().unwrap() > 0, "{h}");
        }
        assert!(h["kv_blocks_allocated"].as_u64().unwrap() > 0, "{h}");
        let (status, v) = s.post("/v1/completions", json!({"prompt": "a", "max_tokens": 2}));
        assert_eq!(status, 200, "{v}");
    }
}

/// A request that alone needs more KV positions than `--max-batch-tokens` is a 400 naming the
/// limit; one that fits runs.
#[test]
fn a_request_beyond_the_kv_budget_is_a_400_with_the_limit() {
    let s = Server::start(&fixture("qwen2-tiny"), &["--max-batch-tokens", "100", "--kv-block-size", "16"]);
    let (status, v) = s.post("/v1/completions", json!({"prompt": "a b c", "max_tokens": 200}));
    assert_eq!(status, 400, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("at most 112") && msg.contains("--max-batch-tokens"), "{msg}");
    let (status, v) = s.post("/v1/completions", json!({"prompt": "a b c", "max_tokens": 20, "n": 4}));
    assert_eq!(status, 200, "{v}");
}

/// A copy of the qwen2-tiny fixture in `dir` with a context of `ctx` positions.
fn long_context_copy(dir: &Path, ctx: usize) -> PathBuf {
    let model = dir.join("qwen2-tiny");
    std::fs::create_dir_all(&model).unwrap();
    for e in std::fs::read_dir(fixture("qwen2-tiny")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), model.join(e.file_name())).unwrap();
    }
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    config["max_position_embeddings"] = json!(ctx);
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    model
}

fn fcgpu(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_fcgpu")).args(args).output().unwrap();
    assert!(out.status.success(), "fcgpu {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// BFCL prompting mode through the route scores as `fcgpu eval --model`: the same system
/// prompt and messages sent to /v1/chat/completions (greedy) give the same answer texts, and
/// `fcgpu eval --results` gives them the same verdicts.
#[test]
fn the_served_route_and_eval_score_the_same_answers_the_same_way() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bfcl = root.join("tests/data/bfcl/v4");
    let tmp = tempfile::tempdir().unwrap();
    // BFCL prompts exceed the fixture's 512 positions (as in tests/generate_eval.rs).
    let model = long_context_copy(tmp.path(), 4096);
    let p = |n: &str| tmp.path().join(n).to_str().unwrap().to_string();
    let (m, b) = (model.to_str().unwrap(), bfcl.to_str().unwrap());
    let common = ["eval", "--bfcl-dir", b, "--category", "simple_python", "--limit", "3"];
    let eval_args =
        [&common[..], &["--model", m, "--device", "cpu", "--batch-size", "1", "--max-new-tokens", "6"]]
            .concat();
    let (saved, v1) = (p("eval.jsonl"), p("v1.jsonl"));
    fcgpu(&[&eval_args[..], &["--save-results", &saved, "--verdicts", &v1]].concat());

    let s = Server::start(&model, &[]);
    let samples = fcgpu::data::load_bfcl_category(&bfcl, "simple_python").unwrap();
    let mut served = String::new();
    for smp in samples.iter().take(3) {
        let fns = fcgpu::fc::prompt::functions_with_hints(&smp.functions, &smp.category);
        let mut system = fcgpu::fc::prompt::bfcl_system_prompt(&fns);
        let mut msgs: Vec<Value> =
            smp.messages.iter().map(|x| json!({"role": x.role, "content": x.content})).collect();
        if msgs[0]["role"] == "system" {
            system = format!("{system}\n\n{}", msgs[0]["content"].as_str().unwrap());
            msgs.remove(0);
        }
        msgs.insert(0, json!({"role": "system", "content": system}));
        let (status, r) =
            s.post("/v1/chat/completions", json!({"messages": msgs, "temperature": 0, "max_tokens": 6}));
        assert_eq!(status, 200, "{r}");
        let text = r["choices"][0]["message"]["content"].as_str().unwrap();
        served.push_str(&format!("{}\n", json!({"id": smp.id, "result": text})));
    }
    let (route, v2) = (p("route.jsonl"), p("v2.jsonl"));
    std::fs::write(&route, &served).unwrap();
    fcgpu(&[&common[..], &["--results", &route, "--verdicts", &v2]].concat());
    let lines = |f: &str| -> Vec<Value> {
        std::fs::read_to_string(f).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    assert_eq!(lines(&saved), lines(&route), "the route's answers differ from eval's");
    assert_eq!(lines(&v1), lines(&v2), "the same answers were scored differently");
    assert_eq!(lines(&v1).len(), 3);
}

/// Generous upper bound for anything the server must do on its own (never the expected time).
const PATIENCE: Duration = Duration::from_secs(120);

/// The start of a request head, never finished (slowloris).
const HALF_HEAD: &[u8] = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Ty";

/// Reads until the server closes the connection; fails if it stays open for PATIENCE.
fn read_until_closed(mut c: TcpStream) -> String {
    c.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut got = Vec::new();
    if let Err(e) = c.read_to_end(&mut got) {
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "the server kept the connection open: {e}");
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Status and error object of a response, asserting it is JSON.
fn error_object(raw: &str) -> (u16, Value) {
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no header end in {raw:?}"));
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    assert!(head.to_ascii_lowercase().contains("content-type: application/json"), "{raw}");
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.into()
    };
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {raw}"));
    assert!(v["error"]["message"].is_string() && v["error"]["type"].is_string(), "{raw}");
    (status, v)
}

#[test]
fn malformed_messages_and_huge_numbers_get_400_naming_the_field() {
    let s = Server::start(&fixture("qwen2-tiny"), &[]);
    let call =
        |args: Value| json!({"id": "c1", "type": "function", "function": {"name": "f", "arguments": args}});
    let huge = json!(u64::MAX);
    let chat = "/v1/chat/completions";
    let with = |msgs: Value| json!({"messages": msgs, "max_tokens": 2});
    let mut cases: Vec<(&str, Value, &str)> = Vec::new();
    for content in [None, Some(json!(null)), Some(json!(5)), Some(json!({"text": "hi"})), Some(json!(true))] {
        let mut m = json!({"role": "user"});
        if let Some(c) = content {
            m["content"] = c;
        }
        cases.push((chat, with(json!([m])), "messages[0].content"));
    }
    cases.push((
        chat,
        with(json!([{"role": "system", "content": 3}, {"role": "user", "content": "hi"}])),
        "messages[0].content",
    ));
    cases.push((
        chat,
        with(json!([{"role": "user", "content": "hi"}, {"role": "tool"}])),
        "messages[1].content",
    ));
    let asked = json!({"role": "user", "content": "hi"});
    for (calls, param) in [
        (json!("garbage"), "messages[1].tool_calls"),
        (json!({"name": "f"}), "messages[1].tool_calls"),
        (json!([5]), "messages[1].tool_calls[0]"),
        (json!([{"type": "function", "function": {"name": 3}}]), "messages[1].tool_calls[0]"),
        (json!([{"type": "retrieval", "function": {"name": "f"}}]), "messages[1].tool_calls[0]"),
        (json!([call(json!(7))]), "messages[1].tool_calls[0]"),
    ] {
        cases.push((
            chat,
            with(json!([asked, {"role": "assistant", "content": null, "tool_calls": calls}])),
            param,
        ));
    }
    cases.push((
        chat,
        with(json!([{"role": "user", "content": "hi", "tool_calls": [call(json!("{}"))]}])),
        "messages[0].tool_calls",
    ));
    cases.push((chat, with(json!([asked, {"role": "assistant", "content": null}])), "messages[1].content"));
    // Numbers past every limit: compared with checked arithmetic, never wrapped.
    for field in ["max_tokens", "max_completion_tokens"] {
        cases.push((chat, json!({"messages": [asked], field: huge}), "messages"));
    }
    cases.push(("/v1/completions", json!({"prompt": "hi", "max_tokens": huge}), "prompt"));
    cases.push(("/v1/completions", json!({"prompt": [1, 2], "max_tokens": huge}), "prompt"));
    cases.push(("/v1/completions", json!({"prompt": "hi", "n": huge}), "n"));
    cases.push(("/v1/completions", json!({"prompt": "hi", "seed": huge}), "seed"));
    // A stop string long enough to make every decode step slow.
    cases.push(("/v1/completions", json!({"prompt": "hi", "stop": "x".repeat(100_000)}), "stop"));
    for (path, body, param) in &cases {
        let (status, v) = s.post(path, body.clone());
        assert_eq!(status, 400, "{body}: {v}");
        assert_eq!(v["error"]["param"], *param, "{body}: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    }
    // The well-formed neighbours of those cases are answered.
    // (The fixture's template concatenates `content`, so the call's message has an empty one.)
    let history = json!([asked, {"role": "assistant", "content": "", "tool_calls": [call(json!("{\"a\": 1}"))]},
        {"role": "tool", "tool_call_id": "c1", "content": "3"}, {"role": "user", "content": [{"type": "text", "text": "ok"}]}]);
    let (status, v) = s.post(chat, with(history));
    assert_eq!(status, 200, "{v}");
    let (status, v) = s.post("/v1/completions", json!({"prompt": "hi", "max_tokens": 2, "seed": 3}));
    assert_eq!(status, 200, "{v}");
}

#[test]
fn every_error_is_an_openai_error_object() {
    let s = Server::start(&fixture("qwen2-tiny"), &["--read-timeout", "1"]);
    let raw = |c: TcpStream| read_until_closed(c);
    // 405 keeps its Allow header.
    for (method, path) in [("GET", "/v1/chat/completions"), ("POST", "/health"), ("DELETE", "/v1/models")] {
        let out = raw(s.send(method, path, ""));
        let (status, v) = error_object(&out);
        assert_eq!(status, 405, "{out}");
        assert!(out.to_ascii_lowercase().contains("\r\nallow: "), "{out}");
        assert!(v["error"]["message"].as_str().unwrap().contains(path), "{v}");
    }
    let (status, _) = error_object(&raw(s.send("POST", "/v1/nothing", "{}")));
    assert_eq!(status, 404);
    let (status, _) = error_object(&raw(s.send("POST", "/v1/completions", "{\"prompt\": ")));
    assert_eq!(status, 400);
    // 413: a declared length over the limit is refused before its body is sent...
    let mut c = s.connect();
    write!(c, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 3000000\r\n\r\n").unwrap();
    let (status, _) = error_object(&raw(c));
    assert_eq!(status, 413);
    // ... and a chunked body when it passes the limit.
    let mut c = s.connect();
    write!(c, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
    let chunk = vec![b'a'; 1 << 20];
    for _ in 0..3 {
        if write!(c, "{:x}\r\n", chunk.len())
            .and_then(|_| c.write_all(&chunk))
            .and_then(|_| c.write_all(b"\r\n"))
            .is_err()
        {
            break; // the server answered and closed already
        }
    }
    let (status, _) = error_object(&raw(c));
    assert_eq!(status, 413);
    // 408: a body that stops arriving.
    let mut c = s.connect();
    write!(c, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{\"prompt\"").unwrap();
    let (status, v) = error_object(&raw(c));
    assert_eq!(status, 408, "{v}");
    assert_eq!(s.request("GET", "/health", "").0, 200);
}

/// Lowers the soft limit on open files of process `pid` to what it has open now plus `spare`.
fn limit_open_files(pid: u32, spare: u64) {
    let open = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count() as u64;
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: prlimit reads and writes the two rlimit structs given.
    unsafe {
        assert_eq!(libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, std::ptr::null(), &mut lim), 0);
        lim.rlim_cur = open + spare;
        assert_eq!(libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &lim, std::ptr::null_mut()), 0);
    }
}

#[test]
fn slowloris_connections_are_closed_and_a_normal_client_is_served() {
    let s = Server::start(&fixture("qwen2-tiny"), &["--read-timeout", "1"]);
    // With few file descriptors, connections that never finish a request would lock out
    // everyone else if the server kept them.
    limit_open_files(s.child.id(), 8);
    let slow: Vec<TcpStream> = (0..48)
        .map(|i| {
            let mut c = s.connect();
            match i % 4 {
                0 => c.write_all(HALF_HEAD).unwrap(),
                // A complete request, then half of the next one on the same connection.
                1 => write!(c, "GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHo").unwrap(),
                // A complete request, then an idle keep-alive connection.
                2 => write!(c, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap(),
                _ => {} // connects and says nothing
            }
            c
        })
        .collect();
    let normal = s.send("POST", "/v1/completions", &json!({"prompt": "a", "max_tokens": 2}).to_string());
    normal.set_read_timeout(Some(PATIENCE)).unwrap();
    let (status, body) = read_response(normal);
    assert_eq!(status, 200, "{body}");
    for c in slow {
        read_until_closed(c);
    }
    assert_eq!(s.request("GET", "/health", "").0, 200);
}

/// Waits (up to PATIENCE) for the server to exit.
fn wait_exit(s: &mut Server) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = s.child.try_wait().unwrap() {
            return status;
        }
        assert!(start.elapsed() < PATIENCE, "the server did not exit; log:\n{}", s.log.lock().unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn shutdown_closes_unfinished_requests_at_once_and_drops_stuck_streams_at_the_deadline() {
    let tmp = tempfile::tempdir().unwrap();
    let model = long_context_copy(tmp.path(), 4096);
    let mut s = Server::start(&model, &["--read-timeout", "600", "--shutdown-timeout", "10"]);
    // A stream far larger than the socket buffers, to a client that stops reading: in flight
    // until the deadline.
    let mut stuck = s.connect();
    let small: libc::c_int = 4096;
    // SAFETY: setsockopt reads one c_int from the pointer given.
    let rc = unsafe {
        libc::setsockopt(
            stuck.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &small as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    let body = json!({"prompt": "a", "max_tokens": 4000, "n": 64, "stream": true}).to_string();
    write!(stuck, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}", body.len())
        .unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 256];
    while !seen.contains("data: ") {
        let n = stuck.read(&mut buf).unwrap();
        assert!(n > 0, "{seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let heads: Vec<TcpStream> = (0..6)
        .map(|_| {
            let mut c = s.connect();
            c.write_all(HALF_HEAD).unwrap();
            c
        })
        .collect();
    let mut half_body = s.connect();
    write!(half_body, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{\"prompt\"")
        .unwrap();
    assert_eq!(s.request("GET", "/health", "").0, 200);
    unsafe { libc::kill(s.child.id() as i32, libc::SIGINT) };
    for c in heads {
        assert_eq!(read_until_closed(c), "", "a half-sent head gets no answer");
    }
    // Its body cut by the shutdown: 503 (or closed, had its head not been read yet).
    let out = read_until_closed(half_body);
    if !out.is_empty() {
        assert_eq!(error_object(&out).0, 503, "{out}");
    }
    // They closed while the stuck stream still held the server (the deadline is 10 s away).
    assert!(s.child.try_wait().unwrap().is_none(), "the server exited early: {}", s.log.lock().unwrap());
    let status = wait_exit(&mut s);
    assert!(status.success(), "{status:?}: {}", s.log.lock().unwrap());
    let log = s.log.lock().unwrap().clone();
    assert!(log.contains("dropped 1 connection(s) still open after --shutdown-timeout 10 s"), "{log}");
    drop(stuck);
}

fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn long_prompts_are_refused_before_tokenizing_and_leave_memory_flat() {
    let s = Server::start(&fixture("qwen2-tiny"), &[]);
    assert_eq!(s.post("/v1/completions", json!({"prompt": "hi", "max_tokens": 2})).0, 200);
    let before = vm_rss_kib(s.child.id());
    // 8 concurrent prompts of 2 MB: the context (512 positions) holds at most 8 KiB of text.
    let text = "hello ".repeat(2_000_000 / 6);
    let answers: Vec<(u16, Value)> = std::thread::scope(|scope| {
        let jobs: Vec<_> = (0..8)
            .map(|i| {
                let (s, text) = (&s, &text);
                scope.spawn(move || {
                    if i % 2 == 0 {
                        s.post("/v1/completions", json!({"prompt": text}))
                    } else {
                        s.post("/v1/chat/completions", json!({"messages": user(text)}))
                    }
                })
            })
            .collect();
        // The async workers stay free meanwhile.
        assert_eq!(s.request("GET", "/health", "").0, 200);
        jobs.into_iter().map(|j| j.join().unwrap()).collect()
    });
    for (i, (status, v)) in answers.iter().enumerate() {
        assert_eq!(*status, 400, "{v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("8192 bytes") && msg.contains("not tokenized"), "{v}");
        assert_eq!(v["error"]["param"], if i % 2 == 0 { "prompt" } else { "messages" });
    }
    let grown = vm_rss_kib(s.child.id()).saturating_sub(before);
    assert!(grown < 128 << 10, "VmRSS grew by {grown} KiB");
}

/// A KV block size out of range stops `serve` at start, with the reason, instead of serving
/// without a decode loop.
#[test]
fn a_bad_kv_block_size_is_refused_at_start() {
    for bs in ["0", "70000"] {
        let out = Command::new(env!("CARGO_BIN_EXE_fcgpu"))
            .args(["serve", "--model", fixture("qwen2-tiny").to_str().unwrap(), "--port", "0"])
            .args(["--device", "cpu", "--kv-block-size", bs])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("KV block size"), "{bs}: {err}");
    }
}
