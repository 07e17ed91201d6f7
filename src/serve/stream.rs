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
use super::output::split_reasoning;
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
        let mut prog = vec![Progress::default(); p.gen.n];
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
                    // With tools offered the content may be calls: it goes out once complete.
                    if !calls && !c.is_empty() {
                        g.sent_content += c.len();
                        delta.insert("content".into(), c.into());
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
    let (message, reason) = message_fields(id, sample, &g.text, finish, calls);
    let mut delta = serde_json::Map::new();
    let (r, c) = split_reasoning(&g.text, true);
    if !tail(r, g.sent_reasoning).is_empty() {
        delta.insert("reasoning_content".into(), tail(r, g.sent_reasoning).into());
    }
    if let Some(tc) = message.get("tool_calls") {
        let indexed: Vec<Json> = tc
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
            .map(|(k, t)| {
                let mut t = t.clone();
                t["index"] = k.into();
                t
            })
            .collect();
        delta.insert("tool_calls".into(), indexed.into());
    } else if !tail(c, g.sent_content).is_empty() {
        delta.insert("content".into(), tail(c, g.sent_content).into());
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
