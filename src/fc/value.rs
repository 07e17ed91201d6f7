//! Python values as BFCL's checker sees them: the decoder yields Python objects and the
//! checker compares them with Python's `==` (so 1 == 1.0 == True, list != tuple).

use serde_json::Value as Json;

/// A Python value produced by decoding a model answer or loading a ground truth.
#[derive(Debug, Clone)]
pub enum Value {
    None,
    Bool(bool),
    Int(i128),
    /// An integer beyond i128, kept as its decimal text (compared textually).
    BigInt(String),
    Float(f64),
    Complex(f64, f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    /// Insertion-ordered; keys are unique under Python equality.
    Dict(Vec<(Value, Value)>),
}

/// Python's `type(x)`, as far as the checker distinguishes types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PyType {
    NoneType,
    Bool,
    Int,
    Float,
    Complex,
    Str,
    Bytes,
    List,
    Tuple,
    Dict,
    Set,
}

impl PyType {
    pub fn name(self) -> &'static str {
        match self {
            PyType::NoneType => "NoneType",
            PyType::Bool => "bool",
            PyType::Int => "int",
            PyType::Float => "float",
            PyType::Complex => "complex",
            PyType::Str => "str",
            PyType::Bytes => "bytes",
            PyType::List => "list",
            PyType::Tuple => "tuple",
            PyType::Dict => "dict",
            PyType::Set => "set",
        }
    }
}

impl Value {
    pub fn py_type(&self) -> PyType {
        match self {
            Value::None => PyType::NoneType,
            Value::Bool(_) => PyType::Bool,
            Value::Int(_) | Value::BigInt(_) => PyType::Int,
            Value::Float(_) => PyType::Float,
            Value::Complex(..) => PyType::Complex,
            Value::Str(_) => PyType::Str,
            Value::Bytes(_) => PyType::Bytes,
            Value::List(_) => PyType::List,
            Value::Tuple(_) => PyType::Tuple,
            Value::Dict(_) => PyType::Dict,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn is_empty_str(&self) -> bool {
        matches!(self, Value::Str(s) if s.is_empty())
    }

    /// Converts a JSON value the way Python's `json.loads` would.
    pub fn from_json(j: &Json) -> Value {
        match j {
            Json::Null => Value::None,
            Json::Bool(b) => Value::Bool(*b),
            Json::Number(n) => {
                if let Some(i) = n.as_i64() {
                    Value::Int(i as i128)
                } else if let Some(u) = n.as_u64() {
                    Value::Int(u as i128)
                } else {
                    Value::Float(n.as_f64().unwrap_or(f64::NAN))
                }
            }
            Json::String(s) => Value::Str(s.clone()),
            Json::Array(a) => Value::List(a.iter().map(Value::from_json).collect()),
            Json::Object(o) => {
                Value::Dict(o.iter().map(|(k, v)| (Value::Str(k.clone()), Value::from_json(v))).collect())
            }
        }
    }

    /// A JSON rendering for reports (verdict files); not used for scoring.
    pub fn to_json(&self) -> Json {
        match self {
            Value::None => Json::Null,
            Value::Bool(b) => Json::Bool(*b),
            Value::Int(i) => match i64::try_from(*i) {
                Ok(v) => Json::from(v),
                Err(_) => Json::String(i.to_string()),
            },
            Value::BigInt(s) => Json::String(s.clone()),
            Value::Float(f) => serde_json::Number::from_f64(*f)
                .map(Json::Number)
                .unwrap_or_else(|| Json::String(py_float_repr(*f))),
            Value::Complex(..) | Value::Bytes(_) => Json::String(self.repr()),
            Value::Str(s) => Json::String(s.clone()),
            Value::List(v) | Value::Tuple(v) => Json::Array(v.iter().map(|x| x.to_json()).collect()),
            Value::Dict(d) => {
                let mut m = serde_json::Map::new();
                for (k, v) in d {
                    let key = match k {
                        Value::Str(s) => s.clone(),
                        other => other.repr(),
                    };
                    m.insert(key, v.to_json());
                }
                Json::Object(m)
            }
        }
    }

    /// Python's `repr()`.
    pub fn repr(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(true) => "True".into(),
            Value::Bool(false) => "False".into(),
            Value::Int(i) => i.to_string(),
            Value::BigInt(s) => s.clone(),
            Value::Float(f) => py_float_repr(*f),
            Value::Complex(re, im) => complex_repr(*re, *im),
            Value::Str(s) => py_str_repr(s),
            Value::Bytes(b) => py_bytes_repr(b),
            Value::List(v) => format!("[{}]", join_repr(v)),
            Value::Tuple(v) if v.len() == 1 => format!("({},)", v[0].repr()),
            Value::Tuple(v) => format!("({})", join_repr(v)),
            Value::Dict(d) => {
                let items: Vec<String> =
                    d.iter().map(|(k, v)| format!("{}: {}", k.repr(), v.repr())).collect();
                format!("{{{}}}", items.join(", "))
            }
        }
    }

    /// A numeric view for cross-type equality (bool and int are numbers in Python).
    fn as_number(&self) -> Option<Num> {
        match self {
            Value::Bool(b) => Some(Num::Int(*b as i128)),
            Value::Int(i) => Some(Num::Int(*i)),
            Value::Float(f) => Some(Num::Float(*f)),
            Value::Complex(re, im) => Some(Num::Complex(*re, *im)),
            _ => None,
        }
    }

    /// Whether Python could use this value as a dict key.
    pub fn is_hashable(&self) -> bool {
        match self {
            Value::List(_) | Value::Dict(_) => false,
            Value::Tuple(v) => v.iter().all(|x| x.is_hashable()),
            _ => true,
        }
    }
}

fn join_repr(v: &[Value]) -> String {
    v.iter().map(|x| x.repr()).collect::<Vec<_>>().join(", ")
}

#[derive(Clone, Copy)]
enum Num {
    Int(i128),
    Float(f64),
    Complex(f64, f64),
}

fn int_eq_float(i: i128, f: f64) -> bool {
    // Exact comparison, as Python does (no rounding of the integer).
    f.is_finite() && f.fract() == 0.0 && f.abs() < 1.7e38 && (f as i128) == i
}

fn num_eq(a: Num, b: Num) -> bool {
    match (a, b) {
        (Num::Int(x), Num::Int(y)) => x == y,
        (Num::Int(x), Num::Float(y)) | (Num::Float(y), Num::Int(x)) => int_eq_float(x, y),
        (Num::Float(x), Num::Float(y)) => x == y,
        (Num::Complex(r, i), other) | (other, Num::Complex(r, i)) => {
            i == 0.0 && num_eq(Num::Float(r), other)
                || matches!(other, Num::Complex(r2, i2) if r2 == r && i2 == i)
        }
    }
}

/// Python's `a == b`.
pub fn py_eq(a: &Value, b: &Value) -> bool {
    if let (Some(x), Some(y)) = (a.as_number(), b.as_number()) {
        if let (Num::Int(_), Num::Complex(..)) | (Num::Complex(..), Num::Int(_)) = (x, y) {
            // int == complex compares the real part exactly.
            return match (x, y) {
                (Num::Int(i), Num::Complex(r, im)) | (Num::Complex(r, im), Num::Int(i)) => {
                    im == 0.0 && int_eq_float(i, r)
                }
                _ => false,
            };
        }
        return num_eq(x, y);
    }
    match (a, b) {
        (Value::None, Value::None) => true,
        (Value::BigInt(x), Value::BigInt(y)) => x == y,
        (Value::Str(x), Value::Str(y)) => x == y,
        (Value::Bytes(x), Value::Bytes(y)) => x == y,
        (Value::List(x), Value::List(y)) | (Value::Tuple(x), Value::Tuple(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| py_eq(p, q))
        }
        (Value::Dict(x), Value::Dict(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| dict_get(y, k).is_some_and(|w| py_eq(v, w)))
        }
        _ => false,
    }
}

/// Python's `x in seq` for a list of candidates.
pub fn py_in(x: &Value, seq: &[Value]) -> bool {
    seq.iter().any(|c| py_eq(x, c))
}

pub fn dict_get<'a>(d: &'a [(Value, Value)], key: &Value) -> Option<&'a Value> {
    d.iter().find(|(k, _)| py_eq(k, key)).map(|(_, v)| v)
}

/// Inserts like Python's `d[k] = v`: an equal key keeps its position and original key object.
pub fn dict_set(d: &mut Vec<(Value, Value)>, key: Value, val: Value) {
    match d.iter_mut().find(|(k, _)| py_eq(k, &key)) {
        Some(slot) => slot.1 = val,
        None => d.push((key, val)),
    }
}

/// Python's `float.__repr__` (shortest round-trip digits; scientific outside 1e-4..1e16).
pub fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf".into() } else { "-inf".into() };
    }
    let sci = format!("{:e}", f);
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let neg = mant.starts_with('-');
    let digits: String = mant.chars().filter(|c| c.is_ascii_digit()).collect();
    let sign = if neg { "-" } else { "" };
    if (-4..16).contains(&exp) {
        if exp >= 0 {
            let e = exp as usize;
            let (int_part, frac) = if digits.len() > e + 1 {
                (digits[..e + 1].to_string(), digits[e + 1..].to_string())
            } else {
                (format!("{}{}", digits, "0".repeat(e + 1 - digits.len())), "0".to_string())
            };
            format!("{sign}{int_part}.{frac}")
        } else {
            format!("{sign}0.{}{}", "0".repeat((-exp - 1) as usize), digits)
        }
    } else {
        let rest = if digits.len() > 1 { format!(".{}", &digits[1..]) } else { String::new() };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{}{rest}e{esign}{:02}", &digits[..1], exp.abs())
    }
}

fn complex_repr(re: f64, im: f64) -> String {
    let fmt = |x: f64| {
        let r = py_float_repr(x);
        r.strip_suffix(".0").map(str::to_string).unwrap_or(r)
    };
    if re == 0.0 && re.is_sign_positive() {
        format!("{}j", fmt(im))
    } else {
        let sign = if im >= 0.0 || im.is_nan() { "+" } else { "" };
        format!("({}{}{}j)", fmt(re), sign, fmt(im))
    }
}

/// Whether Python's `str.isprintable()` holds for one character (approximation of the
/// Unicode categories Cc, Cf, Cs, Co, Cn, Zl, Zp, Zs-except-space).
fn is_printable(c: char) -> bool {
    let u = c as u32;
    if c == ' ' {
        return true;
    }
    if c.is_control() || c.is_whitespace() {
        return false;
    }
    !matches!(u,
        0xAD | 0x600..=0x605 | 0x61C | 0x6DD | 0x70F | 0x180E | 0x200B..=0x200F | 0x202A..=0x202E
        | 0x2060..=0x2064 | 0x2066..=0x206F | 0xFEFF | 0xFFF9..=0xFFFB | 0xE000..=0xF8FF
        | 0xF0000..=0x10FFFF | 0xFFFE | 0xFFFF | 0x1BCA0..=0x1BCA3 | 0xE0001 | 0xE0020..=0xE007F)
}

/// Python's `repr(str)`.
pub fn py_str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if (c as u32) < 0x7f => out.push(c),
            c if is_printable(c) => out.push(c),
            c if (c as u32) <= 0xff => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if (c as u32) <= 0xffff => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push_str(&format!("\\U{:08x}", c as u32)),
        }
    }
    out.push(quote);
    out
}

/// Python's `repr(bytes)`.
pub fn py_bytes_repr(b: &[u8]) -> String {
    let quote = if b.contains(&b'\'') && !b.contains(&b'"') { '"' } else { '\'' };
    let mut out = format!("b{quote}");
    for &c in b {
        match c {
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            c if c as char == quote => {
                out.push('\\');
                out.push(c as char);
            }
            0x20..=0x7e => out.push(c as char),
            c => out.push_str(&format!("\\x{:02x}", c)),
        }
    }
    out.push(quote);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_repr_matches_python() {
        let cases = [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (-2.5, "-2.5"),
            (123456.789, "123456.789"),
            (1.5e300, "1.5e+300"),
            (0.0, "0.0"),
        ];
        for (f, s) in cases {
            assert_eq!(py_float_repr(f), s);
        }
    }

    #[test]
    fn equality_crosses_numeric_types() {
        assert!(py_eq(&Value::Int(1), &Value::Float(1.0)));
        assert!(py_eq(&Value::Bool(true), &Value::Int(1)));
        assert!(!py_eq(&Value::List(vec![]), &Value::Tuple(vec![])));
        assert!(!py_eq(&Value::Str("1".into()), &Value::Int(1)));
    }

    #[test]
    fn str_repr_picks_quotes() {
        assert_eq!(py_str_repr("a'b"), "\"a'b\"");
        assert_eq!(py_str_repr("a'b\""), "'a\\'b\"'");
        assert_eq!(py_str_repr("é\n"), "'é\\n'");
    }
}
