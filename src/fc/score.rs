//! Scoring model answers per BFCL category, and the summary scores of SPEC §6.

use crate::data::{Sample, BFCL_CATEGORIES};
use crate::fc::checker::{ast_check, Verdict};
use crate::fc::decode::{decode, has_call, AnswerFormat, DecodeError, Lang};
use crate::fc::value::Value;
use std::collections::{BTreeMap, HashMap};

/// BFCL's verdict on one answer (reasoning already stripped) for one sample.
/// An answer over fcgpu's decoding bounds is invalid in every category.
pub fn check_answer(sample: &Sample, answer: &str, fmt: AnswerFormat) -> Verdict {
    let bad = |e: DecodeError| Verdict::bad(e.error_type(), format!("{e:?}"));
    if sample.expects_no_call() {
        return match has_call(answer, fmt) {
            Ok(true) => Verdict::bad(
                "irrelevance_error:decoder_success",
                "Valid syntax. Successfully decode AST when it should not.",
            ),
            Ok(false) => Verdict::ok(),
            Err(e) => bad(e),
        };
    }
    if sample.expects_any_call() {
        return match has_call(answer, fmt) {
            Ok(true) => Verdict::ok(),
            Ok(false) => Verdict::bad(
                "relevance_error:decoder_failed",
                "Invalid syntax. Failed to decode AST when it should have.",
            ),
            Err(e) => bad(e),
        };
    }
    let lang = Lang::of_category(&sample.category);
    let calls = match decode(answer, lang, fmt) {
        Ok(c) => c,
        Err(e) => return bad(e),
    };
    let answers: Vec<Value> = sample.ground_truth.iter().map(Value::from_json).collect();
    ast_check(&sample.functions, &calls, &answers, lang, &sample.category)
}

/// One entry's outcome, as written to `--verdicts`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EntryVerdict {
    pub id: String,
    pub category: String,
    pub valid: bool,
    pub error_type: String,
}

#[derive(Debug, Clone, Default)]
pub struct CategoryScore {
    pub correct: usize,
    pub total: usize,
}

impl CategoryScore {
    pub fn accuracy(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.correct as f64 / self.total as f64
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub categories: BTreeMap<String, CategoryScore>,
    pub verdicts: Vec<EntryVerdict>,
}

/// Scores raw model texts (by id) against samples; a missing id counts as wrong
/// (`error_type` "missing_result"). Reasoning is stripped before decoding.
pub fn score(samples: &[Sample], results: &HashMap<String, String>, fmt: AnswerFormat) -> Report {
    let mut report = Report::default();
    for s in samples {
        let v = match results.get(&s.id) {
            Some(text) => check_answer(s, crate::fc::decode::strip_reasoning(text), fmt),
            None => Verdict::bad("missing_result", "no result for this id"),
        };
        let c = report.categories.entry(s.category.clone()).or_default();
        c.total += 1;
        c.correct += v.valid as usize;
        report.verdicts.push(EntryVerdict {
            id: s.id.clone(),
            category: s.category.clone(),
            valid: v.valid,
            error_type: v.error_type,
        });
    }
    report
}

/// SPEC §6 summary scores (each None when a needed category was not scored).
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub simple_ast: Option<f64>,
    pub non_live_ast: Option<f64>,
    pub live: Option<f64>,
    pub irrelevance: Option<f64>,
    pub overall: Option<f64>,
}

fn mean(v: &[Option<f64>]) -> Option<f64> {
    let vals: Option<Vec<f64>> = v.iter().copied().collect();
    vals.filter(|x| !x.is_empty()).map(|x| x.iter().sum::<f64>() / x.len() as f64)
}

impl Report {
    fn acc(&self, cat: &str) -> Option<f64> {
        self.categories.get(cat).filter(|c| c.total > 0).map(CategoryScore::accuracy)
    }

    pub fn summary(&self) -> Summary {
        let simple_ast =
            mean(&[self.acc("simple_python"), self.acc("simple_java"), self.acc("simple_javascript")]);
        let non_live_ast =
            mean(&[simple_ast, self.acc("multiple"), self.acc("parallel"), self.acc("parallel_multiple")]);
        let live_cats = ["live_simple", "live_multiple", "live_parallel", "live_parallel_multiple"];
        let live = if live_cats.iter().all(|c| self.categories.contains_key(*c)) {
            let (ok, n) = live_cats
                .iter()
                .filter_map(|c| self.categories.get(*c))
                .fold((0, 0), |(a, b), c| (a + c.correct, b + c.total));
            (n > 0).then(|| ok as f64 / n as f64)
        } else {
            None
        };
        let irrelevance = mean(&[self.acc("irrelevance"), self.acc("live_irrelevance")]);
        let overall = mean(&[non_live_ast, live]);
        Summary { simple_ast, non_live_ast, live, irrelevance, overall }
    }

    /// The table `fcgpu eval` prints.
    pub fn table(&self) -> String {
        // bfcl_accuracy: BFCL's AST-checker verdict only (no think-block or format rule), unlike
        // the held-out `accuracy` of training runs (docs/metrics.md).
        let mut out = format!("{:<26} {:>13} {:>7}\n", "category", "bfcl_accuracy", "count");
        let mut cats: Vec<&String> = self.categories.keys().collect();
        let order = |c: &str| BFCL_CATEGORIES.iter().position(|x| *x == c).unwrap_or(usize::MAX);
        cats.sort_by_key(|c| (order(c), (*c).clone()));
        for c in cats {
            let s = &self.categories[c];
            out.push_str(&format!("{:<26} {:>12.2}% {:>7}\n", c, 100.0 * s.accuracy(), s.total));
        }
        let sm = self.summary();
        let rows = [sm.simple_ast, sm.non_live_ast, sm.live, sm.irrelevance, sm.overall];
        if rows.iter().all(Option::is_none) {
            return out; // no BFCL category names (a data set of its own): no BFCL summary
        }
        let fmt = |v: Option<f64>| {
            v.map(|x| format!("{:>12.2}%", 100.0 * x)).unwrap_or_else(|| format!("{:>13}", "n/a"))
        };
        out.push('\n');
        for (name, v) in [
            ("Simple AST", sm.simple_ast),
            ("Non-Live AST", sm.non_live_ast),
            ("Live (count-weighted)", sm.live),
            ("Irrelevance", sm.irrelevance),
            ("Overall", sm.overall),
        ] {
            out.push_str(&format!("{:<26} {}\n", name, fmt(v)));
        }
        out
    }
}
