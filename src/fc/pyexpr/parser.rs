//! Recursive-descent parser over Python's expression grammar (PEG rules of 3.11, simplified
//! where models never go). Every recursion step is counted; deep input is an error.

use super::lexer::Tok;
use super::*;

const KEYWORDS: [&str; 35] = [
    "False", "None", "True", "and", "as", "assert", "async", "await", "break", "class", "continue", "def",
    "del", "elif", "else", "except", "finally", "for", "from", "global", "if", "import", "in", "is",
    "lambda", "nonlocal", "not", "or", "pass", "raise", "return", "try", "while", "with", "yield",
];

/// Whether `name` is one of Python's (hard) keywords.
pub fn is_keyword(name: &str) -> bool {
    KEYWORDS.contains(&name)
}

/// Recursion budget: each level of brackets costs about 17 frames.
const MAX_RECURSION: u32 = 4000;

pub struct Parser {
    toks: Vec<Tok>,
    pos: usize,
    rec: u32,
}

fn err<T>(msg: &str) -> Result<T, PyErr> {
    Err(PyErr(msg.to_string()))
}

type R = Result<Expr, PyErr>;

/// The name a token spells when it can be a plain name (not a keyword).
fn plain_name(t: &Tok) -> Option<&str> {
    match t {
        Tok::Name(n) if !is_keyword(n) => Some(n),
        Tok::KwName(n) => Some(n),
        _ => None,
    }
}

impl Parser {
    pub fn new(toks: Vec<Tok>) -> Parser {
        Parser { toks, pos: 0, rec: 0 }
    }

    fn peek(&self) -> &Tok {
        &self.toks[self.pos.min(self.toks.len() - 1)]
    }

    fn peek_at(&self, k: usize) -> &Tok {
        &self.toks[(self.pos + k).min(self.toks.len() - 1)]
    }

    fn bump(&mut self) -> Tok {
        let t = self.peek().clone();
        if self.pos < self.toks.len() - 1 {
            self.pos += 1;
        }
        t
    }

    fn is_op(&self, op: &str) -> bool {
        matches!(self.peek(), Tok::Op(o) if *o == op)
    }

    fn is_kw(&self, kw: &str) -> bool {
        matches!(self.peek(), Tok::Name(n) if n == kw)
    }

    fn eat_op(&mut self, op: &str) -> bool {
        if self.is_op(op) {
            self.bump();
            true
        } else {
            false
        }
    }

    fn eat_kw(&mut self, kw: &str) -> bool {
        if self.is_kw(kw) {
            self.bump();
            true
        } else {
            false
        }
    }

    fn expect_op(&mut self, op: &str) -> Result<(), PyErr> {
        if self.eat_op(op) {
            Ok(())
        } else {
            err("invalid syntax")
        }
    }

    fn enter(&mut self) -> Result<(), PyErr> {
        self.rec += 1;
        if self.rec > MAX_RECURSION {
            return err("expression too deeply nested");
        }
        Ok(())
    }

    fn mk(&self, kind: Kind) -> R {
        let e = Expr::new(kind);
        if e.depth > MAX_DEPTH {
            return err("expression too deeply nested");
        }
        Ok(e)
    }

    pub fn parse_eval(&mut self) -> R {
        let e = self.star_expressions()?;
        if *self.peek() != Tok::End {
            return err("invalid syntax");
        }
        Ok(e)
    }

    /// `a, *b, c` at the top (a tuple when there is a comma).
    fn star_expressions(&mut self) -> R {
        let first = self.star_expression()?;
        if !self.is_op(",") {
            return Ok(first);
        }
        let mut elts = vec![first];
        while self.eat_op(",") {
            if self.at_expr_end() {
                break;
            }
            elts.push(self.star_expression()?);
        }
        self.mk(Kind::Tuple(elts))
    }

    fn at_expr_end(&self) -> bool {
        matches!(
            self.peek(),
            Tok::End
                | Tok::Newline
                | Tok::Op(")")
                | Tok::Op("]")
                | Tok::Op("}")
                | Tok::Op("=")
                | Tok::Op(":")
        ) || self.is_kw("for")
            || self.is_kw("in")
    }

    fn star_expression(&mut self) -> R {
        if self.eat_op("*") {
            let e = self.bitor()?;
            return self.mk(Kind::Starred(e));
        }
        self.expression()
    }

    /// `expression` with an optional `:=` (allowed in displays, call arguments and parentheses).
    fn named_expression(&mut self) -> R {
        if let (Some(n), Tok::Op(":=")) = (plain_name(self.peek()).map(str::to_string), self.peek_at(1)) {
            self.bump();
            self.bump();
            let target = self.mk(Kind::Name(n))?;
            let value = self.expression()?;
            return self.mk(Kind::NamedExpr(target, value));
        }
        let e = self.expression()?;
        if self.is_op(":=") {
            return err("cannot use assignment expressions with this target");
        }
        Ok(e)
    }

    fn star_named_expression(&mut self) -> R {
        if self.eat_op("*") {
            let e = self.bitor()?;
            return self.mk(Kind::Starred(e));
        }
        self.named_expression()
    }

    pub fn expression(&mut self) -> R {
        self.enter()?;
        let r = self.expression_inner();
        self.rec -= 1;
        r
    }

    fn expression_inner(&mut self) -> R {
        if self.is_kw("lambda") {
            return self.lambda();
        }
        let body = self.disjunction()?;
        if self.eat_kw("if") {
            let test = self.disjunction()?;
            if !self.eat_kw("else") {
                return err("expected 'else' after 'if' expression");
            }
            let orelse = self.expression()?;
            return self.mk(Kind::IfExp(test, body, orelse));
        }
        Ok(body)
    }

    fn lambda(&mut self) -> R {
        self.bump();
        let mut params = Vec::new();
        let mut cur = String::new();
        // Parameters: names, defaults, `*`, `**`, `/`, separated by commas.
        while !self.is_op(":") {
            if *self.peek() == Tok::End {
                return err("invalid syntax");
            }
            if self.eat_op(",") {
                params.push(std::mem::take(&mut cur));
                continue;
            }
            if self.eat_op("*") {
                cur.push('*');
            } else if self.eat_op("**") {
                cur.push_str("**");
            } else if self.eat_op("/") {
                cur.push('/');
            } else if matches!(self.peek(), Tok::Name(_) | Tok::KwName(_)) {
                let Some(n) = plain_name(&self.bump()).map(str::to_string) else {
                    return err("invalid syntax");
                };
                cur.push_str(&n);
                if self.eat_op("=") {
                    let d = self.expression()?;
                    cur.push('=');
                    cur.push_str(&unparse(&d));
                }
            } else {
                return err("invalid syntax");
            }
        }
        if !cur.is_empty() {
            params.push(cur);
        }
        self.expect_op(":")?;
        let body = self.expression()?;
        self.mk(Kind::Lambda(params.join(", "), body))
    }

    fn disjunction(&mut self) -> R {
        self.bool_chain("or", true)
    }

    fn conjunction(&mut self) -> R {
        self.bool_chain("and", false)
    }

    fn bool_chain(&mut self, kw: &str, is_or: bool) -> R {
        let first = if is_or { self.conjunction()? } else { self.inversion()? };
        if !self.is_kw(kw) {
            return Ok(first);
        }
        let mut v = vec![first];
        while self.eat_kw(kw) {
            v.push(if is_or { self.conjunction()? } else { self.inversion()? });
        }
        self.mk(Kind::BoolOp(is_or, v))
    }

    fn inversion(&mut self) -> R {
        if self.eat_kw("not") {
            self.enter()?;
            let e = self.inversion();
            self.rec -= 1;
            return self.mk(Kind::Unary(UnOp::Not, e?));
        }
        self.comparison()
    }

    fn comp_op(&mut self) -> Option<String> {
        let op = match self.peek() {
            Tok::Op(o) if matches!(*o, "==" | "!=" | "<" | ">" | "<=" | ">=") => o.to_string(),
            Tok::Name(n) if n == "in" => "in".into(),
            Tok::Name(n) if n == "is" => {
                if matches!(self.peek_at(1), Tok::Name(m) if m == "not") {
                    self.bump();
                    "is not".into()
                } else {
                    "is".into()
                }
            }
            Tok::Name(n) if n == "not" && matches!(self.peek_at(1), Tok::Name(m) if m == "in") => {
                self.bump();
                "not in".into()
            }
            _ => return None,
        };
        self.bump();
        Some(op)
    }

    fn comparison(&mut self) -> R {
        let first = self.bitor()?;
        let mut rest = Vec::new();
        while let Some(op) = self.comp_op() {
            rest.push((op, self.bitor()?));
        }
        if rest.is_empty() {
            Ok(first)
        } else {
            self.mk(Kind::Compare(first, rest))
        }
    }

    fn binary(&mut self, level: usize) -> R {
        const LEVELS: [&[(&str, BinOp)]; 6] = [
            &[("|", BinOp::BitOr)],
            &[("^", BinOp::BitXor)],
            &[("&", BinOp::BitAnd)],
            &[("<<", BinOp::LShift), (">>", BinOp::RShift)],
            &[("+", BinOp::Add), ("-", BinOp::Sub)],
            &[
                ("*", BinOp::Mul),
                ("/", BinOp::Div),
                ("//", BinOp::FloorDiv),
                ("%", BinOp::Mod),
                ("@", BinOp::MatMul),
            ],
        ];
        let next = |p: &mut Parser| {
            if level + 1 < LEVELS.len() {
                p.binary(level + 1)
            } else {
                p.factor()
            }
        };
        let mut left = next(self)?;
        while let Tok::Op(o) = self.peek() {
            let Some(&(_, op)) = LEVELS[level].iter().find(|(s, _)| s == o) else {
                break;
            };
            self.bump();
            let right = next(self)?;
            left = self.mk(Kind::Bin(left, op, right))?;
        }
        Ok(left)
    }

    pub fn bitor(&mut self) -> R {
        self.binary(0)
    }

    fn factor(&mut self) -> R {
        let op = match self.peek() {
            Tok::Op("-") => UnOp::Neg,
            Tok::Op("+") => UnOp::Pos,
            Tok::Op("~") => UnOp::Invert,
            _ => return self.power(),
        };
        self.bump();
        self.enter()?;
        let e = self.factor();
        self.rec -= 1;
        self.mk(Kind::Unary(op, e?))
    }

    fn power(&mut self) -> R {
        let base = if self.eat_kw("await") {
            let p = self.primary()?;
            self.mk(Kind::Await(p))?
        } else {
            self.primary()?
        };
        if self.eat_op("**") {
            self.enter()?;
            let exp = self.factor();
            self.rec -= 1;
            return self.mk(Kind::Bin(base, BinOp::Pow, exp?));
        }
        Ok(base)
    }

    fn primary(&mut self) -> R {
        let mut e = self.atom()?;
        loop {
            if self.eat_op(".") {
                let Some(n) = plain_name(&self.bump()).map(str::to_string) else {
                    return err("invalid syntax");
                };
                e = self.mk(Kind::Attr(e, n))?;
            } else if self.eat_op("(") {
                e = self.call(e)?;
            } else if self.eat_op("[") {
                let s = self.slices()?;
                self.expect_op("]")?;
                e = self.mk(Kind::Subscript(e, s))?;
            } else {
                return Ok(e);
            }
        }
    }

    fn call(&mut self, func: Expr) -> R {
        let mut args = Vec::new();
        let mut keywords: Vec<Keyword> = Vec::new();
        let mut seen_kwunpack = false;
        while !self.is_op(")") {
            if self.eat_op("**") {
                let v = self.expression()?;
                keywords.push(Keyword { arg: None, value: v });
                seen_kwunpack = true;
            } else if self.eat_op("*") {
                if seen_kwunpack {
                    return err("iterable argument unpacking follows keyword argument unpacking");
                }
                let v = self.expression()?;
                args.push(self.mk(Kind::Starred(v))?);
            } else if matches!(self.peek(), Tok::Name(_) | Tok::KwName(_))
                && matches!(self.peek_at(1), Tok::Op("="))
            {
                let Some(n) = plain_name(&self.bump()).map(str::to_string) else {
                    return err("invalid syntax");
                };
                self.bump();
                let v = self.expression()?;
                keywords.push(Keyword { arg: Some(n), value: v });
            } else {
                let e = self.named_expression()?;
                if self.is_kw("for") || self.is_kw("async") {
                    let gens = self.comprehensions()?;
                    let g = self.mk(Kind::Comp(CompKind::Gen, vec![e], gens))?;
                    if !args.is_empty() || !keywords.is_empty() || !self.is_op(")") {
                        return err("Generator expression must be parenthesized");
                    }
                    args.push(g);
                    break;
                }
                if self.is_op("=") {
                    return err("expression cannot contain assignment");
                }
                if !keywords.is_empty() {
                    return err("positional argument follows keyword argument");
                }
                args.push(e);
            }
            if !self.eat_op(",") {
                break;
            }
        }
        self.expect_op(")")?;
        self.mk(Kind::Call { func, args, keywords })
    }

    fn slice_item(&mut self) -> R {
        let lower = if self.is_op(":") { None } else { Some(self.named_or_starred_slice()?) };
        if !self.is_op(":") {
            return lower.ok_or_else(|| PyErr("invalid syntax".into()));
        }
        if let Some(l) = &lower {
            if matches!(*l.kind, Kind::Starred(_) | Kind::NamedExpr(..)) {
                return err("invalid syntax");
            }
        }
        self.bump();
        let upper = if self.is_op(":") || self.is_op(",") || self.is_op("]") {
            None
        } else {
            Some(self.expression()?)
        };
        let mut step = None;
        if self.eat_op(":") && !(self.is_op(",") || self.is_op("]")) {
            step = Some(self.expression()?);
        }
        self.mk(Kind::Slice(lower, upper, step))
    }

    fn named_or_starred_slice(&mut self) -> R {
        if self.eat_op("*") {
            let e = self.bitor()?;
            return self.mk(Kind::Starred(e));
        }
        self.named_expression()
    }

    fn slices(&mut self) -> R {
        let first = self.slice_item()?;
        if !self.is_op(",") {
            if matches!(*first.kind, Kind::Starred(_)) {
                return self.mk(Kind::Tuple(vec![first]));
            }
            return Ok(first);
        }
        let mut v = vec![first];
        while self.eat_op(",") {
            if self.is_op("]") {
                break;
            }
            v.push(self.slice_item()?);
        }
        self.mk(Kind::Tuple(v))
    }

    fn comprehensions(&mut self) -> Result<Vec<Comprehension>, PyErr> {
        let mut gens = Vec::new();
        loop {
            let is_async = self.eat_kw("async");
            if !self.eat_kw("for") {
                if is_async {
                    return err("invalid syntax");
                }
                break;
            }
            let target = self.targets()?;
            if !self.eat_kw("in") {
                return err("invalid syntax");
            }
            let iter = self.disjunction()?;
            let mut ifs = Vec::new();
            while self.eat_kw("if") {
                ifs.push(self.disjunction()?);
            }
            gens.push(Comprehension { target, iter, ifs, is_async });
        }
        Ok(gens)
    }

    /// Comprehension targets: names, attributes, subscripts, starred, tuples of them.
    fn targets(&mut self) -> R {
        let mut v = Vec::new();
        loop {
            let t = if self.eat_op("*") {
                let e = self.bitor()?;
                self.mk(Kind::Starred(e))?
            } else {
                self.bitor()?
            };
            if !is_target(&t) {
                return err("cannot assign to expression");
            }
            v.push(t);
            if !self.eat_op(",") || self.is_kw("in") {
                break;
            }
        }
        if v.len() == 1 && !matches!(self.toks.get(self.pos.wrapping_sub(1)), Some(Tok::Op(","))) {
            return Ok(v.pop().unwrap_or_else(|| Expr::new(Kind::Tuple(vec![]))));
        }
        self.mk(Kind::Tuple(v))
    }

    fn atom(&mut self) -> R {
        let t = self.bump();
        match t {
            Tok::Name(n) => match n.as_str() {
                "True" => self.mk(Kind::Const(Const::True)),
                "False" => self.mk(Kind::Const(Const::False)),
                "None" => self.mk(Kind::Const(Const::None)),
                _ if KEYWORDS.contains(&n.as_str()) => err("invalid syntax"),
                _ => self.mk(Kind::Name(n)),
            },
            Tok::KwName(n) => self.mk(Kind::Name(n)),
            Tok::Num(n) => self.mk(Kind::Const(Const::Num(n))),
            Tok::Str { .. } => self.strings(t),
            Tok::Op("...") => self.mk(Kind::Const(Const::Ellipsis)),
            Tok::Op("(") => self.paren(),
            Tok::Op("[") => self.list(),
            Tok::Op("{") => self.brace(),
            _ => err("invalid syntax"),
        }
    }

    /// Adjacent literals concatenate; bytes cannot mix with str.
    fn strings(&mut self, first: Tok) -> R {
        let mut parts = vec![first];
        while matches!(self.peek(), Tok::Str { .. }) {
            parts.push(self.bump());
        }
        let n_bytes = parts.iter().filter(|p| matches!(p, Tok::Str { bytes: Some(_), .. })).count();
        if n_bytes > 0 && n_bytes < parts.len() {
            return err("cannot mix bytes and nonbytes literals");
        }
        if n_bytes > 0 {
            let mut all = Vec::new();
            for p in parts {
                if let Tok::Str { bytes: Some(b), .. } = p {
                    all.extend(b);
                }
            }
            return self.mk(Kind::Const(Const::Bytes(all)));
        }
        if parts.iter().any(|p| matches!(p, Tok::Str { fstr: true, .. })) {
            let src: Vec<String> = parts
                .iter()
                .map(|p| if let Tok::Str { src, .. } = p { src.clone() } else { String::new() })
                .collect();
            return self.mk(Kind::FString(src.join(" ")));
        }
        let u = matches!(parts[0], Tok::Str { u: true, .. });
        let mut s = String::new();
        for p in parts {
            if let Tok::Str { text, .. } = p {
                s.push_str(&text);
            }
        }
        self.mk(Kind::Const(Const::Str { s, u }))
    }

    fn paren(&mut self) -> R {
        if self.eat_op(")") {
            return self.mk(Kind::Tuple(vec![]));
        }
        if self.eat_kw("yield") {
            let from = self.eat_kw("from");
            let v = if self.is_op(")") {
                None
            } else {
                Some(if from { self.expression()? } else { self.star_expressions()? })
            };
            if from && v.is_none() {
                return err("invalid syntax");
            }
            self.expect_op(")")?;
            return self.mk(Kind::Yield(v, from));
        }
        let first = self.star_named_expression()?;
        if self.is_kw("for") || self.is_kw("async") {
            if matches!(*first.kind, Kind::Starred(_)) {
                return err("iterable unpacking cannot be used in comprehension");
            }
            let gens = self.comprehensions()?;
            self.expect_op(")")?;
            return self.mk(Kind::Comp(CompKind::Gen, vec![first], gens));
        }
        if self.eat_op(")") {
            if matches!(*first.kind, Kind::Starred(_)) {
                return err("cannot use starred expression here");
            }
            return Ok(first);
        }
        let mut elts = vec![first];
        while self.eat_op(",") {
            if self.is_op(")") {
                break;
            }
            elts.push(self.star_named_expression()?);
        }
        self.expect_op(")")?;
        self.mk(Kind::Tuple(elts))
    }

    fn list(&mut self) -> R {
        if self.eat_op("]") {
            return self.mk(Kind::List(vec![]));
        }
        let first = self.star_named_expression()?;
        if self.is_kw("for") || self.is_kw("async") {
            if matches!(*first.kind, Kind::Starred(_)) {
                return err("iterable unpacking cannot be used in comprehension");
            }
            let gens = self.comprehensions()?;
            self.expect_op("]")?;
            return self.mk(Kind::Comp(CompKind::List, vec![first], gens));
        }
        let mut elts = vec![first];
        while self.eat_op(",") {
            if self.is_op("]") {
                break;
            }
            elts.push(self.star_named_expression()?);
        }
        self.expect_op("]")?;
        self.mk(Kind::List(elts))
    }

    fn brace(&mut self) -> R {
        if self.eat_op("}") {
            return self.mk(Kind::Dict(vec![]));
        }
        // Dict when the first item is `**x` or `k: v`; set otherwise.
        if self.eat_op("**") {
            let v = self.bitor()?;
            return self.dict_rest(vec![(None, v)]);
        }
        let first = self.star_named_expression()?;
        if self.eat_op(":") {
            if matches!(*first.kind, Kind::Starred(_) | Kind::NamedExpr(..)) {
                return err("invalid syntax");
            }
            let v = self.expression()?;
            if self.is_kw("for") || self.is_kw("async") {
                let gens = self.comprehensions()?;
                self.expect_op("}")?;
                return self.mk(Kind::Comp(CompKind::Dict, vec![first, v], gens));
            }
            return self.dict_rest(vec![(Some(first), v)]);
        }
        if self.is_kw("for") || self.is_kw("async") {
            let gens = self.comprehensions()?;
            self.expect_op("}")?;
            return self.mk(Kind::Comp(CompKind::Set, vec![first], gens));
        }
        let mut elts = vec![first];
        while self.eat_op(",") {
            if self.is_op("}") {
                break;
            }
            elts.push(self.star_named_expression()?);
        }
        self.expect_op("}")?;
        self.mk(Kind::Set(elts))
    }

    fn dict_rest(&mut self, mut items: Vec<(Option<Expr>, Expr)>) -> R {
        while self.eat_op(",") {
            if self.is_op("}") {
                break;
            }
            if self.eat_op("**") {
                items.push((None, self.bitor()?));
                continue;
            }
            let k = self.expression()?;
            self.expect_op(":")?;
            let v = self.expression()?;
            items.push((Some(k), v));
        }
        self.expect_op("}")?;
        self.mk(Kind::Dict(items))
    }
}

fn is_target(e: &Expr) -> bool {
    match &*e.kind {
        Kind::Name(_) | Kind::Attr(..) | Kind::Subscript(..) => true,
        Kind::Starred(x) => is_target(x),
        Kind::Tuple(v) | Kind::List(v) => v.iter().all(is_target),
        _ => false,
    }
}
