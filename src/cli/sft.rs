//! `fcgpu sft`: supervised fine-tuning with SRML (or plain CE). With no arguments it builds the
//! embedded default (synthetic task, tokenizer, tiny model) in the run directory and trains it.

use anyhow::Result;

use super::run_args::{apply_flags, set_some, RunArgs};
use crate::fc::prompt::PromptStyle;
use crate::train::sft::{self, SftConfig};
use crate::train::srml::{AlphaMode, LossKind};

#[derive(clap::Args, Debug, Default)]
pub struct Args {
    #[command(flatten)]
    pub run: RunArgs,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub grad_accum: Option<usize>,
    #[arg(long, value_enum)]
    pub loss: Option<LossKind>,
    #[arg(long, value_enum)]
    pub alpha_mode: Option<AlphaMode>,
    #[arg(long)]
    pub alpha: Option<f32>,
    /// Segment means over all tokens of the batch instead of per sequence.
    #[arg(long)]
    pub pooled: bool,
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Prompt style: compact, bfcl, reasoning, qwen-fc. Default: the one recorded in the
    /// model directory (`fcgpu.json`), else compact.
    #[arg(long, value_enum)]
    pub style: Option<PromptStyle>,
    /// Targets open with `<think>reasoning</think>` (true) or are plain answers (false).
    /// Default: the model's record, else the style's (reasoning: true; bfcl, qwen-fc: false;
    /// compact: whether the data has reasoning).
    #[arg(long, value_name = "BOOL")]
    pub think: Option<bool>,
}

pub fn resolve(a: &Args) -> Result<SftConfig> {
    let mut c = sft::load_config(a.run.config.as_deref())?;
    a.run.apply(&mut c.run);
    a.run.apply_lora(&mut c.run)?;
    apply_flags!(c, a; batch_size, grad_accum, loss, alpha_mode, alpha, max_len);
    set_some(&mut c.style, a.style);
    set_some(&mut c.think, a.think);
    if a.pooled {
        c.pooled = true;
    }
    sft::validate(&c)?;
    Ok(c)
}

pub fn run(a: Args) -> Result<()> {
    let cfg = resolve(&a)?;
    if a.run.print_config {
        print!("{}", toml::to_string_pretty(&cfg)?);
        return Ok(());
    }
    let device = super::device(&a.run.device, "sft")?;
    let s = sft::run(cfg.clone(), a.run.start(), device)?;
    eprintln!(
        "sft: {} steps in {:.1}s, loss {:.4} -> {:.4}; run directory {}",
        s.steps_run,
        s.seconds,
        s.first_loss,
        s.last_loss,
        cfg.run.run_dir.display()
    );
    if let (Some(acc), Some(ex)) = (s.result_token_accuracy, s.result_exact) {
        println!("result_token_accuracy {acc:.4} result_exact {ex:.4}");
    }
    Ok(())
}
