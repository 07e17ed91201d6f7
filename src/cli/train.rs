//! `fcgpu train`: GRPO with entropy-enhanced advantages. With no arguments it builds the
//! embedded default (task, tokenizer, tiny model, SRML warm-up) and trains it.

use anyhow::Result;

use super::run_args::{apply_flags, set_some, RunArgs};
use crate::fc::prompt::PromptStyle;
use crate::fc::reward::RewardKind;
use crate::rl::advantage::AdvScale;
use crate::rl::policy_loss::LossAgg;
use crate::rl::policy_loss::{ImportanceLevel, RolloutCorrection};
use crate::train::grpo::{self, EntropySegment, Granularity, GrpoConfig};

#[derive(clap::Args, Debug, Default)]
pub struct Args {
    #[command(flatten)]
    pub run: RunArgs,
    /// Prompts per step.
    #[arg(long)]
    pub prompts_per_step: Option<usize>,
    /// Samples per prompt (G).
    #[arg(long)]
    pub group_size: Option<usize>,
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    #[arg(long, value_enum)]
    pub reward: Option<RewardKind>,
    /// Advantage scaling: group (GRPO), batch, none (Dr. GRPO).
    #[arg(long, value_enum)]
    pub adv_scale: Option<AdvScale>,
    /// λ of the CoT-entropy bonus (0: plain GRPO).
    #[arg(long)]
    pub entropy_lambda: Option<f32>,
    /// α of the bonus cap |A|/α.
    #[arg(long)]
    pub entropy_alpha: Option<f32>,
    #[arg(long, value_enum)]
    pub entropy_granularity: Option<Granularity>,
    /// The tokens whose entropy feeds the bonus: auto (think segment with reasoning, the whole
    /// answer without), think, completion.
    #[arg(long, value_enum)]
    pub entropy_segment: Option<EntropySegment>,
    #[arg(long)]
    pub eps_low: Option<f32>,
    #[arg(long)]
    pub eps_high: Option<f32>,
    /// KL coefficient to the frozen reference (0 skips the reference pass).
    #[arg(long)]
    pub beta: Option<f32>,
    #[arg(long, value_enum)]
    pub loss_agg: Option<LossAgg>,
    #[arg(long)]
    pub srml_alpha: Option<f32>,
    /// Importance ratio: token (GRPO) or sequence (GSPO's length-normalised sequence ratio).
    #[arg(long, value_enum)]
    pub importance_level: Option<ImportanceLevel>,
    /// Correct for the sampler's log-probs differing from the training forward's: none,
    /// token-tis, token-mis, seq-tis, seq-mis.
    #[arg(long, value_enum)]
    pub rollout_correction: Option<RolloutCorrection>,
    /// C of --rollout-correction (default 2).
    #[arg(long)]
    pub rollout_correction_cap: Option<f32>,
    /// Log the sampler-vs-training log-prob mismatch every step (mismatch_* metrics; one extra
    /// no-grad forward per step).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub log_mismatch: Option<bool>,
    /// Updates per rollout batch (μ).
    #[arg(long)]
    pub ppo_epochs: Option<usize>,
    #[arg(long)]
    pub micro_batch: Option<usize>,
    /// Prompt style: compact (embedded task), bfcl, reasoning, qwen-fc. Default: the one
    /// recorded in the starting model's directory (`fcgpu.json`), else compact.
    #[arg(long, value_enum)]
    pub style: Option<PromptStyle>,
    /// The reward's format rule asks for a non-empty `<think>` block first (true) or plain
    /// answers (false). Default: the model's record, else the style's (reasoning: true; bfcl,
    /// qwen-fc: false; compact: whether the data has reasoning).
    #[arg(long, value_name = "BOOL")]
    pub think: Option<bool>,
    /// SRML SFT steps on the embedded task before GRPO, from the base (default 0; a
    /// --base scratch model needs about 800).
    #[arg(long)]
    pub warmup_sft_steps: Option<u64>,
    /// Dynamic sampling (DAPO): re-draw groups whose rewards are all equal from new prompts
    /// (`--dynamic-sampling false` turns off a config file's `true`).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub dynamic_sampling: Option<bool>,
    /// Most extra rollout rounds per step with --dynamic-sampling.
    #[arg(long)]
    pub max_resample: Option<usize>,
    /// Positions per block of the rollouts' paged KV cache (default 16).
    #[arg(long)]
    pub kv_block_size: Option<usize>,
    /// Most positions the rollouts' KV cache holds at once (default 0: no cap); past it the
    /// latest admitted sample is preempted and recomputed.
    #[arg(long)]
    pub max_batch_tokens: Option<usize>,
}

pub fn resolve(a: &Args) -> Result<GrpoConfig> {
    let mut c = grpo::load_config(a.run.config.as_deref())?;
    a.run.apply(&mut c.run);
    a.run.apply_lora(&mut c.run)?;
    apply_flags!(c, a; prompts_per_step, group_size, temperature, top_p, max_new_tokens, reward, adv_scale, entropy_lambda,
        entropy_alpha, entropy_granularity, entropy_segment, eps_low, eps_high, beta, loss_agg, srml_alpha, importance_level, rollout_correction, rollout_correction_cap, log_mismatch, ppo_epochs, micro_batch, warmup_sft_steps,
        dynamic_sampling, max_resample, kv_block_size, max_batch_tokens);
    set_some(&mut c.style, a.style);
    set_some(&mut c.think, a.think);
    grpo::validate(&c)?;
    Ok(c)
}

pub fn run(a: Args) -> Result<()> {
    let cfg = resolve(&a)?;
    if a.run.print_config {
        print!("{}", toml::to_string_pretty(&cfg)?);
        return Ok(());
    }
    let device = super::device(&a.run.device, "train")?;
    let (before, after) = grpo::run(cfg.clone(), a.run.start(), device)?;
    if let (Some(b), Some(x)) = (before, after) {
        println!("heldout_accuracy_before {b:.4} heldout_accuracy_after {x:.4}");
    }
    eprintln!("run directory: {} (metrics.jsonl, curves.svg, checkpoints)", cfg.run.run_dir.display());
    Ok(())
}
