//! Server-sent events: OpenAI `chat.completion.chunk` / `text_completion` chunks, then
//! `data: [DONE]`. A task turns the decode loop's events into chunks; when the client goes
//! away the SSE body is dropped, the task's sends fail, it drops the request's receiver and the
//! decode loop frees the request's slots at its next step.

use std::convert::Infallible;

use axum::response::sse::{Event as Sse, KeepAlive};
use axum::response::IntoResponse;
use futures_util::stream;
use serde_json::{json, Value as Json};
use tokio::sync::mpsc::{channel, Receiver};

use super::engine::{Event, Finish};
use super::output::{parse_tool_calls, split_reasoning, tool_calls_json};
use super::routes::{finish_name, message_fields, now, usage, Prepared, Shared};

/// The SSE response reading chunks from `rx`.
fn respond(rx: Receiver<String>) -> impl IntoResponse {
    let events = stream::unfold(rx, |mut rx| async move {
        let data = rx.recv().await?;
        Some((Ok::<_, Infallible>(Sse::default().data(data)), rx))
    });
    axum::response::Sse::new(events).keep_alive(KeepAlive::default())
}

/// Per-sample progress of a streamed chat answer.
#[derive(Default, Clone)]
struct Progress {
    text: String,
    sent_reasoning: usize,
    sent_content: usize,
    /// With tools offered: what the answer (after any reasoning) turned out to be.
    kind: AnswerKind,
    /// Tool calls already sent.
    sent_calls: usize,
}

/// With tools offered, an answer is held back until its start shows whether it is calls.
#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum AnswerKind {
    #[default]
    Undecided,
    /// Plain text: streamed as `content` deltas.
    Content,
    /// Calls: `<tool_call>` blocks go out one by one as each closes; a Python call list whole,
    /// once the sample ends.
    Calls,
}

/// What the start of an answer says it is (None: too little of it yet).
fn answer_kind(content: &str) -> Option<AnswerKind> {
    let t = content.trim_start();
    if t.is_empty() || (TOOL_CALL.starts_with(t) && t.len() < TOOL_CALL.len()) {
        return None;
    }
    Some(if t.starts_with(TOOL_CALL) || t.starts_with('[') { AnswerKind::Calls } else { AnswerKind::Content })
}

const TOOL_CALL: &str = "<tool_call>";

/// The `<tool_call>` blocks of `content` that are complete, as OpenAI tool calls.
fn closed_json_calls(id: &str, sample: usize, content: &str) -> Vec<Json> {
    let Some(end) = content.rfind("</tool_call>") else { return vec![] };
    let done = &content[..end + "</tool_call>".len()];
    match parse_tool_calls(done.trim()) {
        Some(calls) => tool_calls_json(&calls, &format!("{id}_{sample}")),
        None => vec![],
    }
}

/// Tool-call deltas for `calls[from..]`, each with its index.
fn call_deltas(calls: &[Json], from: usize) -> Vec<Json> {
    calls
        .iter()
        .enumerate()
        .skip(from)
        .map(|(k, t)| {
            let mut t = t.clone();
            t["index"] = k.into();
            t
        })
        .collect()
}

/// The not yet sent tail of `now`, given `sent` bytes already out.
fn tail(now: &str, sent: usize) -> &str {
    if now.len() > sent && now.is_char_boundary(sent) {
        &now[sent..]
    } else {
        ""
    }
}

pub fn chat(s: Shared, mut p: Prepared, calls: bool) -> impl IntoResponse {
    let (tx, rx) = channel::<String>(64);
    tokio::spawn(async move {
        let id = format!("chatcmpl-{}", p.id);
        let created = now();
        let chunk = |index: usize, delta: Json, finish: Option<&str>| {
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": s.model_name,
                "choices": [{"index": index, "delta": delta, "logprobs": null, "finish_reason": finish}]})
            .to_string()
        };
        let mut prog = vec![Progress { text: p.forced.clone(), ..Progress::default() }; p.gen.n];
        for i in 0..p.gen.n {
            if tx.send(chunk(i, json!({"role": "assistant", "content": ""}), None)).await.is_err() {
                return;
            }
        }
        let mut tokens = 0;
        let mut left = p.gen.n;
        while left > 0 {
            let out = match p.events.recv().await {
                Some(Event::Text { sample, text }) => {
                    let g = &mut prog[sample];
                    g.text.push_str(&text);
                    let (r, c) = split_reasoning(&g.text, false);
                    let (r, c) = (tail(r, g.sent_reasoning).to_string(), tail(c, g.sent_content).to_string());
                    g.sent_reasoning += r.len();
                    let mut delta = serde_json::Map::new();
                    if !r.is_empty() {
                        delta.insert("reasoning_content".into(), r.into());
                    }
                    if calls && g.kind == AnswerKind::Undecided {
                        g.kind = answer_kind(split_reasoning(&g.text, false).1).unwrap_or(AnswerKind::Undecided);
                    }
                    if (!calls || g.kind == AnswerKind::Content) && !c.is_empty() {
                        g.sent_content += c.len();
                        delta.insert("content".into(), c.into());
                    }
                    if g.kind == AnswerKind::Calls {
                        let done = closed_json_calls(&p.id, sample, split_reasoning(&g.text, false).1);
                        if done.len() > g.sent_calls {
                            delta.insert("tool_calls".into(), call_deltas(&done, g.sent_calls).into());
                            g.sent_calls = done.len();
                        }
                    }
                    if delta.is_empty() {
                        continue;
                    }
                    vec![chunk(sample, Json::Object(delta), None)]
                }
                Some(Event::Done { sample, finish, tokens: t }) => {
                    tokens += t;
                    left -= 1;
                    last_chunks(&p.id, sample, &prog[sample], finish, calls, &chunk)
                }
                Some(Event::Failed(e)) => vec![json!({"error": {"message": format!("generation failed: {e}"), "type": "server_error", "param": null, "code": null}}).to_string()],
                None => return,
            };
            for c in out {
                if tx.send(c).await.is_err() {
                    return;
                }
            }
        }
        if p.gen.include_usage {
            let u = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": s.model_name,
                "choices": [], "usage": usage(p.prompt_tokens, tokens)});
            let _ = tx.send(u.to_string()).await;
        }
        let _ = tx.send("[DONE]".into()).await;
    });
    respond(rx)
}

/// The rest of a finished sample: unsent text (or its tool calls), then the finish reason.
fn last_chunks(
    id: &str,
    sample: usize,
    g: &Progress,
    finish: Finish,
    calls: bool,
    chunk: &dyn Fn(usize, Json, Option<&str>) -> String,
) -> Vec<String> {
    let (message, mut reason) = message_fields(id, sample, &g.text, finish, calls);
    let mut delta = serde_json::Map::new();
    let (r, c) = split_reasoning(&g.text, true);
    if !tail(r, g.sent_reasoning).is_empty() {
        delta.insert("reasoning_content".into(), tail(r, g.sent_reasoning).into());
    }
    match message.get("tool_calls").and_then(Json::as_array) {
        // Content already streamed stays content, whatever its end parses as.
        Some(tc) if g.sent_content == 0 => {
            if tc.len() > g.sent_calls {
                delta.insert("tool_calls".into(), call_deltas(tc, g.sent_calls).into());
            }
        }
        _ if g.sent_calls > 0 => reason = "tool_calls", // calls went out; the rest did not parse
        _ => {
            if message.get("tool_calls").is_some() {
                reason = finish_name(finish);
            }
            if !tail(c, g.sent_content).is_empty() {
                delta.insert("content".into(), tail(c, g.sent_content).into());
            }
        }
    }
    let mut out = Vec::new();
    if !delta.is_empty() {
        out.push(chunk(sample, Json::Object(delta), None));
    }
    out.push(chunk(sample, json!({}), Some(reason)));
    out
}

pub fn completion(s: Shared, mut p: Prepared) -> impl IntoResponse {
    let (tx, rx) = channel::<String>(64);
    tokio::spawn(async move {
        let id = format!("cmpl-{}", p.id);
        let created = now();
        let chunk = |index: usize, text: &str, finish: Option<&str>| {
            json!({"id": id, "object": "text_completion", "created": created, "model": s.model_name,
                "choices": [{"index": index, "text": text, "logprobs": null, "finish_reason": finish}]})
            .to_string()
        };
        let (mut left, mut tokens) = (p.gen.n, 0);
        while left > 0 {
            let c = match p.events.recv().await {
                Some(Event::Text { sample, text }) => chunk(sample, &text, None),
                Some(Event::Done { sample, finish, tokens: t }) => {
                    left -= 1;
                    tokens += t;
                    chunk(sample, "", Some(finish_name(finish)))
                }
                Some(Event::Failed(e)) => json!({"error": {"message": format!("generation failed: {e}"), "type": "server_error", "param": null, "code": null}}).to_string(),
                None => return,
            };
            if tx.send(c).await.is_err() {
                return;
            }
        }
        if p.gen.include_usage {
            let u = json!({"id": id, "object": "text_completion", "created": created, "model": s.model_name,
                "choices": [], "usage": usage(p.prompt_tokens, tokens)});
            let _ = tx.send(u.to_string()).await;
        }
        let _ = tx.send("[DONE]".into()).await;
    });
    respond(rx)
}
