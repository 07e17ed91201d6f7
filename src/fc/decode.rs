//! Turning a model's answer text into calls, exactly as BFCL's decoders do
//! (`default_decode_ast_prompting`, `resolve_ast_by_type`, the Java/JavaScript tree-sitter
//! parsers and Qwen's `<tool_call>` JSON extraction), quirks included.

use crate::fc::budget::{self, Budget, COMPARE, NODE};
use crate::fc::pyexpr::{self, dict_insert, eval_expr, unparse, Const, Expr, Kind, Num, UnOp};
use crate::fc::value::Value;

/// One decoded call: `{name: {param: value}}`. A `None` parameter name is Python's `None`
/// key (from `**kwargs`, or a positional Java/JS argument).
#[derive(Debug, Clone)]
pub struct Call {
    pub name: String,
    pub args: Vec<(Option<String>, Value)>,
}

impl Call {
    pub fn arg(&self, name: &str) -> Option<&Value> {
        self.args.iter().find(|(k, _)| k.as_deref() == Some(name)).map(|(_, v)| v)
    }
}

/// The language of a category's calls (BFCL: `java` / `javascript` in the category name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    Python,
    Java,
    JavaScript,
}

impl Lang {
    pub fn of_category(cat: &str) -> Lang {
        if cat.contains("javascript") {
            Lang::JavaScript
        } else if cat.contains("java") {
            Lang::Java
        } else {
            Lang::Python
        }
    }
}

/// How the model writes calls: BFCL prompting mode (Python list syntax) or Qwen's JSON mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerFormat {
    Python,
    Json,
}

#[derive(Debug, Clone, PartialEq)]
pub enum DecodeError {
    /// BFCL: `ast_decoder:decoder_failed` (the decoder raised).
    Failed(String),
    /// BFCL: `ast_decoder:decoder_wrong_output_format` (decoded, but not a list of calls).
    WrongFormat,
    /// fcgpu only: the answer crosses a bound of `fc::budget` (size, nesting, work); BFCL
    /// would exhaust memory, hang or crash on it. Always an invalid answer.
    Bounds(String),
}

impl DecodeError {
    pub fn error_type(&self) -> &'static str {
        match self {
            DecodeError::Failed(_) => "ast_decoder:decoder_failed",
            DecodeError::WrongFormat => "ast_decoder:decoder_wrong_output_format",
            DecodeError::Bounds(_) => "ast_decoder:decoder_bounds_exceeded",
        }
    }
}

fn fail<T>(m: impl Into<String>) -> Result<T, DecodeError> {
    Err(DecodeError::Failed(m.into()))
}

/// fcgpu's reasoning removal: keep the text after the last `</think>`, then the inside of
/// `<answer>…</answer>` when present. BFCL's Qwen handler does the first step the same way.
pub fn strip_reasoning(text: &str) -> &str {
    let after = match text.rfind("</think>") {
        Some(i) => &text[i + "</think>".len()..],
        None => text,
    };
    if let Some(s) = after.find("<answer>") {
        let inner = &after[s + "<answer>".len()..];
        if let Some(e) = inner.find("</answer>") {
            return &inner[..e];
        }
    }
    after
}

/// Decodes an answer that has already had its reasoning removed.
pub fn decode(answer: &str, lang: Lang, fmt: AnswerFormat) -> Result<Vec<Call>, DecodeError> {
    decode_counted(answer, lang, fmt).0
}

/// [`decode`], also returning the work it spent (for the fuzz test's per-input bounds).
pub fn decode_counted(answer: &str, lang: Lang, fmt: AnswerFormat) -> (Result<Vec<Call>, DecodeError>, u64) {
    let mut b = Budget::new();
    let r = decode_in(answer, lang, fmt, &mut b);
    // Whatever error surfaced, a crossed bound is the reason the answer was refused.
    let r = match (r, b.exceeded()) {
        (Err(_), Some(e)) => Err(DecodeError::Bounds(e.0.clone())),
        (r, _) => r,
    };
    (r, b.used())
}

fn decode_in(answer: &str, lang: Lang, fmt: AnswerFormat, b: &mut Budget) -> Result<Vec<Call>, DecodeError> {
    budget::check_len(answer).map_err(|e| DecodeError::Bounds(e.0))?;
    if fmt == AnswerFormat::Json {
        return decode_json_tool_calls(answer);
    }
    let s = answer.trim_matches(|c| c == '`' || c == '\n' || c == ' ');
    let mut w = String::with_capacity(s.len() + 2);
    if !s.starts_with('[') {
        w.push('[');
    }
    w.push_str(s);
    if !s.ends_with(']') {
        w.push(']');
    }
    match lang {
        Lang::Python => decode_python_list(&w, b),
        Lang::Java => crate::fc::javajs::parse_java(strip_first_last(&w), b),
        Lang::JavaScript => crate::fc::javajs::parse_js(strip_first_last(&w), b),
    }
}

/// Python's `s[1:-1]` on a string of at least two characters.
fn strip_first_last(s: &str) -> &str {
    let mut it = s.char_indices();
    let start = it.next().map(|(_, c)| c.len_utf8()).unwrap_or(0);
    let end = s.char_indices().last().map(|(i, _)| i).unwrap_or(0);
    if end <= start {
        ""
    } else {
        &s[start..end]
    }
}

/// Whether BFCL's relevance check sees a call (decodes, and is not empty); an answer over
/// fcgpu's bounds is the error it gives.
pub fn has_call(answer: &str, fmt: AnswerFormat) -> Result<bool, DecodeError> {
    match decode(answer, Lang::Python, fmt) {
        Ok(calls) => Ok(!calls.is_empty()),
        Err(e @ DecodeError::Bounds(_)) => Err(e),
        Err(_) => Ok(false),
    }
}

fn decode_python_list(src: &str, b: &mut Budget) -> Result<Vec<Call>, DecodeError> {
    let body = pyexpr::parse_expr(src).map_err(|e| DecodeError::Failed(e.0))?;
    match &*body.kind {
        Kind::Call { .. } => Ok(vec![resolve_call(&body, b)?]),
        Kind::List(elts) | Kind::Tuple(elts) | Kind::Set(elts) => elts
            .iter()
            .map(|e| match &*e.kind {
                Kind::Call { .. } => resolve_call(e, b),
                _ => fail("AssertionError"),
            })
            .collect(),
        _ => fail("object has no attribute 'elts'"),
    }
}

/// `resolve_ast_call`: dotted name, keyword arguments only (positional ones are dropped).
fn resolve_call(e: &Expr, b: &mut Budget) -> Result<Call, DecodeError> {
    let Kind::Call { func, keywords, .. } = &*e.kind else {
        return fail("not a call");
    };
    let mut parts = Vec::new();
    let mut f = func;
    while let Kind::Attr(v, attr) = &*f.kind {
        parts.push(attr.clone());
        f = v;
    }
    if let Kind::Name(n) = &*f.kind {
        parts.push(n.clone());
    }
    parts.reverse();
    let mut args: Vec<(Option<String>, Value)> = Vec::new();
    for k in keywords {
        let v = resolve_value(&k.value, b)?;
        // Finding a repeated keyword compares it with every earlier one.
        charge(b, args.len() as u64 * COMPARE, "comparing keyword names")?;
        match args.iter_mut().find(|(n, _)| *n == k.arg) {
            Some(slot) => slot.1 = v,
            None => args.push((k.arg.clone(), v)),
        }
    }
    Ok(Call { name: parts.join("."), args })
}

fn const_value(c: &Const) -> Value {
    match c {
        Const::None => Value::None,
        Const::True => Value::Bool(true),
        Const::False => Value::Bool(false),
        Const::Ellipsis => Value::Str("...".into()),
        Const::Num(Num::Int(i)) => Value::Int(*i),
        Const::Num(Num::BigInt(s)) => Value::BigInt(s.clone()),
        Const::Num(Num::Float(f)) => Value::Float(*f),
        Const::Num(Num::Imag(f)) => Value::Complex(0.0, *f),
        Const::Str { s, .. } => Value::Str(s.clone()),
        Const::Bytes(b) => Value::Bytes(b.clone()),
    }
}

/// BFCL's unary handling: `-operand.value` for every unary operator, and only when the operand
/// is a constant (so `+3` and `~3` give -3, `not True` gives -1).
fn resolve_unary(op: UnOp, operand: &Expr) -> Result<Value, DecodeError> {
    let _ = op;
    let Kind::Const(c) = &*operand.kind else {
        return fail("operand has no attribute 'value'");
    };
    match const_value(c) {
        Value::Bool(b) => Ok(Value::Int(-(b as i128))),
        Value::Int(i) => Ok(Value::Int(-i)),
        Value::BigInt(s) => Ok(Value::BigInt(format!("-{s}"))),
        Value::Float(f) => Ok(Value::Float(-f)),
        Value::Complex(a, b) => Ok(Value::Complex(-a, -b)),
        _ => fail("bad operand type for unary -"),
    }
}

fn charge(b: &mut Budget, units: u64, what: &str) -> Result<(), DecodeError> {
    b.charge(units, what).map_err(|e| DecodeError::Bounds(e.0))
}

/// `resolve_ast_by_type`, charging each value it builds.
fn resolve_value(e: &Expr, b: &mut Budget) -> Result<Value, DecodeError> {
    charge(b, NODE, "a value")?;
    match &*e.kind {
        Kind::Const(c) => {
            if let Const::Str { s: text, .. } = c {
                charge(b, text.len() as u64, "a string")?;
            }
            Ok(const_value(c))
        }
        Kind::Unary(op, v) => resolve_unary(*op, v),
        Kind::List(v) => Ok(Value::List(v.iter().map(|x| resolve_value(x, b)).collect::<Result<_, _>>()?)),
        Kind::Tuple(v) => Ok(Value::Tuple(v.iter().map(|x| resolve_value(x, b)).collect::<Result<_, _>>()?)),
        Kind::Dict(items) => {
            let mut d = Vec::new();
            for (k, v) in items {
                let Some(k) = k else {
                    return fail("Unsupported AST type: NoneType");
                };
                let k = resolve_value(k, b)?;
                let v = resolve_value(v, b)?;
                if !k.is_hashable() {
                    return fail("unhashable type");
                }
                dict_insert(&mut d, k, v, b).map_err(|e| DecodeError::Failed(e.0))?;
            }
            Ok(Value::Dict(d))
        }
        Kind::Bin(..) => eval_expr(e, b).map_err(|x| DecodeError::Failed(x.0)),
        Kind::Name(n) => Ok(Value::Str(n.clone())),
        Kind::Call { keywords, .. } => {
            if keywords.is_empty() {
                Ok(Value::Str(unparse(e)))
            } else {
                let c = resolve_call(e, b)?;
                let params =
                    c.args.into_iter().map(|(k, v)| (k.map(Value::Str).unwrap_or(Value::None), v)).collect();
                Ok(Value::Dict(vec![(Value::Str(c.name), Value::Dict(params))]))
            }
        }
        Kind::Subscript(v, s) => Ok(Value::Str(format!("{}[{}]", unparse(v), unparse(s)))),
        _ => fail("Unsupported AST type"),
    }
}

/// Qwen FC: every `<tool_call>\n…\n</tool_call>` block parsed with Python's `json.loads`
/// semantics (`NaN`, `1e999`, long integers); blocks it would refuse are dropped.
pub fn decode_json_tool_calls(text: &str) -> Result<Vec<Call>, DecodeError> {
    use crate::fc::json_py::{loads, LoadError};
    let mut calls = Vec::new();
    for block in tool_call_blocks(text) {
        let o = match loads(block) {
            Ok(Value::Dict(o)) => o,
            Ok(_) => return fail("Model did not return a list of function calls"),
            Err(LoadError::Invalid(_)) => continue,
            Err(LoadError::TooDeep) => {
                let m = format!("a <tool_call> block nests over {} levels", budget::MAX_NESTING);
                return Err(DecodeError::Bounds(m));
            }
        };
        let get = |k: &str| o.iter().find(|(key, _)| key.as_str() == Some(k)).map(|(_, v)| v);
        let name = match get("name") {
            Some(Value::Str(s)) => s.clone(),
            Some(v) if !v.is_hashable() => return fail("unhashable type"),
            // A non-string name can never equal a function name.
            Some(other) => format!("\u{0}{}", other.repr()),
            None => return fail("KeyError: 'name'"),
        };
        let Some(Value::Dict(args)) = get("arguments") else {
            return fail("arguments is not a dict");
        };
        let args = args.iter().map(|(k, v)| (k.as_str().map(str::to_string), v.clone())).collect();
        calls.push(Call { name, args });
    }
    Ok(calls)
}

/// The non-overlapping matches of `<tool_call>\n(.*?)\n</tool_call>` (dot matches newline).
fn tool_call_blocks(text: &str) -> Vec<&str> {
    const OPEN: &str = "<tool_call>\n";
    const CLOSE: &str = "\n</tool_call>";
    let mut out = Vec::new();
    let mut pos = 0;
    while let Some(i) = text[pos..].find(OPEN) {
        let start = pos + i + OPEN.len();
        match text[start..].find(CLOSE) {
            Some(j) => {
                out.push(&text[start..start + j]);
                pos = start + j + CLOSE.len();
            }
            None => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn py(s: &str) -> Result<Vec<Call>, DecodeError> {
        decode(s, Lang::Python, AnswerFormat::Python)
    }

    #[test]
    fn bfcl_quirks() {
        let c = py("[f(a=+3, b=true, c=2*3, d=sqrt(2), e=x[0], g=..., h=not True)]").unwrap();
        assert_eq!(c[0].arg("a").unwrap().repr(), "-3");
        assert_eq!(c[0].arg("b").unwrap().repr(), "'true'");
        assert_eq!(c[0].arg("c").unwrap().repr(), "6");
        assert_eq!(c[0].arg("d").unwrap().repr(), "'sqrt(2)'");
        assert_eq!(c[0].arg("e").unwrap().repr(), "'x[0]'");
        assert_eq!(c[0].arg("g").unwrap().repr(), "'...'");
        assert_eq!(c[0].arg("h").unwrap().repr(), "-1");
        assert!(py("f(a=math.pi)").is_err());
        assert!(py("```python\nf(a=1)\n```").is_err());
        assert!(py("```\nf(a=1)\n```").is_ok());
        assert!(py("Sure: f(a=1)").is_err());
        assert!(py("math.factorial(n=5, 3)").is_err());
        assert_eq!(py("math.factorial(3, n=5)").unwrap()[0].name, "math.factorial");
    }

    #[test]
    fn think_and_answer_tags() {
        assert_eq!(strip_reasoning("<think>a</think>\n\n[f()]"), "\n\n[f()]");
        assert_eq!(strip_reasoning("<think>a</think><answer>[f()]</answer>"), "[f()]");
    }

    #[test]
    fn json_blocks() {
        let t = "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n</tool_call>\n<tool_call>\nnot json\n</tool_call>";
        let c = decode_json_tool_calls(t).unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].arg("a").unwrap().repr(), "1");
    }
}
