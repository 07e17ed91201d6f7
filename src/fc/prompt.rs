//! Prompt rendering: BFCL's prompting-mode system prompt, fcgpu's reasoning variant, and
//! native JSON tool calling (the functions given to the chat template as `tools`), each a
//! conversation rendered by the model's own chat template. Without a model, fcgpu's built-in
//! template writes the Qwen ChatML that BFCL's Qwen handlers write (byte-identical to them).
//! Also the SFT completion target.

use std::sync::OnceLock;

use anyhow::{Context, Result};

use crate::chat_template::ChatTemplate;
use crate::data::Sample;
use crate::fc::decode::Lang;
use crate::fc::json_py::dumps;
use crate::fc::value::Value;
use serde_json::Value as Json;

/// How a sample becomes prompt text (`--style`, `style` in config.toml).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PromptStyle {
    /// The embedded task's short ChatML prompt: one signature line per tool
    /// (`data::synth::render_prompt`).
    Compact,
    /// BFCL's default prompting-mode prompt (what BFCL sends a Qwen model).
    Bfcl,
    /// BFCL's prompt plus fcgpu's instruction to reason inside `<think></think>` first.
    Reasoning,
    /// Qwen's native JSON tool calling (`<tools>` in the system message).
    QwenFc,
}

const PERSONA: &str = "You are an expert in composing functions.";
const TASK: &str = "You are given a question and a set of possible functions. Based on the question, you will need to make one or more function/tool calls to achieve the purpose. If none of the functions can be used, point it out. If the given question lacks the parameters required by the function, also point it out.";
const TOOL_CALL: &str = "You should only return the function calls in your response.\n\nIf you decide to invoke any of the function(s), you MUST put it in the format of [func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)].  You SHOULD NOT include any other text in the response.";
const MULTITURN: &str = "At each turn, you should try your best to complete the tasks requested by the user within the current turn. Continue to output functions to call until you have fulfilled the user's request to the best of your ability. Once you have no more functions to call, the system will consider the current turn complete and proceed to the next turn or task.";

/// fcgpu's reasoning instruction (SPEC §1), appended to BFCL's system prompt.
pub const REASONING_INSTRUCTION: &str = "Before answering, think step by step inside <think></think>: decide which function(s) fit the request and check that every required parameter has a value from the question. After </think>, give only the list of function calls in the format above, with no other text; if no function can be used, say so in plain text instead.";

/// What an irrelevance target says after its reasoning.
pub const NO_CALL_TEXT: &str = "None of the provided functions can be used to answer this question.";

fn hint(lang: Lang) -> &'static str {
    match lang {
        Lang::Java => " Note that the provided function is in Java 8 SDK syntax.",
        Lang::JavaScript => " Note that the provided function is in JavaScript syntax.",
        Lang::Python => " Note that the provided function is in Python 3 syntax.",
    }
}

fn append(v: &mut Json, key: &str, extra: &str) {
    let cur = v.get(key).and_then(Json::as_str).unwrap_or_default().to_string();
    v[key] = Json::String(cur + extra);
}

/// BFCL's `_func_doc_language_specific_pre_processing`: description hints; Java/JavaScript
/// parameters become strings with their real type spelled out.
pub fn functions_with_hints(functions: &[Json], category: &str) -> Vec<Json> {
    let lang = Lang::of_category(category);
    let mut out = functions.to_vec();
    for f in &mut out {
        append(f, "description", hint(lang));
        if lang == Lang::Python {
            continue;
        }
        let Some(props) =
            f.get_mut("parameters").and_then(|p| p.get_mut("properties")).and_then(Json::as_object_mut)
        else {
            continue;
        };
        for (_, p) in props.iter_mut() {
            language_param(p, lang);
        }
    }
    out
}

fn language_param(p: &mut Json, lang: Lang) {
    let ty = p.get("type").and_then(Json::as_str).unwrap_or_default().to_string();
    let lname = if lang == Lang::Java { "Java" } else { "JavaScript" };
    if ty == "any" {
        append(
            p,
            "description",
            &format!(" This parameter can be of any type of {lname} object in string representation."),
        );
    } else {
        append(p, "description", &format!(" This is {lname} {ty} type parameter in string representation."));
    }
    let is_list = if lang == Lang::Java { ty == "ArrayList" || ty == "Array" } else { ty == "array" };
    if is_list {
        let item = p["items"]["type"].as_str().unwrap_or_default().to_string();
        append(
            p,
            "description",
            &format!(" The list elements are of type {item}; they are not in string representation."),
        );
        if let Some(o) = p.as_object_mut() {
            o.shift_remove("items");
        }
    }
    if lang == Lang::JavaScript && ty == "dict" && p.get("properties").is_some() {
        let schema = dumps(&p["properties"], None);
        append(p, "description", &format!(" The dictionary entries have the following schema; they are not in string representation. {schema}"));
        if let Some(o) = p.as_object_mut() {
            o.shift_remove("properties");
        }
    }
    p["type"] = Json::String("string".into());
}

/// BFCL's default system prompt for a list of (already hinted) functions.
pub fn bfcl_system_prompt(functions: &[Json]) -> String {
    let docs = dumps(&Json::Array(functions.to_vec()), Some(4));
    format!(
        "{PERSONA}{TASK}\n\n{TOOL_CALL}\n\n{MULTITURN}\n\nHere is a list of functions in json format that you can invoke.\n{docs}\n"
    )
}

/// fcgpu's built-in chat template: the Qwen ChatML that BFCL's Qwen handlers write.
pub const BUILTIN_TEMPLATE: &str = include_str!("../../prompts/templates/qwen-chatml.jinja");

/// The built-in template, compiled once.
pub fn builtin_template() -> &'static ChatTemplate {
    static T: OnceLock<ChatTemplate> = OnceLock::new();
    T.get_or_init(|| {
        ChatTemplate::from_source(
            BUILTIN_TEMPLATE,
            "prompts/templates/qwen-chatml.jinja (built in)",
            &[("eos_token", "<|im_end|>")],
        )
        .expect("the built-in chat template compiles (tests/chat_template.rs renders it)")
    })
}

/// A sample as the chat template is given it in a style: for `bfcl` and `reasoning`, BFCL's
/// system prompt (with the functions) before the sample's own system text; for `qwen-fc`, the
/// sample's messages with its functions as `tools`.
pub fn prompt_messages(sample: &Sample, style: PromptStyle) -> (Vec<Json>, Option<Vec<Json>>) {
    let functions = functions_with_hints(&sample.functions, &sample.category);
    let mut msgs: Vec<Json> =
        sample.messages.iter().map(|m| serde_json::json!({"role": m.role, "content": m.content})).collect();
    if style == PromptStyle::QwenFc {
        return (msgs, (!functions.is_empty()).then_some(functions));
    }
    let mut system = bfcl_system_prompt(&functions);
    if style == PromptStyle::Reasoning {
        system = format!("{system}\n{REASONING_INSTRUCTION}\n");
    }
    match msgs.first_mut() {
        Some(m) if m["role"] == "system" => {
            m["content"] = Json::String(format!("{system}\n\n{}", m["content"].as_str().unwrap_or_default()))
        }
        _ => msgs.insert(0, serde_json::json!({"role": "system", "content": system})),
    }
    (msgs, None)
}

/// The full prompt text for a sample in a style, rendered by fcgpu's built-in template (BFCL's
/// Qwen ChatML; ends with `<|im_start|>assistant\n`). `compact` is the embedded task's own format.
pub fn render_prompt(sample: &Sample, style: PromptStyle) -> Result<String> {
    render_prompt_with(None, sample, style)
}

/// The full prompt text for a sample in a style, rendered by `template` (a model's own; the
/// built-in one when None), ending with the template's generation prompt. `compact` keeps the
/// embedded task's fixed format whatever the template.
pub fn render_prompt_with(
    template: Option<&ChatTemplate>,
    sample: &Sample,
    style: PromptStyle,
) -> Result<String> {
    if style == PromptStyle::Compact {
        return Ok(crate::data::synth::render_prompt(&sample.messages, &sample.functions));
    }
    let (messages, tools) = prompt_messages(sample, style);
    let template = match template {
        Some(t) => t,
        None => builtin_template(),
    };
    template
        .render(&messages, tools.as_deref(), true)
        .with_context(|| format!("the prompt of entry {}", sample.id))
}

/// The value to write for one ground-truth parameter: its first allowed value, or the first
/// non-empty one for a required parameter; None when the parameter is best left out.
fn chosen_value(alts: &Json, required: bool) -> Option<Json> {
    let a = alts.as_array()?;
    let empty = Json::String(String::new());
    let first = if required { a.iter().find(|v| **v != empty)? } else { a.first()? };
    (*first != empty).then(|| concrete(first))
}

/// Dicts in ground truths map each key to its allowed values; pick one per key.
fn concrete(v: &Json) -> Json {
    match v {
        Json::Object(o) => Json::Object(
            o.iter()
                .filter_map(|(k, alts)| match alts {
                    Json::Array(_) => chosen_value(alts, false).map(|x| (k.clone(), x)),
                    other => Some((k.clone(), other.clone())),
                })
                .collect(),
        ),
        Json::Array(a) => {
            Json::Array(a.iter().map(|x| if x.is_object() { concrete(x) } else { x.clone() }).collect())
        }
        other => other.clone(),
    }
}

fn java_scalar(v: &Json, ty: &str) -> String {
    match (ty, v) {
        (_, Json::String(s)) if matches!(ty, "String") => format!("\"{s}\""),
        (_, Json::String(s)) => s.clone(),
        ("long", Json::Number(n)) => format!("{n}L"),
        ("float", Json::Number(n)) => {
            format!("{}f", Value::from_json(&Json::Number(n.clone())).repr())
        }
        (_, Json::Number(n)) => Value::from_json(&Json::Number(n.clone())).repr(),
        (_, other) => other.to_string(),
    }
}

/// Java source for a ground-truth value of a parameter type (BFCL's converters parse these).
fn java_value(v: &Json, ty: &str, item: &str) -> String {
    match (ty, v) {
        ("ArrayList", Json::Array(a)) => {
            let parts: Vec<String> = a
                .iter()
                .map(|x| java_scalar(x, if item == "any" && x.is_string() { "String" } else { item }))
                .collect();
            format!("new ArrayList<>(Arrays.asList({}))", parts.join(", "))
        }
        ("Array", Json::Array(a)) => {
            let jt = match item {
                "integer" => "int",
                "String" => "String",
                "long" => "long",
                "double" => "double",
                other => other,
            };
            let parts: Vec<String> = a.iter().map(|x| java_scalar(x, item)).collect();
            format!("new {jt}[]{{{}}}", parts.join(", "))
        }
        ("HashMap", Json::Object(o)) => {
            let puts: Vec<String> = o
                .iter()
                .map(|(k, x)| {
                    format!("put(\"{k}\", {}); ", java_scalar(x, if x.is_string() { "String" } else { "" }))
                })
                .collect();
            format!("new HashMap<String, Object>() {{{{ {}}}}}", puts.concat())
        }
        _ => java_scalar(v, ty),
    }
}

fn js_value(v: &Json, ty: &str) -> String {
    match (ty, v) {
        ("String", Json::String(s)) => format!("\"{s}\""),
        (_, Json::String(s)) => s.clone(),
        ("Bigint", Json::Number(n)) => format!("{n}n"),
        (_, Json::Array(a)) => {
            let parts: Vec<String> =
                a.iter().map(|x| js_value(x, if x.is_string() { "String" } else { "" })).collect();
            format!("[{}]", parts.join(", "))
        }
        (_, Json::Object(o)) => {
            let parts: Vec<String> = o
                .iter()
                .map(|(k, x)| format!("{k}: {}", js_value(x, if x.is_string() { "String" } else { "" })))
                .collect();
            format!("{{{}}}", parts.join(", "))
        }
        (_, Json::Number(n)) => Value::from_json(&Json::Number(n.clone())).repr(),
        (_, other) => other.to_string(),
    }
}

fn render_arg(lang: Lang, v: &Json, schema: Option<&Json>) -> String {
    let ty = schema.and_then(|s| s["type"].as_str()).unwrap_or("");
    let item = schema.and_then(|s| s["items"]["type"].as_str()).unwrap_or("");
    match lang {
        Lang::Python => Value::from_json(v).repr(),
        Lang::Java => java_value(v, ty, item),
        Lang::JavaScript => js_value(v, ty),
    }
}

/// The reference call list (`[f(a=1, b='x')]`), written in the category's language.
pub fn render_calls(sample: &Sample) -> String {
    let lang = Lang::of_category(&sample.category);
    let mut calls = Vec::new();
    for (name, params) in
        sample.ground_truth.iter().filter_map(Json::as_object).filter_map(|o| o.iter().next())
    {
        let doc = sample.functions.iter().find(|f| f["name"] == name.as_str());
        let required: Vec<&str> = doc
            .and_then(|d| d["parameters"]["required"].as_array())
            .into_iter()
            .flatten()
            .filter_map(Json::as_str)
            .collect();
        let mut args = Vec::new();
        for (k, alts) in params.as_object().into_iter().flatten() {
            if let Some(v) = chosen_value(alts, required.contains(&k.as_str())) {
                let schema = doc.map(|d| &d["parameters"]["properties"][k]);
                args.push(format!("{k}={}", render_arg(lang, &v, schema)));
            }
        }
        calls.push(format!("{name}({})", args.join(", ")));
    }
    format!("[{}]", calls.join(", "))
}

/// The SFT completion target: `<think>reasoning</think>\n\n[calls]` (or a plain refusal for
/// samples that expect no call).
pub fn render_target(sample: &Sample) -> String {
    let reasoning = sample.reasoning.clone().unwrap_or_default();
    let answer = if sample.expects_no_call() { NO_CALL_TEXT.to_string() } else { render_calls(sample) };
    format!("<think>{reasoning}</think>\n\n{answer}")
}
