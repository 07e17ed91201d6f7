//! Tokenizer for Python 3.11 expressions (what `ast.parse(s, mode="eval")` tokenizes).

use super::PyErr;

#[derive(Debug, Clone, PartialEq)]
pub enum Num {
    Int(i128),
    BigInt(String),
    Float(f64),
    Imag(f64),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Tok {
    /// An identifier, NFKC-normalised as Python's parser stores it.
    Name(String),
    /// An identifier written with non-ASCII characters whose NFKC form is a keyword (`Ｔrue`):
    /// Python recognises keywords by their spelling, so this is a plain name (`Name(id='True')`).
    KwName(String),
    Num(Num),
    /// One string literal: `bytes` holds the decoded bytes for b-strings; `fstr` marks f-strings
    /// (kept as source text); `u` marks the `u` prefix (ast.unparse keeps it).
    Str {
        text: String,
        bytes: Option<Vec<u8>>,
        fstr: bool,
        u: bool,
        src: String,
    },
    Op(&'static str),
    Newline,
    End,
}

const OPS: [&str; 47] = [
    "**=", "//=", ">>=", "<<=", "...", "->", ":=", "**", "//", "<<", ">>", "<=", ">=", "==", "!=", "+=",
    "-=", "*=", "/=", "%=", "&=", "|=", "^=", "@=", "(", ")", "[", "]", "{", "}", ",", ":", ".", ";", "+",
    "-", "*", "/", "%", "&", "|", "^", "~", "<", ">", "=", "@",
];

/// Python's tokenizer refuses more than 200 nested brackets.
const MAX_LEVEL: usize = 200;

pub fn tokenize(src: &str) -> Result<Vec<Tok>, PyErr> {
    // Python's tokenizer translates \r\n and lone \r to \n before anything else.
    let translated;
    let src = if src.contains('\r') {
        translated = src.replace("\r\n", "\n").replace('\r', "\n");
        translated.as_str()
    } else {
        src
    };
    let mut lx = Lexer { s: src.as_bytes(), src, i: 0, out: Vec::new(), level: 0 };
    lx.run()?;
    Ok(lx.out)
}

struct Lexer<'a> {
    s: &'a [u8],
    src: &'a str,
    i: usize,
    out: Vec<Tok>,
    level: usize,
}

fn err(msg: &str) -> PyErr {
    PyErr(msg.to_string())
}

/// CPython's tokenizer takes every non-ASCII character as a possible identifier character and
/// validates the whole identifier afterwards ([`identifier`]).
fn is_id_start(c: char) -> bool {
    c == '_' || c.is_ascii_alphabetic() || !c.is_ascii()
}

fn is_id_continue(c: char) -> bool {
    c == '_' || c.is_ascii_alphanumeric() || !c.is_ascii()
}

/// A non-ASCII identifier as Python reads it (PEP 3131): NFKC-normalised, then XID_Start (or
/// `_`) followed by XID_Continue; anything else is a syntax error.
fn identifier(raw: &str) -> Result<String, PyErr> {
    use unicode_normalization::UnicodeNormalization;
    if raw.is_ascii() {
        return Ok(raw.to_string());
    }
    let name: String = raw.nfkc().collect();
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c == '_' || unicode_ident::is_xid_start(c))
        && chars.all(unicode_ident::is_xid_continue);
    if !ok {
        return Err(err("invalid character in identifier"));
    }
    Ok(name)
}

impl<'a> Lexer<'a> {
    fn peek_char(&self) -> Option<char> {
        self.src[self.i..].chars().next()
    }

    fn run(&mut self) -> Result<(), PyErr> {
        if self.s.contains(&0) {
            return Err(err("source code string cannot contain null bytes"));
        }
        while let Some(c) = self.peek_char() {
            match c {
                ' ' | '\t' | '\x0c' => self.i += 1,
                '\r' | '\n' => {
                    self.i += 1;
                    if self.level == 0 && self.out.last() != Some(&Tok::Newline) {
                        self.out.push(Tok::Newline);
                    }
                }
                '#' => {
                    while let Some(c) = self.peek_char() {
                        if c == '\n' || c == '\r' {
                            break;
                        }
                        self.i += c.len_utf8();
                    }
                }
                '\\' => {
                    // Line continuation only.
                    let rest = &self.s[self.i + 1..];
                    if rest.starts_with(b"\n") {
                        self.i += 2;
                    } else if rest.starts_with(b"\r\n") {
                        self.i += 3;
                    } else if rest.starts_with(b"\r") {
                        self.i += 2;
                    } else {
                        return Err(err("unexpected character after line continuation character"));
                    }
                }
                c if c.is_ascii_digit() => self.number()?,
                '.' if self.s.get(self.i + 1).is_some_and(|b| b.is_ascii_digit()) => self.number()?,
                '\'' | '"' => self.string("")?,
                c if is_id_start(c) => self.name_or_string()?,
                _ => self.op()?,
            }
        }
        while self.out.last() == Some(&Tok::Newline) {
            self.out.pop();
        }
        if self.level > 0 {
            return Err(err("unexpected EOF"));
        }
        self.out.push(Tok::End);
        Ok(())
    }

    fn op(&mut self) -> Result<(), PyErr> {
        let rest = &self.src[self.i..];
        let op = OPS.iter().find(|o| rest.starts_with(**o)).ok_or_else(|| err("invalid character"))?;
        match *op {
            "(" | "[" | "{" => {
                self.level += 1;
                if self.level > MAX_LEVEL {
                    return Err(err("too many nested parentheses"));
                }
            }
            ")" | "]" | "}" => {
                if self.level == 0 {
                    return Err(err("unmatched bracket"));
                }
                self.level -= 1;
            }
            _ => {}
        }
        self.i += op.len();
        self.out.push(Tok::Op(op));
        Ok(())
    }

    fn name_or_string(&mut self) -> Result<(), PyErr> {
        let start = self.i;
        while let Some(c) = self.peek_char() {
            if !is_id_continue(c) {
                break;
            }
            self.i += c.len_utf8();
        }
        let name = &self.src[start..self.i];
        let next = self.s.get(self.i).copied();
        if matches!(next, Some(b'\'') | Some(b'"')) {
            let lower = name.to_ascii_lowercase();
            if matches!(lower.as_str(), "r" | "u" | "b" | "br" | "rb" | "f" | "fr" | "rf") {
                return self.string(&lower);
            }
        }
        let id = identifier(name)?;
        if id != name && super::parser::is_keyword(&id) {
            self.out.push(Tok::KwName(id));
        } else {
            self.out.push(Tok::Name(id));
        }
        Ok(())
    }

    fn digits(&mut self, ok: fn(u8) -> bool) -> Result<String, PyErr> {
        // digit (_? digit)*; an underscore must sit between two digits.
        let mut out = String::new();
        while let Some(&b) = self.s.get(self.i) {
            if ok(b) {
                out.push(b as char);
                self.i += 1;
            } else if b == b'_' && self.s.get(self.i + 1).is_some_and(|&n| ok(n)) && !out.is_empty() {
                self.i += 1;
            } else if b == b'_' {
                return Err(err("invalid decimal literal"));
            } else {
                break;
            }
        }
        Ok(out)
    }

    fn number(&mut self) -> Result<(), PyErr> {
        let s = self.s;
        if s[self.i] == b'0' && matches!(s.get(self.i + 1), Some(b'x' | b'X' | b'o' | b'O' | b'b' | b'B')) {
            let radix = match s[self.i + 1] {
                b'x' | b'X' => 16,
                b'o' | b'O' => 8,
                _ => 2,
            };
            self.i += 2;
            if s.get(self.i) == Some(&b'_') {
                self.i += 1;
            }
            let ds = match radix {
                16 => self.digits(|b| b.is_ascii_hexdigit())?,
                8 => self.digits(|b| (b'0'..=b'7').contains(&b))?,
                _ => self.digits(|b| b == b'0' || b == b'1')?,
            };
            if ds.is_empty() || s.get(self.i).is_some_and(|b| b.is_ascii_digit()) {
                return Err(err("invalid digit in literal"));
            }
            self.end_of_number()?;
            let n = match i128::from_str_radix(&ds, radix) {
                Ok(v) => Num::Int(v),
                Err(_) => Num::BigInt(format!("0x{ds}")),
            };
            self.out.push(Tok::Num(n));
            return Ok(());
        }
        let int_part = self.digits(|b| b.is_ascii_digit())?;
        let mut is_float = false;
        let mut text = int_part.clone();
        if s.get(self.i) == Some(&b'.') {
            is_float = true;
            self.i += 1;
            if s.get(self.i).is_some_and(|b| b.is_ascii_digit()) {
                text.push('.');
                text.push_str(&self.digits(|b| b.is_ascii_digit())?);
            }
        }
        if matches!(s.get(self.i), Some(b'e' | b'E')) {
            let save = self.i;
            self.i += 1;
            let mut sign = String::new();
            if matches!(s.get(self.i), Some(b'+' | b'-')) {
                sign.push(s[self.i] as char);
                self.i += 1;
            }
            if s.get(self.i).is_some_and(|b| b.is_ascii_digit()) {
                is_float = true;
                let e = self.digits(|b| b.is_ascii_digit())?;
                text = format!("{}e{}{}", if text.is_empty() { "0".into() } else { text }, sign, e);
            } else {
                self.i = save;
                return Err(err("invalid decimal literal"));
            }
        }
        if text.is_empty() || text.starts_with('.') {
            text = format!("0{text}");
        }
        if matches!(s.get(self.i), Some(b'j' | b'J')) {
            self.i += 1;
            self.end_of_number()?;
            let v: f64 = text.parse().unwrap_or(f64::INFINITY);
            self.out.push(Tok::Num(Num::Imag(v)));
            return Ok(());
        }
        self.end_of_number()?;
        if is_float {
            let v: f64 = text.parse().unwrap_or(f64::INFINITY);
            self.out.push(Tok::Num(Num::Float(v)));
        } else {
            if int_part.len() > 1 && int_part.starts_with('0') && int_part.bytes().any(|b| b != b'0') {
                return Err(err("leading zeros in decimal integer literals are not permitted"));
            }
            let n = match int_part.parse::<i128>() {
                Ok(v) => Num::Int(v),
                Err(_) => Num::BigInt(int_part.trim_start_matches('0').to_string()),
            };
            self.out.push(Tok::Num(n));
        }
        Ok(())
    }

    /// A number directly followed by a letter is an error, except before these keywords
    /// (Python 3.11 only warns: `1if x else y`).
    fn end_of_number(&mut self) -> Result<(), PyErr> {
        let rest = &self.src[self.i..];
        match rest.chars().next() {
            Some(c) if is_id_continue(c) => {
                for kw in ["and", "else", "for", "if", "in", "is", "not", "or"] {
                    if rest.starts_with(kw) {
                        return Ok(());
                    }
                }
                Err(err("invalid decimal literal"))
            }
            _ => Ok(()),
        }
    }

    fn string(&mut self, prefix: &str) -> Result<(), PyErr> {
        let start = self.i - prefix.len();
        let raw = prefix.contains('r');
        let is_bytes = prefix.contains('b');
        let fstr = prefix.contains('f');
        let q = self.s[self.i];
        let triple = self.s[self.i..].starts_with(&[q, q, q]);
        let qlen = if triple { 3 } else { 1 };
        self.i += qlen;
        let body_start = self.i;
        loop {
            let Some(&b) = self.s.get(self.i) else {
                return Err(err("unterminated string literal"));
            };
            if b == b'\\' {
                self.i += 2;
                if self.i > self.s.len() {
                    return Err(err("unterminated string literal"));
                }
                continue;
            }
            if !triple && (b == b'\n' || b == b'\r') {
                return Err(err("unterminated string literal"));
            }
            if b == q && (!triple || self.s[self.i..].starts_with(&[q, q, q])) {
                break;
            }
            self.i += 1;
        }
        // A backslash step may land inside a multi-byte char; re-align safely.
        let body_end = self.i;
        let body = self.src.get(body_start..body_end).ok_or_else(|| err("bad string"))?.to_string();
        self.i += qlen;
        let src = self.src[start..self.i].to_string();
        let tok = if fstr {
            Tok::Str { text: body, bytes: None, fstr: true, u: false, src }
        } else if is_bytes {
            if !body.is_ascii() {
                return Err(err("bytes can only contain ASCII literal characters"));
            }
            let b = if raw { body.into_bytes() } else { unescape_bytes(&body)? };
            Tok::Str { text: String::new(), bytes: Some(b), fstr: false, u: false, src }
        } else {
            let t = if raw { body } else { unescape_str(&body)? };
            Tok::Str { text: t, bytes: None, fstr: false, u: prefix == "u", src }
        };
        self.out.push(tok);
        Ok(())
    }
}

fn hex_n(chars: &mut std::iter::Peekable<std::str::Chars>, n: usize) -> Result<u32, PyErr> {
    let mut v = 0u32;
    for _ in 0..n {
        let c = chars.next().ok_or_else(|| err("truncated escape"))?;
        let d = c.to_digit(16).ok_or_else(|| err("truncated escape"))?;
        v = v * 16 + d;
    }
    Ok(v)
}

fn octal(first: char, chars: &mut std::iter::Peekable<std::str::Chars>) -> u32 {
    let mut v = first.to_digit(8).unwrap_or(0);
    for _ in 0..2 {
        match chars.peek().and_then(|c| c.to_digit(8)) {
            Some(d) => {
                v = v * 8 + d;
                chars.next();
            }
            None => break,
        }
    }
    v
}

fn simple_escape(c: char) -> Option<char> {
    Some(match c {
        '\\' => '\\',
        '\'' => '\'',
        '"' => '"',
        'a' => '\x07',
        'b' => '\x08',
        'f' => '\x0c',
        'n' => '\n',
        'r' => '\r',
        't' => '\t',
        'v' => '\x0b',
        _ => return None,
    })
}

/// Decodes a non-raw str body the way Python's `unicode_escape` does for literals.
fn unescape_str(body: &str) -> Result<String, PyErr> {
    let mut out = String::with_capacity(body.len());
    let mut chars = body.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let Some(e) = chars.next() else {
            out.push('\\');
            break;
        };
        if let Some(s) = simple_escape(e) {
            out.push(s);
            continue;
        }
        let code = match e {
            '\n' => continue,
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                continue;
            }
            '0'..='7' => octal(e, &mut chars),
            'x' => hex_n(&mut chars, 2)?,
            'u' => hex_n(&mut chars, 4)?,
            'U' => {
                let v = hex_n(&mut chars, 8)?;
                if v > 0x10FFFF {
                    return Err(err("illegal Unicode character"));
                }
                v
            }
            'N' => named_escape(&mut chars)?,
            other => {
                out.push('\\');
                out.push(other);
                continue;
            }
        };
        // Lone surrogates cannot live in a Rust string; U+FFFD stands in for them.
        out.push(char::from_u32(code).unwrap_or('\u{FFFD}'));
    }
    Ok(out)
}

/// `\N{NAME}`: the character of that Unicode name or alias, as Python's `unicodedata` looks it
/// up (case-insensitive, but spaces and hyphens exactly as in the name).
fn named_escape(chars: &mut std::iter::Peekable<std::str::Chars>) -> Result<u32, PyErr> {
    let bad = || err("malformed \\N character escape");
    if chars.next() != Some('{') {
        return Err(bad());
    }
    let mut name = String::new();
    loop {
        match chars.next() {
            Some('}') => break,
            Some(c) => name.push(c),
            None => return Err(bad()),
        }
    }
    lookup_name(&name).map(u32::from).ok_or_else(|| err("unknown Unicode character name"))
}

/// `unicode_names2` matches loosely (UAX44-LM2: case, spaces, underscores and medial hyphens
/// ignored); Python ignores case only. A name must be spelled as the character's own name; a
/// loose spelling of it is refused. An alias (whose spelling the crate does not keep) must be
/// words of letters and digits joined by single spaces or hyphens, so only an alias with its
/// spaces or hyphens moved (`LINEFEED`) is read where Python refuses it.
fn lookup_name(name: &str) -> Option<char> {
    let upper = name.to_ascii_uppercase();
    // CPython computes these two families' names, in upper case only, hex digits included.
    if let Some(hex) = name.strip_prefix("CJK UNIFIED IDEOGRAPH-") {
        let ok = matches!(hex.len(), 4 | 5)
            && hex.bytes().all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b));
        let c = char::from_u32(u32::from_str_radix(hex, 16).ok()?).filter(|_| ok)?;
        let own = unicode_names2::name(c)?.to_string();
        return own.starts_with("CJK UNIFIED IDEOGRAPH-").then_some(c);
    }
    if ["CJK UNIFIED IDEOGRAPH-", "HANGUL SYLLABLE "].iter().any(|p| upper.starts_with(p)) && name != upper {
        return None;
    }
    let c = unicode_names2::character(&upper)?;
    let own = unicode_names2::name(c).map(|n| n.to_string());
    if own.as_deref() == Some(upper.as_str()) {
        return Some(c);
    }
    let loose = |s: &str| s.chars().filter(|c| !matches!(c, ' ' | '_' | '-')).collect::<String>();
    if own.is_some_and(|n| loose(&n) == loose(&upper)) {
        return None;
    }
    let word = |w: &str| !w.is_empty() && w.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
    upper.split([' ', '-']).all(word).then_some(c)
}

fn unescape_bytes(body: &str) -> Result<Vec<u8>, PyErr> {
    let mut out = Vec::with_capacity(body.len());
    let mut chars = body.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c as u8);
            continue;
        }
        let Some(e) = chars.next() else {
            out.push(b'\\');
            break;
        };
        if let Some(s) = simple_escape(e) {
            out.push(s as u8);
            continue;
        }
        match e {
            '\n' => {}
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
            }
            '0'..='7' => out.push((octal(e, &mut chars) & 0xff) as u8),
            'x' => out.push(hex_n(&mut chars, 2)? as u8),
            other => {
                out.push(b'\\');
                out.push(other as u8);
            }
        }
    }
    Ok(out)
}
