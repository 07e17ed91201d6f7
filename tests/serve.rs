//! `fcgpu serve` end to end: the binary on a fixture model, spoken to over loopback HTTP.
//! (The official `openai` client and the load test are in tools/serve_openai_test.py.)

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;

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
    let model = tmp.path().join("qwen2-tiny");
    std::fs::create_dir_all(&model).unwrap();
    for e in std::fs::read_dir(fixture("qwen2-tiny")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), model.join(e.file_name())).unwrap();
    }
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    config["max_position_embeddings"] = json!(4096);
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
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
