//! Adversarial answer families for the decoder fuzzers (issue 11): nested repetition, long
//! concatenations, format specifiers, deep Java/JavaScript/Python nesting and many distinct
//! keys. Shared by `tests/fc_fuzz.rs` and the cargo-fuzz target (`fuzz/`, which includes this
//! file by path), so it takes its randomness as a function `pick(n)` returning `0..n`.

use fcgpu::fc::Lang;

pub type Pick<'a> = &'a mut dyn FnMut(usize) -> usize;

fn one<'a>(pick: Pick, xs: &[&'a str]) -> &'a str {
    xs[pick(xs.len())]
}

const COUNTS: &[&str] =
    &["0", "1", "2", "-1", "7", "1000", "65536", "1048576", "1048577", "10**9", "2**64", "True"];

/// `[f(x=[[base]*n]*m…)]` with random bases, counts and sequence kinds.
fn nested_repetition(pick: Pick) -> String {
    let mut e = one(pick, &["0", "'a'", "\"a\"*1048576", "b'xy'", "None", "(0,)", "{'k': 1}", "'%s'", "[]"])
        .to_string();
    for _ in 0..1 + pick(5) {
        let n = one(pick, COUNTS);
        e = match pick(4) {
            0 => format!("[{e}]*{n}"),
            1 => format!("({e},)*{n}"),
            2 => format!("{n}*[{e}]"),
            _ => format!("{e}*{n}"),
        };
    }
    format!("[f(x={e})]")
}

/// Many large terms joined by one operator (mostly `+`).
fn long_concatenation(pick: Pick) -> String {
    let terms = [2, 10, 100, 800, 899, 3000][pick(6)];
    let term = one(
        pick,
        &[
            "\"a\"*1000000",
            "'ab'",
            "[0]*1000",
            "('x',)*100000",
            "b'z'*65536",
            "'a'*1048576",
            "[[0]*1000]*1000",
        ],
    );
    let op = one(pick, &["+", "+", "+", "*", "%"]);
    format!("[f(x={})]", vec![term; terms].join(op))
}

/// `'%…' % args` with huge precisions, many conversions and large arguments.
fn format_specifiers(pick: Pick) -> String {
    let prec = one(
        pick,
        &["", ".0", ".6", ".4096", ".4097", ".65535", ".65536", ".99999999999999999999", ".", ".-1"],
    );
    let conv = one(pick, &["f", "s", "r", "d", "x", "%", "i", "q", ""]);
    let reps = [1, 2, 100, 10_000][pick(4)];
    let arg = one(
        pick,
        &[
            "1.0",
            "1e308",
            "-0.0",
            "'a'*1000000",
            "(1, 2)",
            "[0]*1000000",
            "10**30",
            "('a'*1000000,)*50",
            "True",
            "'\\x00'*100000",
        ],
    );
    let args = match pick(3) {
        0 => arg.to_string(),
        1 => format!("({arg},)*{reps}"),
        _ => format!("({arg}, {arg})"),
    };
    format!("[f(x='{}' % {args})]", format!("%{prec}{conv}").repeat(reps))
}

/// Deep nesting of every kind the parsers recurse on, in a random language.
fn deep_nesting(pick: Pick) -> (String, Lang) {
    let lang = [Lang::Java, Lang::JavaScript, Lang::Python][pick(3)];
    let n = [10, 450, 899, 900, 901, 1999, 2001, 20_000, 100_000][pick(9)];
    let body = match pick(9) {
        0 => format!("{}1{}", "(".repeat(n), ")".repeat(n)),
        1 => "[".repeat(n),
        2 => format!("{}1{}", "[".repeat(n), "]".repeat(n)),
        3 => vec!["1"; n].join("+"),
        4 => format!("{}1", "- ".repeat(n)),
        5 => vec!["a"; n].join("."),
        6 => format!("{}{}", "new int[]{".repeat(n), "}".repeat(n)),
        7 => format!("{}x{}", "f(".repeat(n), ")".repeat(n)),
        _ => format!("{}1", "x = ".repeat(n)),
    };
    (format!("foo(a={body})"), lang)
}

/// Thousands of distinct keyword names or dictionary keys.
fn many_keys(pick: Pick) -> String {
    let n = [10, 1000, 5000, 20_000][pick(4)];
    if pick(2) == 0 {
        let kw: Vec<String> = (0..n).map(|i| format!("a{i}=0")).collect();
        format!("[f({})]", kw.join(","))
    } else {
        let keys: Vec<String> = (0..n).map(|i| format!("'{i}':0")).collect();
        format!("[f(x={{{}}})]", keys.join(","))
    }
}

/// One adversarial answer and the language to decode it as.
pub fn hostile_answer(pick: Pick) -> (String, Lang) {
    match pick(5) {
        0 => (nested_repetition(pick), Lang::Python),
        1 => (long_concatenation(pick), Lang::Python),
        2 => (format_specifiers(pick), Lang::Python),
        3 => deep_nesting(pick),
        _ => (many_keys(pick), Lang::Python),
    }
}
