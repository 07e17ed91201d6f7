//! `fcgpu sft`: supervised fine-tuning with SRML (or plain CE). With no arguments it builds the
//! embedded default (synthetic task, tokenizer, tiny model) in the run directory and trains it.

use std::path::PathBuf;

use anyhow::Result;

use crate::train::sft::{self, SftConfig};
use crate::train::srml::{AlphaMode, LossKind};

#[derive(clap::Args, Debug, Default)]
pub struct Args {
    /// TOML config (the fields of config.toml); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Model directory (HF layout). Default: the tiny model, built in <run-dir>/base-model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Training data, fcgpu JSONL. Default: the embedded synthetic task.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Held-out data, fcgpu JSONL.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Run directory (default runs/sft).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    #[arg(long)]
    pub steps: Option<u64>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub grad_accum: Option<usize>,
    #[arg(long)]
    pub lr: Option<f32>,
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    #[arg(long)]
    pub max_grad_norm: Option<f32>,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long, value_enum)]
    pub loss: Option<LossKind>,
    #[arg(long, value_enum)]
    pub alpha_mode: Option<AlphaMode>,
    #[arg(long)]
    pub alpha: Option<f32>,
    /// Segment means over all tokens of the batch instead of per sequence.
    #[arg(long)]
    pub pooled: bool,
    /// Continue from the latest checkpoint in the run directory.
    #[arg(long)]
    pub resume: bool,
    #[arg(long)]
    pub save_every: Option<u64>,
    /// Tiny model size when building the default model: tiny or micro.
    #[arg(long)]
    pub preset: Option<String>,
    #[arg(long)]
    pub max_len: Option<usize>,
    #[arg(long)]
    pub eval_samples: Option<usize>,
}

pub fn resolve(a: &Args) -> Result<SftConfig> {
    let mut c = sft::load_config(a.config.as_deref())?;
    macro_rules! set {
        ($($f:ident),*) => { $( if let Some(v) = a.$f.clone() { c.$f = v; } )* };
    }
    set!(run_dir, steps, batch_size, grad_accum, lr, warmup_steps, max_grad_norm, seed, loss, alpha_mode, alpha, save_every, preset, max_len, eval_samples);
    if a.model.is_some() {
        c.model = a.model.clone();
    }
    if a.data.is_some() {
        c.data = a.data.clone();
    }
    if a.eval_data.is_some() {
        c.eval_data = a.eval_data.clone();
    }
    if a.pooled {
        c.pooled = true;
    }
    anyhow::ensure!((0.0..=1.0).contains(&c.alpha), "--alpha must be in [0, 1], got {}", c.alpha);
    anyhow::ensure!(c.batch_size > 0 && c.grad_accum > 0, "--batch-size and --grad-accum must be positive");
    Ok(c)
}

pub fn run(a: Args) -> Result<()> {
    let cfg = resolve(&a)?;
    let s = sft::run(cfg.clone(), a.resume)?;
    eprintln!("sft: {} steps in {:.1}s, loss {:.4} -> {:.4}; run directory {}", s.steps_run, s.seconds, s.first_loss, s.last_loss, cfg.run_dir.display());
    if let (Some(acc), Some(ex)) = (s.result_token_accuracy, s.result_exact) {
        println!("result_token_accuracy {acc:.4} result_exact {ex:.4}");
    }
    Ok(())
}
