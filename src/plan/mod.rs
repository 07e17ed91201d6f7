//! The memory plan of a training run (`fcgpu plan`): the peak device memory of one SFT step and
//! one GRPO step (rollout, reference pass, update), split by what the bytes hold.
//!
//! The plan is not a formula. It runs the trainers' own step code (`sft::Trainer::step_on`,
//! `rollout::generate`, `grpo::GrpoTrainer::update`) on the meta device, where tensors have
//! shapes and no data and every allocation is counted as cuda and emu count theirs
//! ([`crate::backend::memory`]). The same code on emu, with data, gives the same peak
//! (tests/memory_plan.rs). Every rollout runs to `max_new_tokens` (no early EOS): the plan is
//! the step's worst case.
//!
//! With LoRA (`--lora-rank`) the step's model gets its adapters as `fcgpu sft`/`train` give
//! them ([`Model::add_lora`]), so the plan holds the adapters, their gradients and AdamW state,
//! their activations and no reference copy (the reference is the base with the adapters off),
//! counted, not modelled.

pub mod cli;

use std::sync::Mutex;

use anyhow::{bail, ensure, Context, Result};

use crate::backend::memory::{scope, Category, MemSnapshot};
use crate::model::checkpoint::Checkpointing;
use crate::model::lora::LoraConfig;
use crate::model::{Batch, Model, ModelConfig};
use crate::tensor::{Device, Tensor};
use crate::train::run_config::RunConfig;

/// Whether a run checkpoints its layers' activations on `device`: `layer` always, `none`
/// never, `auto` when the run does not fit `device` without it (see [`auto_checkpoint`]; the
/// cpu never needs it).
pub fn checkpoint_layers(run: &RunConfig, device: Device) -> bool {
    match run.checkpoint_activations {
        Checkpointing::None => false,
        Checkpointing::Layer => true,
        Checkpointing::Auto => AUTO.lock().unwrap().get(&device).copied().unwrap_or(false),
    }
}

/// `auto`'s decision per device, made by the plan `fcgpu train`/`sft` run before loading
/// ([`cli::check_fits`]); a device with no decision keeps its activations.
static AUTO: Mutex<Vec<(Device, bool)>> = Mutex::new(Vec::new());

trait Lookup {
    fn get(&self, d: &Device) -> Option<&bool>;
}
impl Lookup for Vec<(Device, bool)> {
    fn get(&self, d: &Device) -> Option<&bool> {
        self.iter().find(|(x, _)| x == d).map(|(_, b)| b)
    }
}

/// Records `auto`'s decision for `device`.
pub fn set_auto_checkpoint(device: Device, on: bool) {
    let mut v = AUTO.lock().unwrap();
    v.retain(|(d, _)| *d != device);
    v.push((device, on));
}

/// What a plan is of: the model's shapes and one step of each trainer.
#[derive(Clone, Debug)]
pub struct Spec {
    pub config: ModelConfig,
    pub checkpoint: bool,
    pub lora: Option<LoraConfig>,
    /// SFT: sequences per micro-batch, tokens per sequence, micro-batches per step.
    pub sft_batch: usize,
    pub sft_len: usize,
    pub grad_accum: usize,
    /// GRPO: prompts per step, samples per prompt, prompt tokens, new tokens, completions per
    /// micro-batch of the update, PPO epochs, KL coefficient (0: no reference pass).
    pub prompts: usize,
    pub group: usize,
    pub prompt_len: usize,
    pub new_tokens: usize,
    pub micro_batch: usize,
    pub ppo_epochs: usize,
    pub beta: f32,
}

/// The most tokens one sequence of a plan may have, and the most sequences: beyond them the
/// figures are meaningless (and the meta run would take long).
pub const MAX_TOKENS: usize = 1 << 20;
pub const MAX_SEQS: usize = 1 << 16;

impl Spec {
    /// Range checks, naming the flag.
    pub fn validate(&self) -> Result<()> {
        let c = &self.config;
        for (name, v) in [
            ("--batch-size", self.sft_batch),
            ("--max-len", self.sft_len),
            ("--grad-accum", self.grad_accum),
            ("--prompts-per-step", self.prompts),
            ("--group-size", self.group),
            ("--prompt-len", self.prompt_len),
            ("--max-new-tokens", self.new_tokens),
            ("--micro-batch", self.micro_batch),
            ("--ppo-epochs", self.ppo_epochs),
        ] {
            ensure!(v >= 1, "{name} must be at least 1");
        }
        ensure!(self.sft_len <= MAX_TOKENS, "--max-len {} is above {MAX_TOKENS} tokens", self.sft_len);
        let seq = self.prompt_len + self.new_tokens;
        ensure!(seq <= MAX_TOKENS, "--prompt-len + --max-new-tokens = {seq} is above {MAX_TOKENS} tokens");
        ensure!(
            self.prompts.saturating_mul(self.group) <= MAX_SEQS && self.sft_batch <= MAX_SEQS,
            "more than {MAX_SEQS} sequences in a step"
        );
        ensure!(
            seq <= c.max_position_embeddings && self.sft_len <= c.max_position_embeddings,
            "a sequence of {} tokens exceeds the model's context (max_position_embeddings = {})",
            seq.max(self.sft_len),
            c.max_position_embeddings
        );
        if let Some(l) = &self.lora {
            l.validate().context("--lora-rank, --lora-targets, --lora-dropout")?;
            l.check_model(c).context("--lora-rank")?;
            ensure!(
                !(self.checkpoint && l.dropout > 0.0),
                "--lora-dropout {} with activation checkpointing: the recompute would draw other masks (use --lora-dropout 0)",
                l.dropout
            );
        }
        Ok(())
    }
}

/// One phase's peak and its split.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Peak {
    pub split: [u64; Category::ALL.len()],
}

impl Peak {
    pub fn total(&self) -> u64 {
        self.split.iter().sum()
    }
    pub fn of(&self, c: Category) -> u64 {
        self.split[c as usize]
    }
    fn from_snapshot(s: &MemSnapshot, base: &MemSnapshot) -> Peak {
        Peak { split: std::array::from_fn(|i| s.peak[i].saturating_sub(base.live[i])) }
    }
    fn max(a: Peak, b: Peak) -> Peak {
        if b.total() > a.total() {
            b
        } else {
            a
        }
    }
}

/// The plan: SFT step, GRPO step (the larger of its rollout and its update), and the two GRPO
/// phases.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub sft: Peak,
    pub rollout: Peak,
    pub update: Peak,
}

impl Plan {
    pub fn grpo(&self) -> Peak {
        Peak::max(self.rollout, self.update)
    }
}

/// Where the step's model comes from: built on the meta device from a config, or a host model
/// moved to a GPU device (emu in the tests).
pub enum Source<'a> {
    Meta,
    Host(&'a Model),
}

/// One plan at a time per process: the device's counters are shared.
static RUNNING: Mutex<()> = Mutex::new(());

/// Runs the plan's steps on `device` (meta for a plan; emu with `Source::Host` to measure) and
/// returns their peaks, above what was live on the device before.
pub fn measure(spec: &Spec, device: Device, source: Source) -> Result<Plan> {
    spec.validate()?;
    ensure!(device.is_gpu(), "a memory plan runs on a GPU device (meta, emu or cuda), not {device}");
    let _one = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
    let dev = device.gpu()?;
    // Every measurement starts from the same device state: no cached RoPE tables.
    crate::ops::rope::clear_device_tables();
    let base = dev.memory();
    dev.reset_peak_memory();
    sft_step(spec, device, &source).context("the plan's SFT step")?;
    // What stays live after a step (device caches such as RoPE tables) is counted from then on.
    let sft = Peak::from_snapshot(&dev.memory(), &base);
    let (rollout, update) = grpo_step(spec, device, &source, &dev, &base).context("the plan's GRPO step")?;
    Ok(Plan { sft, rollout, update })
}

/// The model of a step on `device`, its weights counted as weights, with the run's adapters
/// (counted as adapters) when it has them.
fn model_on(spec: &Spec, device: Device, source: &Source) -> Result<Model> {
    let mut model = base_on(spec, device, source)?;
    if let Some(l) = &spec.lora {
        scope(Category::Adapters, || model.add_lora(l, 1))?;
    }
    Ok(model)
}

fn base_on(spec: &Spec, device: Device, source: &Source) -> Result<Model> {
    scope(Category::Weights, || match source {
        Source::Host(m) => m.to_device(device),
        Source::Meta => {
            let dev = device.gpu()?;
            let dt = device.compute_dtype();
            Model::build(spec.config.clone(), &mut |_, shape| {
                let n = shape.iter().product();
                Tensor::from_gpu(crate::backend::storage::GpuStorage::uninit(&dev, dt, n)?, shape)
            })
        }
    })
}

/// f32 master weights and moments of `model`, as `Trainer::new` attaches them.
fn optimizer_for(model: &Model, device: Device) -> Result<crate::train::optim::AdamW> {
    let mut opt = crate::train::optim::AdamW::default();
    scope(Category::Optimizer, || opt.attach(model, device))?;
    Ok(opt)
}

/// A tokenizer with no vocabulary: the steps the plan runs never encode or decode text.
fn no_tokenizer() -> crate::model::tokenizer::Tokenizer {
    let wl = tokenizers::models::wordlevel::WordLevel::default();
    crate::model::tokenizer::Tokenizer::from_inner(tokenizers::Tokenizer::new(wl))
}

fn ids(n: usize, vocab: usize, salt: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 31 + salt * 17 + 1) % vocab) as u32).collect()
}

fn run_config(spec: &Spec) -> RunConfig {
    let checkpoint = if spec.checkpoint { Checkpointing::Layer } else { Checkpointing::None };
    RunConfig { checkpoint_activations: checkpoint, lr: 1e-5, ..RunConfig::sft() }
}

fn sft_step(spec: &Spec, device: Device, source: &Source) -> Result<()> {
    use crate::train::sft::{SftConfig, Trainer};
    let model = model_on(spec, device, source)?;
    let opt = optimizer_for(&model, device)?;
    let cfg = SftConfig {
        run: run_config(spec),
        batch_size: spec.sft_batch,
        grad_accum: spec.grad_accum,
        max_len: spec.sft_len,
        ..Default::default()
    };
    let mut t = Trainer::from_model(cfg, model, no_tokenizer(), u32::MAX);
    t.opt = opt;
    let vocab = spec.config.vocab_size;
    let micro: Vec<(Batch, Vec<usize>)> = (0..spec.grad_accum)
        .map(|m| {
            let seqs: Vec<Vec<u32>> =
                (0..spec.sft_batch).map(|s| ids(spec.sft_len, vocab, m * 1000 + s)).collect();
            (Batch::from_sequences(&seqs), vec![spec.sft_len / 2; spec.sft_batch])
        })
        .collect();
    t.step_on(&micro)?;
    Ok(())
}

/// The rollout (every completion to `new_tokens`), then the update with the reference pass.
fn grpo_step(
    spec: &Spec,
    device: Device,
    source: &Source,
    dev: &crate::backend::GpuDevice,
    base: &MemSnapshot,
) -> Result<(Peak, Peak)> {
    use crate::rollout::{generate, SamplingConfig};
    use crate::train::grpo::{GrpoConfig, GrpoTrainer, Rollout};
    dev.reset_peak_memory();
    let model = model_on(spec, device, source)?;
    // `GrpoTrainer::new` loads the reference as a copy of its own; with LoRA the reference is
    // the base with the adapters off.
    let reference =
        if spec.beta != 0.0 && spec.lora.is_none() { Some(base_on(spec, device, source)?) } else { None };
    let opt = optimizer_for(&model, device)?;
    let cfg = GrpoConfig {
        run: RunConfig {
            checkpoint_activations: run_config(spec).checkpoint_activations,
            ..RunConfig::grpo()
        },
        prompts_per_step: spec.prompts,
        group_size: spec.group,
        max_new_tokens: spec.new_tokens,
        micro_batch: spec.micro_batch,
        ppo_epochs: spec.ppo_epochs,
        beta: spec.beta,
        ..Default::default()
    };
    let mut t = GrpoTrainer::with_model(cfg, model, no_tokenizer());
    t.opt = opt;
    t.reference = reference;
    let vocab = spec.config.vocab_size;
    let prompts: Vec<Vec<u32>> = (0..spec.prompts).map(|p| ids(spec.prompt_len, vocab, p)).collect();
    let sampling = SamplingConfig {
        n: spec.group,
        max_new_tokens: spec.new_tokens,
        ignore_eos: true,
        seed: 1,
        ..Default::default()
    };
    let done = crate::autograd::no_grad(|| generate(&t.model, &prompts, &sampling, None))?;
    let rollout = Peak::from_snapshot(&dev.memory(), base);
    dev.reset_peak_memory();
    let rollouts: Vec<Rollout> = done
        .iter()
        .map(|c| {
            let mut ids = prompts[c.prompt_index].clone();
            ids.extend_from_slice(&c.new_ids);
            Rollout {
                ids,
                prompt_len: spec.prompt_len,
                old_logp: c.logprobs.clone(),
                entropy: c.entropy.clone(),
                think_len: 0,
                think_start: 0,
            }
        })
        .collect();
    ensure!(
        rollouts.iter().all(|r| r.ids.len() == spec.prompt_len + spec.new_tokens),
        "a plan's rollout stopped before max_new_tokens"
    );
    // Rewards that differ within every group, so no group is skipped as zero-variance.
    let rewards: Vec<f32> = (0..rollouts.len()).map(|i| (i % 2) as f32).collect();
    t.update(&rollouts, &rewards, 1e-5)?;
    let update = Peak::from_snapshot(&dev.memory(), base);
    Ok((rollout, update))
}

/// A GPU's memory, bytes, by `--device` name.
pub fn device_memory(name: &str) -> Result<(&'static str, u64)> {
    Ok(match name {
        "h100" => ("H100 80 GB", 80 * GB),
        "h200" => ("H200 141 GB", 141 * GB),
        "emu" => ("emu (host memory)", u64::MAX),
        _ => bail!("--device {name:?}: expected h100, h200 or emu"),
    })
}

/// 10^9 bytes (GPU memory is sold in these).
pub const GB: u64 = 1_000_000_000;
