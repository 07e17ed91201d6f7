//! BFCL's AST checker (`ast_checker.py`), step for step: same order of checks, same
//! Python equality, same error types. Where BFCL's Python would raise (bad data), the
//! verdict is invalid with error type `checker:exception`.

use crate::fc::convert::{java_convert, js_convert};
use crate::fc::decode::{Call, Lang};
use crate::fc::value::{dict_get, py_eq, py_in, PyType, Value};
use serde_json::Value as Json;

/// A checker verdict: BFCL's `valid` and `error_type` (plus a human-readable message).
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub valid: bool,
    pub error_type: String,
    pub error: String,
}

impl Verdict {
    pub fn ok() -> Verdict {
        Verdict { valid: true, error_type: String::new(), error: String::new() }
    }

    pub fn bad(error_type: &str, error: impl Into<String>) -> Verdict {
        Verdict { valid: false, error_type: error_type.to_string(), error: error.into() }
    }
}

/// Where BFCL's own code would raise an exception.
#[derive(Debug)]
pub struct Exc(pub String);

type CR<T> = Result<T, Exc>;

fn exc<T>(m: impl Into<String>) -> CR<T> {
    Err(Exc(m.into()))
}

pub const EXCEPTION: &str = "checker:exception";

/// `ast_checker`: dispatch on the category name.
pub fn ast_check(
    functions: &[Json],
    calls: &[Call],
    answers: &[Value],
    lang: Lang,
    category: &str,
) -> Verdict {
    let r = if category.contains("parallel") {
        parallel_no_order(functions, calls, answers, lang)
    } else if category.contains("multiple") {
        multiple(functions, calls, answers, lang)
    } else if calls.len() != 1 {
        Ok(Verdict::bad("simple_function_checker:wrong_count", "Wrong number of functions."))
    } else {
        match (functions.first(), answers.first()) {
            (Some(f), Some(a)) => simple(f, &calls[0], a, lang),
            _ => exc("list index out of range"),
        }
    };
    r.unwrap_or_else(|e| Verdict::bad(EXCEPTION, e.0))
}

fn find_description<'a>(functions: &'a [Json], name: &str) -> CR<&'a Json> {
    functions
        .iter()
        .find(|f| f.get("name").and_then(Json::as_str) == Some(name))
        .ok_or_else(|| Exc("'NoneType' object is not subscriptable".into()))
}

/// The single key of a ground-truth entry `{name: {...}}`.
fn answer_name(a: &Value) -> CR<&str> {
    match a {
        Value::Dict(d) => match d.first() {
            Some((Value::Str(k), _)) => Ok(k),
            _ => exc("list index out of range"),
        },
        _ => exc("answer is not a dict"),
    }
}

fn multiple(functions: &[Json], calls: &[Call], answers: &[Value], lang: Lang) -> CR<Verdict> {
    if calls.len() != answers.len() {
        return Ok(Verdict::bad("multiple_function_checker:wrong_count", "Wrong number of functions."));
    }
    let Some(first) = answers.first() else {
        return exc("list index out of range");
    };
    let desc = find_description(functions, answer_name(first)?)?;
    simple(desc, &calls[0], first, lang)
}

/// Greedy: each expected call takes the first unmatched output that passes.
fn parallel_no_order(functions: &[Json], calls: &[Call], answers: &[Value], lang: Lang) -> CR<Verdict> {
    if calls.len() != answers.len() {
        return Ok(Verdict::bad(
            "parallel_function_checker_no_order:wrong_count",
            "Wrong number of functions.",
        ));
    }
    let mut matched = vec![false; calls.len()];
    let mut last_valid = true;
    for (i, ans) in answers.iter().enumerate() {
        let desc = find_description(functions, answer_name(ans)?);
        for (j, call) in calls.iter().enumerate() {
            if matched[j] {
                continue;
            }
            let desc = desc.as_ref().map_err(|e| Exc(e.0.clone()))?;
            let r = simple(desc, call, ans, lang)?;
            last_valid = r.valid;
            if r.valid {
                matched[j] = true;
                break;
            }
        }
        if !last_valid {
            return Ok(Verdict::bad(
                "parallel_function_checker_no_order:cannot_find_match",
                format!("Could not find a matching function for index {i} of possible answers."),
            ));
        }
    }
    Ok(Verdict::ok())
}

pub(crate) fn type_of_name(lang: Lang, t: &str) -> CR<PyType> {
    let ty = match lang {
        Lang::Python => match t {
            "string" | "any" => PyType::Str,
            "integer" => PyType::Int,
            "float" => PyType::Float,
            "boolean" => PyType::Bool,
            "array" | "tuple" => PyType::List,
            "dict" => PyType::Dict,
            _ => return exc(format!("KeyError: {t:?}")),
        },
        Lang::Java => match t {
            "byte" | "short" | "integer" | "long" => PyType::Int,
            "float" | "double" => PyType::Float,
            "boolean" => PyType::Bool,
            "char" | "String" | "any" => PyType::Str,
            "Array" | "ArrayList" | "Queue" | "Stack" => PyType::List,
            "Set" => PyType::Set,
            "HashMap" | "Hashtable" => PyType::Dict,
            _ => return exc(format!("KeyError: {t:?}")),
        },
        Lang::JavaScript => match t {
            "String" | "any" => PyType::Str,
            "integer" | "Bigint" => PyType::Int,
            "float" => PyType::Float,
            "Boolean" => PyType::Bool,
            "dict" => PyType::Dict,
            "array" => PyType::List,
            _ => return exc(format!("KeyError: {t:?}")),
        },
    };
    Ok(ty)
}

fn json_str<'a>(j: &'a Json, path: &[&str]) -> CR<&'a Json> {
    let mut cur = j;
    for p in path {
        cur = cur.get(*p).ok_or_else(|| Exc(format!("KeyError: '{p}'")))?;
    }
    Ok(cur)
}

/// `simple_function_checker`.
pub fn simple(desc: &Json, call: &Call, answer: &Value, lang: Lang) -> CR<Verdict> {
    let Value::Dict(ans) = answer else {
        return exc("answer is not a dict");
    };
    let Some((_, Value::Dict(pa))) = ans.first() else {
        return exc("answer params are not a dict");
    };
    let func_name = json_str(desc, &["name"])?.as_str().unwrap_or_default();
    let props = json_str(desc, &["parameters", "properties"])?;
    let required = json_str(desc, &["parameters", "required"])?;

    if call.name != func_name {
        return Ok(Verdict::bad(
            "simple_function_checker:wrong_func_name",
            format!("Function name '{func_name}' not found in model output."),
        ));
    }
    for r in required.as_array().into_iter().flatten() {
        let r = r.as_str().unwrap_or_default();
        if call.arg(r).is_none() {
            return Ok(Verdict::bad(
                "simple_function_checker:missing_required",
                format!("Missing required parameter: '{r}'."),
            ));
        }
    }
    for (param, value) in &call.args {
        let detail = param.as_deref().and_then(|p| props.get(p));
        let alts = param.as_deref().and_then(|p| dict_get(pa, &Value::Str(p.to_string())));
        let (Some(detail), Some(alts)) = (detail, alts) else {
            return Ok(Verdict::bad(
                "simple_function_checker:unexpected_param",
                format!("Unexpected parameter: {param:?}."),
            ));
        };
        if let Some(v) = check_param(param.as_deref().unwrap_or_default(), value, detail, alts, lang)? {
            return Ok(v);
        }
    }
    for (k, alts) in pa {
        let k = k.as_str().unwrap_or_default();
        if call.arg(k).is_none() && !py_contains(alts, &Value::Str(String::new()))? {
            return Ok(Verdict::bad(
                "simple_function_checker:missing_optional",
                format!("Optional parameter '{k}' not provided and not marked as optional."),
            ));
        }
    }
    Ok(Verdict::ok())
}

/// Checks one parameter; `Some(verdict)` on failure.
fn check_param(param: &str, value: &Value, detail: &Json, alts: &Value, lang: Lang) -> CR<Option<Verdict>> {
    let desc = json_str(detail, &["type"])?.as_str().unwrap_or_default().to_string();
    let expected = type_of_name(lang, &desc)?;
    let mut nested = None;
    let mut value = value.clone();
    match lang {
        Lang::Java | Lang::JavaScript => {
            let Value::Str(s) = &value else {
                let (et, l) = if lang == Lang::Java {
                    ("type_error:java", "String")
                } else {
                    ("type_error:js", "String")
                };
                return Ok(Some(Verdict::bad(
                    et,
                    format!("Incorrect type for parameter '{param}'. Expected type {l}."),
                )));
            };
            let nested_name = if matches!(desc.as_str(), "Array" | "ArrayList" | "array") {
                let n = json_str(detail, &["items", "type"])?.as_str().unwrap_or_default().to_string();
                nested = Some(type_of_name(lang, &n)?);
                Some(n)
            } else {
                None
            };
            value = if lang == Lang::Java {
                java_convert(s, &desc, nested_name.as_deref())?
            } else {
                js_convert(s, &desc, nested_name.as_deref())?
            };
        }
        Lang::Python => {
            if desc == "array" || desc == "tuple" {
                let n = json_str(detail, &["items", "type"])?.as_str().unwrap_or_default().to_string();
                nested = Some(type_of_name(lang, &n)?);
            }
        }
    }
    if desc == "tuple" {
        if let Value::Tuple(v) = value {
            value = Value::List(v);
        }
    }
    if lang == Lang::Python && desc == "float" {
        match &value {
            Value::Int(i) => value = Value::Float(*i as f64),
            Value::BigInt(s) => match s.parse::<f64>() {
                // Python's float(int) raises instead of rounding to infinity.
                Ok(f) if f.is_finite() => value = Value::Float(f),
                _ => return exc("OverflowError: int too large to convert to float"),
            },
            _ => {}
        }
    }
    let tc = type_check(&value, alts, expected, nested)?;
    if !tc.valid {
        return Ok(Some(Verdict::bad(tc.error_type, format!("Incorrect type for parameter '{param}'."))));
    }
    if !tc.is_variable {
        let r = match (expected, nested) {
            (PyType::Dict, _) => Some(dict_checker(&value, alts)?),
            (PyType::List, Some(PyType::Dict)) => Some(list_dict_checker(&value, alts)?),
            (PyType::Str, _) => Some(string_checker(&value, alts)?),
            (PyType::List, _) => Some(list_checker(&value, alts)?),
            _ => None,
        };
        if let Some(r) = r {
            return Ok(if r.valid { None } else { Some(r) });
        }
    }
    if !py_contains(alts, &value)? {
        return Ok(Some(Verdict::bad(
            "value_error:others",
            format!("Invalid value for parameter '{param}': {}.", value.repr()),
        )));
    }
    Ok(None)
}

/// Python's `for x in v` over the containers the data can hold.
pub fn py_iter(v: &Value) -> CR<Vec<Value>> {
    Ok(match v {
        Value::List(x) | Value::Tuple(x) => x.clone(),
        Value::Str(s) => s.chars().map(|c| Value::Str(c.to_string())).collect(),
        Value::Dict(d) => d.iter().map(|(k, _)| k.clone()).collect(),
        Value::Bytes(b) => b.iter().map(|&c| Value::Int(c as i128)).collect(),
        other => return exc(format!("'{}' object is not iterable", other.py_type().name())),
    })
}

/// Python's `[v[i] for i in range(len(v))]`.
fn py_index_items(v: &Value) -> CR<Vec<Value>> {
    match v {
        Value::Dict(d) => (0..d.len())
            .map(|i| {
                dict_get(d, &Value::Int(i as i128)).cloned().ok_or_else(|| Exc(format!("KeyError: {i}")))
            })
            .collect(),
        Value::List(_) | Value::Tuple(_) | Value::Str(_) | Value::Bytes(_) => py_iter(v),
        other => exc(format!("object of type '{}' has no len()", other.py_type().name())),
    }
}

fn py_len(v: &Value) -> CR<usize> {
    Ok(match v {
        Value::List(x) | Value::Tuple(x) => x.len(),
        Value::Str(s) => s.chars().count(),
        Value::Dict(d) => d.len(),
        Value::Bytes(b) => b.len(),
        other => return exc(format!("object of type '{}' has no len()", other.py_type().name())),
    })
}

/// Python's `x in container`.
pub fn py_contains(container: &Value, x: &Value) -> CR<bool> {
    match container {
        Value::List(v) | Value::Tuple(v) => Ok(py_in(x, v)),
        Value::Str(s) => match x {
            Value::Str(needle) => Ok(s.contains(needle.as_str())),
            _ => exc("'in <string>' requires string as left operand"),
        },
        Value::Dict(d) => {
            if !x.is_hashable() {
                return exc("unhashable type");
            }
            Ok(dict_get(d, x).is_some())
        }
        other => exc(format!("argument of type '{}' is not iterable", other.py_type().name())),
    }
}

fn possible_answer_type(alts: &Value) -> CR<Option<PyType>> {
    for a in py_iter(alts)? {
        if !a.is_empty_str() {
            return Ok(Some(a.py_type()));
        }
    }
    Ok(None)
}

struct TypeResult {
    valid: bool,
    is_variable: bool,
    error_type: &'static str,
}

/// `type_checker`: exact types; a value of the answers' own type counts as a "variable".
fn type_check(value: &Value, alts: &Value, expected: PyType, nested: Option<PyType>) -> CR<TypeResult> {
    let mut res = TypeResult { valid: true, is_variable: false, error_type: "type_error:simple" };
    let pat = possible_answer_type(alts)?;
    let is_variable = pat.is_some_and(|t| t != expected);
    if value.py_type() == expected {
        let Some(inner) = nested else {
            res.is_variable = is_variable;
            return Ok(res);
        };
        for item in py_iter(alts)? {
            let mut flag = true;
            if item.py_type() == PyType::List {
                for vi in py_iter(value)? {
                    if !type_check(&vi, &item, inner, None)?.valid {
                        flag = false;
                        break;
                    }
                }
            }
            if flag {
                return Ok(TypeResult { valid: true, is_variable, error_type: "" });
            }
        }
        res.valid = false;
        res.error_type = "type_error:nested";
    }
    if pat.is_some_and(|t| value.py_type() == t) {
        res.is_variable = true;
        return Ok(res);
    }
    res.valid = false;
    res.error_type = "type_error:simple";
    Ok(res)
}

/// `standardize_string`: drop ` ,./-_*^`, lowercase, `'` → `"`.
pub fn standardize(s: &str) -> String {
    let kept: String =
        s.chars().filter(|c| !matches!(c, ' ' | ',' | '.' | '/' | '-' | '_' | '*' | '^')).collect();
    kept.to_lowercase().replace('\'', "\"")
}

fn std_value(v: &Value) -> Value {
    match v {
        Value::Str(s) => Value::Str(standardize(s)),
        other => other.clone(),
    }
}

fn string_checker(value: &Value, alts: &Value) -> CR<Verdict> {
    let Value::Str(s) = value else {
        return exc("expected str");
    };
    let out = standardize(s);
    let ok = py_index_items(alts)?.iter().any(|a| matches!(a, Value::Str(x) if standardize(x) == out));
    Ok(if ok {
        Verdict::ok()
    } else {
        Verdict::bad("value_error:string", format!("Invalid value: {}.", value.repr()))
    })
}

fn list_checker(value: &Value, alts: &Value) -> CR<Verdict> {
    let out = Value::List(py_iter(value)?.iter().map(std_value).collect());
    for alt in py_index_items(alts)? {
        let std_alt = Value::List(py_index_items(&alt)?.iter().map(std_value).collect());
        if py_eq(&out, &std_alt) {
            return Ok(Verdict::ok());
        }
    }
    Ok(Verdict::bad("value_error:list/tuple", format!("Invalid value: {}.", value.repr())))
}

fn dict_checker(value: &Value, alts: &Value) -> CR<Verdict> {
    let mut result = Verdict::bad("dict_checker:unclear", "");
    for alt in py_index_items(alts)? {
        if alt.is_empty_str() {
            continue;
        }
        // BFCL resets `result` per alternative; a failing alternative always replaces it.
        if let Some(v) = dict_alternative(value, &alt)? {
            result = v;
            continue;
        }
        return Ok(Verdict::ok());
    }
    Ok(result)
}

/// One alternative of `dict_checker`; `Some(failure)` when it does not match.
fn dict_alternative(value: &Value, alt: &Value) -> CR<Option<Verdict>> {
    let Value::Dict(out) = value else {
        return exc("object has no attribute 'items'");
    };
    let Value::Dict(alt_d) = alt else {
        return exc("alternative is not a dict");
    };
    // BFCL runs both loops; a failure in the second overwrites the first one's error type.
    let mut failure = None;
    for (k, v) in out {
        if !py_contains(alt, k)? {
            failure = Some(Verdict::bad(
                "value_error:dict_key",
                format!("Unexpected dict key parameter: {}.", k.repr()),
            ));
            break;
        }
        let allowed: Vec<Value> =
            py_index_items(dict_get(alt_d, k).unwrap_or(&Value::None))?.iter().map(std_value).collect();
        if !py_in(&std_value(v), &allowed) {
            failure = Some(Verdict::bad(
                "value_error:dict_value",
                format!("Invalid value for parameter {}.", k.repr()),
            ));
            break;
        }
    }
    for (k, v) in alt_d {
        if !py_contains(value, k)? && !py_contains(v, &Value::Str(String::new()))? {
            failure = Some(Verdict::bad(
                "value_error:dict_key",
                format!("Missing dict key parameter: {}.", k.repr()),
            ));
            break;
        }
    }
    Ok(failure)
}

fn list_dict_checker(value: &Value, alts: &Value) -> CR<Verdict> {
    let mut result = Verdict::bad("list_dict_checker:unclear", "");
    let items = py_iter(value)?;
    for alt in py_index_items(alts)? {
        if items.len() != py_len(&alt)? {
            result = Verdict::bad("value_error:list_dict_count", "Wrong number of dictionaries in the list.");
            continue;
        }
        let alt_items = py_index_items(&alt)?;
        let mut flag = true;
        for (i, item) in items.iter().enumerate() {
            result = dict_checker(item, &Value::List(vec![alt_items[i].clone()]))?;
            if !result.valid {
                flag = false;
                break;
            }
        }
        if flag {
            return Ok(Verdict::ok());
        }
    }
    Ok(result)
}
