//! Evaluates the constant expressions BFCL hands to Python's `eval` (it evaluates every
//! binary operation it meets: `2*3` → 6, `'a'+'b'` → 'ab'). Names and calls would raise
//! NameError in BFCL's empty-ish namespace, so they are errors here too.
//! Every value built is charged to a [`Budget`] before it is allocated (see `fc::budget`).

use super::*;
use crate::fc::budget::{cost, Budget, COMPARE, MAX_FORMAT_PRECISION, NODE};
use crate::fc::value::{dict_set, Value};

/// Python refuses nothing here, but a model writing `'a'*10**9` should not eat our memory.
const MAX_SEQ: i128 = 1 << 20;

fn err<T>(m: &str) -> Result<T, PyErr> {
    Err(PyErr(m.to_string()))
}

/// Evaluates `e`, spending `budget`; an exhausted budget is an error (the budget says which).
pub fn eval_expr(e: &Expr, budget: &mut Budget) -> Result<Value, PyErr> {
    budget.charge(NODE, "a value")?;
    match &*e.kind {
        Kind::Const(c) => Ok(match c {
            Const::None => Value::None,
            Const::True => Value::Bool(true),
            Const::False => Value::Bool(false),
            Const::Ellipsis => return err("Ellipsis is not supported in arithmetic"),
            Const::Num(Num::Int(i)) => Value::Int(*i),
            Const::Num(Num::BigInt(s)) => Value::BigInt(s.clone()),
            Const::Num(Num::Float(f)) => Value::Float(*f),
            Const::Num(Num::Imag(f)) => Value::Complex(0.0, *f),
            Const::Str { s, .. } => {
                budget.charge(s.len() as u64, "a string")?;
                Value::Str(s.clone())
            }
            Const::Bytes(b) => {
                budget.charge(b.len() as u64, "a bytes literal")?;
                Value::Bytes(b.clone())
            }
        }),
        Kind::List(v) => Ok(Value::List(v.iter().map(|x| eval_expr(x, budget)).collect::<Result<_, _>>()?)),
        Kind::Tuple(v) => Ok(Value::Tuple(v.iter().map(|x| eval_expr(x, budget)).collect::<Result<_, _>>()?)),
        Kind::Dict(items) => {
            let mut d = Vec::new();
            for (k, v) in items {
                let Some(k) = k else {
                    return err("dict unpacking is not supported");
                };
                let k = eval_expr(k, budget)?;
                if !k.is_hashable() {
                    return err("unhashable type");
                }
                let v = eval_expr(v, budget)?;
                dict_insert(&mut d, k, v, budget)?;
            }
            Ok(Value::Dict(d))
        }
        Kind::Unary(op, v) => unary(*op, eval_expr(v, budget)?),
        Kind::Bin(l, op, r) => {
            let (l, r) = (eval_expr(l, budget)?, eval_expr(r, budget)?);
            binary(l, *op, r, budget)
        }
        Kind::Name(n) => err(&format!("name '{n}' is not defined")),
        _ => err("unsupported expression"),
    }
}

/// `dict_set`, charged: finding the key compares it with every key already there.
pub fn dict_insert(
    d: &mut Vec<(Value, Value)>,
    k: Value,
    v: Value,
    budget: &mut Budget,
) -> Result<(), PyErr> {
    let per_key = COMPARE.max(cost(&k));
    budget.charge(d.len() as u64 * per_key, "comparing dictionary keys")?;
    dict_set(d, k, v);
    Ok(())
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::None => false,
        Value::Bool(b) => *b,
        Value::Int(i) => *i != 0,
        Value::BigInt(_) => true,
        Value::Float(f) => *f != 0.0,
        Value::Complex(a, b) => *a != 0.0 || *b != 0.0,
        Value::Str(s) => !s.is_empty(),
        Value::Bytes(b) => !b.is_empty(),
        Value::List(v) | Value::Tuple(v) => !v.is_empty(),
        Value::Dict(d) => !d.is_empty(),
    }
}

fn unary(op: UnOp, v: Value) -> Result<Value, PyErr> {
    if op == UnOp::Not {
        return Ok(Value::Bool(!truthy(&v)));
    }
    let i = match v {
        Value::Bool(b) => b as i128,
        Value::Int(i) => i,
        Value::BigInt(s) if op != UnOp::Pos => {
            let neg = s.trim_start_matches('~').starts_with('-');
            let mag = s.trim_start_matches('~').trim_start_matches('-');
            let approx = if s.starts_with('~') { "~" } else { "" };
            return Ok(Value::BigInt(format!("{approx}{}{mag}", if neg { "" } else { "-" })));
        }
        Value::BigInt(s) => return Ok(Value::BigInt(s)),
        Value::Float(f) if op != UnOp::Invert => {
            return Ok(Value::Float(if op == UnOp::Neg { -f } else { f }))
        }
        Value::Complex(a, b) if op != UnOp::Invert => {
            return Ok(if op == UnOp::Neg { Value::Complex(-a, -b) } else { Value::Complex(a, b) })
        }
        _ => return err("bad operand type for unary operator"),
    };
    Ok(Value::Int(match op {
        UnOp::Neg => i.checked_neg().ok_or_else(|| PyErr("overflow".into()))?,
        UnOp::Pos => i,
        _ => !i,
    }))
}

enum N {
    I(i128),
    F(f64),
    /// An integer beyond i128, known only approximately.
    B(f64),
}

fn num(v: &Value) -> Option<N> {
    match v {
        Value::Bool(b) => Some(N::I(*b as i128)),
        Value::Int(i) => Some(N::I(*i)),
        Value::Float(f) => Some(N::F(*f)),
        Value::BigInt(s) => Some(N::B(s.trim_start_matches('~').parse().unwrap_or(f64::INFINITY))),
        _ => None,
    }
}

/// Python ints never overflow; past i128 fcgpu keeps the int type and an approximate value
/// (marked `~`), which is all the checker needs (such a value never equals an answer).
fn big(approx: f64) -> Value {
    Value::BigInt(format!("~{approx:e}"))
}

fn approx_int_op(x: f64, op: BinOp, y: f64) -> Result<Value, PyErr> {
    match op {
        BinOp::Div => float_op(x, op, y),
        BinOp::Add => Ok(big(x + y)),
        BinOp::Sub => Ok(big(x - y)),
        BinOp::Mul => Ok(big(x * y)),
        BinOp::Pow if y < 0.0 => float_op(x, op, y),
        BinOp::Pow => Ok(big(x.powf(y))),
        BinOp::LShift => Ok(big(x * 2f64.powf(y))),
        BinOp::MatMul => err("unsupported operand type(s) for @"),
        _ if y == 0.0 && matches!(op, BinOp::FloorDiv | BinOp::Mod) => err("division by zero"),
        _ => Ok(big(x)),
    }
}

fn seq_count(v: &Value) -> Option<i128> {
    match v {
        Value::Bool(b) => Some(*b as i128),
        Value::Int(i) => Some(*i),
        _ => None,
    }
}

fn repeat(seq: &Value, n: i128, budget: &mut Budget) -> Result<Value, PyErr> {
    let n = n.max(0);
    let len = match seq {
        Value::Str(s) => s.chars().count(),
        Value::Bytes(b) => b.len(),
        Value::List(v) | Value::Tuple(v) => v.len(),
        _ => return err("can't multiply sequence"),
    } as i128;
    if len.saturating_mul(n) > MAX_SEQ {
        return err("sequence too large");
    }
    // Each copy clones the whole sequence, nested values included.
    budget.charge(cost(seq).saturating_mul(n as u64), "repeating a sequence")?;
    let n = n as usize;
    Ok(match seq {
        Value::Str(s) => Value::Str(s.repeat(n)),
        Value::Bytes(b) => Value::Bytes(b.repeat(n)),
        Value::List(v) => Value::List(v.iter().cloned().cycle().take(v.len() * n).collect()),
        Value::Tuple(v) => Value::Tuple(v.iter().cloned().cycle().take(v.len() * n).collect()),
        _ => unreachable!(),
    })
}

fn binary(l: Value, op: BinOp, r: Value, budget: &mut Budget) -> Result<Value, PyErr> {
    if let (Some(a), Some(b)) = (num(&l), num(&r)) {
        if let (Value::Bool(x), Value::Bool(y)) = (&l, &r) {
            match op {
                BinOp::BitAnd => return Ok(Value::Bool(*x & *y)),
                BinOp::BitOr => return Ok(Value::Bool(*x | *y)),
                BinOp::BitXor => return Ok(Value::Bool(*x ^ *y)),
                _ => {}
            }
        }
        return match (a, b) {
            (N::I(x), N::I(y)) => match int_op(x, op, y) {
                Err(e) if e.0 == "integer overflow" => approx_int_op(x as f64, op, y as f64),
                r => r,
            },
            (N::I(x), N::F(y)) => float_op(x as f64, op, y),
            (N::B(x), N::F(y)) => float_op(x, op, y),
            (N::F(x), N::I(y)) => float_op(x, op, y as f64),
            (N::F(x), N::F(y)) | (N::F(x), N::B(y)) => float_op(x, op, y),
            (N::B(x), N::I(y)) => approx_int_op(x, op, y as f64),
            (N::I(x), N::B(y)) => approx_int_op(x as f64, op, y),
            (N::B(x), N::B(y)) => approx_int_op(x, op, y),
        };
    }
    if op == BinOp::Add {
        // The result copies both operands.
        budget.charge(cost(&l) + cost(&r), "concatenating")?;
    }
    match (op, &l, &r) {
        (BinOp::Add, Value::Str(a), Value::Str(b)) => Ok(Value::Str(format!("{a}{b}"))),
        (BinOp::Add, Value::Bytes(a), Value::Bytes(b)) => Ok(Value::Bytes([a.as_slice(), b].concat())),
        (BinOp::Add, Value::List(a), Value::List(b)) => Ok(Value::List([a.as_slice(), b].concat())),
        (BinOp::Add, Value::Tuple(a), Value::Tuple(b)) => Ok(Value::Tuple([a.as_slice(), b].concat())),
        (BinOp::Mul, s, n) if seq_count(n).is_some() && seq_count(s).is_none() => {
            repeat(s, seq_count(n).unwrap_or(0), budget)
        }
        (BinOp::Mul, n, s) if seq_count(n).is_some() => repeat(s, seq_count(n).unwrap_or(0), budget),
        (BinOp::Mod, Value::Str(f), args) => percent_format(f, args, budget).map(Value::Str),
        _ => err("unsupported operand types"),
    }
}

fn ovf<T>(v: Option<T>) -> Result<T, PyErr> {
    v.ok_or_else(|| PyErr("integer overflow".into()))
}

fn int_op(x: i128, op: BinOp, y: i128) -> Result<Value, PyErr> {
    let zero = || PyErr("division by zero".into());
    Ok(Value::Int(match op {
        BinOp::Add => ovf(x.checked_add(y))?,
        BinOp::Sub => ovf(x.checked_sub(y))?,
        BinOp::Mul => ovf(x.checked_mul(y))?,
        BinOp::Div => {
            if y == 0 {
                return Err(zero());
            }
            return Ok(Value::Float(x as f64 / y as f64));
        }
        BinOp::FloorDiv => {
            if y == 0 {
                return Err(zero());
            }
            ovf(x.checked_div(y))?;
            floor_div(x, y)
        }
        BinOp::Mod => {
            if y == 0 {
                return Err(zero());
            }
            x - y * floor_div(x, y)
        }
        BinOp::Pow => {
            if y < 0 {
                if x == 0 {
                    return err("0.0 cannot be raised to a negative power");
                }
                return Ok(Value::Float((x as f64).powf(y as f64)));
            }
            let e = u32::try_from(y).map_err(|_| PyErr("integer overflow".into()))?;
            ovf(x.checked_pow(e))?
        }
        BinOp::LShift => {
            if y < 0 {
                return err("negative shift count");
            }
            let s = u32::try_from(y).map_err(|_| PyErr("integer overflow".into()))?;
            if x == 0 {
                0
            } else if s >= 126 || (x.unsigned_abs().leading_zeros() as i64 - 1) < s as i64 {
                return err("integer overflow");
            } else {
                x << s
            }
        }
        BinOp::RShift => {
            if y < 0 {
                return err("negative shift count");
            }
            x >> y.min(127) as u32
        }
        BinOp::BitAnd => x & y,
        BinOp::BitOr => x | y,
        BinOp::BitXor => x ^ y,
        BinOp::MatMul => return err("unsupported operand type(s) for @"),
    }))
}

fn floor_div(x: i128, y: i128) -> i128 {
    let q = x / y;
    if (x % y != 0) && ((x < 0) != (y < 0)) {
        q - 1
    } else {
        q
    }
}

fn float_op(x: f64, op: BinOp, y: f64) -> Result<Value, PyErr> {
    let zero = || PyErr("float division by zero".into());
    let v = match op {
        BinOp::Add => x + y,
        BinOp::Sub => x - y,
        BinOp::Mul => x * y,
        BinOp::Div => {
            if y == 0.0 {
                return Err(zero());
            }
            x / y
        }
        BinOp::FloorDiv => {
            if y == 0.0 {
                return Err(zero());
            }
            py_fmod_div(x, y).0
        }
        BinOp::Mod => {
            if y == 0.0 {
                return Err(zero());
            }
            py_fmod_div(x, y).1
        }
        BinOp::Pow => {
            if x == 0.0 && y < 0.0 {
                return Err(zero());
            }
            if x < 0.0 && y.fract() != 0.0 {
                return err("complex result");
            }
            let r = x.powf(y);
            if r.is_infinite() && x.is_finite() && y.is_finite() {
                return err("Numerical result out of range");
            }
            r
        }
        _ => return err("unsupported operand type(s) for float"),
    };
    Ok(Value::Float(v))
}

/// Python's float divmod: the remainder takes the sign of the divisor.
fn py_fmod_div(x: f64, y: f64) -> (f64, f64) {
    let mut m = x % y;
    let mut d = (x - m) / y;
    if m != 0.0 {
        if (y < 0.0) != (m < 0.0) {
            m += y;
            d -= 1.0;
        }
    } else {
        m = 0.0_f64.copysign(y);
    }
    let fd = if d != 0.0 {
        let f = d.floor();
        if d - f > 0.5 {
            f + 1.0
        } else {
            f
        }
    } else {
        0.0_f64.copysign(x / y)
    };
    (fd, m)
}

/// Python's `str(x)`.
fn py_str(v: &Value) -> String {
    match v {
        Value::Str(s) => s.clone(),
        other => other.repr(),
    }
}

/// The digits of a `%.N` precision: Python reads them as an int (empty is 0).
fn precision(digits: &str, budget: &mut Budget) -> Result<usize, PyErr> {
    let t = digits.trim_start_matches('0');
    match t.parse::<usize>() {
        _ if t.is_empty() => Ok(0),
        Ok(p) if t.len() <= 9 && p <= MAX_FORMAT_PRECISION => Ok(p),
        _ => Err(budget
            .refuse(format!("format precision {digits} is over fcgpu's bound of {MAX_FORMAT_PRECISION}"))
            .into()),
    }
}

/// `'fmt' % args` for the common conversions (%s %r %d %i %f %.Nf %x %%); others are errors.
/// Every piece of output is charged before it is written; the precision is capped (Rust's
/// formatter panics past 65535, and a real answer never asks for more than a few digits).
fn percent_format(f: &str, args: &Value, budget: &mut Budget) -> Result<String, PyErr> {
    budget.charge(cost(args), "copying format arguments")?;
    let items: Vec<Value> = match args {
        Value::Tuple(v) => v.clone(),
        other => vec![other.clone()],
    };
    let mut it = items.into_iter();
    let mut out = String::new();
    let mut chars = f.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            budget.charge(c.len_utf8() as u64, "formatting")?;
            out.push(c);
            continue;
        }
        let mut prec: Option<usize> = None;
        if chars.peek() == Some(&'.') {
            chars.next();
            let mut d = String::new();
            while let Some(x) = chars.peek().filter(|x| x.is_ascii_digit()) {
                d.push(*x);
                chars.next();
            }
            prec = Some(precision(&d, budget)?);
        }
        let conv = chars.next().ok_or_else(|| PyErr("incomplete format".into()))?;
        if conv == '%' {
            out.push('%');
            continue;
        }
        let arg = it.next().ok_or_else(|| PyErr("not enough arguments for format string".into()))?;
        // A repr is at most 4 bytes per byte of text (`\x00`) and under 4 per value node.
        budget.charge(4 * cost(&arg), "formatting")?;
        if conv == 'f' {
            budget.charge(320 + prec.unwrap_or(6) as u64, "formatting")?;
        }
        let num = |v: &Value| match v {
            Value::Bool(b) => Ok(*b as i128 as f64),
            Value::Int(i) => Ok(*i as f64),
            Value::Float(x) => Ok(*x),
            _ => err("a real number is required"),
        };
        match conv {
            's' => out.push_str(&py_str(&arg)),
            'r' => out.push_str(&arg.repr()),
            'd' | 'i' => match arg {
                Value::Bool(b) => out.push_str(&(b as i128).to_string()),
                Value::Int(i) => out.push_str(&i.to_string()),
                Value::Float(x) if x.is_finite() => out.push_str(&(x.trunc() as i128).to_string()),
                _ => return err("%d format: a real number is required"),
            },
            'f' => out.push_str(&format!("{:.*}", prec.unwrap_or(6), num(&arg)?)),
            'x' => match arg {
                Value::Int(i) if i >= 0 => out.push_str(&format!("{i:x}")),
                _ => return err("%x format: an integer is required"),
            },
            _ => return err("unsupported format character"),
        }
    }
    if it.next().is_some() {
        return err("not all arguments converted during string formatting");
    }
    Ok(out)
}
