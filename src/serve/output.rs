//! A sample's text as OpenAI message fields: reasoning inside `<think>…</think>` goes to
//! `reasoning_content` (as vLLM's reasoning parsers do), and calls written as `<tool_call>`
//! JSON blocks or as a Python call list become `tool_calls`, decoded by the same decoders that
//! `fcgpu eval` scores with (`fc::decode`).

use serde_json::{json, Value as Json};

use crate::fc::decode::{decode, decode_json_tool_calls, AnswerFormat, Call, Lang};

const THINK: &str = "<think>";
const THINK_END: &str = "</think>";

/// Reasoning and content of `text` so far. While the reasoning is open, a tail that could be
/// the start of `</think>` is held back (unless `done`), so streamed pieces never retract.
pub fn split_reasoning(text: &str, done: bool) -> (&str, &str) {
    let t = text.trim_start();
    if !t.starts_with(THINK) {
        if !done && !t.is_empty() && THINK.starts_with(t) {
            return ("", "");
        }
        return ("", text);
    }
    let inner = &t[THINK.len()..];
    if let Some(i) = inner.find(THINK_END) {
        return (&inner[..i], &inner[i + THINK_END.len()..]);
    }
    if done {
        return (inner, "");
    }
    let mut end = inner.len();
    for k in 1..THINK_END.len() {
        if inner.ends_with(&THINK_END[..k]) {
            end = inner.len() - k;
            break;
        }
    }
    (&inner[..end], "")
}

/// The calls in an answer: `<tool_call>` JSON blocks when there are any, else the whole
/// answer as a Python call list. None when it is neither (plain text), or when a call has a
/// positional argument, which a JSON object of arguments cannot hold.
pub fn parse_tool_calls(content: &str) -> Option<Vec<Call>> {
    let calls = if content.contains("<tool_call>") {
        decode_json_tool_calls(content).ok()?
    } else {
        decode(content, Lang::Python, AnswerFormat::Python).ok()?
    };
    if calls.is_empty() || calls.iter().any(|c| c.args.iter().any(|(k, _)| k.is_none())) {
        return None;
    }
    Some(calls)
}

/// OpenAI `tool_calls` entries; ids are `call_<request id>_<sample>_<k>` (unique per response).
pub fn tool_calls_json(calls: &[Call], id_prefix: &str) -> Vec<Json> {
    calls
        .iter()
        .enumerate()
        .map(|(k, c)| {
            let args: serde_json::Map<String, Json> =
                c.args.iter().filter_map(|(k, v)| Some((k.clone()?, v.to_json()))).collect();
            json!({
                "id": format!("call_{id_prefix}_{k}"),
                "type": "function",
                "function": {"name": c.name, "arguments": Json::Object(args).to_string()},
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasoning_is_split_and_held_back_while_open() {
        assert_eq!(split_reasoning("<think>a b</think>\n[f()]", true), ("a b", "\n[f()]"));
        assert_eq!(split_reasoning("<think>a </th", false), ("a ", ""));
        assert_eq!(split_reasoning("<thi", false), ("", ""));
        assert_eq!(split_reasoning("plain", false), ("", "plain"));
    }

    #[test]
    fn both_call_formats_become_tool_calls() {
        let c = parse_tool_calls("[get_weather(city='Paris', days=3)]").unwrap();
        let j = tool_calls_json(&c, "x_0");
        assert_eq!(j[0]["function"]["name"], "get_weather");
        let args: Json = serde_json::from_str(j[0]["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args, json!({"city": "Paris", "days": 3}));
        let c = parse_tool_calls("<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": [1]}}\n</tool_call>")
            .unwrap();
        assert_eq!(c[0].name, "f");
        assert!(parse_tool_calls("Hello there").is_none());
        // BFCL's Python resolver keeps keyword arguments only.
        let c = parse_tool_calls("[f(1)]").unwrap();
        assert_eq!(tool_calls_json(&c, "x")[0]["function"]["arguments"], "{}");
    }
}
