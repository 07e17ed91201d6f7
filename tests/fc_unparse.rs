//! `ast.unparse` fidelity: BFCL turns calls without keywords into their unparsed source, so
//! fcgpu must print expressions exactly as Python 3.11 does. Expectations in
//! tests/data/bfcl/unparse.jsonl come from Python's own `ast.unparse`.

mod fc_common;

use fcgpu::fc::pyexpr::{parse_expr, unparse};

#[test]
fn unparse_matches_python() {
    let cases = fc_common::read_jsonl(&fc_common::data_file("unparse.jsonl"));
    assert!(cases.len() > 30);
    let mut bad = Vec::new();
    for c in cases {
        let src = c["src"].as_str().unwrap();
        let want = c["unparse"].as_str().unwrap();
        match parse_expr(src) {
            Ok(e) if unparse(&e) == want => {}
            Ok(e) => bad.push(format!("{src}: got {} want {want}", unparse(&e))),
            Err(e) => bad.push(format!("{src}: parse error {e}")),
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}
