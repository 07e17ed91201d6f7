//! The HTTP routes: request → prompt ids → a job for the decode loop → an OpenAI answer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value as Json_};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::engine::{EngineHandle, Event, Finish, Job, SubmitError};
use super::errors::{no_route, ApiError};
use super::output::{parse_tool_calls, split_reasoning, tool_calls_json};
use super::stream;
use super::types::{self, Gen, Prompt, ToolChoice};
use crate::model::tokenizer::{max_text_bytes, Tokenizer, TEXT_BYTES_PER_POSITION};
use crate::rollout::chat::ChatFormat;

/// What the routes share.
pub struct AppState {
    pub engine: EngineHandle,
    pub tok: Arc<Tokenizer>,
    pub format: ChatFormat,
    pub model_name: String,
    pub ctx: usize,
    pub vocab: usize,
    /// KV positions the server holds at once (`--max-batch-tokens`, whole blocks).
    pub kv_positions: usize,
    pub max_queue: usize,
    pub created: u64,
    pub next_id: AtomicU64,
}

pub type Shared = Arc<AppState>;

pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .fallback(no_route)
        // The connection layer reads at most this much (conn::MAX_BODY); the same limit here.
        .layer(axum::extract::DefaultBodyLimit::max(super::conn::MAX_BODY))
        .with_state(state)
}

/// 200 while the server runs, with the decode loop's counters.
async fn health(State(s): State<Shared>) -> Json<Json_> {
    let st = &s.engine.stats;
    Json(json!({
        "status": "ok",
        "running": st.running.load(Ordering::Relaxed),
        "finished": st.finished.load(Ordering::Relaxed),
        "cancelled": st.cancelled.load(Ordering::Relaxed),
        "kv_blocks_in_use": st.kv_blocks_in_use.load(Ordering::Relaxed),
        "kv_blocks_allocated": st.kv_blocks_allocated.load(Ordering::Relaxed),
        "kv_blocks_limit": st.kv_blocks_limit.load(Ordering::Relaxed),
        "prefix_cache_blocks": st.prefix_cache_blocks.load(Ordering::Relaxed),
        "prefix_cache_hits": st.prefix_cache_hits.load(Ordering::Relaxed),
        "prefix_cache_tokens": st.prefix_cache_tokens.load(Ordering::Relaxed),
        "prompt_tokens_computed": st.prompt_tokens_computed.load(Ordering::Relaxed),
        "preemptions": st.preemptions.load(Ordering::Relaxed),
        "peak_running": st.peak_running.load(Ordering::Relaxed),
        "waiting_for_blocks": st.waiting_for_blocks.load(Ordering::Relaxed),
        "block_waits": st.block_waits.load(Ordering::Relaxed),
    }))
}

async fn models(State(s): State<Shared>) -> Json<Json_> {
    Json(json!({"object": "list", "data": [{
        "id": s.model_name, "object": "model", "created": s.created, "owned_by": "fcgpu",
        "max_model_len": s.ctx,
    }]}))
}

/// A request ready for the decode loop.
pub struct Prepared {
    pub id: String,
    pub prompt_tokens: usize,
    pub gen: Gen,
    pub events: UnboundedReceiver<Event>,
    /// The start of every answer, written into the prompt by the server (a forced tool call's
    /// opening): each sample's text is this followed by what the model generates.
    pub forced: String,
}

impl AppState {
    fn check_model(&self, gen: &Gen) -> Result<(), ApiError> {
        match &gen.model {
            Some(m) if m != &self.model_name => Err(ApiError::model_not_found(m, &self.model_name)),
            _ => Ok(()),
        }
    }

    /// Checks the prompt against the context and queues the job.
    /// `then`: text that, once in a sample, is followed by forced tokens ([`Job::then`]).
    fn submit(
        &self,
        prompt: Vec<u32>,
        mut gen: Gen,
        kind: &str,
        then: Option<(String, Vec<u32>)>,
    ) -> Result<Prepared, ApiError> {
        let len = prompt.len();
        if len == 0 {
            return Err(ApiError::bad_request("The prompt has no tokens", None));
        }
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(ApiError::bad_request(
                format!("Token id {bad} is outside the vocabulary of {}", self.vocab),
                Some("prompt"),
            ));
        }
        if len >= self.ctx {
            return Err(ApiError::bad_request(
                format!("This model's maximum context length is {} tokens. However, your {kind} resulted in {len} tokens, leaving no room for a completion.", self.ctx),
                Some(kind),
            ));
        }
        // `len < ctx` above, so the room left cannot underflow, and comparing with it (never
        // adding the request's number to anything) cannot wrap whatever `max_tokens` is.
        let room = self.ctx - len;
        let max_tokens = gen.max_tokens.unwrap_or(room);
        if max_tokens > room {
            let total = len as u128 + max_tokens as u128;
            return Err(ApiError::bad_request(
                format!("This model's maximum context length is {} tokens. However, you requested {total} tokens ({len} in the {kind}, {max_tokens} for the completion). Please reduce the length of the {kind} or the completion.", self.ctx),
                Some(kind),
            ));
        }
        // One sample must fit the KV budget on its own (a group's samples can take turns).
        if len + max_tokens > self.kv_positions {
            return Err(ApiError::bad_request(
                format!("This request needs {} KV cache positions ({len} in the {kind}, {max_tokens} for the completion) but the server holds at most {} (--max-batch-tokens). Please reduce the length of the {kind} or max_tokens.", len + max_tokens, self.kv_positions),
                Some(kind),
            ));
        }
        gen.max_tokens = Some(max_tokens);
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        // Without a seed every request draws differently; with one, the same request repeats.
        let seed = gen.seed.unwrap_or_else(|| n ^ self.created.rotate_left(17));
        let (tx, rx) = unbounded_channel();
        let job = Job {
            prompt,
            n: gen.n,
            max_tokens,
            params: gen.params,
            seed,
            stop: gen.stop.clone(),
            then,
            events: tx,
        };
        self.engine.submit(job).map_err(|e| match e {
            SubmitError::QueueFull => ApiError::queue_full(
                self.max_queue,
                self.engine.stats.waiting_for_blocks.load(Ordering::Relaxed),
            ),
            SubmitError::ShuttingDown => ApiError::unavailable(),
        })?;
        Ok(Prepared { id: format!("{n:x}"), prompt_tokens: len, gen, events: rx, forced: String::new() })
    }
}

/// `f` on tokio's blocking threads, so a long render or tokenization never stalls the async
/// workers (and with them `/health` and every other connection).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::internal(format!("the worker failed: {e}")))?
}

/// The ids of `text` (the `kind` of the request), refused before tokenizing when it has more
/// bytes than the context could hold at [`TEXT_BYTES_PER_POSITION`] bytes per position.
async fn encode(s: &Shared, text: String, special: bool, kind: &str) -> Result<Vec<u32>, ApiError> {
    let max = max_text_bytes(s.ctx);
    if text.len() > max {
        return Err(ApiError::bad_request(
            format!("This model's maximum context length is {} tokens. However, your {kind} is {} bytes of text, more than the {max} bytes ({TEXT_BYTES_PER_POSITION} per position) that could fit it; it was not tokenized.", s.ctx, text.len()),
            Some(kind),
        ));
    }
    let tok = s.tok.clone();
    blocking(move || tok.encode(&text, special).map_err(|e| ApiError::internal(format!("{e:#}")))).await
}

/// The finished samples of a request.
pub struct Sample {
    pub text: String,
    pub finish: Finish,
    pub tokens: usize,
}

/// Waits for every sample of a request.
async fn collect(p: &mut Prepared) -> Result<Vec<Sample>, ApiError> {
    let mut out: Vec<Sample> =
        (0..p.gen.n).map(|_| Sample { text: p.forced.clone(), finish: Finish::Length, tokens: 0 }).collect();
    let mut left = p.gen.n;
    while left > 0 {
        match p.events.recv().await {
            Some(Event::Text { sample, text }) => out[sample].text.push_str(&text),
            Some(Event::Done { sample, finish, tokens }) => {
                out[sample].finish = finish;
                out[sample].tokens = tokens;
                left -= 1;
            }
            Some(Event::Failed(e)) => return Err(ApiError::internal(format!("generation failed: {e}"))),
            None => return Err(ApiError::internal("the decode loop stopped")),
        }
    }
    Ok(out)
}

pub fn finish_name(f: Finish) -> &'static str {
    match f {
        Finish::Stop => "stop",
        Finish::Length => "length",
    }
}

pub fn usage(prompt: usize, completion: usize) -> Json_ {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The tools offered to the model under `choice` (a named function must be among `tools`).
fn offered(tools: Vec<Json_>, choice: &ToolChoice) -> Result<Vec<Json_>, ApiError> {
    match choice {
        ToolChoice::Auto => Ok(tools),
        ToolChoice::None => Ok(vec![]),
        ToolChoice::Required if tools.is_empty() => {
            Err(ApiError::bad_request("`tool_choice` \"required\" needs `tools`", Some("tool_choice")))
        }
        ToolChoice::Required => Ok(tools),
        ToolChoice::Named(name) => {
            let t: Vec<Json_> =
                tools.into_iter().filter(|t| t["function"]["name"] == name.as_str()).collect();
            if t.is_empty() {
                return Err(ApiError::bad_request(
                    format!("`tool_choice` names `{name}`, which is not in `tools`"),
                    Some("tool_choice"),
                ));
            }
            Ok(t)
        }
    }
}

async fn chat(State(s): State<Shared>, body: Bytes) -> Result<Response, ApiError> {
    let o = types::parse_body(&body)?;
    let gen = Gen::parse(&o, &["max_completion_tokens", "max_tokens"], None)?;
    s.check_model(&gen)?;
    let messages = types::messages(&o)?;
    let choice = types::tool_choice(&o)?;
    let tools = offered(types::tools(&o)?, &choice)?;
    // Rendering a long chat takes a while too: off the async workers, as tokenizing is.
    let (s2, tools2) = (s.clone(), tools.clone());
    let mut text = blocking(move || {
        let text = s2.format.render(&messages, Some(&tools2));
        if !tools2.is_empty() && !s2.format.shows_tools() {
            let why = text.err().map(|e| format!("{e:#}"));
            return Err(ApiError::bad_request(
                why.unwrap_or_else(|| "this model's chat template does not show tools to the model".into()),
                Some("tools"),
            ));
        }
        text.map_err(|e| ApiError::bad_request(format!("{e:#}"), Some("messages")))
    })
    .await?;
    // A call that must be made is started for the model (no grammar: the arguments are its own).
    let forced_call = |name: Option<&str>| {
        s.format.forced_call(name).map_err(|e| ApiError::bad_request(format!("{e:#}"), Some("tool_choice")))
    };
    let (forced, then) = match &choice {
        ToolChoice::Named(name) => forced_call(Some(name))?,
        ToolChoice::Required => forced_call(None)?,
        ToolChoice::Auto | ToolChoice::None => (String::new(), None),
    };
    text.push_str(&forced);
    let ids = encode(&s, text, false, "messages").await?;
    let then = match then {
        Some((trigger, after)) => Some((trigger, encode(&s, after, false, "tool_choice").await?)),
        None => None,
    };
    let mut p = s.submit(ids, gen, "messages", then)?;
    p.forced = forced;
    let calls = !tools.is_empty();
    if p.gen.stream {
        return Ok(stream::chat(s.clone(), p, calls).into_response());
    }
    let samples = collect(&mut p).await?;
    let choices: Vec<Json_> =
        samples.iter().enumerate().map(|(i, x)| chat_choice(&p.id, i, &x.text, x.finish, calls)).collect();
    let completion: usize = samples.iter().map(|x| x.tokens).sum();
    Ok(Json(json!({
        "id": format!("chatcmpl-{}", p.id), "object": "chat.completion", "created": now(),
        "model": s.model_name, "choices": choices, "usage": usage(p.prompt_tokens, completion),
    }))
    .into_response())
}

/// A chat choice's message: reasoning apart, then tool calls when tools were offered.
pub fn message_fields(
    id: &str,
    index: usize,
    text: &str,
    finish: Finish,
    calls: bool,
) -> (Json_, &'static str) {
    let (reasoning, content) = split_reasoning(text, true);
    let reasoning = (!reasoning.is_empty()).then(|| reasoning.to_string());
    if calls {
        if let Some(c) = parse_tool_calls(content.trim()) {
            let tc = tool_calls_json(&c, &format!("{id}_{index}"));
            let m = json!({"role": "assistant", "content": null, "reasoning_content": reasoning, "tool_calls": tc});
            return (m, "tool_calls");
        }
    }
    (json!({"role": "assistant", "content": content, "reasoning_content": reasoning}), finish_name(finish))
}

fn chat_choice(id: &str, index: usize, text: &str, finish: Finish, calls: bool) -> Json_ {
    let (message, reason) = message_fields(id, index, text, finish, calls);
    json!({"index": index, "message": message, "logprobs": null, "finish_reason": reason})
}

async fn completions(State(s): State<Shared>, body: Bytes) -> Result<Response, ApiError> {
    let o = types::parse_body(&body)?;
    // OpenAI's default for this route is 16 tokens.
    let gen = Gen::parse(&o, &["max_tokens"], Some(16))?;
    s.check_model(&gen)?;
    let ids = match types::prompt(&o)? {
        Prompt::Text(t) => encode(&s, t, true, "prompt").await?,
        Prompt::Ids(ids) => ids,
    };
    let mut p = s.submit(ids, gen, "prompt", None)?;
    if p.gen.stream {
        return Ok(stream::completion(s.clone(), p).into_response());
    }
    let samples = collect(&mut p).await?;
    let choices: Vec<Json_> = samples
        .iter()
        .enumerate()
        .map(|(i, x)| json!({"index": i, "text": x.text, "logprobs": null, "finish_reason": finish_name(x.finish)}))
        .collect();
    let completion: usize = samples.iter().map(|x| x.tokens).sum();
    Ok(Json(json!({
        "id": format!("cmpl-{}", p.id), "object": "text_completion", "created": now(),
        "model": s.model_name, "choices": choices, "usage": usage(p.prompt_tokens, completion),
    }))
    .into_response())
}
