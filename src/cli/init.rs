//! `fcgpu init`: a randomly initialised model from a `config.json`, saved in Hugging Face layout.

use std::path::PathBuf;

use anyhow::Result;

use crate::model::{Model, ModelConfig};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A Hugging Face config.json (model_type qwen2, qwen3 or llama).
    #[arg(long)]
    pub config: PathBuf,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(a: Args) -> Result<()> {
    let config = ModelConfig::from_file(&a.config)?;
    let model = Model::init_random(config, a.seed)?;
    model.save(&a.out, None)?;
    eprintln!("wrote a random {} model ({} parameters) to {}", model.config.arch.model_type(),
        model.named_params().iter().map(|(_, t)| t.numel()).sum::<usize>(), a.out.display());
    Ok(())
}
