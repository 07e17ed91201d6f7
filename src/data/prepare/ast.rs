//! Stage 2: AST validation of each reference call against the sample's tool schemas, with
//! BFCL's type rules (`fc::checker`). Deterministic; one reason code per rule (docs/data.md).

use serde_json::{Map, Value as Json};

use super::Reject;
use crate::data::Sample;
use crate::fc::checker::{standardize, type_of_name};
use crate::fc::decode::Lang;
use crate::fc::value::{py_eq, PyType, Value};

/// Stage-2 switches.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Also require string values to appear in the query (`ungrounded_value`).
    pub grounding: bool,
}

/// Failures a corrected call can fix (with `--stage all` they go to the judge).
pub fn correctable(reason: &str) -> bool {
    matches!(
        reason,
        "unknown_function"
            | "missing_required"
            | "unknown_parameter"
            | "type_mismatch"
            | "enum_violation"
            | "ungrounded_value"
    )
}

/// The text that makes two samples exact duplicates: messages, tools and reference.
pub fn duplicate_key(s: &Sample) -> String {
    serde_json::json!([s.messages, s.functions, s.ground_truth]).to_string()
}

/// Every stage-2 rule but `duplicate` (which needs the other samples), in order.
pub fn check(s: &Sample, opts: &Options) -> Result<(), Reject> {
    if query(s).trim().is_empty() {
        return Err(Reject::new("empty_query", "no user message with text"));
    }
    check_calls(s, &s.ground_truth, opts)
}

/// The user's text: every user message, in order.
pub fn query(s: &Sample) -> String {
    let user: Vec<&str> =
        s.messages.iter().filter(|m| m.role == "user").map(|m| m.content.as_str()).collect();
    user.join("\n")
}

/// The rules on a list of reference calls in BFCL ground-truth shape (also used for the
/// judge's corrections).
pub fn check_calls(s: &Sample, calls: &[Json], opts: &Options) -> Result<(), Reject> {
    check_shape(calls)?;
    let lang = Lang::of_category(&s.category);
    let q = opts.grounding.then(|| normalise(&query(s)));
    for c in calls {
        let (name, params) = c.as_object().and_then(|o| o.iter().next()).expect("shape checked");
        let doc = s
            .functions
            .iter()
            .find(|f| f.get("name").and_then(Json::as_str) == Some(name.as_str()))
            .ok_or_else(|| Reject::new("unknown_function", format!("{name}: no tool of that name")))?;
        let params = params.as_object().expect("shape checked");
        check_call(name, doc, params, lang, q.as_deref())?;
    }
    Ok(())
}

/// `parse_error` unless every call is `{name: {param: [values]}}`.
pub fn check_shape(calls: &[Json]) -> Result<(), Reject> {
    for c in calls {
        let ok = c.as_object().is_some_and(|o| {
            o.len() == 1 && o.values().all(|p| p.as_object().is_some_and(|m| m.values().all(Json::is_array)))
        });
        if !ok {
            let msg = format!("call {c} is not in BFCL ground-truth shape {{name: {{param: [values]}}}}");
            return Err(Reject::new("parse_error", msg));
        }
    }
    Ok(())
}

const EMPTY: &str = "";

fn is_empty_alt(v: &Json) -> bool {
    v.as_str() == Some(EMPTY)
}

fn check_call(
    name: &str,
    doc: &Json,
    params: &Map<String, Json>,
    lang: Lang,
    q: Option<&str>,
) -> Result<(), Reject> {
    let props = doc["parameters"]["properties"].as_object();
    let required = doc["parameters"]["required"].as_array().into_iter().flatten().filter_map(Json::as_str);
    for r in required {
        let given =
            params.get(r).and_then(Json::as_array).is_some_and(|a| a.iter().any(|v| !is_empty_alt(v)));
        if !given {
            return Err(Reject::new(
                "missing_required",
                format!("{name}: required parameter {r:?} has no value"),
            ));
        }
    }
    for (k, alts) in params {
        let Some(schema) = props.and_then(|p| p.get(k)) else {
            return Err(Reject::new(
                "unknown_parameter",
                format!("{name}: no parameter {k:?} in the schema"),
            ));
        };
        let optional = alts.as_array().is_some_and(|a| a.iter().any(is_empty_alt));
        for v in alts.as_array().into_iter().flatten().filter(|v| !is_empty_alt(v)) {
            check_type(name, k, v, schema, lang, optional)?;
            if !(v.is_null() && optional) {
                check_enum(name, k, v, schema)?;
            }
        }
        if let Some(q) = q {
            check_grounded(name, k, alts, schema, q)?;
        }
    }
    Ok(())
}

/// The Python type a schema type name stands for under BFCL's rules; None for `any` (and a
/// missing type): any value is allowed.
fn expected_type(schema: &Json, lang: Lang) -> Result<Option<PyType>, String> {
    match schema.get("type").and_then(Json::as_str) {
        None | Some("any") => Ok(None),
        // JSON-schema names (xLAM tools written as JSON schemas) for BFCL's.
        Some("number") => Ok(Some(PyType::Float)),
        Some("object") => Ok(Some(PyType::Dict)),
        Some(t) => type_of_name(lang, t).map(Some).map_err(|_| format!("unknown schema type {t:?}")),
    }
}

/// Whether `v` has type `t`, with BFCL's widenings: an int is a float, a tuple is a list, and
/// a set may be written as a list.
fn has_type(v: &Value, t: PyType) -> bool {
    let got = v.py_type();
    got == t
        || (t == PyType::Float && got == PyType::Int)
        || (t == PyType::List && got == PyType::Tuple)
        || (t == PyType::Set && matches!(got, PyType::List | PyType::Tuple))
}

fn check_type(
    name: &str,
    k: &str,
    v: &Json,
    schema: &Json,
    lang: Lang,
    optional: bool,
) -> Result<(), Reject> {
    let bad = |m: String| Err(Reject::new("type_mismatch", format!("{name}: parameter {k:?}: {m}")));
    let t = match expected_type(schema, lang) {
        Ok(Some(t)) => t,
        Ok(None) => return Ok(()),
        Err(m) => return bad(m),
    };
    let value = Value::from_json(v);
    // `None` stands for "not given" in Python; fine for an optional parameter.
    if matches!(value, Value::None) && optional {
        return Ok(());
    }
    // Java and JavaScript references are source text: a string where the schema wants another
    // type names a variable, which BFCL's checker accepts (its `is_variable` rule).
    if lang != Lang::Python && value.py_type() == PyType::Str {
        return Ok(());
    }
    if !has_type(&value, t) {
        return bad(format!("{v} is a {}, the schema says {}", value.py_type().name(), schema["type"]));
    }
    if t != PyType::List {
        return Ok(());
    }
    let Ok(Some(item)) = expected_type(&schema["items"], lang) else { return Ok(()) };
    for x in v.as_array().into_iter().flatten() {
        if !has_type(&Value::from_json(x), item) {
            return bad(format!("item {x} is not of the schema's item type {}", schema["items"]["type"]));
        }
    }
    Ok(())
}

/// Enum values compared as BFCL compares strings (standardised); list items are checked
/// against `items.enum`.
fn check_enum(name: &str, k: &str, v: &Json, schema: &Json) -> Result<(), Reject> {
    let allowed = |e: &Json, x: &Json| match (e.as_array(), x) {
        (None, _) => true,
        (Some(list), Json::String(s)) => {
            list.iter().any(|a| a.as_str().is_some_and(|a| standardize(a) == standardize(s)))
        }
        (Some(list), x) => list.iter().any(|a| py_eq(&Value::from_json(a), &Value::from_json(x))),
    };
    let check_one = |e: &Json, x: &Json| {
        if allowed(e, x) {
            Ok(())
        } else {
            Err(Reject::new("enum_violation", format!("{name}: parameter {k:?}: {x} is not one of {e}")))
        }
    };
    // On a list, an enum (of the parameter, as BFCL's live data puts it, or of its items)
    // constrains each item.
    match v {
        Json::Array(items) => {
            let e = if schema.get("enum").is_some() { &schema["enum"] } else { &schema["items"]["enum"] };
            items.iter().try_for_each(|x| check_one(e, x))
        }
        _ => check_one(&schema["enum"], v),
    }
}

/// Some alternative of the parameter has all its strings in the (normalised) query. Enum
/// parameters are exempt: their values come from the schema, not the user.
fn check_grounded(name: &str, k: &str, alts: &Json, schema: &Json, q: &str) -> Result<(), Reject> {
    if schema.get("enum").is_some() || schema["items"].get("enum").is_some() {
        return Ok(());
    }
    let mut alts = alts.as_array().into_iter().flatten().filter(|v| !is_empty_alt(v)).peekable();
    if alts.peek().is_none() {
        return Ok(());
    }
    let mut missing = None;
    for a in alts {
        let mut strings = Vec::new();
        collect_strings(a, &mut strings);
        match strings.into_iter().find(|s| !q.contains(&normalise(s.trim()))) {
            None => return Ok(()),
            Some(s) => missing = missing.or(Some(s)),
        }
    }
    let s = missing.unwrap_or_default();
    Err(Reject::new(
        "ungrounded_value",
        format!("{name}: parameter {k:?}: {s:?} does not appear in the query"),
    ))
}

fn collect_strings(v: &Json, out: &mut Vec<String>) {
    match v {
        Json::String(s) if !s.trim().is_empty() => out.push(s.clone()),
        Json::Array(a) => a.iter().for_each(|x| collect_strings(x, out)),
        Json::Object(o) => o.values().for_each(|x| collect_strings(x, out)),
        _ => {}
    }
}

/// Lowercased text with every number written one way (`1,000.50` → `1000.5`, `5.0` → `5`), so
/// a value matches the query however either writes its numbers.
pub fn normalise(text: &str) -> String {
    static NUM: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let re = NUM.get_or_init(|| regex::Regex::new(r"\d+(?:,\d{3})*(?:\.\d+)?").expect("valid regex"));
    let lower = text.to_lowercase();
    re.replace_all(&lower, |c: &regex::Captures| {
        let n = c[0].replace(',', "");
        if n.contains('.') {
            n.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            n
        }
    })
    .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Message;
    use serde_json::json;

    fn sample(query: &str, gt: Json) -> Sample {
        Sample {
            id: "t".into(),
            category: "simple_python".into(),
            messages: vec![Message { role: "user".into(), content: query.into() }],
            functions: vec![json!({"name": "get_weather", "description": "", "parameters": {"type": "dict",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                    "tags": {"type": "array", "items": {"type": "string"}}},
                "required": ["city"]}})],
            ground_truth: vec![gt],
            reasoning: None,
        }
    }

    fn reason(query: &str, gt: Json, grounding: bool) -> Option<&'static str> {
        check(&sample(query, gt), &Options { grounding }).err().map(|r| r.reason)
    }

    #[test]
    fn one_case_per_reason_code() {
        let q = "Weather in Paris for 3 days, in celsius";
        let ok = json!({"get_weather": {"city": ["Paris"], "days": [3, ""], "unit": ["celsius"]}});
        assert_eq!(reason(q, ok.clone(), true), None);
        assert_eq!(reason(" ", ok, false), Some("empty_query"));
        assert_eq!(reason(q, json!({"get_weather": {"city": "Paris"}}), false), Some("parse_error"));
        assert_eq!(reason(q, json!({"get_time": {"city": ["Paris"]}}), false), Some("unknown_function"));
        assert_eq!(reason(q, json!({"get_weather": {"days": [3]}}), false), Some("missing_required"));
        assert_eq!(reason(q, json!({"get_weather": {"city": [""]}}), false), Some("missing_required"));
        assert_eq!(
            reason(q, json!({"get_weather": {"city": ["Paris"], "hour": [1]}}), false),
            Some("unknown_parameter")
        );
        assert_eq!(
            reason(q, json!({"get_weather": {"city": ["Paris"], "days": ["3"]}}), false),
            Some("type_mismatch")
        );
        assert_eq!(
            reason(q, json!({"get_weather": {"city": ["Paris"], "tags": [[1]]}}), false),
            Some("type_mismatch")
        );
        assert_eq!(
            reason(q, json!({"get_weather": {"city": ["Paris"], "unit": ["kelvin"]}}), false),
            Some("enum_violation")
        );
        assert_eq!(reason(q, json!({"get_weather": {"city": ["Lyon"]}}), true), Some("ungrounded_value"));
        assert_eq!(reason(q, json!({"get_weather": {"city": ["Lyon"]}}), false), None);
    }

    #[test]
    fn grounding_normalises_case_and_numbers() {
        assert_eq!(normalise("Pay 1,000.50 USD or 5.0"), "pay 1000.5 usd or 5");
        let q = "Weather in PARIS on 2024-01-05 for 1,000 days";
        let gt = json!({"get_weather": {"city": ["paris"], "tags": [["2024-01-05", "1000"]]}});
        assert_eq!(reason(q, gt, true), None);
        // One grounded alternative is enough.
        let gt = json!({"get_weather": {"city": ["Lyon", "Paris"]}});
        assert_eq!(reason(q, gt, true), None);
    }

    #[test]
    fn bfcl_type_rules() {
        let q = "x";
        let f = |t: &str, v: Json| {
            let mut s = sample(q, json!({"f": {"p": [v]}}));
            s.functions = vec![
                json!({"name": "f", "parameters": {"type": "dict", "properties": {"p": {"type": t}}, "required": []}}),
            ];
            check(&s, &Options::default()).err().map(|r| r.reason)
        };
        assert_eq!(f("float", json!(3)), None);
        assert_eq!(f("integer", json!(3.5)), Some("type_mismatch"));
        assert_eq!(f("boolean", json!(1)), Some("type_mismatch"));
        assert_eq!(f("any", json!({"a": 1})), None);
        assert_eq!(f("tuple", json!([1, 2])), None);
        assert_eq!(f("dict", json!({"a": [1]})), None);
        assert_eq!(f("strange", json!(1)), Some("type_mismatch"));
    }
}
