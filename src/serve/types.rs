//! The request schema: the OpenAI fields `fcgpu serve` reads, each checked with an error that
//! names it. Fields it does not know are ignored (clients send many optional ones).

use serde::de::DeserializeOwned;
use serde_json::{Map, Value as Json};

use super::errors::ApiError;
use crate::rollout::SamplerParams;

/// Most samples one request may ask for.
pub const MAX_N: usize = 64;
/// Most stop strings one request may give (OpenAI allows 4).
pub const MAX_STOP: usize = 4;
/// Longest stop string, in bytes: the decode loop holds back any tail of a sample that could
/// start one, a check that grows with the square of its length at every token.
pub const MAX_STOP_BYTES: usize = 256;

/// The body as a JSON object, or a 400 saying what is wrong with it.
pub fn parse_body(bytes: &[u8]) -> Result<Map<String, Json>, ApiError> {
    match serde_json::from_slice::<Json>(bytes) {
        Ok(Json::Object(o)) => Ok(o),
        Ok(_) => Err(ApiError::bad_request("The request body must be a JSON object", None)),
        Err(e) => Err(ApiError::bad_request(format!("The request body is not valid JSON: {e}"), None)),
    }
}

/// Field `name` as a `T` (absent or null = None), or a 400 naming the field.
pub fn field<T: DeserializeOwned>(
    o: &Map<String, Json>,
    name: &str,
    expected: &str,
) -> Result<Option<T>, ApiError> {
    match o.get(name) {
        None | Some(Json::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone())
            .map(Some)
            .map_err(|_| ApiError::bad_request(format!("`{name}` must be {expected}, got {v}"), Some(name))),
    }
}

/// Sampling fields shared by both completion routes.
pub struct Gen {
    pub model: Option<String>,
    pub n: usize,
    pub max_tokens: Option<usize>,
    pub params: SamplerParams,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(serde::Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

impl Gen {
    /// Reads and checks the sampling fields; `max_tokens_names` in order of precedence.
    pub fn parse(
        o: &Map<String, Json>,
        max_tokens_names: &[&str],
        default_max: Option<usize>,
    ) -> Result<Gen, ApiError> {
        let n = field::<usize>(o, "n", "a positive integer")?.unwrap_or(1);
        if n == 0 || n > MAX_N {
            return Err(ApiError::bad_request(
                format!("`n` must be between 1 and {MAX_N}, got {n}"),
                Some("n"),
            ));
        }
        let mut max_tokens = default_max;
        for name in max_tokens_names.iter().rev() {
            if let Some(m) = field::<usize>(o, name, "a positive integer")? {
                if m == 0 {
                    return Err(ApiError::bad_request(format!("`{name}` must be at least 1"), Some(name)));
                }
                max_tokens = Some(m);
            }
        }
        let temperature = field::<f32>(o, "temperature", "a number between 0 and 2")?.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::bad_request(
                format!("`temperature` must be between 0 and 2, got {temperature}"),
                Some("temperature"),
            ));
        }
        let top_p = field::<f32>(o, "top_p", "a number in (0, 1]")?.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::bad_request(
                format!("`top_p` must be in (0, 1], got {top_p}"),
                Some("top_p"),
            ));
        }
        let stop = match field::<Stop>(o, "stop", "a string or an array of strings")? {
            None => vec![],
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        };
        if stop.len() > MAX_STOP || stop.iter().any(|s| s.is_empty() || s.len() > MAX_STOP_BYTES) {
            return Err(ApiError::bad_request(
                format!(
                    "`stop` takes at most {MAX_STOP} non-empty strings of at most {MAX_STOP_BYTES} bytes"
                ),
                Some("stop"),
            ));
        }
        let seed = field::<i64>(o, "seed", "an integer")?.map(|s| s as u64);
        let stream = field::<bool>(o, "stream", "a boolean")?.unwrap_or(false);
        let include_usage =
            field::<StreamOptions>(o, "stream_options", "an object {\"include_usage\": bool}")?
                .is_some_and(|s| s.include_usage);
        Ok(Gen {
            model: field(o, "model", "a string")?,
            n,
            max_tokens,
            params: SamplerParams { temperature, top_p, top_k: 0 },
            seed,
            stop,
            stream,
            include_usage,
        })
    }
}

/// What `tool_choice` asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    Auto,
    None,
    /// The answer must call one of the tools: it is started with the format's call opening.
    Required,
    /// Only this function is offered, and the answer is started with a call of it.
    Named(String),
}

pub fn tool_choice(o: &Map<String, Json>) -> Result<ToolChoice, ApiError> {
    let bad = || {
        ApiError::bad_request(
            "`tool_choice` must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": …}}",
            Some("tool_choice"),
        )
    };
    match o.get("tool_choice") {
        None | Some(Json::Null) => Ok(ToolChoice::Auto),
        Some(Json::String(s)) => match s.as_str() {
            "auto" => Ok(ToolChoice::Auto),
            "required" => Ok(ToolChoice::Required),
            "none" => Ok(ToolChoice::None),
            _ => Err(bad()),
        },
        Some(v) => v["function"]["name"].as_str().map(|n| ToolChoice::Named(n.to_string())).ok_or_else(bad),
    }
}

/// The `tools` list: each `{"type": "function", "function": {"name": …, …}}`, as given.
pub fn tools(o: &Map<String, Json>) -> Result<Vec<Json>, ApiError> {
    let tools = field::<Vec<Json>>(o, "tools", "an array of tools")?.unwrap_or_default();
    for (i, t) in tools.iter().enumerate() {
        if t["function"]["name"].as_str().is_none() {
            return Err(ApiError::bad_request(
                format!("tools[{i}] needs `function.name` (a string)"),
                Some(&format!("tools[{i}]")),
            ));
        }
    }
    Ok(tools)
}

/// The `messages` list, with OpenAI content parts (`[{"type": "text", "text": …}]`) joined into
/// one string, as the chat templates expect.
pub fn messages(o: &Map<String, Json>) -> Result<Vec<Json>, ApiError> {
    let Some(msgs) = field::<Vec<Json>>(o, "messages", "an array of messages")? else {
        return Err(ApiError::bad_request("`messages` is required", Some("messages")));
    };
    if msgs.is_empty() {
        return Err(ApiError::bad_request("`messages` must not be empty", Some("messages")));
    }
    let mut out = Vec::with_capacity(msgs.len());
    for (i, mut m) in msgs.into_iter().enumerate() {
        let param = format!("messages[{i}]");
        let role = m.get("role").and_then(Json::as_str).unwrap_or("").to_string();
        let role = role.as_str();
        if !["system", "developer", "user", "assistant", "tool"].contains(&role) {
            return Err(ApiError::bad_request(
                format!("{param}.role must be system, developer, user, assistant or tool"),
                Some(&param),
            ));
        }
        if role == "developer" {
            m["role"] = Json::from("system");
        }
        if let Some(Json::Array(parts)) = m.get("content") {
            let mut text = String::new();
            for p in parts {
                match p.get("text").and_then(Json::as_str) {
                    Some(t) => text.push_str(t),
                    None => {
                        return Err(ApiError::bad_request(
                            format!("{param}.content: only text parts are supported"),
                            Some(&param),
                        ))
                    }
                }
            }
            m["content"] = Json::from(text);
        }
        check_message(&m, role, &param)?;
        out.push(m);
    }
    Ok(out)
}

/// A message's `content` and `tool_calls` (content parts already joined): text everywhere,
/// except that an assistant message with `tool_calls` may have none; `tool_calls` only on an
/// assistant message, each `{"type": "function", "function": {"name": …, "arguments": …}}`.
fn check_message(m: &Json, role: &str, param: &str) -> Result<(), ApiError> {
    let calls = m.get("tool_calls").filter(|c| !c.is_null());
    if let Some(calls) = calls {
        let at = format!("{param}.tool_calls");
        if role != "assistant" {
            return Err(ApiError::bad_request(
                format!("{at}: only an assistant message has tool calls"),
                Some(&at),
            ));
        }
        let Some(list) = calls.as_array() else {
            return Err(ApiError::bad_request(
                format!("{at} must be an array of tool calls, got {calls}"),
                Some(&at),
            ));
        };
        for (k, c) in list.iter().enumerate() {
            check_tool_call(c, &format!("{at}[{k}]"))?;
        }
    }
    let content = format!("{param}.content");
    match m.get("content") {
        Some(Json::String(_)) => Ok(()),
        None | Some(Json::Null) if role == "assistant" && calls.is_some() => Ok(()),
        None => Err(ApiError::bad_request(format!("{content} is required (a string)"), Some(&content))),
        Some(v) => Err(ApiError::bad_request(
            format!("{content} must be a string or an array of text parts, got {v}"),
            Some(&content),
        )),
    }
}

fn check_tool_call(c: &Json, at: &str) -> Result<(), ApiError> {
    let bad = |why: &str| ApiError::bad_request(format!("{at}: {why}"), Some(at));
    if !c.is_object() {
        return Err(bad("a tool call must be an object {\"type\": \"function\", \"function\": {…}}"));
    }
    if c.get("type").is_some_and(|t| t != "function") {
        return Err(bad("`type` must be \"function\""));
    }
    let f = &c["function"];
    if !f["name"].is_string() {
        return Err(bad("needs `function.name` (a string)"));
    }
    match f.get("arguments") {
        None | Some(Json::String(_)) | Some(Json::Object(_)) => Ok(()),
        Some(v) => Err(bad(&format!("`function.arguments` must be a JSON string or an object, got {v}"))),
    }
}

/// `prompt` of /v1/completions: a string, a one-string array, or token ids.
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

pub fn prompt(o: &Map<String, Json>) -> Result<Prompt, ApiError> {
    let bad = || {
        ApiError::bad_request(
            "`prompt` must be a string or an array of token ids (one prompt per request)",
            Some("prompt"),
        )
    };
    match o.get("prompt") {
        Some(Json::String(s)) => Ok(Prompt::Text(s.clone())),
        Some(Json::Array(a)) if a.len() == 1 && a[0].is_string() => {
            Ok(Prompt::Text(a[0].as_str().unwrap().into()))
        }
        Some(v @ Json::Array(_)) => serde_json::from_value(v.clone()).map(Prompt::Ids).map_err(|_| bad()),
        None => Err(ApiError::bad_request("`prompt` is required", Some("prompt"))),
        _ => Err(bad()),
    }
}
