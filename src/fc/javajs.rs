//! BFCL's Java and JavaScript call parsers, on the same tree-sitter grammars it uses
//! (tree-sitter-java 0.21.0, tree-sitter-javascript 0.21.4). Values stay source text.

use crate::fc::budget::{check_nesting, Budget, COMPARE};
use crate::fc::decode::{Call, DecodeError};
use crate::fc::value::Value;
use tree_sitter::{Node, Parser, Tree};

/// Python's default recursion limit, roughly.
const MAX_TREE_DEPTH: u32 = 900;

/// Deepest tree handed to tree-sitter's recursive `to_sexp` (a few hundred bytes of stack per
/// level, so well inside a 2 MiB thread stack). BFCL's Java traversal fails at ~1000 levels
/// anyway; only a JavaScript value such as a 2,000-term sum could differ from BFCL.
const MAX_SEXP_DEPTH: usize = 2000;

/// Longest Java/JavaScript answer handed to tree-sitter (BFCL's gold answers: under 1 KB).
const MAX_TREE_SITTER_BYTES: usize = 16 << 10;

/// Parses with tree-sitter after the nesting pre-scan: tree-sitter recurses on nesting in
/// places, so deep input must be refused before it sees it.
fn parse_tree(src: &str, java: bool) -> Result<Tree, DecodeError> {
    // tree-sitter's error recovery is super-linear on long malformed input (a 170 KB
    // JavaScript-like dict took 80 s of CPU): Java/JavaScript answers get a tighter length cap.
    if src.len() > MAX_TREE_SITTER_BYTES {
        return Err(DecodeError::Bounds(format!(
            "a Java/JavaScript answer is {} bytes, over fcgpu's bound of {MAX_TREE_SITTER_BYTES}",
            src.len()
        )));
    }
    check_nesting(src).map_err(|e| DecodeError::Bounds(e.0))?;
    let mut p = Parser::new();
    // Last line of defence against a pathological parse: give up after a second.
    p.set_timeout_micros(1_000_000);
    let lang = if java { tree_sitter_java::language() } else { tree_sitter_javascript::language() };
    p.set_language(&lang).map_err(|e| DecodeError::Failed(e.to_string()))?;
    let tree =
        p.parse(src, None).ok_or_else(|| DecodeError::Bounds("tree-sitter parse took over 1 s".into()))?;
    // `Node::to_sexp` recurses once per level of the tree, which `a+a+…+a` makes as deep as
    // the input is long (brackets are already capped): refuse deep trees before calling it.
    if tree_depth(&tree) > MAX_SEXP_DEPTH {
        return Err(DecodeError::Bounds(format!(
            "syntax tree nests deeper than fcgpu's bound of {MAX_SEXP_DEPTH}"
        )));
    }
    // BFCL rejects the tree when its s-expression mentions ERROR (MISSING nodes pass).
    if tree.root_node().to_sexp().contains("ERROR") {
        return Err(DecodeError::Failed("Error parsing the source code.".into()));
    }
    Ok(tree)
}

/// The depth of the tree's visible nodes, found without recursion.
fn tree_depth(tree: &Tree) -> usize {
    let mut cur = tree.walk();
    let (mut depth, mut max) = (1usize, 1usize);
    loop {
        if cur.goto_first_child() {
            depth += 1;
            max = max.max(depth);
            continue;
        }
        if cur.goto_next_sibling() {
            continue;
        }
        loop {
            if !cur.goto_parent() {
                return max;
            }
            depth -= 1;
            if cur.goto_next_sibling() {
                break;
            }
        }
    }
}

/// BFCL's Java parser slices a Python str with byte offsets; reproduce that on characters.
struct JavaSrc {
    chars: Vec<char>,
}

impl JavaSrc {
    fn text(&self, n: Node) -> String {
        let len = self.chars.len();
        let (a, b) = (n.start_byte().min(len), n.end_byte().min(len));
        if a >= b {
            return String::new();
        }
        self.chars[a..b].iter().collect()
    }

    fn strip_quotes(&self, n: Node) -> String {
        let t: Vec<char> = self.text(n).chars().collect();
        if t.len() < 2 {
            return String::new();
        }
        t[1..t.len() - 1].iter().collect()
    }

    fn traverse(&self, n: Node, nested: bool, depth: u32) -> Result<String, DecodeError> {
        // Python would hit its recursion limit; so do we, without overflowing the stack.
        if depth > MAX_TREE_DEPTH {
            return Err(DecodeError::Failed("maximum recursion depth exceeded".into()));
        }
        let d = depth + 1;
        Ok(match n.kind() {
            "string_literal" | "character_literal" => {
                if nested {
                    self.text(n)
                } else {
                    self.strip_quotes(n)
                }
            }
            "identifier" | "class_literal" | "type_identifier" | "method_invocation" => self.text(n),
            "array_creation_expression" => {
                let t = self.field(n, "type", d)?;
                let v = self.field(n, "value", d)?;
                format!("new {t}[]{v}")
            }
            "object_creation_expression" => {
                let t = self.field(n, "type", d)?;
                match n.child_by_field_name("arguments") {
                    Some(args) => {
                        let mut cur = args.walk();
                        let parts: Vec<String> = args
                            .children(&mut cur)
                            .filter(|c| !matches!(c.kind(), "," | "(" | ")"))
                            .map(|c| self.traverse(c, true, d))
                            .collect::<Result<_, _>>()?;
                        format!("new {t}({})", parts.join(", "))
                    }
                    None => format!("new {t}()"),
                }
            }
            "set" => {
                let mut cur = n.walk();
                let items: Vec<String> = n
                    .children(&mut cur)
                    .filter(|c| !matches!(c.kind(), "," | "set"))
                    .map(|c| self.traverse(c, true, d))
                    .collect::<Result<_, _>>()?;
                format!("{{{}}}", items.join(", "))
            }
            _ if n.child_count() > 0 => {
                let mut cur = n.walk();
                n.children(&mut cur).map(|c| self.traverse(c, true, d)).collect::<Result<_, _>>()?
            }
            _ => self.text(n),
        })
    }

    /// A missing field is `None` in Python, and traversing it raises.
    fn field(&self, n: Node, name: &str, d: u32) -> Result<String, DecodeError> {
        match n.child_by_field_name(name) {
            Some(c) => self.traverse(c, true, d),
            None => Err(DecodeError::Failed("'NoneType' object has no attribute 'type'".into())),
        }
    }

    fn arguments(&self, args: Node, b: &mut Budget) -> Result<Vec<(Option<String>, Value)>, DecodeError> {
        let mut out: Vec<(Option<String>, Value)> = Vec::new();
        let mut cur = args.walk();
        for child in args.children(&mut cur) {
            let (name, value) = match child.kind() {
                "assignment_expression" => {
                    let (Some(l), Some(r)) = (child.child(0), child.child(2)) else {
                        continue;
                    };
                    (Some(self.text(l)), self.traverse(r, false, 0)?)
                }
                "identifier" | "class_literal" | "set" => (None, self.traverse(child, false, 0)?),
                _ => continue,
            };
            push_unique(&mut out, name, value, b)?;
        }
        Ok(out)
    }

    fn find_call(&self, n: Node, depth: u32, b: &mut Budget) -> Option<Result<Call, DecodeError>> {
        if depth > MAX_TREE_DEPTH {
            return Some(Err(DecodeError::Failed("maximum recursion depth exceeded".into())));
        }
        if n.kind() == "method_invocation" {
            let method = n.child_by_field_name("name").map(|c| self.text(c)).unwrap_or_default();
            let name = match n.child_by_field_name("object") {
                Some(o) => format!("{}.{}", self.text(o), method),
                None => method,
            };
            let args = n.child_by_field_name("arguments")?;
            return Some(self.arguments(args, b).map(|args| Call { name, args }));
        }
        let mut cur = n.walk();
        let children: Vec<Node> = n.children(&mut cur).collect();
        children.into_iter().find_map(|c| self.find_call(c, depth + 1, b))
    }
}

/// Two arguments under one name are an error in BFCL's parsers.
fn push_unique(
    out: &mut Vec<(Option<String>, Value)>,
    name: Option<String>,
    v: String,
    b: &mut Budget,
) -> Result<(), DecodeError> {
    b.charge(out.len() as u64 * COMPARE, "comparing argument names").map_err(|e| DecodeError::Bounds(e.0))?;
    if out.iter().any(|(k, _)| *k == name) {
        return Err(DecodeError::Failed("Multiple arguments with the same name are not supported.".into()));
    }
    out.push((name, Value::Str(v)));
    Ok(())
}

/// `parse_java_function_call`: the first method invocation found, or `{}` (wrong format).
pub fn parse_java(src: &str, b: &mut Budget) -> Result<Vec<Call>, DecodeError> {
    let tree = parse_tree(src, true)?;
    let js = JavaSrc { chars: src.chars().collect() };
    match js.find_call(tree.root_node(), 0, b) {
        Some(r) => Ok(vec![r?]),
        None => Err(DecodeError::WrongFormat),
    }
}

fn node_text(n: Node, src: &str) -> String {
    src.get(n.start_byte()..n.end_byte()).unwrap_or("").to_string()
}

/// `parse_javascript_function_call`: the first top-level call statement, or None (wrong format).
pub fn parse_js(src: &str, b: &mut Budget) -> Result<Vec<Call>, DecodeError> {
    let tree = parse_tree(src, false)?;
    let root = tree.root_node();
    if root.kind() != "program" {
        return Err(DecodeError::WrongFormat);
    }
    let mut cur = root.walk();
    for stmt in root.children(&mut cur) {
        if stmt.kind() != "expression_statement" {
            continue;
        }
        let mut c2 = stmt.walk();
        for call in stmt.children(&mut c2) {
            if call.kind() != "call_expression" {
                continue;
            }
            let name = call.child(0).map(|n| node_text(n, src)).unwrap_or_default();
            let mut args = Vec::new();
            if let Some(an) = call.child(1) {
                let mut c3 = an.walk();
                for child in an.children(&mut c3) {
                    let (k, v) = match child.kind() {
                        "assignment_expression" => {
                            let k = child.child(0).map(|n| node_text(n, src)).unwrap_or_default();
                            let v = child.child(2).map(|n| node_text(n, src)).unwrap_or_default();
                            (Some(k), strip_js_quotes(v))
                        }
                        "identifier" | "true" => (None, node_text(child, src)),
                        _ => continue,
                    };
                    push_unique(&mut args, k, v, b)?;
                }
            }
            return Ok(vec![Call { name, args }]);
        }
    }
    Err(DecodeError::WrongFormat)
}

fn strip_js_quotes(v: String) -> String {
    let q = (v.starts_with('"') && v.ends_with('"')) || (v.starts_with('\'') && v.ends_with('\''));
    if !q {
        return v;
    }
    let chars: Vec<char> = v.chars().collect();
    if chars.len() < 2 {
        return String::new();
    }
    chars[1..chars.len() - 1].iter().collect()
}
