//! A small Python 3.11 expression parser: accepts and rejects what `ast.parse(s, mode="eval")`
//! does for the inputs models write, builds an AST, and renders it back like `ast.unparse`.
//! Depth is capped so that no input can overflow the stack.

mod eval;
mod lexer;
mod parser;
mod unparse;

pub use eval::{dict_insert, eval_expr};
pub use lexer::Num;
pub use unparse::unparse;

/// A parse or evaluation failure (Python would raise SyntaxError, TypeError, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct PyErr(pub String);

impl std::fmt::Display for PyErr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Deepest expression tree accepted (Python itself gives up around here too).
pub const MAX_DEPTH: u32 = 900;

#[derive(Debug, Clone, PartialEq)]
pub enum Const {
    None,
    True,
    False,
    Ellipsis,
    Num(Num),
    Str { s: String, u: bool },
    Bytes(Vec<u8>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnOp {
    Neg,
    Pos,
    Not,
    Invert,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    FloorDiv,
    Mod,
    Pow,
    MatMul,
    LShift,
    RShift,
    BitAnd,
    BitOr,
    BitXor,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Keyword {
    /// None for `**expr`.
    pub arg: Option<String>,
    pub value: Expr,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Comprehension {
    pub target: Expr,
    pub iter: Expr,
    pub ifs: Vec<Expr>,
    pub is_async: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum CompKind {
    List,
    Set,
    Gen,
    Dict,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    Const(Const),
    /// f-string, kept as its source text.
    FString(String),
    Name(String),
    Attr(Expr, String),
    Call {
        func: Expr,
        args: Vec<Expr>,
        keywords: Vec<Keyword>,
    },
    Subscript(Expr, Expr),
    Slice(Option<Expr>, Option<Expr>, Option<Expr>),
    Unary(UnOp, Expr),
    Bin(Expr, BinOp, Expr),
    BoolOp(bool, Vec<Expr>),
    Compare(Expr, Vec<(String, Expr)>),
    IfExp(Expr, Expr, Expr),
    /// Parameter source text, body.
    Lambda(String, Expr),
    List(Vec<Expr>),
    Tuple(Vec<Expr>),
    Set(Vec<Expr>),
    /// A None key is `**value`.
    Dict(Vec<(Option<Expr>, Expr)>),
    Comp(CompKind, Vec<Expr>, Vec<Comprehension>),
    Starred(Expr),
    NamedExpr(Expr, Expr),
    Await(Expr),
    Yield(Option<Expr>, bool),
}

/// An expression node with its tree depth (so consumers can trust the recursion bound).
#[derive(Debug, Clone, PartialEq)]
pub struct Expr {
    pub kind: Box<Kind>,
    pub depth: u32,
}

impl Expr {
    pub fn new(kind: Kind) -> Expr {
        let depth = 1 + child_depth(&kind);
        Expr { kind: Box::new(kind), depth }
    }
}

fn max_d<'a>(it: impl Iterator<Item = &'a Expr>) -> u32 {
    it.map(|e| e.depth).max().unwrap_or(0)
}

fn child_depth(k: &Kind) -> u32 {
    match k {
        Kind::Const(_) | Kind::FString(_) | Kind::Name(_) | Kind::Yield(None, _) => 0,
        Kind::Attr(e, _) | Kind::Unary(_, e) | Kind::Lambda(_, e) | Kind::Starred(e) | Kind::Await(e) => {
            e.depth
        }
        Kind::Yield(Some(e), _) => e.depth,
        Kind::Call { func, args, keywords } => {
            func.depth.max(max_d(args.iter())).max(max_d(keywords.iter().map(|k| &k.value)))
        }
        Kind::Subscript(a, b) | Kind::Bin(a, _, b) | Kind::NamedExpr(a, b) => a.depth.max(b.depth),
        Kind::Slice(a, b, c) => max_d([a, b, c].into_iter().flatten()),
        Kind::BoolOp(_, v) | Kind::List(v) | Kind::Tuple(v) | Kind::Set(v) => max_d(v.iter()),
        Kind::Compare(a, rest) => a.depth.max(max_d(rest.iter().map(|(_, e)| e))),
        Kind::IfExp(a, b, c) => a.depth.max(b.depth).max(c.depth),
        Kind::Dict(items) => max_d(items.iter().flat_map(|(k, v)| k.iter().chain(std::iter::once(v)))),
        Kind::Comp(_, elts, gens) => max_d(elts.iter())
            .max(max_d(gens.iter().flat_map(|g| {
                std::iter::once(&g.target).chain(std::iter::once(&g.iter)).chain(g.ifs.iter())
            }))),
    }
}

/// Parses one expression like `ast.parse(src, mode="eval").body`.
pub fn parse_expr(src: &str) -> Result<Expr, PyErr> {
    let toks = lexer::tokenize(src)?;
    parser::Parser::new(toks).parse_eval()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_rejects_like_python() {
        for ok in ["f(a=1, a=2)", "1if 1 else 2", "00", "0x_1", "[x:=1]", "a[1:2,3]", "lambda: 1", "'a\\\nb'"]
        {
            assert!(parse_expr(ok).is_ok(), "{ok}");
        }
        for bad in [
            "f(a=1, 2)",
            "f(**k, *a)",
            "f(True=1)",
            "01",
            "f(a=x:=1)",
            "'a\nb'",
            "1.__add__",
            "r'\\'",
            "ur'x'",
            "f(,)",
            "[,]",
            "0b102",
            "1__0",
            "1_",
            "'\\x4'",
        ] {
            assert!(parse_expr(bad).is_err(), "{bad}");
        }
    }

    /// What `ast.dump(ast.parse(src, mode="eval").body)` gives in CPython 3.11, abridged.
    #[test]
    fn identifiers_are_nfkc_normalised_and_keywords_go_by_spelling() {
        let name = |src: &str| match &*parse_expr(src).unwrap().kind {
            Kind::Name(n) => n.clone(),
            other => panic!("{src}: {other:?}"),
        };
        assert_eq!(name("ｍａｔｈ"), "math");
        assert_eq!(name("ℌ"), "H");
        assert_eq!(name("ﬁ"), "fi");
        assert_eq!(name("𝐲"), "y");
        // A keyword only when spelled in ASCII: `Ｔrue` is the name `True`.
        assert_eq!(name("Ｔrue"), "True");
        let Kind::Call { keywords, .. } = &*parse_expr("f(ｉf=1, ｘ=2)").unwrap().kind else { panic!() };
        let args: Vec<_> = keywords.iter().map(|k| k.arg.clone().unwrap()).collect();
        assert_eq!(args, ["if", "x"]);
        assert!(matches!(&*parse_expr("a.Ｎone").unwrap().kind, Kind::Attr(_, a) if a == "None"));
        // Not identifiers after NFKC: a fullwidth digit first, a soft hyphen, an arrow.
        for bad in ["f(x=４)", "hyp\u{ad}ot", "a→b", "ｎot x", "x ｉf y else z", "ｒ'a'"] {
            assert!(parse_expr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn named_escapes_decode_as_python_does() {
        let s = |src: &str| match &*parse_expr(src).unwrap().kind {
            Kind::Const(Const::Str { s, .. }) => s.clone(),
            other => panic!("{src}: {other:?}"),
        };
        assert_eq!(s(r"'kg/m\N{SUPERSCRIPT THREE}'"), "kg/m³");
        assert_eq!(s(r"'\N{superscript three}'"), "³");
        assert_eq!(s(r"'\N{LINE FEED}\N{LF}'"), "\n\n");
        assert_eq!(s(r"'\N{CJK UNIFIED IDEOGRAPH-4E00}\N{HANGUL SYLLABLE GAG}'"), "一각");
        assert_eq!(s(r"'\N{CJK UNIFIED IDEOGRAPH-04E00}\N{cjk compatibility ideograph-F900}'"), "一\u{f900}");
        assert_eq!(s(r"'\N{byte order mark}'"), "\u{feff}");
        assert_eq!(s(r"r'\N{SOLIDUS}'"), r"\N{SOLIDUS}");
        for bad in [
            r"'\N{NO SUCH CHARACTER}'",
            r"'\N{SUPERSCRIPT  THREE}'",
            r"'\N{SUPERSCRIPT-THREE}'",
            r"'\N{ SUPERSCRIPT THREE}'",
            r"'\N{SUPERSCRIPTTHREE}'",
            r"'\N{}'",
            r"'\N'",
            r"'\N{SOLIDUS'",
            // The computed names are upper case only.
            r"'\N{cjk unified ideograph-4E00}'",
            r"'\N{CJK UNIFIED IDEOGRAPH-4e00}'",
            r"'\N{CJK UNIFIED IDEOGRAPH-4E0}'",
            r"'\N{hangul syllable gag}'",
            r"'\N{HANGUL SYLLABLE gag}'",
        ] {
            assert!(parse_expr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = format!("{}1{}", "[".repeat(5000), "]".repeat(5000));
        assert!(parse_expr(&deep).is_err());
        let chain = format!("1{}", "+1".repeat(50000));
        assert!(parse_expr(&chain).is_err());
        let unary = format!("{}1", "-".repeat(50000));
        assert!(parse_expr(&unary).is_err());
    }
}
