//! A model's own chat template (`chat_template.jinja`, or `chat_template` in
//! `tokenizer_config.json`), rendered with minijinja the way transformers'
//! `apply_chat_template(tokenize=False)` renders it with Jinja2:
//!
//! - the same variables: `messages`, `tools`, `documents`, `add_generation_prompt`, the named
//!   special tokens (`bos_token`, `eos_token`, ...), and any extra keyword variables;
//! - the same messages: keys whose value is null dropped, reasoning aliased under
//!   `reasoning_content` and `thinking`;
//! - the same environment: `trim_blocks` and `lstrip_blocks`, loop controls, `namespace`,
//!   `raise_exception`, `strftime_now`, `dict`, and `tojson` as `json.dumps(ensure_ascii=False)`
//!   with `indent`, `separators` and `sort_keys`;
//! - Python's string methods and printing (`True`, `None`, `1e-05`, `['a']`) where Jinja2 and
//!   minijinja differ.
//!
//! A template that uses what this engine lacks fails with an error naming the template file and
//! what failed; it is never approximated.

use std::path::Path;

use anyhow::{bail, Context, Result};
use minijinja::value::{Kwargs, Rest, ValueKind};
use minijinja::{Environment, Error as MjError, ErrorKind, State, Value as MjValue};
use serde_json::{Map, Value as Json};

/// The special-token variables transformers passes to every template (those the tokenizer has).
const SPECIAL_TOKENS: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

/// Names a message's reasoning may come under; templates read `reasoning_content` (or
/// `thinking`), as transformers aliases them.
const REASONING_FIELDS: [&str; 3] = ["reasoning_content", "thinking", "reasoning"];

/// An upper bound on the engine's instructions per render: a template cannot hang a request.
const FUEL: u64 = 20_000_000;

/// How the template writes an assistant's tool call: the text before the function's name and
/// between the name and the arguments (`<tool_call>\n{"name": "` and `", "arguments": `).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallSyntax {
    pub before_name: String,
    pub before_args: String,
}

struct Named {
    /// `default`, `tool_use`, ...: as in a `chat_template` list.
    name: String,
    /// Where it came from, for errors; also the template's name in the environment.
    origin: String,
    /// Whether the template reads `tools` at all.
    uses_tools: bool,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    templates: Vec<Named>,
    specials: Vec<(String, String)>,
    call: Option<CallSyntax>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let origins: Vec<&str> = self.templates.iter().map(|t| t.origin.as_str()).collect();
        f.debug_struct("ChatTemplate").field("templates", &origins).finish()
    }
}

impl ChatTemplate {
    /// The chat template of a model directory; an error naming the directory when it has none.
    pub fn load(dir: &Path) -> Result<ChatTemplate> {
        Self::find(dir)?.with_context(|| {
            format!(
                "{}: the model has no chat template (no chat_template.jinja and no `chat_template` in tokenizer_config.json), so a conversation cannot be rendered in its format",
                dir.display()
            )
        })
    }

    /// The chat template of a model directory, if it has one: `chat_template.jinja` (with named
    /// extras in `additional_chat_templates/`, as transformers 5 writes them), else the
    /// `chat_template` of `tokenizer_config.json` (a string, or a list of named templates).
    pub fn find(dir: &Path) -> Result<Option<ChatTemplate>> {
        let config = read_json(&dir.join("tokenizer_config.json"))?;
        let mut specials = special_tokens(config.as_ref());
        if let Some(map) = read_json(&dir.join("special_tokens_map.json"))? {
            for (k, v) in special_tokens(Some(&map)) {
                if !specials.iter().any(|(s, _)| *s == k) {
                    specials.push((k, v));
                }
            }
        }
        let mut sources = Vec::new();
        let jinja = dir.join("chat_template.jinja");
        if jinja.exists() {
            sources.push(("default".to_string(), jinja.display().to_string(), read_text(&jinja)?));
            sources.extend(additional_templates(&dir.join("additional_chat_templates"))?);
        } else if let Some(t) = config.as_ref().and_then(|c| c.get("chat_template")) {
            sources = config_templates(t, &dir.join("tokenizer_config.json"))?;
        }
        if sources.is_empty() {
            return Ok(None);
        }
        Self::from_sources(sources, specials).map(Some)
    }

    /// One template from its source; `origin` names it in errors; `specials` are the
    /// special-token variables (`("bos_token", "<s>")`, ...).
    pub fn from_source(source: &str, origin: &str, specials: &[(&str, &str)]) -> Result<ChatTemplate> {
        let specials = specials.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Self::from_sources(vec![("default".into(), origin.into(), source.into())], specials)
    }

    fn from_sources(
        sources: Vec<(String, String, String)>,
        specials: Vec<(String, String)>,
    ) -> Result<ChatTemplate> {
        let mut env = environment()?;
        let mut templates = Vec::new();
        for (name, origin, source) in sources {
            let source = generation_blocks_as_ifs(&source);
            env.add_template_owned(origin.clone(), source)
                .map_err(|e| anyhow::anyhow!("chat template {origin}: {}", describe(&e)))?;
            let uses_tools = env.get_template(&origin)?.undeclared_variables(false).contains("tools");
            templates.push(Named { name, origin, uses_tools });
        }
        let mut t = ChatTemplate { env, templates, specials, call: None };
        t.call = t.probe_call_syntax();
        Ok(t)
    }

    /// Where the template that renders a conversation (with or without tools) came from.
    pub fn origin(&self, with_tools: bool) -> Result<&str> {
        Ok(&self.pick(with_tools)?.origin)
    }

    /// Whether the template shows `tools` to the model at all.
    pub fn uses_tools(&self) -> bool {
        self.pick(true).is_ok_and(|t| t.uses_tools)
    }

    /// How this template writes a tool call, when it writes them.
    pub fn call_syntax(&self) -> Option<&CallSyntax> {
        self.call.as_ref()
    }

    /// transformers' choice among named templates: `tool_use` when tools are given and there is
    /// one, else `default`.
    fn pick(&self, with_tools: bool) -> Result<&Named> {
        if self.templates.len() == 1 {
            return Ok(&self.templates[0]);
        }
        let find = |n: &str| self.templates.iter().find(|t| t.name == n);
        let chosen = if with_tools { find("tool_use").or_else(|| find("default")) } else { find("default") };
        chosen.with_context(|| {
            let names: Vec<&str> = self.templates.iter().map(|t| t.name.as_str()).collect();
            format!("the model has several chat templates ({}) and none is named `default`", names.join(", "))
        })
    }

    /// The text of `messages` (OpenAI-style JSON objects) with `tools` (JSON schemas), as
    /// `apply_chat_template(messages, tools=tools, add_generation_prompt=..., tokenize=False)`.
    pub fn render(
        &self,
        messages: &[Json],
        tools: Option<&[Json]>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.render_with(messages, tools, add_generation_prompt, &Map::new())
    }

    /// [`render`](Self::render) with extra template variables (transformers' `**kwargs`, e.g.
    /// `enable_thinking` or `date_string`); they override the special tokens of the same name.
    pub fn render_with(
        &self,
        messages: &[Json],
        tools: Option<&[Json]>,
        add_generation_prompt: bool,
        extra: &Map<String, Json>,
    ) -> Result<String> {
        let named = self.pick(tools.is_some())?;
        if tools.is_some_and(|t| !t.is_empty()) && !named.uses_tools {
            bail!(
                "chat template {}: it never reads `tools`, so the model would not see the tools it is given; give the functions in a system message instead (e.g. `--style bfcl`)",
                named.origin
            );
        }
        if messages.is_empty() {
            bail!("a conversation needs at least one message");
        }
        let mut ctx = Map::new();
        ctx.insert("messages".into(), Json::Array(normalize_messages(messages)?));
        ctx.insert("tools".into(), tools.map_or(Json::Null, |t| Json::Array(t.to_vec())));
        ctx.insert("documents".into(), Json::Null);
        ctx.insert("add_generation_prompt".into(), Json::Bool(add_generation_prompt));
        for (k, v) in &self.specials {
            ctx.insert(k.clone(), Json::String(v.clone()));
        }
        for (k, v) in extra {
            ctx.insert(k.clone(), v.clone());
        }
        let template = self.env.get_template(&named.origin)?;
        template
            .render(MjValue::from(minijinja::value::Serde(&ctx)))
            .map_err(|e| anyhow::anyhow!("chat template {}: {}", named.origin, describe(&e)))
    }

    /// Renders a call to a made-up function and finds how the template writes it (after a
    /// system message too, for templates that require one).
    fn probe_call_syntax(&self) -> Option<CallSyntax> {
        let system = serde_json::json!({"role": "system", "content": "fcgpu probe system"});
        self.probe_calls(None).or_else(|| self.probe_calls(Some(system)))
    }

    fn probe_calls(&self, system: Option<Json>) -> Option<CallSyntax> {
        const NAME: &str = "fcgpu_probe_function";
        const ARG: &str = "{\"fcgpu_probe_argument\"";
        let tool = serde_json::json!({"type": "function", "function": {"name": NAME, "description": "x",
            "parameters": {"type": "object", "properties": {"fcgpu_probe_argument": {"type": "integer"}}}}});
        let tools = self.uses_tools().then(|| vec![tool]);
        let user = serde_json::json!({"role": "user", "content": "fcgpu probe question"});
        let call = serde_json::json!({"role": "assistant", "content": "", "tool_calls": [{"id": "call_0", "type": "function",
            "function": {"name": NAME, "arguments": {"fcgpu_probe_argument": 1}}}]});
        let after = serde_json::json!({"role": "user", "content": "fcgpu probe follow-up"});
        let head: Vec<Json> = system.into_iter().chain([user]).collect();
        let prompt = self.render(&head, tools.as_deref(), true).ok()?;
        let full = self.render(&[head, vec![call, after]].concat(), tools.as_deref(), false).ok()?;
        let turn = full.strip_prefix(&prompt)?;
        let at = turn.find(NAME)?;
        let rest = &turn[at + NAME.len()..];
        let args = rest.find(ARG)?;
        Some(CallSyntax { before_name: turn[..at].to_string(), before_args: rest[..args].to_string() })
    }
}

/// Largest chat template or tokenizer_config.json read (published ones are a few KB; some
/// tokenizer configs list thousands of added tokens, a few MB).
const MAX_TEMPLATE_FILE_BYTES: u64 = 16 << 20;

/// A model file read with a size cap, refusing FIFOs and devices (`runfs::read_capped`).
fn read_text(path: &Path) -> Result<String> {
    crate::runfs::read_capped(path, MAX_TEMPLATE_FILE_BYTES)
}

fn read_json(path: &Path) -> Result<Option<Json>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = read_text(path)?;
    let v = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
    Ok(Some(v))
}

/// The named special tokens of a tokenizer config: a string, or an AddedToken object's
/// `content`.
fn special_tokens(config: Option<&Json>) -> Vec<(String, String)> {
    let Some(c) = config else { return Vec::new() };
    SPECIAL_TOKENS
        .iter()
        .filter_map(|k| {
            let v = c.get(*k)?;
            let s = v.as_str().or_else(|| v.get("content").and_then(Json::as_str))?;
            Some((k.to_string(), s.to_string()))
        })
        .collect()
}

fn additional_templates(dir: &Path) -> Result<Vec<(String, String, String)>> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "jinja") {
            let name = p.file_stem().unwrap_or_default().to_string_lossy().into_owned();
            out.push((name, p.display().to_string(), read_text(&p)?));
        }
    }
    out.sort();
    Ok(out)
}

fn config_templates(t: &Json, path: &Path) -> Result<Vec<(String, String, String)>> {
    let at = path.display();
    match t {
        Json::String(s) => Ok(vec![("default".into(), format!("{at} (chat_template)"), s.clone())]),
        Json::Array(list) => list
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let name = e.get("name").and_then(Json::as_str);
                let source = e.get("template").and_then(Json::as_str);
                match (name, source) {
                    (Some(n), Some(s)) => {
                        Ok((n.to_string(), format!("{at} (chat_template `{n}`)"), s.to_string()))
                    }
                    _ => bail!("{at}: chat_template[{i}] needs a string `name` and a string `template`"),
                }
            })
            .collect(),
        Json::Null => Ok(Vec::new()),
        _ => bail!("{at}: `chat_template` must be a string or a list of {{\"name\", \"template\"}} objects"),
    }
}

/// transformers' message preparation: keys whose value is null are dropped (templates test for
/// a missing key), and reasoning is given under `thinking` and `reasoning_content` too.
fn normalize_messages(messages: &[Json]) -> Result<Vec<Json>> {
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let obj = m.as_object().with_context(|| format!("message {} is not a JSON object", i + 1))?;
            let kept: Map<String, Json> =
                obj.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), v.clone())).collect();
            let reasoning = REASONING_FIELDS.iter().find_map(|f| kept.get(*f)).cloned();
            let Some(r) = reasoning else { return Ok(Json::Object(kept)) };
            let mut out = Map::new();
            out.insert("thinking".into(), r.clone());
            for (k, v) in kept {
                out.insert(k, v);
            }
            out.insert("reasoning_content".into(), r);
            Ok(Json::Object(out))
        })
        .collect()
}

/// transformers' `{% generation %}` block only marks assistant text for masks; its body renders
/// unchanged. minijinja has no such tag: an `{% if true %}` keeps the body and the tags'
/// whitespace control.
fn generation_blocks_as_ifs(source: &str) -> String {
    let open = regex::Regex::new(r"\{%([-+]?)\s*generation\s*([-+]?)%\}").expect("valid regex");
    let close = regex::Regex::new(r"\{%([-+]?)\s*endgeneration\s*([-+]?)%\}").expect("valid regex");
    let s = open.replace_all(source, "{%${1} if true ${2}%}");
    close.replace_all(&s, "{%${1} endif ${2}%}").into_owned()
}

/// An engine error with its kind, detail and line.
fn describe(e: &MjError) -> String {
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        s.push_str(&format!(": {inner}"));
        source = inner.source();
    }
    s
}

fn environment() -> Result<Environment<'static>> {
    let mut env = Environment::new();
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .context("minijinja syntax")?,
    );
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    env.set_fuel(Some(FUEL));
    env.set_debug(false);
    env.set_formatter(python_print);
    env.set_unknown_method_callback(python_methods);
    env.add_filter("tojson", tojson_filter);
    // Jinja2's `trim` is `str(value).strip(chars)`.
    env.add_filter("trim", |v: MjValue, chars: Option<&str>| -> Result<String, MjError> {
        Ok(py_strip(&python_str(&v)?, chars, true, true))
    });
    env.add_filter("string", |v: MjValue| python_str(&v));
    env.add_test("sequence", |v: MjValue| {
        v.is_undefined() || matches!(v.kind(), ValueKind::Seq | ValueKind::Map | ValueKind::String)
    });
    env.add_function("raise_exception", |msg: String| -> Result<MjValue, MjError> {
        Err(MjError::new(ErrorKind::InvalidOperation, format!("raise_exception: {msg}")))
    });
    env.add_function("strftime_now", |fmt: &str| strftime_now(fmt));
    env.add_function("dict", dict_function);
    Ok(env)
}

/// `{{ value }}` as Jinja2 prints it: Python's `str()`.
fn python_print(out: &mut minijinja::Output, _: &mut State, v: &MjValue) -> Result<(), MjError> {
    write!(out, "{}", python_str(v)?).map_err(|_| MjError::new(ErrorKind::WriteFailure, "write failed"))
}

/// Python's `str(value)` for what a template can hold.
fn python_str(v: &MjValue) -> Result<String, MjError> {
    Ok(match v.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::None => "None".into(),
        ValueKind::Bool => if v.is_true() { "True" } else { "False" }.into(),
        ValueKind::String => v.as_str().unwrap_or_default().to_string(),
        ValueKind::Number => match f64::try_from(v.clone()) {
            Ok(f) if !v.is_integer() => crate::fc::value::Value::Float(f).repr(),
            _ => v.to_string(),
        },
        ValueKind::Seq | ValueKind::Map => {
            let j = to_json(v)?;
            crate::fc::value::Value::from_json(&j).repr()
        }
        _ => v.to_string(),
    })
}

fn to_json(v: &MjValue) -> Result<Json, MjError> {
    serde_json::to_value(v)
        .map_err(|e| MjError::new(ErrorKind::InvalidOperation, format!("not JSON data: {e}")))
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, keys in their given order.
fn tojson_filter(v: MjValue, args: Rest<MjValue>, kwargs: Kwargs) -> Result<MjValue, MjError> {
    let names = ["ensure_ascii", "indent", "separators", "sort_keys"];
    if args.len() > names.len() {
        return Err(MjError::new(ErrorKind::TooManyArguments, "tojson takes at most 4 arguments"));
    }
    let mut opts = [MjValue::from(false), MjValue::from(()), MjValue::from(()), MjValue::from(false)];
    for (i, a) in args.iter().enumerate() {
        opts[i] = a.clone();
    }
    for (i, n) in names.iter().enumerate() {
        if kwargs.has(n) {
            opts[i] = kwargs.get(n)?;
        }
    }
    kwargs.assert_all_used()?;
    let indent = match opts[1].kind() {
        ValueKind::None | ValueKind::Undefined => None,
        ValueKind::String => Some(opts[1].as_str().unwrap_or_default().to_string()),
        ValueKind::Number => Some(" ".repeat(i64::try_from(opts[1].clone())?.max(0) as usize)),
        _ => {
            return Err(MjError::new(
                ErrorKind::InvalidOperation,
                "tojson: indent must be a number or a string",
            ))
        }
    };
    let (item_sep, key_sep) = match opts[2].kind() {
        ValueKind::None | ValueKind::Undefined => {
            (if indent.is_some() { "," } else { ", " }.to_string(), ": ".to_string())
        }
        _ => {
            let parts: Vec<MjValue> = opts[2].try_iter()?.collect();
            match parts.as_slice() {
                [a, b] if a.as_str().is_some() && b.as_str().is_some() => {
                    (a.as_str().unwrap_or_default().to_string(), b.as_str().unwrap_or_default().to_string())
                }
                _ => {
                    return Err(MjError::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be two strings",
                    ))
                }
            }
        }
    };
    let o = DumpOptions {
        ensure_ascii: opts[0].is_true(),
        indent,
        item_sep,
        key_sep,
        sort_keys: opts[3].is_true(),
    };
    Ok(MjValue::from(dumps(&to_json(&v)?, &o)))
}

/// Python's `json.dumps` options.
pub struct DumpOptions {
    pub ensure_ascii: bool,
    pub indent: Option<String>,
    pub item_sep: String,
    pub key_sep: String,
    pub sort_keys: bool,
}

impl DumpOptions {
    /// `json.dumps(v, ensure_ascii=False, indent=indent)`.
    pub fn python(indent: Option<usize>) -> DumpOptions {
        DumpOptions {
            ensure_ascii: false,
            indent: indent.map(|n| " ".repeat(n)),
            item_sep: if indent.is_some() { "," } else { ", " }.into(),
            key_sep: ": ".into(),
            sort_keys: false,
        }
    }
}

/// Python's `json.dumps(v, ...)`: floats as `repr`, non-finite as `NaN`/`Infinity`.
pub fn dumps(v: &Json, o: &DumpOptions) -> String {
    let mut s = String::new();
    write_json(&mut s, v, o, 0);
    s
}

fn write_json(s: &mut String, v: &Json, o: &DumpOptions, level: usize) {
    let nl = |s: &mut String, level: usize| {
        if let Some(ind) = &o.indent {
            s.push('\n');
            s.push_str(&ind.repeat(level));
        }
    };
    match v {
        Json::Array(a) if !a.is_empty() => {
            s.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    s.push_str(&o.item_sep);
                }
                nl(s, level + 1);
                write_json(s, x, o, level + 1);
            }
            nl(s, level);
            s.push(']');
        }
        Json::Object(m) if !m.is_empty() => {
            let mut items: Vec<(&String, &Json)> = m.iter().collect();
            if o.sort_keys {
                items.sort_by(|a, b| a.0.cmp(b.0));
            }
            s.push('{');
            for (i, (k, x)) in items.into_iter().enumerate() {
                if i > 0 {
                    s.push_str(&o.item_sep);
                }
                nl(s, level + 1);
                write_str(s, k, o.ensure_ascii);
                s.push_str(&o.key_sep);
                write_json(s, x, o, level + 1);
            }
            nl(s, level);
            s.push('}');
        }
        Json::Array(_) => s.push_str("[]"),
        Json::Object(_) => s.push_str("{}"),
        Json::String(t) => write_str(s, t, o.ensure_ascii),
        Json::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(0.0);
            s.push_str(&crate::fc::value::Value::Float(f).repr());
        }
        other => s.push_str(&other.to_string()),
    }
}

/// A JSON string as Python's encoder writes it.
fn write_str(s: &mut String, t: &str, ensure_ascii: bool) {
    s.push('"');
    for c in t.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\t' => s.push_str("\\t"),
            '\u{8}' => s.push_str("\\b"),
            '\u{c}' => s.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && (c as u32) > 0x7e) => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    s.push_str(&format!("\\u{u:04x}"));
                }
            }
            c => s.push(c),
        }
    }
    s.push('"');
}

/// Python's whitespace (`str.isspace`): Unicode White_Space plus the four ASCII separators.
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

fn py_strip(s: &str, chars: Option<&str>, left: bool, right: bool) -> String {
    let set: Option<Vec<char>> = chars.map(|c| c.chars().collect());
    let drop = |c: char| match &set {
        Some(set) => set.contains(&c),
        None => py_space(c),
    };
    let mut t = s;
    if left {
        t = t.trim_start_matches(drop);
    }
    if right {
        t = t.trim_end_matches(drop);
    }
    t.to_string()
}

/// Python's `str.split(sep=None, maxsplit=-1)` (and `rsplit` when `from_right`).
fn py_split(s: &str, sep: Option<&str>, maxsplit: i64, from_right: bool) -> Result<Vec<String>, MjError> {
    let limit = if maxsplit < 0 { usize::MAX } else { maxsplit as usize };
    match sep {
        Some("") => Err(MjError::new(ErrorKind::InvalidOperation, "split: empty separator")),
        Some(sep) if from_right => {
            let mut v: Vec<String> = s.rsplitn(limit.saturating_add(1), sep).map(String::from).collect();
            v.reverse();
            Ok(v)
        }
        Some(sep) => Ok(s.splitn(limit.saturating_add(1), sep).map(String::from).collect()),
        None => {
            // Runs of whitespace separate; once `maxsplit` words are cut, the rest is one part
            // (its outer whitespace on the cut side dropped, as CPython does).
            let mut out = Vec::new();
            let (mut rest, mut n) = (s, limit);
            loop {
                rest = if from_right {
                    rest.trim_end_matches(py_space)
                } else {
                    rest.trim_start_matches(py_space)
                };
                if rest.is_empty() {
                    break;
                }
                if n == 0 {
                    out.push(rest.to_string());
                    break;
                }
                if from_right {
                    let cut = rest
                        .char_indices()
                        .rev()
                        .find(|(_, c)| py_space(*c))
                        .map_or(0, |(i, c)| i + c.len_utf8());
                    out.push(rest[cut..].to_string());
                    rest = &rest[..cut];
                } else {
                    let cut = rest.find(py_space).unwrap_or(rest.len());
                    out.push(rest[..cut].to_string());
                    rest = &rest[cut..];
                }
                n -= 1;
            }
            if from_right {
                out.reverse();
            }
            Ok(out)
        }
    }
}

/// Python's `str.splitlines(keepends=False)`.
fn py_splitlines(s: &str, keepends: bool) -> Vec<String> {
    let breaks = |c: char| {
        matches!(
            c,
            '\n' | '\r'
                | '\u{b}'
                | '\u{c}'
                | '\u{1c}'
                | '\u{1d}'
                | '\u{1e}'
                | '\u{85}'
                | '\u{2028}'
                | '\u{2029}'
        )
    };
    let mut out = Vec::new();
    let mut start = 0;
    let mut it = s.char_indices().peekable();
    while let Some((i, c)) = it.next() {
        if !breaks(c) {
            continue;
        }
        let mut end = i + c.len_utf8();
        if c == '\r' && it.peek().is_some_and(|&(_, n)| n == '\n') {
            it.next();
            end += 1;
        }
        out.push(s[start..if keepends { end } else { i }].to_string());
        start = end;
    }
    if start < s.len() {
        out.push(s[start..].to_string());
    }
    out
}

/// Python methods on template values: exact versions of the whitespace-sensitive string
/// methods, the rest from minijinja-contrib's `pycompat`.
fn python_methods(
    state: &mut State,
    value: &MjValue,
    method: &str,
    args: &[MjValue],
) -> Result<MjValue, MjError> {
    use minijinja::value::from_args;
    if let Some(s) = value.as_str() {
        match method {
            "strip" | "lstrip" | "rstrip" => {
                let (chars,): (Option<&str>,) = from_args(args)?;
                let (l, r) = (method != "rstrip", method != "lstrip");
                return Ok(MjValue::from(py_strip(s, chars, l, r)));
            }
            "split" | "rsplit" => {
                let (sep, maxsplit): (Option<&str>, Option<i64>) = from_args(args)?;
                let parts = py_split(s, sep, maxsplit.unwrap_or(-1), method == "rsplit")?;
                return Ok(MjValue::from(parts));
            }
            "splitlines" => {
                let (keepends,): (Option<bool>,) = from_args(args)?;
                return Ok(MjValue::from(py_splitlines(s, keepends.unwrap_or(false))));
            }
            _ => {}
        }
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args).map_err(|e| {
        if e.kind() == ErrorKind::UnknownMethod {
            MjError::new(
                ErrorKind::UnknownMethod,
                format!("{} has no method `{method}` in fcgpu's template engine", value.kind()),
            )
        } else {
            e
        }
    })
}

/// Python's `dict(mapping_or_pairs, **kwargs)`.
fn dict_function(args: Rest<MjValue>, kwargs: Kwargs) -> Result<MjValue, MjError> {
    let mut out: Vec<(MjValue, MjValue)> = Vec::new();
    let mut set = |k: MjValue, v: MjValue| match out.iter_mut().find(|(x, _)| *x == k) {
        Some(slot) => slot.1 = v,
        None => out.push((k, v)),
    };
    match args.as_slice() {
        [] => {}
        [m] if m.kind() == ValueKind::Map => {
            for k in m.try_iter()? {
                let v = m.get_item(&k)?;
                set(k, v);
            }
        }
        [pairs] => {
            for p in pairs.try_iter()? {
                let kv: Vec<MjValue> = p.try_iter()?.collect();
                let [k, v] = <[MjValue; 2]>::try_from(kv).map_err(|_| {
                    MjError::new(ErrorKind::InvalidOperation, "dict: each item must be a pair")
                })?;
                set(k, v);
            }
        }
        _ => {
            return Err(MjError::new(
                ErrorKind::TooManyArguments,
                "dict takes at most one positional argument",
            ))
        }
    }
    for k in kwargs.args() {
        set(MjValue::from(k), kwargs.get::<MjValue>(k)?);
    }
    Ok(MjValue::from_pairs(out))
}

/// transformers' `strftime_now(format)`: the local time through the C library's `strftime`,
/// which Python's `datetime.strftime` calls too.
fn strftime_now(fmt: &str) -> Result<String, MjError> {
    let bad = |m: &str| MjError::new(ErrorKind::InvalidOperation, format!("strftime_now: {m}"));
    let cfmt = std::ffi::CString::new(fmt).map_err(|_| bad("the format contains a NUL character"))?;
    // SAFETY: `time`, `localtime_r` and `strftime` get valid pointers to locals; `strftime`
    // writes at most `buf.len()` bytes and returns how many.
    unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&now, &mut tm).is_null() {
            return Err(bad("the local time is unavailable"));
        }
        let mut buf = vec![0u8; 256 + fmt.len() * 16];
        let n = libc::strftime(buf.as_mut_ptr().cast(), buf.len(), cfmt.as_ptr(), &tm);
        if n == 0 && !fmt.is_empty() {
            return Err(bad("the formatted date is empty or too long"));
        }
        buf.truncate(n);
        String::from_utf8(buf).map_err(|_| bad("the formatted date is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_split_and_strip() {
        assert_eq!(py_split("  a b  c ", None, -1, false).unwrap(), ["a", "b", "c"]);
        assert_eq!(py_split("  a b  c ", None, 1, false).unwrap(), ["a", "b  c "]);
        assert_eq!(py_split("  a b  c ", None, 1, true).unwrap(), ["  a b", "c"]);
        assert_eq!(py_split("a b ", None, 1, false).unwrap(), ["a", "b "]);
        assert_eq!(py_split(" a b", None, 1, true).unwrap(), [" a", "b"]);
        assert_eq!(py_split(" \u{3000}", None, -1, false).unwrap(), Vec::<String>::new());
        assert_eq!(py_split("a,b,,c", Some(","), 2, false).unwrap(), ["a", "b", ",c"]);
        assert_eq!(py_split("a,b,,c", Some(","), 1, true).unwrap(), ["a,b,", "c"]);
        assert!(py_split("a", Some(""), -1, false).is_err());
        assert_eq!(py_strip("\u{1c} x\n", None, true, true), "x");
        assert_eq!(py_strip("\n\nx\n", Some("\n"), true, false), "x\n");
        assert_eq!(py_splitlines("a\r\nb\rc\n", false), ["a", "b", "c"]);
        assert_eq!(py_splitlines("a\r\nb", true), ["a\r\n", "b"]);
    }

    #[test]
    fn generation_tags_keep_their_whitespace_control() {
        assert_eq!(
            generation_blocks_as_ifs("a {%- generation %}b{% endgeneration -%} c"),
            "a {%- if true %}b{% endif -%} c"
        );
    }
}
