//! Python's `json.dumps` byte for byte (ensure_ascii, key order kept, `float.__repr__` for
//! floats), so prompts match what BFCL feeds the model.

use crate::fc::value::py_float_repr;
use serde_json::Value as Json;

/// `json.dumps(v)` (indent None: separators ", " and ": ") or `json.dumps(v, indent=n)`.
pub fn dumps(v: &Json, indent: Option<usize>) -> String {
    let mut out = String::new();
    write(v, indent, 0, &mut out);
    out
}

fn newline(indent: Option<usize>, level: usize, out: &mut String) {
    if let Some(n) = indent {
        out.push('\n');
        out.push_str(&" ".repeat(n * level));
    }
}

fn write(v: &Json, indent: Option<usize>, level: usize, out: &mut String) {
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        Json::Null => out.push_str("null"),
        Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Json::Number(n) => out.push_str(&number(n)),
        Json::String(s) => out.push_str(&quote(s)),
        Json::Array(a) if a.is_empty() => out.push_str("[]"),
        Json::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(indent, level + 1, out);
                write(x, indent, level + 1, out);
            }
            newline(indent, level, out);
            out.push(']');
        }
        Json::Object(o) if o.is_empty() => out.push_str("{}"),
        Json::Object(o) => {
            out.push('{');
            for (i, (k, x)) in o.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(indent, level + 1, out);
                out.push_str(&quote(k));
                out.push_str(": ");
                write(x, indent, level + 1, out);
            }
            newline(indent, level, out);
            out.push('}');
        }
    }
}

fn number(n: &serde_json::Number) -> String {
    if n.is_i64() || n.is_u64() {
        return n.to_string();
    }
    let f = n.as_f64().unwrap_or(f64::NAN);
    match f {
        f if f.is_nan() => "NaN".into(),
        f if f == f64::INFINITY => "Infinity".into(),
        f if f == f64::NEG_INFINITY => "-Infinity".into(),
        f => py_float_repr(f),
    }
}

/// A JSON string with Python's ensure_ascii escaping (lowercase hex, surrogate pairs).
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\x08' => out.push_str("\\b"),
            '\x0c' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e && (c as u32) != 0x7f => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{:04x}", unit));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_python_dumps() {
        let v: Json = serde_json::from_str(r#"{"b": [1, 2.0, 1e-05, "é😀"], "a": {}, "c": []}"#).unwrap();
        assert_eq!(dumps(&v, None), r#"{"b": [1, 2.0, 1e-05, "\u00e9\ud83d\ude00"], "a": {}, "c": []}"#);
        assert_eq!(dumps(&v, Some(2)), "{\n  \"b\": [\n    1,\n    2.0,\n    1e-05,\n    \"\\u00e9\\ud83d\\ude00\"\n  ],\n  \"a\": {},\n  \"c\": []\n}");
    }
}
