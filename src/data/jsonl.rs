//! xLAM-style JSONL (`query`, `tools` JSON string, `answers` JSON string of
//! `{name, arguments}`) and fcgpu's own JSONL (`messages`, `tools`, `calls` in BFCL
//! ground-truth shape, optional `reasoning`, `id`, `category`).

use super::{data_err, infer_category, Message, Sample};
use anyhow::Result;
use serde_json::{json, Map, Value as Json};
use std::path::Path;

/// Loads a JSONL file of either format (detected per line: `query` means xLAM).
pub fn load_jsonl(path: &Path) -> Result<Vec<Sample>> {
    Ok(load_jsonl_lines(path)?.into_iter().map(|(_, s)| s).collect())
}

/// [`load_jsonl`] for scoring: every `id` must be unique, since answers are matched to entries
/// by id. A repeated id is an error naming the file, both lines and the id.
pub fn load_jsonl_unique_ids(path: &Path) -> Result<Vec<Sample>> {
    let lines = load_jsonl_lines(path)?;
    let mut first: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (line, s) in &lines {
        if let Some(earlier) = first.insert(&s.id, *line) {
            anyhow::bail!(
                "{}: lines {earlier} and {line} have the same id {:?}; answers are matched to entries by id, \
                 so each id must be unique",
                path.display(),
                s.id
            );
        }
    }
    Ok(lines.into_iter().map(|(_, s)| s).collect())
}

/// The samples of a JSONL file with their (1-based) line numbers.
fn load_jsonl_lines(path: &Path) -> Result<Vec<(usize, Sample)>> {
    let text = crate::jsonl::read_text(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let default_id = format!("{}_{}", path.file_stem().and_then(|s| s.to_str()).unwrap_or("line"), i + 1);
        let v: Json = serde_json::from_str(line).map_err(|e| data_err(path, i + 1, e))?;
        let s = if v.get("query").is_some() {
            parse_xlam_line(&v, &default_id)
        } else {
            parse_fcgpu_line(&v, &default_id)
        };
        out.push((i + 1, s.map_err(|e| data_err(path, i + 1, e))?));
    }
    Ok(out)
}

/// A JSON field that may hold JSON text (xLAM stores `tools`/`answers` as strings).
fn json_field(v: &Json, key: &str) -> Result<Json, String> {
    match v.get(key) {
        Some(Json::String(s)) => {
            serde_json::from_str(s).map_err(|e| format!("field \"{key}\" is not valid JSON: {e}"))
        }
        Some(other) => Ok(other.clone()),
        None => Err(format!("missing field \"{key}\"")),
    }
}

/// One xLAM record.
pub fn parse_xlam_line(v: &Json, default_id: &str) -> Result<Sample, String> {
    let query = v.get("query").and_then(Json::as_str).ok_or("field \"query\" must be a string")?;
    let tools = json_field(v, "tools")?;
    let tools = tools.as_array().ok_or("\"tools\" must be a list")?;
    let functions: Vec<Json> = tools.iter().map(xlam_tool).collect::<Result<_, _>>()?;
    let answers = json_field(v, "answers")?;
    let answers = answers.as_array().ok_or("\"answers\" must be a list")?;
    let mut calls = Vec::new();
    for a in answers {
        let name = a.get("name").and_then(Json::as_str).ok_or("answer without \"name\"")?;
        let args = a.get("arguments").and_then(Json::as_object).cloned().unwrap_or_default();
        let func = functions.iter().find(|f| f["name"] == name);
        calls.push(answer_to_ground_truth(name, &args, func));
    }
    let id = v
        .get("id")
        .map(|x| x.as_str().map(str::to_string).unwrap_or_else(|| x.to_string()))
        .unwrap_or_else(|| default_id.to_string());
    Ok(Sample {
        id,
        category: infer_category(functions.len(), &calls),
        messages: vec![Message { role: "user".into(), content: query.to_string() }],
        functions,
        ground_truth: calls,
        reasoning: None,
    })
}

/// `{name, arguments}` → `{name: {param: [value]}}`; optional parameters the answer leaves
/// out may be omitted (`""`) or given their default.
pub fn answer_to_ground_truth(name: &str, args: &Map<String, Json>, func: Option<&Json>) -> Json {
    let mut params = Map::new();
    for (k, v) in args {
        params.insert(k.clone(), json!([v]));
    }
    if let Some(f) = func {
        let required: Vec<&str> =
            f["parameters"]["required"].as_array().into_iter().flatten().filter_map(Json::as_str).collect();
        for (k, p) in f["parameters"]["properties"].as_object().into_iter().flatten() {
            if params.contains_key(k) || required.contains(&k.as_str()) {
                continue;
            }
            let mut alts = vec![json!("")];
            if let Some(d) = p.get("default").filter(|d| !d.is_null() && **d != json!("")) {
                alts.insert(0, d.clone());
            }
            params.insert(k.clone(), Json::Array(alts));
        }
    }
    json!({ name: params })
}

/// Maps an xLAM type (`str`, `List[int]`, `Optional[float]`, ...) to a BFCL type.
fn xlam_type(t: &str) -> (Json, bool) {
    let t = t.trim();
    let (inner, optional) = match t.strip_prefix("Optional[").and_then(|r| r.strip_suffix(']')) {
        Some(x) => (x.trim(), true),
        None => match t.strip_suffix(", optional") {
            Some(x) => (x.trim(), true),
            None => (t, false),
        },
    };
    let base = |s: &str| match s.to_ascii_lowercase().as_str() {
        "str" | "string" => "string",
        "int" | "integer" => "integer",
        "float" | "number" | "double" => "float",
        "bool" | "boolean" => "boolean",
        "dict" | "object" => "dict",
        "list" | "array" => "array",
        "tuple" => "tuple",
        _ => "any",
    };
    let lower = inner.to_ascii_lowercase();
    for (prefix, kind) in [("list[", "array"), ("tuple[", "tuple"), ("set[", "array")] {
        if lower.starts_with(prefix) && lower.ends_with(']') {
            let item = &inner[prefix.len()..inner.len() - 1];
            return (
                json!({"type": kind, "items": {"type": base(item.split(',').next().unwrap_or(""))}}),
                optional,
            );
        }
    }
    if lower.starts_with("dict[") {
        return (json!({"type": "dict"}), optional);
    }
    let b = base(inner);
    let v = if b == "array" || b == "tuple" {
        json!({"type": b, "items": {"type": "any"}})
    } else {
        json!({"type": b})
    };
    (v, optional)
}

/// An xLAM tool (`parameters: {name: {type, description, default}}`, or a JSON schema) as a
/// BFCL function doc.
fn xlam_tool(t: &Json) -> Result<Json, String> {
    let name = t.get("name").and_then(Json::as_str).ok_or("tool without \"name\"")?;
    let desc = t.get("description").and_then(Json::as_str).unwrap_or("");
    let params = t.get("parameters").cloned().unwrap_or(json!({}));
    if params.get("properties").is_some() {
        let mut p = params.clone();
        if p["type"] == "object" {
            p["type"] = json!("dict");
        }
        if p.get("required").is_none() {
            p["required"] = json!([]);
        }
        return Ok(json!({"name": name, "description": desc, "parameters": p}));
    }
    let mut props = Map::new();
    let mut required = Vec::new();
    for (k, p) in params.as_object().into_iter().flatten() {
        let (mut schema, optional) = xlam_type(p.get("type").and_then(Json::as_str).unwrap_or("any"));
        if let Some(d) = p.get("description") {
            schema["description"] = d.clone();
        }
        if let Some(d) = p.get("default") {
            schema["default"] = d.clone();
        }
        if !optional && p.get("default").is_none() {
            required.push(json!(k));
        }
        props.insert(k.clone(), schema);
    }
    Ok(
        json!({"name": name, "description": desc, "parameters": {"type": "dict", "properties": props, "required": required}}),
    )
}

/// One fcgpu record.
pub fn parse_fcgpu_line(v: &Json, default_id: &str) -> Result<Sample, String> {
    let messages: Vec<Message> =
        serde_json::from_value(v.get("messages").cloned().ok_or("missing field \"messages\"")?)
            .map_err(|e| format!("bad \"messages\": {e}"))?;
    let functions = v
        .get("tools")
        .or_else(|| v.get("functions"))
        .and_then(Json::as_array)
        .cloned()
        .ok_or("missing list field \"tools\"")?;
    let calls = v
        .get("calls")
        .or_else(|| v.get("ground_truth"))
        .and_then(Json::as_array)
        .cloned()
        .ok_or("missing list field \"calls\"")?;
    for c in &calls {
        let ok = c.as_object().is_some_and(|o| {
            o.len() == 1 && o.values().all(|p| p.as_object().is_some_and(|m| m.values().all(Json::is_array)))
        });
        if !ok {
            return Err(format!("call {c} is not in BFCL ground-truth shape {{name: {{param: [values]}}}}"));
        }
    }
    let category = match v.get("category").and_then(Json::as_str) {
        Some(c) => c.to_string(),
        None => infer_category(functions.len(), &calls),
    };
    Ok(Sample {
        id: v.get("id").and_then(Json::as_str).unwrap_or(default_id).to_string(),
        category,
        messages,
        functions,
        ground_truth: calls,
        reasoning: v.get("reasoning").and_then(Json::as_str).map(str::to_string),
    })
}
