//! `fcgpu init`: a randomly initialised model from a `config.json`, saved in Hugging Face layout.

use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::model::{Model, ModelConfig};
use crate::runfs;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A Hugging Face config.json (model_type qwen2, qwen3 or llama).
    #[arg(long)]
    pub config: PathBuf,
    /// Output directory (created; an existing non-empty one needs --force).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Replace the contents of a non-empty --out directory (the new model is written next to
    /// it first; the old contents are removed only once it is complete).
    #[arg(long)]
    pub force: bool,
}

pub fn run(a: Args) -> Result<()> {
    let config = ModelConfig::from_file(&a.config)?;
    if a.out.exists() && !a.out.is_dir() {
        bail!("--out {} exists and is not a directory", a.out.display());
    }
    // The current directory cannot be replaced without pulling it from under the user.
    runfs::ensure_not_cwd(&a.out, "--out")?;
    if runfs::non_empty_dir(&a.out) {
        if !a.force {
            bail!(
                "--out {} is not empty; refusing to overwrite it (use --force to replace its contents)",
                a.out.display()
            );
        }
    }
    // A trailing `.`/`..` has no file name to build temporary siblings from.
    let out = if a.out.file_name().is_none() { a.out.canonicalize()? } else { a.out.clone() };
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        runfs::clean_stale_temps_noisy(parent);
    }
    config.check_memory("fcgpu init")?;
    let model = Model::init_random(config, a.seed)?;
    model.save(&out, None)?;
    eprintln!(
        "wrote a random {} model ({} parameters) to {}",
        model.config.arch.model_type(),
        model.named_params().iter().map(|(_, t)| t.numel()).sum::<usize>(),
        a.out.display()
    );
    Ok(())
}
