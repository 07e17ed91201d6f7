//! Chat prompts rendered as the model families' chat templates do, ending with the assistant
//! generation prompt: Qwen ChatML (Qwen2.5 / Qwen3 templates, tools as the `# Tools` system
//! block) and Llama 3 headers (3.1 templates: tools in the first user message); and the
//! embedded task's compact prompt (one signature line per tool, calls as a Python list), which
//! models trained by `fcgpu train` on that task answer.
//!
//! Not a Jinja engine: the two templates are written out by hand. JSON inside prompts is written
//! as transformers' `tojson` filter writes it (`json.dumps(ensure_ascii=False)`: `", "` and
//! `": "` separators, keys in their given order).

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::model::{Arch, Model};

#[derive(Clone, Debug, PartialEq)]
pub enum ChatFormat {
    /// `<|im_start|>role\n…<|im_end|>\n`; `default_system` is used when the conversation has
    /// no system message (Qwen2.5: "You are Qwen, created by Alibaba Cloud. …"; Qwen3: none).
    ChatMl { default_system: Option<String> },
    /// `<|start_header_id|>role<|end_header_id|>\n\n…<|eot_id|>`; `dated` adds the Llama 3.1
    /// system preamble ("Cutting Knowledge Date: …").
    Llama3 { dated: bool },
    /// The embedded task's prompt (`data::synth::render_prompt`): ChatML with one signature line
    /// per tool; the model thinks in `<think></think>`, then answers with a Python call list.
    Compact,
}

const QWEN25_SYSTEM: &str = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";
const QWEN2_SYSTEM: &str = "You are a helpful assistant.";

impl ChatFormat {
    /// The format of a model: its family, refined by the chat template in
    /// `tokenizer_config.json` when the model directory has one.
    pub fn for_model(model: &Model) -> ChatFormat {
        let template = model.dir.as_deref().and_then(chat_template);
        let has = |s: &str| template.as_deref().is_some_and(|t| t.contains(s));
        let llama = if has("<|im_start|>") {
            false
        } else if has("<|start_header_id|>") {
            true
        } else {
            model.config.arch == Arch::Llama
        };
        if llama {
            return ChatFormat::Llama3 { dated: template.is_none() || has("Cutting Knowledge Date") };
        }
        let default_system = if template.is_some() {
            if has(QWEN25_SYSTEM) {
                Some(QWEN25_SYSTEM.to_string())
            } else if has(QWEN2_SYSTEM) && has("loop.first") {
                Some(QWEN2_SYSTEM.to_string())
            } else {
                None
            }
        } else if model.config.arch == Arch::Qwen2 {
            Some(QWEN25_SYSTEM.to_string())
        } else {
            None
        };
        ChatFormat::ChatMl { default_system }
    }

    /// The prompt text of `messages` (and `tools`), ending with the assistant's turn opening.
    /// Llama 3 text starts with `<|begin_of_text|>`: tokenize it without adding special tokens.
    pub fn render(&self, messages: &[Value], tools: Option<&[Value]>) -> Result<String> {
        let msgs: Vec<Msg> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| Msg::parse(m).with_context(|| format!("message {}", i + 1)))
            .collect::<Result<_>>()?;
        let tools = tools.filter(|t| !t.is_empty());
        match self {
            ChatFormat::ChatMl { default_system } => {
                Ok(render_chatml(&msgs, tools, default_system.as_deref()))
            }
            ChatFormat::Llama3 { dated } => render_llama3(&msgs, tools, *dated),
            ChatFormat::Compact => Ok(render_compact(&msgs, tools.unwrap_or(&[]))),
        }
    }

    /// How to make an answer call `name` (any tool when None), in this format's call syntax:
    /// the text to append to the prompt, and, for a format whose model reasons first, the text
    /// that ends the reasoning and what to write after it. The function and the call's opening
    /// are forced; the arguments are still the model's own (no grammar-constrained decoding).
    pub fn forced_call(&self, name: Option<&str>) -> (String, Option<(String, String)>) {
        let quoted = |n: &str| tojson(&Value::from(n), None);
        match (self, name) {
            (ChatFormat::ChatMl { .. }, Some(n)) => {
                (format!("<tool_call>\n{{\"name\": {}, \"arguments\": ", quoted(n)), None)
            }
            (ChatFormat::ChatMl { .. }, None) => ("<tool_call>\n{\"name\": \"".into(), None),
            (ChatFormat::Llama3 { .. }, Some(n)) => {
                (format!("{{\"name\": {}, \"parameters\": ", quoted(n)), None)
            }
            (ChatFormat::Llama3 { .. }, None) => ("{\"name\": \"".into(), None),
            // The compact model reasons before it answers: let it, then start the call.
            (ChatFormat::Compact, n) => {
                let call = n.map_or("\n\n[".to_string(), |n| format!("\n\n[{n}("));
                ("<think>".into(), Some(("</think>".into(), call)))
            }
        }
    }
}

/// The compact prompt of the embedded task for a chat: OpenAI-style tools (`{"type":
/// "function", "function": {...}}`) or bare function docs; earlier assistant calls written as
/// the Python call list the model answers with.
fn render_compact(msgs: &[Msg], tools: &[Value]) -> String {
    let docs: Vec<Value> = tools.iter().map(|t| t.get("function").unwrap_or(t).clone()).collect();
    let messages: Vec<crate::data::Message> = msgs
        .iter()
        .map(|m| {
            let mut content = m.content.clone();
            if !m.tool_calls.is_empty() {
                let calls: Vec<String> = m.tool_calls.iter().map(|(n, a)| python_call(n, a)).collect();
                if !content.is_empty() {
                    content.push_str("\n\n");
                }
                content.push_str(&format!("[{}]", calls.join(", ")));
            }
            crate::data::Message { role: m.role.to_string(), content }
        })
        .collect();
    crate::data::synth::render_prompt(&messages, &docs)
}

/// `name(k=v, ...)` with Python literals; `args` is an object or a JSON string of one.
fn python_call(name: &str, args: &Value) -> String {
    let parsed;
    let obj = match args {
        Value::String(s) => {
            parsed = serde_json::from_str::<Value>(s).unwrap_or(Value::Null);
            &parsed
        }
        other => other,
    };
    let kv: Vec<String> = obj
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", crate::data::synth::py(v)))
        .collect();
    format!("{name}({})", kv.join(", "))
}

/// The chat template: `chat_template.jinja` (transformers ≥ 4.56) or the `chat_template` of
/// `tokenizer_config.json`.
fn chat_template(dir: &Path) -> Option<String> {
    if let Ok(t) = std::fs::read_to_string(dir.join("chat_template.jinja")) {
        return Some(t);
    }
    let text = std::fs::read_to_string(dir.join("tokenizer_config.json")).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    match v.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(a) => Some(
            a.iter()
                .filter_map(|t| t.get("template").and_then(|x| x.as_str()))
                .collect::<Vec<_>>()
                .join("\n"),
        ),
        _ => None,
    }
}

struct Msg<'a> {
    role: &'a str,
    content: String,
    tool_calls: Vec<(String, Value)>,
}

impl<'a> Msg<'a> {
    fn parse(m: &'a Value) -> Result<Msg<'a>> {
        let role = m.get("role").and_then(|r| r.as_str()).context("needs a string `role`")?;
        let content = match m.get("content") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => tojson(other, None),
        };
        let mut tool_calls = Vec::new();
        if let Some(calls) = m.get("tool_calls").and_then(|c| c.as_array()) {
            for c in calls {
                let f = c.get("function").unwrap_or(c);
                let name = f.get("name").and_then(|n| n.as_str()).context("tool call without a `name`")?;
                let args = f.get("arguments").cloned().unwrap_or(Value::Object(Default::default()));
                tool_calls.push((name.to_string(), args));
            }
        }
        Ok(Msg { role, content, tool_calls })
    }
}

/// Arguments as the templates write them: a JSON string is inserted as is, else `tojson`.
fn args_text(a: &Value) -> String {
    match a {
        Value::String(s) => s.clone(),
        other => tojson(other, None),
    }
}

fn render_chatml(msgs: &[Msg], tools: Option<&[Value]>, default_system: Option<&str>) -> String {
    let mut s = String::new();
    let first_system = msgs.first().filter(|m| m.role == "system");
    if let Some(tools) = tools {
        s.push_str("<|im_start|>system\n");
        match (first_system, default_system) {
            (Some(m), _) => {
                s.push_str(&m.content);
                s.push_str("\n\n");
            }
            (None, Some(d)) => {
                s.push_str(d);
                s.push_str("\n\n");
            }
            (None, None) => {}
        }
        s.push_str("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>");
        for t in tools {
            s.push('\n');
            s.push_str(&tojson(t, None));
        }
        s.push_str("\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n");
    } else if let Some(m) = first_system {
        s.push_str(&format!("<|im_start|>system\n{}<|im_end|>\n", m.content));
    } else if let Some(d) = default_system {
        s.push_str(&format!("<|im_start|>system\n{d}<|im_end|>\n"));
    }
    for (i, m) in msgs.iter().enumerate() {
        match m.role {
            "system" if i == 0 => {}
            "assistant" if !m.tool_calls.is_empty() => {
                s.push_str("<|im_start|>assistant");
                if !m.content.is_empty() {
                    s.push('\n');
                    s.push_str(&m.content);
                }
                for (name, args) in &m.tool_calls {
                    s.push_str(&format!(
                        "\n<tool_call>\n{{\"name\": \"{name}\", \"arguments\": {}}}\n</tool_call>",
                        args_text(args)
                    ));
                }
                s.push_str("<|im_end|>\n");
            }
            "tool" => {
                if i == 0 || msgs[i - 1].role != "tool" {
                    s.push_str("<|im_start|>user");
                }
                s.push_str("\n<tool_response>\n");
                s.push_str(&m.content);
                s.push_str("\n</tool_response>");
                if i + 1 == msgs.len() || msgs[i + 1].role != "tool" {
                    s.push_str("<|im_end|>\n");
                }
            }
            role => s.push_str(&format!("<|im_start|>{role}\n{}<|im_end|>\n", m.content)),
        }
    }
    s.push_str("<|im_start|>assistant\n");
    s
}

fn render_llama3(msgs: &[Msg], tools: Option<&[Value]>, dated: bool) -> Result<String> {
    let mut s = String::from("<|begin_of_text|>");
    let (system, mut rest) = match msgs.first() {
        Some(m) if m.role == "system" => (Some(m.content.trim()), &msgs[1..]),
        _ => (None, msgs),
    };
    if dated || system.is_some() || tools.is_some() {
        s.push_str("<|start_header_id|>system<|end_header_id|>\n\n");
        if tools.is_some() {
            s.push_str("Environment: ipython\n");
        }
        if dated {
            s.push_str("Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n");
        }
        s.push_str(system.unwrap_or(""));
        s.push_str("<|eot_id|>");
    }
    if let Some(tools) = tools {
        let Some(first) = rest.first() else {
            bail!("tools go into the first user message, and there is none")
        };
        s.push_str("<|start_header_id|>user<|end_header_id|>\n\n");
        s.push_str("Given the following functions, please respond with a JSON for a function call with its proper arguments that best answers the given prompt.\n\n");
        s.push_str("Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.Do not use variables.\n\n");
        for t in tools {
            s.push_str(&tojson(t, Some(4)));
            s.push_str("\n\n");
        }
        s.push_str(first.content.trim());
        s.push_str("<|eot_id|>");
        rest = &rest[1..];
    }
    for m in rest {
        if !m.tool_calls.is_empty() {
            s.push_str("<|start_header_id|>assistant<|end_header_id|>\n\n");
            for (name, args) in &m.tool_calls {
                s.push_str(&format!("{{\"name\": \"{name}\", \"parameters\": {}}}", tojson(args, None)));
            }
            s.push_str("<|eot_id|>");
        } else if m.role == "tool" || m.role == "ipython" {
            s.push_str(&format!("<|start_header_id|>ipython<|end_header_id|>\n\n{}<|eot_id|>", m.content));
        } else {
            s.push_str(&format!(
                "<|start_header_id|>{}<|end_header_id|>\n\n{}<|eot_id|>",
                m.role,
                m.content.trim()
            ));
        }
    }
    s.push_str("<|start_header_id|>assistant<|end_header_id|>\n\n");
    Ok(s)
}

/// Python's `json.dumps(v, ensure_ascii=False[, indent=n])`.
pub fn tojson(v: &Value, indent: Option<usize>) -> String {
    let mut s = String::new();
    write_json(&mut s, v, indent, 0);
    s
}

fn write_json(s: &mut String, v: &Value, indent: Option<usize>, level: usize) {
    let nl = |s: &mut String, level: usize| {
        if let Some(n) = indent {
            s.push('\n');
            s.push_str(&" ".repeat(n * level));
        }
    };
    let sep = if indent.is_some() { "," } else { ", " };
    match v {
        Value::Array(a) if !a.is_empty() => {
            s.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    s.push_str(sep);
                }
                nl(s, level + 1);
                write_json(s, x, indent, level + 1);
            }
            nl(s, level);
            s.push(']');
        }
        Value::Object(o) if !o.is_empty() => {
            s.push('{');
            for (i, (k, x)) in o.iter().enumerate() {
                if i > 0 {
                    s.push_str(sep);
                }
                nl(s, level + 1);
                s.push_str(&serde_json::to_string(k).unwrap());
                s.push_str(": ");
                write_json(s, x, indent, level + 1);
            }
            nl(s, level);
            s.push('}');
        }
        Value::Number(n) => s.push_str(&py_number(n)),
        other => s.push_str(&serde_json::to_string(other).unwrap()),
    }
}

/// Floats as Python's `repr` writes them (`1.0`, `1e-05`, `1e+16`); integers unchanged.
fn py_number(n: &serde_json::Number) -> String {
    if n.is_i64() || n.is_u64() {
        return n.to_string();
    }
    let f = n.as_f64().unwrap_or(0.0);
    let a = f.abs();
    if a != 0.0 && !(1e-4..1e16).contains(&a) {
        // Python: shortest round-trip digits in exponent form with a 2-digit minimum exponent.
        let e = format!("{f:e}");
        let (mant, exp) = e.split_once('e').unwrap();
        let exp: i32 = exp.parse().unwrap();
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mant}e{sign}{:02}", exp.abs());
    }
    let s = format!("{f}");
    if s.contains('.') || s.contains("inf") || s.contains("NaN") {
        s
    } else {
        format!("{s}.0")
    }
}
