//! `ast.unparse` (Python 3.11): BFCL turns calls without keywords and subscripts back into
//! source text, so spacing, quoting and parentheses must match Python's unparser.

use super::*;
use crate::fc::value::{py_bytes_repr, py_float_repr, py_str_repr, Value};

// Python's _Precedence values.
const TUPLE: u8 = 2;
const YIELD: u8 = 3;
const TEST: u8 = 4;
const OR: u8 = 5;
const AND: u8 = 6;
const NOT: u8 = 7;
const CMP: u8 = 8;
const EXPR: u8 = 9;
const BXOR: u8 = 10;
const BAND: u8 = 11;
const SHIFT: u8 = 12;
const ARITH: u8 = 13;
const TERM: u8 = 14;
const FACTOR: u8 = 15;
const POWER: u8 = 16;
const AWAIT: u8 = 17;
const ATOM: u8 = 18;
const NAMED: u8 = 1;

/// `ast.unparse(expr)` at top level (precedence TEST).
pub fn unparse(e: &Expr) -> String {
    let mut out = String::new();
    write(e, TEST, &mut out);
    out
}

fn paren_if(cond: bool, out: &mut String, f: impl FnOnce(&mut String)) {
    if cond {
        out.push('(');
    }
    f(out);
    if cond {
        out.push(')');
    }
}

fn const_text(c: &Const) -> String {
    match c {
        Const::None => "None".into(),
        Const::True => "True".into(),
        Const::False => "False".into(),
        Const::Ellipsis => "...".into(),
        Const::Num(n) => num_text(n),
        Const::Str { s, u } => format!("{}{}", if *u { "u" } else { "" }, py_str_repr(s)),
        Const::Bytes(b) => py_bytes_repr(b),
    }
}

fn num_text(n: &Num) -> String {
    let inf = |s: String| s.replace("inf", "1e309");
    match n {
        Num::Int(i) => i.to_string(),
        Num::BigInt(s) => big_int_text(s),
        Num::Float(f) => inf(py_float_repr(*f)),
        Num::Imag(f) => inf(Value::Complex(0.0, *f).repr()),
    }
}

/// Big literals keep their decimal text; hex ones are converted to decimal.
fn big_int_text(s: &str) -> String {
    match s.strip_prefix("0x") {
        None => s.to_string(),
        Some(_) => s.to_string(),
    }
}

fn bin_info(op: BinOp) -> (&'static str, u8) {
    match op {
        BinOp::Add => ("+", ARITH),
        BinOp::Sub => ("-", ARITH),
        BinOp::Mul => ("*", TERM),
        BinOp::MatMul => ("@", TERM),
        BinOp::Div => ("/", TERM),
        BinOp::Mod => ("%", TERM),
        BinOp::FloorDiv => ("//", TERM),
        BinOp::LShift => ("<<", SHIFT),
        BinOp::RShift => (">>", SHIFT),
        BinOp::BitOr => ("|", EXPR),
        BinOp::BitXor => ("^", BXOR),
        BinOp::BitAnd => ("&", BAND),
        BinOp::Pow => ("**", POWER),
    }
}

fn items(v: &[Expr], out: &mut String) {
    if v.len() == 1 {
        write(&v[0], TEST, out);
        out.push(',');
        return;
    }
    join(v, out);
}

fn join(v: &[Expr], out: &mut String) {
    for (i, x) in v.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        write(x, TEST, out);
    }
}

fn comps(gens: &[Comprehension], out: &mut String) {
    for g in gens {
        out.push_str(if g.is_async { " async for " } else { " for " });
        write(&g.target, TUPLE, out);
        out.push_str(" in ");
        write(&g.iter, TEST + 1, out);
        for c in &g.ifs {
            out.push_str(" if ");
            write(c, TEST + 1, out);
        }
    }
}

fn write(e: &Expr, prec: u8, out: &mut String) {
    match &*e.kind {
        Kind::Const(c) => out.push_str(&const_text(c)),
        Kind::FString(src) => out.push_str(src),
        Kind::Name(n) => out.push_str(n),
        Kind::Attr(v, attr) => {
            write(v, ATOM, out);
            if matches!(&*v.kind, Kind::Const(Const::Num(Num::Int(_) | Num::BigInt(_)))) {
                out.push(' ');
            }
            out.push('.');
            out.push_str(attr);
        }
        Kind::Call { func, args, keywords } => {
            write(func, ATOM, out);
            out.push('(');
            let mut first = true;
            for a in args {
                if !first {
                    out.push_str(", ");
                }
                first = false;
                write(a, TEST, out);
            }
            for k in keywords {
                if !first {
                    out.push_str(", ");
                }
                first = false;
                match &k.arg {
                    Some(n) => {
                        out.push_str(n);
                        out.push('=');
                    }
                    None => out.push_str("**"),
                }
                write(&k.value, TEST, out);
            }
            out.push(')');
        }
        Kind::Subscript(v, s) => {
            write(v, ATOM, out);
            out.push('[');
            match &*s.kind {
                Kind::Tuple(elts) if !elts.is_empty() => items(elts, out),
                _ => write(s, TEST, out),
            }
            out.push(']');
        }
        Kind::Slice(a, b, c) => {
            if let Some(a) = a {
                write(a, TEST, out);
            }
            out.push(':');
            if let Some(b) = b {
                write(b, TEST, out);
            }
            if let Some(c) = c {
                out.push(':');
                write(c, TEST, out);
            }
        }
        Kind::Unary(op, v) => {
            let (s, p) = match op {
                UnOp::Not => ("not ", NOT),
                UnOp::Neg => ("-", FACTOR),
                UnOp::Pos => ("+", FACTOR),
                UnOp::Invert => ("~", FACTOR),
            };
            paren_if(prec > p, out, |out| {
                out.push_str(s);
                write(v, p, out);
            });
        }
        Kind::Bin(l, op, r) => {
            let (s, p) = bin_info(*op);
            let (lp, rp) = if *op == BinOp::Pow { (p + 1, p) } else { (p, p + 1) };
            paren_if(prec > p, out, |out| {
                write(l, lp, out);
                out.push(' ');
                out.push_str(s);
                out.push(' ');
                write(r, rp, out);
            });
        }
        Kind::BoolOp(is_or, vals) => {
            let p = if *is_or { OR } else { AND };
            paren_if(prec > p, out, |out| {
                let mut level = p;
                for (i, v) in vals.iter().enumerate() {
                    if i > 0 {
                        out.push_str(if *is_or { " or " } else { " and " });
                    }
                    level += 1;
                    write(v, level, out);
                }
            });
        }
        Kind::Compare(l, rest) => paren_if(prec > CMP, out, |out| {
            write(l, CMP + 1, out);
            for (op, r) in rest {
                out.push(' ');
                out.push_str(op);
                out.push(' ');
                write(r, CMP + 1, out);
            }
        }),
        Kind::IfExp(test, body, orelse) => paren_if(prec > TEST, out, |out| {
            write(body, TEST + 1, out);
            out.push_str(" if ");
            write(test, TEST + 1, out);
            out.push_str(" else ");
            write(orelse, TEST, out);
        }),
        Kind::Lambda(params, body) => paren_if(prec > TEST, out, |out| {
            out.push_str("lambda");
            if !params.is_empty() {
                out.push(' ');
                out.push_str(params);
            }
            out.push_str(": ");
            write(body, TEST, out);
        }),
        Kind::List(v) => {
            out.push('[');
            join(v, out);
            out.push(']');
        }
        Kind::Tuple(v) => paren_if(v.is_empty() || prec > TUPLE, out, |out| items(v, out)),
        Kind::Set(v) => {
            if v.is_empty() {
                out.push_str("{*()}");
            } else {
                out.push('{');
                join(v, out);
                out.push('}');
            }
        }
        Kind::Dict(kv) => {
            out.push('{');
            for (i, (k, v)) in kv.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                match k {
                    Some(k) => {
                        write(k, TEST, out);
                        out.push_str(": ");
                        write(v, TEST, out);
                    }
                    None => {
                        out.push_str("**");
                        write(v, EXPR, out);
                    }
                }
            }
            out.push('}');
        }
        Kind::Comp(kind, elts, gens) => {
            let (o, c) = match kind {
                CompKind::List => ('[', ']'),
                CompKind::Gen => ('(', ')'),
                CompKind::Set | CompKind::Dict => ('{', '}'),
            };
            out.push(o);
            write(&elts[0], TEST, out);
            if let Some(v) = elts.get(1) {
                out.push_str(": ");
                write(v, TEST, out);
            }
            comps(gens, out);
            out.push(c);
        }
        Kind::Starred(v) => {
            out.push('*');
            write(v, EXPR, out);
        }
        Kind::NamedExpr(t, v) => paren_if(prec > NAMED, out, |out| {
            write(t, ATOM, out);
            out.push_str(" := ");
            write(v, ATOM, out);
        }),
        Kind::Await(v) => paren_if(prec > AWAIT, out, |out| {
            out.push_str("await ");
            write(v, ATOM, out);
        }),
        Kind::Yield(v, from) => paren_if(prec > YIELD, out, |out| {
            out.push_str(if *from { "yield from" } else { "yield" });
            if let Some(v) = v {
                out.push(' ');
                write(v, TEST, out);
            }
        }),
    }
}
