//! `fcgpu merge`: a LoRA adapter folded into its base model, `W + (alpha/r)·B·A` for every
//! target, written as a plain Hugging Face model directory (no adapter files).

use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::model::Model;
use crate::runfs;
use crate::tensor::{DType, Device};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The base model directory (Hugging Face layout).
    #[arg(long)]
    pub model: PathBuf,
    /// The PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output directory (must not exist unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Weight dtype of the output: f32 or bf16 (default: the base's).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Replace an existing --out (the merged model is written next to it first).
    #[arg(long)]
    pub force: bool,
}

pub fn run(a: Args) -> Result<()> {
    let dtype = match a.dtype.as_deref().map(DType::from_hf_name) {
        None => None,
        Some(Some(d @ (DType::F32 | DType::BF16))) => Some(d),
        Some(_) => bail!("--dtype {}: must be f32 or bf16", a.dtype.unwrap_or_default()),
    };
    runfs::ensure_not_cwd(&a.out, "--out")?;
    let same =
        |p: &std::path::Path| matches!((a.out.canonicalize(), p.canonicalize()), (Ok(x), Ok(y)) if x == y);
    if same(&a.model) || same(&a.adapter) {
        bail!("--out {} is an input directory; write the merged model elsewhere", a.out.display());
    }
    if a.out.exists() || a.out.is_symlink() {
        if !a.force {
            bail!(
                "--out {} already exists; refusing to overwrite it (use --force to replace it)",
                a.out.display()
            );
        }
        if !a.out.is_dir() {
            bail!("--out {} exists and is not a directory", a.out.display());
        }
    }
    let out = if a.out.file_name().is_none() { a.out.canonicalize()? } else { a.out.clone() };
    let model = Model::load_on_with_adapter(&a.model, Some(&a.adapter), Device::Cpu, None)?;
    let cfg = model.lora().expect("an adapter was loaded");
    let merged = model.merged()?;
    merged.save(&out, dtype)?;
    eprintln!(
        "merged {} (rank {}, alpha {}, {}) into {}: {}",
        a.adapter.display(),
        cfg.rank,
        cfg.alpha,
        cfg.targets.join(","),
        a.model.display(),
        out.display()
    );
    Ok(())
}
