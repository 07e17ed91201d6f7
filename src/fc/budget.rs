//! Bounds on what decoding one model answer may cost.
//!
//! The GRPO reward decodes every sampled completion, and `fcgpu eval` decodes whatever a
//! results file holds, so an answer is hostile input: `["a"*1048576]*1048576` would allocate a
//! terabyte, 800 `+`-joined `"a"*1000000` terms copy 300 GB, and 20,000 nested brackets
//! overflow the stack inside tree-sitter. Every such answer is an invalid answer
//! (`ast_decoder:decoder_bounds_exceeded`, reward 0), never a crash.
//!
//! The bounds sit far above anything a real answer reaches: BFCL's longest gold answer is a few
//! kilobytes, nests fewer than 10 brackets, and evaluates (`2*3`, `'a'+'b'`) to a few bytes.
//! - [`MAX_ANSWER_BYTES`]: the answer text (after reasoning removal) is at most 256 KiB, so the
//!   parsers' own memory (tokens, AST, tree-sitter nodes) stays in the tens of megabytes.
//! - [`MAX_NESTING`]: at most 900 open brackets, checked by a linear scan before tree-sitter
//!   runs (tree-sitter and BFCL's Python both recurse on nesting; Python's limit is ~1000).
//! - [`MAX_WORK`]: the evaluation of constant expressions and the building of argument values
//!   may create at most 16 MiB of values (counted before each allocation, as bytes of strings
//!   plus the size of each value node); comparing two keyword, argument or dictionary keys
//!   costs [`COMPARE`] units or more. This caps both memory and time: one input costs a few
//!   tens of milliseconds at most.
//! - [`MAX_FORMAT_PRECISION`]: `'%.Nf' % x` accepts N up to 4096.

use crate::fc::value::Value;
use std::fmt;

/// Longest answer text decoded, in bytes.
pub const MAX_ANSWER_BYTES: usize = 256 << 10;
/// Deepest bracket nesting (`(`, `[`, `{`) accepted before a tree-sitter parse.
pub const MAX_NESTING: usize = 900;
/// Work units (bytes of values built, key comparisons) one answer's decoding may spend.
pub const MAX_WORK: u64 = 16 << 20;
/// Units charged for comparing two keys: a comparison costs far more time than copying a byte.
pub const COMPARE: u64 = 64;
/// Largest precision in a `%` format.
pub const MAX_FORMAT_PRECISION: usize = 4096;

/// Why an answer was refused: the bound it would have crossed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exceeded(pub String);

impl fmt::Display for Exceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The work spent decoding one answer. Charges are made before the work is done, so a
/// refused charge means nothing was allocated for it.
#[derive(Debug, Clone, Default)]
pub struct Budget {
    used: u64,
    exceeded: Option<Exceeded>,
}

impl Budget {
    pub fn new() -> Budget {
        Budget::default()
    }

    /// Spends `units`; past [`MAX_WORK`] the budget stays exhausted and every charge fails.
    pub fn charge(&mut self, units: u64, what: &str) -> Result<(), Exceeded> {
        if let Some(e) = &self.exceeded {
            return Err(e.clone());
        }
        let total = self.used.saturating_add(units);
        if total > MAX_WORK {
            let e = Exceeded(format!(
                "{what} would take the answer's work past fcgpu's bound of {MAX_WORK} units"
            ));
            self.exceeded = Some(e.clone());
            return Err(e);
        }
        self.used = total;
        Ok(())
    }

    /// Records a bound crossed outside [`Budget::charge`] (answer length, nesting, precision).
    pub fn refuse(&mut self, reason: String) -> Exceeded {
        let e = Exceeded(reason);
        self.exceeded = Some(e.clone());
        e
    }

    /// Units spent so far.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// The bound that was crossed, if any.
    pub fn exceeded(&self) -> Option<&Exceeded> {
        self.exceeded.as_ref()
    }
}

/// Units to build one value node (its heap text aside).
pub const NODE: u64 = std::mem::size_of::<Value>() as u64;

/// What building a copy of `v` costs: one [`NODE`] per value plus the bytes of its text.
/// Values nest no deeper than the expressions they come from (capped by the parser).
pub fn cost(v: &Value) -> u64 {
    NODE + match v {
        Value::BigInt(s) | Value::Str(s) => s.len() as u64,
        Value::Bytes(b) => b.len() as u64,
        Value::List(xs) | Value::Tuple(xs) => xs.iter().map(cost).sum(),
        Value::Dict(d) => d.iter().map(|(k, x)| cost(k) + cost(x)).sum(),
        _ => 0,
    }
}

impl From<Exceeded> for crate::fc::pyexpr::PyErr {
    fn from(e: Exceeded) -> Self {
        crate::fc::pyexpr::PyErr(e.0)
    }
}

/// Checks the answer length.
pub fn check_len(text: &str) -> Result<(), Exceeded> {
    if text.len() > MAX_ANSWER_BYTES {
        return Err(Exceeded(format!(
            "answer is {} bytes, over fcgpu's bound of {MAX_ANSWER_BYTES}",
            text.len()
        )));
    }
    Ok(())
}

/// Checks bracket nesting with one linear scan. Brackets inside string literals count too: a
/// real answer never nests 900 deep either way, and the scan must not trust any parse.
pub fn check_nesting(text: &str) -> Result<(), Exceeded> {
    let mut depth = 0usize;
    for b in text.bytes() {
        match b {
            b'(' | b'[' | b'{' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Err(Exceeded(format!(
                        "brackets nest deeper than fcgpu's bound of {MAX_NESTING}"
                    )));
                }
            }
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_accumulate_and_stay_exhausted() {
        let mut b = Budget::new();
        assert!(b.charge(MAX_WORK - 1, "x").is_ok());
        assert!(b.charge(1, "x").is_ok());
        assert!(b.charge(1, "y").is_err());
        assert_eq!(b.used(), MAX_WORK);
        // A failed charge leaves the budget exhausted even for a zero charge.
        assert!(b.charge(0, "z").is_err());
        assert!(b.exceeded().unwrap().0.contains('y'));
    }

    #[test]
    fn nesting_scan() {
        assert!(check_nesting(&"[".repeat(MAX_NESTING)).is_ok());
        assert!(check_nesting(&"[".repeat(MAX_NESTING + 1)).is_err());
        // Closers before openers do not earn credit.
        let s = format!("{}{}", ")".repeat(50), "(".repeat(MAX_NESTING));
        assert!(check_nesting(&s).is_ok());
        assert!(check_nesting(&"()".repeat(100_000)).is_ok());
    }
}
