//! `fcgpu prompt`: print the exact prompt a model is given: for one BFCL entry in a style
//! (`--id`), or for a conversation as `generate` and `serve` render it (`--messages`); as text,
//! or with `--ids` as the token ids.

use crate::chat_template::ChatTemplate;
use crate::data::{category_of_id, load_bfcl_category};
use crate::fc::prompt::{render_prompt_with, PromptStyle};
use crate::rollout::chat::ChatFormat;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// BFCL v4 data directory (falls back to $FCGPU_BFCL_DIR).
    #[arg(long)]
    pub bfcl_dir: Option<PathBuf>,
    /// Entry id, e.g. `simple_python_0` or `live_multiple_10-4-2`.
    #[arg(long, conflicts_with = "messages", required_unless_present = "messages")]
    pub id: Option<String>,
    /// Category; inferred from the id as BFCL does when not given.
    #[arg(long, requires = "id")]
    pub category: Option<String>,
    /// How a BFCL entry becomes a conversation (`--id`); with `--messages`, only `compact`
    /// changes anything (the embedded task's prompt instead of the model's template).
    #[arg(long, value_enum)]
    pub style: Option<PromptStyle>,
    /// Model directory: render with its chat template (and tokenize with its tokenizer for
    /// `--ids`). Without it, `--id` prompts use fcgpu's built-in template (BFCL's Qwen ChatML).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A JSON file with the conversation: a list of messages, or an object with `messages`
    /// (and `tools`), as a `generate` input line. Needs `--model`.
    #[arg(long, requires = "model")]
    pub messages: Option<PathBuf>,
    /// A JSON file with the tools (a list of OpenAI-style tools or JSON schemas).
    #[arg(long, requires = "messages")]
    pub tools: Option<PathBuf>,
    /// Print the token ids (one JSON array) instead of the text.
    #[arg(long)]
    pub ids: bool,
    /// Leave out the assistant's generation prompt at the end.
    #[arg(long, requires = "messages")]
    pub no_generation_prompt: bool,
}

pub fn run(a: Args) -> Result<()> {
    let text = match &a.messages {
        Some(file) => conversation_prompt(&a, file)?,
        None => entry_prompt(&a)?,
    };
    let mut out = std::io::stdout().lock();
    if a.ids {
        let dir = a.model.as_deref().context("--ids needs --model (its tokenizer)")?;
        let tok = crate::model::tokenizer::Tokenizer::load(dir)?;
        // As generate and serve tokenize a rendered prompt: the template writes any BOS.
        let ids = tok.encode(&text, false)?;
        writeln!(out, "{}", serde_json::to_string(&ids)?)?;
    } else {
        // Exactly the prompt bytes, no extra newline.
        out.write_all(text.as_bytes())?;
    }
    Ok(())
}

/// One BFCL entry's prompt in a style.
fn entry_prompt(a: &Args) -> Result<String> {
    let id = a.id.as_deref().context("give --id ENTRY or --messages FILE")?;
    let bfcl_dir = crate::cli::eval::resolve_bfcl_dir(a.bfcl_dir.clone())?;
    let cat = a.category.clone().unwrap_or_else(|| category_of_id(id));
    let samples = load_bfcl_category(&bfcl_dir, &cat)?;
    let s =
        samples.iter().find(|s| s.id == id).with_context(|| format!("no entry {id} in category {cat}"))?;
    let style = a.style.unwrap_or(PromptStyle::Bfcl);
    let template = match (&a.model, style) {
        (Some(dir), s) if s != PromptStyle::Compact => Some(ChatTemplate::load(dir)?),
        _ => None,
    };
    render_prompt_with(template.as_ref(), s, style)
}

/// A conversation's prompt, as `generate` renders a `messages` line and `serve` a chat request.
fn conversation_prompt(a: &Args, file: &Path) -> Result<String> {
    let dir = a.model.as_deref().context("--messages needs --model")?;
    let (messages, mut tools) = read_conversation(file)?;
    if let Some(t) = &a.tools {
        if tools.is_some() {
            bail!("{}: the file has `tools` and --tools gives them too; give them once", file.display());
        }
        let v = read_json(t)?;
        let list = v.as_array().with_context(|| format!("{}: tools must be a JSON list", t.display()))?;
        tools = Some(list.clone());
    }
    let format = match a.style {
        Some(PromptStyle::Compact) => ChatFormat::Compact,
        Some(other) => bail!(
            "--style {other:?} shapes BFCL entries (--id); a --messages conversation is rendered as it is"
        ),
        None => ChatFormat::for_dir(dir)?,
    };
    format
        .render_with(&messages, tools.as_deref(), !a.no_generation_prompt)
        .with_context(|| format!("{}", file.display()))
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))
}

/// A list of messages, or `{"messages": [...], "tools": [...]}`.
fn read_conversation(path: &Path) -> Result<(Vec<Value>, Option<Vec<Value>>)> {
    let at = path.display();
    match read_json(path)? {
        Value::Array(m) => Ok((m, None)),
        Value::Object(o) => {
            if let Some(k) = o.keys().find(|k| !matches!(k.as_str(), "messages" | "tools")) {
                bail!("{at}: unknown field `{k}` (expected `messages` and `tools`)");
            }
            let m = o
                .get("messages")
                .and_then(Value::as_array)
                .with_context(|| format!("{at}: needs a `messages` list"))?;
            let tools = match o.get("tools") {
                None | Some(Value::Null) => None,
                Some(Value::Array(t)) => Some(t.clone()),
                Some(_) => bail!("{at}: `tools` must be a list"),
            };
            Ok((m.clone(), tools))
        }
        _ => bail!("{at}: expected a list of messages or an object with `messages`"),
    }
}
