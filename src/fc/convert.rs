//! BFCL's Java and JavaScript type converters (`java_type_converter`, `js_type_converter`):
//! regex-driven conversion of the source text of an argument into a Python value; text that
//! does not match stays a string (and then usually fails the type check).

use crate::fc::checker::Exc;
use crate::fc::value::Value;
use regex::Regex;
use std::sync::OnceLock;

macro_rules! re {
    ($name:ident, $pat:expr) => {
        fn $name() -> &'static Regex {
            static R: OnceLock<Regex> = OnceLock::new();
            R.get_or_init(|| Regex::new($pat).expect("valid regex"))
        }
    };
}

// Python's `$` (no MULTILINE) also matches before a final newline: `\n?\z`.
re!(re_int, r"^-?[0-9]+\n?\z");
re!(re_java_float, r"^-?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?[fF]\n?\z");
re!(re_java_double, r"^-?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?\n?\z");
re!(re_java_long, r"^-?[0-9]+[lL]\n?\z");
re!(re_js_float, r"^-?[0-9]+(\.[0-9]+)?\n?\z");
re!(re_js_bigint, r"^-?[0-9]+n\n?\z");
re!(re_arraylist_aslist, r"new\s+ArrayList<\w*>\(Arrays\.asList\((.+?)\)\)");
re!(re_arraylist_add, r"(?s)new\s+ArrayList<\w*>\(\)\s*\{\{\s*(.+?)\s*\}\}");
re!(re_add, r"add\((.+?)\)");
re!(re_arraylist_empty, r"new\s+ArrayList<\w*>\(\)");
re!(re_array, r"new\s+\w+\[\]\s*\{(.*?)\}");
re!(re_hashmap, r"(?s)new\s+HashMap<.*?>\s*\(\)\s*\{\s*\{?\s*(.*?)\s*\}?\s*\}");
re!(re_put, r#"put\("(.*?)",\s*(.*?)\)"#);
re!(re_hashmap_empty, r"new\s+HashMap<.*?>\s*\(\)");
re!(re_js_2d, r"^(?:\[\s*\[.*?\]\s*(,\s*\[.*?\]\s*)*\]|\bnew\s+Array\(\s*\[.*?\]\s*(,\s*\[.*?\]\s*)*\))");
re!(re_js_1d, r"^(?:\[(.*?)\]|\bnew\s+Array\((.*?)\))");
re!(re_inner, r"\[(.*?)\]");
re!(re_js_dict, r"^\{(.*?)\}");

fn js_pairs() -> &'static fancy_regex::Regex {
    static R: OnceLock<fancy_regex::Regex> = OnceLock::new();
    R.get_or_init(|| fancy_regex::Regex::new(r"([^:]+):\s*(.*?)(?:,\s*(?=[^,]+:)|$)").expect("valid regex"))
}

/// Python's `s[1:-1]`.
fn inner(s: &str) -> String {
    let c: Vec<char> = s.chars().collect();
    if c.len() < 2 {
        return String::new();
    }
    c[1..c.len() - 1].iter().collect()
}

/// Python's `s[:-1]`.
fn drop_last(s: &str) -> &str {
    match s.char_indices().last() {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn digits_ok(d: &str) -> bool {
    !d.is_empty()
        && !d.starts_with('_')
        && !d.ends_with('_')
        && !d.contains("__")
        && d.chars().all(|c| c.is_ascii_digit() || c == '_')
}

/// Python's `int(s)` for base 10.
pub fn py_int(s: &str) -> Option<Value> {
    let t = s.trim();
    let (neg, d) = match t.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    if !digits_ok(d) {
        return None;
    }
    let d: String = d.chars().filter(|c| *c != '_').collect();
    let signed = if neg { format!("-{d}") } else { d.clone() };
    Some(match signed.parse::<i128>() {
        Ok(v) => Value::Int(v),
        Err(_) => {
            let stripped = d.trim_start_matches('0');
            Value::BigInt(if neg { format!("-{stripped}") } else { stripped.to_string() })
        }
    })
}

/// Python's `float(s)`.
pub fn py_float(s: &str) -> Option<f64> {
    let t = s.trim();
    let (neg, body) = match t.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let lower = body.to_ascii_lowercase();
    let v = if lower == "inf" || lower == "infinity" {
        f64::INFINITY
    } else if lower == "nan" {
        f64::NAN
    } else {
        let (mant, exp) = match lower.split_once('e') {
            Some((m, e)) => (m, Some(e)),
            None => (lower.as_str(), None),
        };
        let (ip, fp) = mant.split_once('.').unwrap_or((mant, ""));
        let has_dot = mant.contains('.');
        let ok_part = |p: &str| p.is_empty() || digits_ok(p);
        if (ip.is_empty() && fp.is_empty()) || !ok_part(ip) || !ok_part(fp) || (!has_dot && ip.is_empty()) {
            return None;
        }
        if let Some(e) = exp {
            let e2 = e.strip_prefix(['+', '-']).unwrap_or(e);
            if !digits_ok(e2) {
                return None;
            }
        }
        let clean: String = lower.chars().filter(|c| *c != '_').collect();
        clean.parse::<f64>().ok()?
    };
    Some(if neg { -v } else { v })
}

fn int_value(s: &str) -> Value {
    py_int(s).unwrap_or_else(|| Value::Str(s.to_string()))
}

/// `java_type_converter`.
pub fn java_convert(v: &str, ty: &str, nested: Option<&str>) -> Result<Value, Exc> {
    let s = || Value::Str(v.to_string());
    Ok(match ty {
        "byte" | "short" | "integer" => {
            if re_int().is_match(v) {
                int_value(v)
            } else {
                s()
            }
        }
        "float" => {
            if re_java_float().is_match(v) {
                float_of(drop_f(v))
            } else {
                s()
            }
        }
        "double" => {
            if re_java_double().is_match(v) {
                float_of(v)
            } else {
                s()
            }
        }
        "long" => {
            if re_java_long().is_match(v) {
                int_value(drop_suffix(v))
            } else {
                s()
            }
        }
        "boolean" => match v {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => s(),
        },
        "char" | "String" | "any" => s(),
        "Array" => parse_java_array(v, nested)?,
        "ArrayList" => parse_arraylist(v, nested)?,
        "HashMap" => parse_hashmap(v),
        "Set" | "Hashtable" | "Queue" | "Stack" => {
            return Err(Exc(format!("NotImplementedError: {ty} conversion")))
        }
        _ => return Err(Exc(format!("Unsupported type: {ty}"))),
    })
}

fn float_of(s: &str) -> Value {
    Value::Float(py_float(s).unwrap_or(f64::NAN))
}

/// `re.sub(r"[fF]$", "", v)`: the last f/F, before an optional final newline.
fn drop_f(v: &str) -> &str {
    let t = v.strip_suffix('\n').unwrap_or(v);
    t.strip_suffix(['f', 'F']).unwrap_or(t)
}

fn drop_suffix(v: &str) -> &str {
    let t = v.strip_suffix('\n').unwrap_or(v);
    t.strip_suffix(['l', 'L']).unwrap_or(t)
}

fn java_element(e: &str, nested: Option<&str>) -> Result<Value, Exc> {
    Ok(match nested {
        Some("char") | Some("String") => Value::Str(inner(e)),
        Some(n) => java_convert(e, n, None)?,
        None => parse_java_value(e),
    })
}

fn parse_arraylist(v: &str, nested: Option<&str>) -> Result<Value, Exc> {
    if let Some(c) = re_arraylist_aslist().captures(v) {
        let items = c[1].split(',').map(|e| java_element(e.trim(), nested)).collect::<Result<_, _>>()?;
        return Ok(Value::List(items));
    }
    if let Some(c) = re_arraylist_add().captures(v) {
        let items = re_add()
            .captures_iter(&c[1])
            .map(|m| java_element(m[1].trim(), nested))
            .collect::<Result<_, _>>()?;
        return Ok(Value::List(items));
    }
    if re_arraylist_empty().is_match(v) {
        return Ok(Value::List(vec![]));
    }
    Ok(Value::Str(v.to_string()))
}

fn parse_java_array(v: &str, nested: Option<&str>) -> Result<Value, Exc> {
    let Some(c) = re_array().captures(v) else {
        return Ok(Value::Str(v.to_string()));
    };
    let mut items = Vec::new();
    for x in c[1].split(',') {
        let x = x.trim();
        if x.is_empty() {
            continue;
        }
        items.push(match nested {
            Some(n) => java_convert(x, n, None)?,
            None => parse_java_value(x),
        });
    }
    Ok(Value::List(items))
}

fn parse_hashmap(v: &str) -> Value {
    if let Some(c) = re_hashmap().captures(v) {
        let mut d = StrDict::default();
        let puts = &c[1];
        if !puts.trim().is_empty() {
            for m in re_put().captures_iter(puts) {
                d.set(m[1].to_string(), parse_java_value(m[2].trim()));
            }
        }
        return d.into_value();
    }
    if re_hashmap_empty().is_match(v) {
        return Value::Dict(vec![]);
    }
    Value::Str(v.to_string())
}

/// `parse_java_value`: typeless guess at a Java literal.
fn parse_java_value(s: &str) -> Value {
    match s {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        _ if s.starts_with('"') && s.ends_with('"') => Value::Str(inner(s)),
        _ if re_java_long().is_match(s) => int_value(drop_last(s)),
        _ if re_java_float().is_match(s) => float_of(drop_f(s)),
        _ => py_value_guess(s),
    }
}

/// `int(s)`, else `float(s)`, else the string.
fn py_value_guess(s: &str) -> Value {
    if let Some(v) = py_int(s) {
        return v;
    }
    match py_float(s) {
        Some(f) => Value::Float(f),
        None => Value::Str(s.to_string()),
    }
}

/// `js_type_converter`.
pub fn js_convert(v: &str, ty: &str, nested: Option<&str>) -> Result<Value, Exc> {
    let s = || Value::Str(v.to_string());
    Ok(match ty {
        "String" => {
            let q = (v.starts_with('"') && v.ends_with('"')) || (v.starts_with('\'') && v.ends_with('\''));
            if q {
                Value::Str(inner(v))
            } else {
                s()
            }
        }
        "integer" => {
            if re_int().is_match(v) {
                int_value(v)
            } else {
                s()
            }
        }
        "float" => {
            if re_js_float().is_match(v) {
                float_of(v)
            } else {
                s()
            }
        }
        "Bigint" => {
            if re_js_bigint().is_match(v) {
                int_value(drop_last(v.strip_suffix('\n').unwrap_or(v)))
            } else {
                s()
            }
        }
        "Boolean" => match v {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => s(),
        },
        "dict" => parse_js_dict(v),
        "array" => parse_js_array(v, nested),
        "any" => s(),
        _ => return Err(Exc(format!("Unsupported type: {ty}"))),
    })
}

/// `parse_js_value`.
fn parse_js_value(s: &str) -> Value {
    let s = s.trim();
    match s {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        _ if (s.starts_with('"') && s.ends_with('"')) || (s.starts_with('\'') && s.ends_with('\'')) => {
            Value::Str(inner(s))
        }
        _ => py_value_guess(s),
    }
}

fn parse_js_array(code_in: &str, nested: Option<&str>) -> Value {
    let code = code_in.trim();
    if let Some(m) = re_js_2d().find(code) {
        let mut out = Vec::new();
        for (idx, c) in re_inner().captures_iter(m.as_str()).enumerate() {
            let mut s = c[1].trim();
            if idx == 0 {
                s = s.strip_prefix('[').unwrap_or(s);
            }
            out.push(Value::List(s.split(',').map(|e| parse_js_value(e.trim())).collect()));
        }
        return Value::List(out);
    }
    let Some(c) = re_js_1d().captures(code) else {
        return Value::Str(code.to_string());
    };
    let body = c.get(1).or_else(|| c.get(2)).map(|m| m.as_str().trim()).unwrap_or("");
    let elements: Vec<&str> = if body.is_empty() { vec![] } else { body.split(',').collect() };
    let mut out = Vec::new();
    for e in elements {
        let e = e.trim();
        match nested {
            Some(n) => {
                let nested2 = if e.starts_with('\'') || e.starts_with('"') { Some("String") } else { None };
                match js_convert(e, n, nested2) {
                    Ok(v) => out.push(v),
                    // BFCL's bare `except:` returns the code unchanged.
                    Err(_) => return Value::Str(code.to_string()),
                }
            }
            None => out.push(parse_js_value(e)),
        }
    }
    Value::List(out)
}

fn parse_js_dict(code_in: &str) -> Value {
    let code = code_in.trim();
    if code == "{}" {
        return Value::Dict(vec![]);
    }
    let Some(c) = re_js_dict().captures(code) else {
        return Value::Str(code.to_string());
    };
    let content = &c[1];
    let mut d = StrDict::default();
    for m in js_pairs().captures_iter(content) {
        let Ok(m) = m else {
            return Value::Str(code.to_string());
        };
        let key = m.get(1).map(|x| x.as_str()).unwrap_or("").trim().trim_matches(['\'', '"']);
        let value = m.get(2).map(|x| x.as_str()).unwrap_or("").trim();
        let v = if value.starts_with('[') && value.ends_with(']') {
            parse_js_array(value, None)
        } else if value.starts_with('{') && value.ends_with('}') {
            parse_js_dict(value)
        } else {
            parse_js_value(value.trim_matches(['\'', '"']))
        };
        d.set(key.to_string(), v);
    }
    d.into_value()
}

/// A dict with string keys built in linear time: a later value for a key replaces the earlier
/// one in its first position, as Python's dict does (`dict_set` would compare each new key with
/// every key before it, quadratic in a hostile answer's key count).
#[derive(Default)]
struct StrDict {
    items: Vec<(Value, Value)>,
    index: std::collections::HashMap<String, usize>,
}

impl StrDict {
    fn set(&mut self, key: String, val: Value) {
        match self.index.get(&key) {
            Some(&i) => self.items[i].1 = val,
            None => {
                self.index.insert(key.clone(), self.items.len());
                self.items.push((Value::Str(key), val));
            }
        }
    }

    fn into_value(self) -> Value {
        Value::Dict(self.items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fc::value::py_eq;

    #[test]
    fn a_repeated_key_keeps_its_first_place_and_last_value() {
        let d = parse_js_dict("{a: 1, b: 2, a: 3}");
        let Value::Dict(items) = d else { panic!("not a dict: {d:?}") };
        let want = [("a", 3), ("b", 2)];
        assert_eq!(items.len(), want.len());
        for ((k, v), (wk, wv)) in items.iter().zip(want) {
            assert!(py_eq(k, &Value::Str(wk.into())) && py_eq(v, &Value::Int(wv)), "{k:?}: {v:?}");
        }
    }

    #[test]
    fn many_keys_decode_to_one_entry_each() {
        let body: Vec<String> = (0..3000).map(|i| format!("k{}: {i}", i % 1000)).collect();
        let Value::Dict(items) = parse_js_dict(&format!("{{{}}}", body.join(", "))) else { panic!() };
        assert_eq!(items.len(), 1000);
        assert!(py_eq(&items[7].0, &Value::Str("k7".into())) && py_eq(&items[7].1, &Value::Int(2007)));
    }
}
