//! `fcgpu prompt`: print the exact prompt text for one BFCL entry.

use crate::data::{category_of_id, load_bfcl_category};
use crate::fc::prompt::{render_prompt, PromptStyle};
use anyhow::{Context, Result};
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// BFCL v4 data directory (falls back to $FCGPU_BFCL_DIR).
    #[arg(long)]
    pub bfcl_dir: Option<PathBuf>,
    /// Entry id, e.g. `simple_python_0` or `live_multiple_10-4-2`.
    #[arg(long)]
    pub id: String,
    /// Category; inferred from the id as BFCL does when not given.
    #[arg(long)]
    pub category: Option<String>,
    #[arg(long, value_enum, default_value = "bfcl")]
    pub style: PromptStyle,
}

pub fn run(a: Args) -> Result<()> {
    let bfcl_dir = crate::cli::eval::resolve_bfcl_dir(a.bfcl_dir.clone())?;
    let cat = a.category.unwrap_or_else(|| category_of_id(&a.id));
    let samples = load_bfcl_category(&bfcl_dir, &cat)?;
    let s = samples
        .iter()
        .find(|s| s.id == a.id)
        .with_context(|| format!("no entry {} in category {cat}", a.id))?;
    // Exactly the prompt bytes, no extra newline.
    std::io::stdout().write_all(render_prompt(s, a.style).as_bytes())?;
    Ok(())
}
