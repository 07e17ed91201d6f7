//! `fcgpu convert`: a GGUF file (llama.cpp) to a Hugging Face model directory.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};

use crate::gguf;
use crate::runfs;
use crate::tensor::DType;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The GGUF file (architectures llama and qwen2; F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1
    /// and Q8_0 tensors).
    #[arg(long, required_unless_present = "converter_version")]
    pub from: Option<PathBuf>,
    /// Output directory (must not exist unless --force).
    #[arg(long, required_unless_present = "converter_version")]
    pub out: Option<PathBuf>,
    /// Weight dtype of model.safetensors: f32 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Replace an existing --out (the new model is written next to it first; the old one is
    /// removed only once the new one is complete).
    #[arg(long)]
    pub force: bool,
    /// Print the converter's output version (recorded in fcgpu_convert.json) and exit.
    #[arg(long)]
    pub converter_version: bool,
}

pub fn run(a: Args) -> Result<()> {
    if a.converter_version {
        println!("{}", gguf::CONVERTER_VERSION);
        return Ok(());
    }
    let (Some(from), Some(out)) = (a.from, a.out) else { bail!("--from and --out are required") };
    let dtype = match DType::from_hf_name(&a.dtype) {
        Some(d @ (DType::F32 | DType::BF16)) => d,
        _ => bail!("--dtype {}: must be f32 or bf16", a.dtype),
    };
    if !from.is_file() {
        bail!("--from {}: no such file", from.display());
    }
    runfs::ensure_not_cwd(&out, "--out")?;
    if out.exists() || out.is_symlink() {
        if !a.force {
            bail!(
                "--out {} already exists; refusing to overwrite it (use --force to replace it)",
                out.display()
            );
        }
        if !out.is_dir() {
            bail!("--out {} exists and is not a directory", out.display());
        }
    }
    // A trailing `.`/`..` has no file name to build temporary siblings from.
    let out = if out.file_name().is_none() { out.canonicalize()? } else { out };
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        runfs::clean_stale_temps_noisy(parent);
    }
    let start = Instant::now();
    let s = gguf::convert(&from, &out, dtype)?;
    let types: Vec<String> = s.types.iter().map(|(t, n)| format!("{n} {t}")).collect();
    eprintln!(
        "converted {} ({}, {} tensors: {}; {} parameters, vocab {}{}) to {} as {} in {:.1} s",
        from.display(),
        s.arch,
        s.tensors,
        types.join(", "),
        s.parameters,
        s.vocab,
        if s.tied { ", tied embeddings" } else { "" },
        out.display(),
        dtype.hf_name(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
