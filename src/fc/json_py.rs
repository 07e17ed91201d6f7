//! Python's `json.dumps` byte for byte (ensure_ascii, key order kept, `float.__repr__` for
//! floats), so prompts match what BFCL feeds the model; and `json.loads` as BFCL's JSON-mode
//! decoder reads a `<tool_call>` block ([`loads`]).

use std::collections::HashMap;

use crate::fc::budget::MAX_NESTING;
use crate::fc::value::{py_float_repr, Value};
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

/// Python's `int()` refuses decimal texts of more digits (`sys.int_info.default_max_str_digits`).
const MAX_INT_DIGITS: usize = 4300;

/// Why [`loads`] failed: Python raises (the block is dropped), or the text nests deeper than
/// fcgpu's bound ([`MAX_NESTING`]; Python's own limit is about 1000).
#[derive(Debug, Clone, PartialEq)]
pub enum LoadError {
    Invalid(String),
    TooDeep,
}

/// Python's `json.loads(text)` as a Python value: `NaN`, `Infinity` and `-Infinity` are
/// floats, `1e999` is `inf`, integers are exact at any length up to Python's 4,300 digits,
/// a repeated key keeps its first position and its last value. A lone surrogate escape
/// (`"\ud800"`), which a Rust string cannot hold, becomes U+FFFD as in Python literals.
pub fn loads(text: &str) -> Result<Value, LoadError> {
    let mut p = Loader { s: text.as_bytes(), src: text, i: 0, depth: 0 };
    p.ws();
    let v = p.value()?;
    p.ws();
    if p.i != p.s.len() {
        return Err(p.bad("Extra data"));
    }
    Ok(v)
}

struct Loader<'a> {
    s: &'a [u8],
    src: &'a str,
    i: usize,
    depth: usize,
}

impl Loader<'_> {
    fn bad(&self, what: &str) -> LoadError {
        LoadError::Invalid(format!("{what}: char {}", self.i))
    }

    fn ws(&mut self) {
        while self.s.get(self.i).is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn eat(&mut self, word: &str) -> bool {
        let hit = self.s[self.i..].starts_with(word.as_bytes());
        if hit {
            self.i += word.len();
        }
        hit
    }

    fn value(&mut self) -> Result<Value, LoadError> {
        let words: [(&str, Value); 6] = [
            ("null", Value::None),
            ("true", Value::Bool(true)),
            ("false", Value::Bool(false)),
            ("NaN", Value::Float(f64::NAN)),
            ("Infinity", Value::Float(f64::INFINITY)),
            ("-Infinity", Value::Float(f64::NEG_INFINITY)),
        ];
        match self.s.get(self.i) {
            Some(b'"') => return self.string().map(Value::Str),
            Some(b'{') => return self.nested(Self::object),
            Some(b'[') => return self.nested(Self::array),
            _ => {}
        }
        for (w, v) in words {
            if self.eat(w) {
                return Ok(v);
            }
        }
        self.number()
    }

    fn nested(&mut self, f: fn(&mut Self) -> Result<Value, LoadError>) -> Result<Value, LoadError> {
        self.depth += 1;
        if self.depth > MAX_NESTING {
            return Err(LoadError::TooDeep);
        }
        self.i += 1;
        let v = f(self);
        self.depth -= 1;
        v
    }

    /// After `[`: values separated by `,`, then `]`.
    fn array(&mut self) -> Result<Value, LoadError> {
        let mut out = Vec::new();
        self.ws();
        if self.eat("]") {
            return Ok(Value::List(out));
        }
        loop {
            self.ws();
            out.push(self.value()?);
            self.ws();
            if self.eat("]") {
                return Ok(Value::List(out));
            }
            if !self.eat(",") {
                return Err(self.bad("Expecting ',' delimiter"));
            }
        }
    }

    /// After `{`: `"key": value` pairs separated by `,`, then `}`.
    fn object(&mut self) -> Result<Value, LoadError> {
        let mut out: Vec<(Value, Value)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        self.ws();
        if self.eat("}") {
            return Ok(Value::Dict(out));
        }
        loop {
            self.ws();
            if self.s.get(self.i) != Some(&b'"') {
                return Err(self.bad("Expecting property name enclosed in double quotes"));
            }
            let k = self.string()?;
            self.ws();
            if !self.eat(":") {
                return Err(self.bad("Expecting ':' delimiter"));
            }
            self.ws();
            let v = self.value()?;
            match index.get(&k) {
                Some(&at) => out[at].1 = v,
                None => {
                    index.insert(k.clone(), out.len());
                    out.push((Value::Str(k), v));
                }
            }
            self.ws();
            if self.eat("}") {
                return Ok(Value::Dict(out));
            }
            if !self.eat(",") {
                return Err(self.bad("Expecting ',' delimiter"));
            }
        }
    }

    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?`: an int, or a float when it has a
    /// fraction or an exponent.
    fn number(&mut self) -> Result<Value, LoadError> {
        let start = self.i;
        let digits = |p: &mut Self| {
            let from = p.i;
            while p.s.get(p.i).is_some_and(u8::is_ascii_digit) {
                p.i += 1;
            }
            p.i - from
        };
        self.eat("-");
        match self.s.get(self.i) {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                digits(self);
            }
            _ => return Err(self.bad("Expecting value")),
        }
        let mut float = false;
        if self.s.get(self.i) == Some(&b'.') && self.s.get(self.i + 1).is_some_and(u8::is_ascii_digit) {
            self.i += 1;
            digits(self);
            float = true;
        }
        if matches!(self.s.get(self.i), Some(b'e' | b'E')) {
            let mark = self.i;
            self.i += 1;
            if matches!(self.s.get(self.i), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if digits(self) == 0 {
                self.i = mark;
            } else {
                float = true;
            }
        }
        let text = &self.src[start..self.i];
        if float {
            // Rust's parse rounds correctly like Python's float(); overflow gives ±inf.
            return text.parse::<f64>().map(Value::Float).map_err(|_| self.bad("bad number"));
        }
        if text.trim_start_matches('-').len() > MAX_INT_DIGITS {
            return Err(LoadError::Invalid(format!(
                "Exceeds the limit ({MAX_INT_DIGITS} digits) for integer string conversion"
            )));
        }
        Ok(match text.parse::<i128>() {
            Ok(v) => Value::Int(v),
            Err(_) => Value::BigInt(text.to_string()),
        })
    }

    /// A string literal (strict: no raw control characters), escapes decoded.
    fn string(&mut self) -> Result<String, LoadError> {
        self.i += 1;
        let mut out = String::new();
        loop {
            let run = self.i;
            while self.s.get(self.i).is_some_and(|&b| b != b'"' && b != b'\\' && b >= 0x20) {
                self.i += 1;
            }
            out.push_str(&self.src[run..self.i]);
            match self.s.get(self.i) {
                None => return Err(self.bad("Unterminated string starting at")),
                Some(b'"') => {
                    self.i += 1;
                    return Ok(out);
                }
                Some(b'\\') => self.escape(&mut out)?,
                Some(_) => return Err(self.bad("Invalid control character")),
            }
        }
    }

    fn escape(&mut self, out: &mut String) -> Result<(), LoadError> {
        let c = match self.s.get(self.i + 1) {
            Some(b'"') => '"',
            Some(b'\\') => '\\',
            Some(b'/') => '/',
            Some(b'b') => '\x08',
            Some(b'f') => '\x0c',
            Some(b'n') => '\n',
            Some(b'r') => '\r',
            Some(b't') => '\t',
            Some(b'u') => {
                self.i += 2;
                let hi = self.hex4()?;
                let code = if (0xd800..0xdc00).contains(&hi) && self.s[self.i..].starts_with(b"\\u") {
                    let mark = self.i;
                    self.i += 2;
                    match self.hex4()? {
                        lo @ 0xdc00..=0xdfff => 0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00),
                        _ => {
                            self.i = mark;
                            hi
                        }
                    }
                } else {
                    hi
                };
                out.push(char::from_u32(code).unwrap_or('\u{FFFD}'));
                return Ok(());
            }
            _ => return Err(self.bad("Invalid \\escape")),
        };
        out.push(c);
        self.i += 2;
        Ok(())
    }

    fn hex4(&mut self) -> Result<u32, LoadError> {
        let h = self.s.get(self.i..self.i + 4).ok_or_else(|| self.bad("Invalid \\uXXXX escape"))?;
        if !h.iter().all(u8::is_ascii_hexdigit) {
            return Err(self.bad("Invalid \\uXXXX escape"));
        }
        self.i += 4;
        Ok(h.iter().fold(0, |v, &d| v * 16 + (d as char).to_digit(16).unwrap_or(0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `repr(json.loads(text))` in CPython 3.11; None where it raises.
    #[test]
    fn loads_matches_python() {
        let big = format!("1{}", "0".repeat(399));
        let cases: Vec<(String, Option<String>)> = vec![
            ("1e999".into(), Some("inf".into())),
            ("-1e999".into(), Some("-inf".into())),
            ("[NaN, Infinity, -Infinity]".into(), Some("[nan, inf, -inf]".into())),
            ("1e-999".into(), Some("0.0".into())),
            (big.clone(), Some(big.clone())),
            (format!("-{big}"), Some(format!("-{big}"))),
            ("9".repeat(4300), Some("9".repeat(4300))),
            ("9".repeat(4301), None),
            (r#""\ud800x""#.into(), Some("'\u{FFFD}x'".into())),
            (r#""\ud83d\ude00""#.into(), Some("'😀'".into())),
            (r#"{"a": 1, "b": 2, "a": 3}"#.into(), Some("{'a': 3, 'b': 2}".into())),
            (" [1, 2.5, true, null, \"\\/\"] ".into(), Some("[1, 2.5, True, None, '/']".into())),
            ("nan".into(), None),
            ("inf".into(), None),
            ("01".into(), None),
            ("1.".into(), None),
            ("[1,]".into(), None),
            ("\"a\nb\"".into(), None),
            ("\"a\\u000Ab\"".into(), Some("'a\\nb'".into())),
            ("{\"a\" 1}".into(), None),
            ("\"\\x41\"".into(), None),
        ];
        for (text, want) in cases {
            let got = loads(&text).ok().map(|v| v.repr());
            assert_eq!(got, want, "{text}");
        }
        let deep = format!("{}{}", "[".repeat(MAX_NESTING + 1), "]".repeat(MAX_NESTING + 1));
        assert!(matches!(loads(&deep), Err(LoadError::TooDeep)));
        assert!(loads(&format!("{}{}", "[".repeat(MAX_NESTING), "]".repeat(MAX_NESTING))).is_ok());
    }

    #[test]
    fn matches_python_dumps() {
        let v: Json = serde_json::from_str(r#"{"b": [1, 2.0, 1e-05, "é😀"], "a": {}, "c": []}"#).unwrap();
        assert_eq!(dumps(&v, None), r#"{"b": [1, 2.0, 1e-05, "\u00e9\ud83d\ude00"], "a": {}, "c": []}"#);
        assert_eq!(dumps(&v, Some(2)), "{\n  \"b\": [\n    1,\n    2.0,\n    1e-05,\n    \"\\u00e9\\ud83d\\ude00\"\n  ],\n  \"a\": {},\n  \"c\": []\n}");
    }
}
