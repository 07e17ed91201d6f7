//! Chat prompts: a conversation rendered with the model's own chat template
//! ([`ChatTemplate`], as transformers' `apply_chat_template` renders it), ending with the
//! assistant's generation prompt; or the embedded task's compact prompt (one signature line per
//! tool, calls as a Python list), which models trained by `fcgpu train` on that task answer.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde_json::Value;

pub use crate::chat_template::ChatTemplate;
use crate::chat_template::{dumps, DumpOptions};
use crate::model::Model;

#[derive(Clone, Debug)]
pub enum ChatFormat {
    /// The model's own chat template.
    Template(Arc<ChatTemplate>),
    /// The embedded task's prompt (`data::synth::render_prompt`): ChatML with one signature line
    /// per tool; the model thinks in `<think></think>`, then answers with a Python call list.
    Compact,
}

impl ChatFormat {
    /// The format of a model: the chat template of the directory it was loaded from; an error
    /// naming the directory when it has none.
    pub fn for_model(model: &Model) -> Result<ChatFormat> {
        let dir = model
            .dir
            .as_deref()
            .context("the model was not loaded from a directory, so it has no chat template")?;
        Self::for_dir(dir)
    }

    /// The chat template of a model directory.
    pub fn for_dir(dir: &Path) -> Result<ChatFormat> {
        Ok(ChatFormat::Template(Arc::new(ChatTemplate::load(dir)?)))
    }

    /// The prompt text of `messages` (and `tools`), ending with the assistant's turn opening.
    /// Templates that start with a BOS token write it: tokenize without adding special tokens.
    pub fn render(&self, messages: &[Value], tools: Option<&[Value]>) -> Result<String> {
        self.render_with(messages, tools, true)
    }

    /// [`render`](Self::render), with or without the assistant's generation prompt at the end.
    /// An empty tool list counts as no tools.
    pub fn render_with(
        &self,
        messages: &[Value],
        tools: Option<&[Value]>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tools = tools.filter(|t| !t.is_empty());
        match self {
            ChatFormat::Template(t) => t.render(messages, tools, add_generation_prompt),
            ChatFormat::Compact => {
                if !add_generation_prompt {
                    bail!("the compact prompt always ends with the assistant's turn opening");
                }
                let msgs: Vec<Msg> = messages
                    .iter()
                    .enumerate()
                    .map(|(i, m)| Msg::parse(m).with_context(|| format!("message {}", i + 1)))
                    .collect::<Result<_>>()?;
                Ok(render_compact(&msgs, tools.unwrap_or(&[])))
            }
        }
    }

    /// Whether the format shows tools to the model (a template that never reads `tools` does not).
    pub fn shows_tools(&self) -> bool {
        match self {
            ChatFormat::Template(t) => t.uses_tools(),
            ChatFormat::Compact => true,
        }
    }

    /// How to make an answer call `name` (any tool when None), in this format's call syntax:
    /// the text to append to the prompt, and, for a format whose model reasons first, the text
    /// that ends the reasoning and what to write after it. The function and the call's opening
    /// are forced; the arguments are still the model's own (no grammar-constrained decoding).
    /// A template's call syntax is the one it writes for an assistant's earlier calls.
    pub fn forced_call(&self, name: Option<&str>) -> Result<(String, Option<(String, String)>)> {
        match self {
            ChatFormat::Template(t) => {
                let c = t.call_syntax().with_context(|| {
                    format!(
                        "chat template {} writes no tool calls fcgpu can recognise (a function name followed by JSON arguments), so a call cannot be forced",
                        t.origin(true).unwrap_or("(unnamed)")
                    )
                })?;
                let text = match name {
                    Some(n) => format!("{}{n}{}", c.before_name, c.before_args),
                    None => c.before_name.clone(),
                };
                Ok((text, None))
            }
            // The compact model reasons before it answers: let it, then start the call.
            ChatFormat::Compact => {
                let call = name.map_or("\n\n[".to_string(), |n| format!("\n\n[{n}("));
                Ok(("<think>".into(), Some(("</think>".into(), call))))
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

/// Python's `json.dumps(v, ensure_ascii=False[, indent=n])` (transformers' `tojson`).
pub fn tojson(v: &Value, indent: Option<usize>) -> String {
    dumps(v, &DumpOptions::python(indent))
}
