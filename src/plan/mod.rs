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
//! LoRA (`--lora-rank`) is modelled until the adapters exist in the model: the full-training
//! plan's phases, less the base's gradients, optimizer state and reference copy, plus the
//! adapters' weights, gradients, AdamW state and their `[tokens, rank]` activations
//! ([`lora_phase`]).

pub mod cli;

use std::sync::Mutex;

use anyhow::{bail, ensure, Context, Result};

use crate::backend::memory::{scope, Category, MemSnapshot};
use crate::model::checkpoint::Checkpointing;
use crate::model::{Batch, Model, ModelConfig};
use crate::tensor::{DType, Device, Tensor};
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

/// LoRA adapters: rank and the projections they adapt.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    pub rank: usize,
    pub targets: Vec<String>,
}

/// The projections LoRA may target.
pub const LORA_TARGETS: [&str; 7] =
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// What a plan is of: the model's shapes and one step of each trainer.
#[derive(Clone, Debug)]
pub struct Spec {
    pub config: ModelConfig,
    pub checkpoint: bool,
    pub lora: Option<LoraSpec>,
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
            ensure!(l.rank >= 1, "--lora-rank must be at least 1");
            let narrowest = c.hidden_size.min(c.num_kv_heads * c.head_dim);
            ensure!(
                l.rank <= narrowest,
                "--lora-rank {} is larger than the narrowest adapted layer width ({narrowest})",
                l.rank
            );
            ensure!(!l.targets.is_empty(), "--lora-targets is empty");
            for t in &l.targets {
                ensure!(
                    LORA_TARGETS.contains(&t.as_str()),
                    "--lora-targets: unknown target `{t}` (expected a comma list of {})",
                    LORA_TARGETS.join(", ")
                );
            }
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
    fn set(&mut self, c: Category, v: u64) {
        self.split[c as usize] = v;
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
    let full = Spec { lora: None, ..spec.clone() };
    let dev = device.gpu()?;
    let base = dev.memory();
    dev.reset_peak_memory();
    sft_step(&full, device, &source).context("the plan's SFT step")?;
    // What stays live after a step (device caches such as RoPE tables) is counted from then on.
    let sft = Peak::from_snapshot(&dev.memory(), &base);
    let (rollout, update) = grpo_step(&full, device, &source, &dev, &base).context("the plan's GRPO step")?;
    let plan = Plan { sft, rollout, update };
    Ok(match &spec.lora {
        None => plan,
        Some(l) => Plan {
            sft: lora_phase(spec, l, plan.sft, spec.sft_batch * spec.sft_len, false),
            rollout: lora_phase(spec, l, plan.rollout, 0, spec.beta != 0.0),
            update: lora_phase(spec, l, plan.update, update_tokens(spec), spec.beta != 0.0),
        },
    })
}

/// Tokens of one update micro-batch (the prompt once, `micro_batch` completions).
fn update_tokens(s: &Spec) -> usize {
    s.prompt_len + s.micro_batch.min(s.group) * (s.new_tokens + 1)
}

/// The model of a step on `device`, its weights counted as weights.
fn model_on(spec: &Spec, device: Device, source: &Source) -> Result<Model> {
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
    // `GrpoTrainer::new` loads the reference as a copy of its own.
    let reference = if spec.beta != 0.0 { Some(model_on(spec, device, source)?) } else { None };
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

/// Parameters of one layer's adapters: `r (in + out)` per target.
pub fn lora_params(c: &ModelConfig, l: &LoraSpec) -> u64 {
    let (h, q, kv, i) =
        (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size);
    let per_layer: usize = l
        .targets
        .iter()
        .map(|t| match t.as_str() {
            "q_proj" => h + q,
            "k_proj" | "v_proj" => h + kv,
            "o_proj" => q + h,
            "gate_proj" | "up_proj" => h + i,
            "down_proj" => i + h,
            _ => 0,
        })
        .sum();
    (per_layer * l.rank * c.num_layers) as u64
}

/// A full-training phase turned into the LoRA one: the base's gradients and optimizer state
/// go, the reference copy goes (the reference is the base with the adapters off); the
/// adapters' bf16 weights, f32 gradients, f32 master weights and moments come; and `tokens`
/// tokens of `[tokens, rank]` bf16 activations per target and layer (all layers without
/// checkpointing, one with it).
fn lora_phase(spec: &Spec, l: &LoraSpec, full: Peak, tokens: usize, had_reference: bool) -> Peak {
    let c = &spec.config;
    let p = lora_params(c, l);
    let mut out = full;
    let base_weights = full.of(Category::Weights) / if had_reference { 2 } else { 1 };
    out.set(Category::Weights, base_weights);
    out.set(Category::Adapters, p * DType::BF16.size() as u64);
    let had_grads = full.of(Category::Gradients) > 0;
    out.set(Category::Gradients, if had_grads { p * 4 } else { 0 });
    out.set(Category::Optimizer, p * 12);
    let layers = if spec.checkpoint { 1 } else { c.num_layers };
    let act = (tokens * l.rank * l.targets.len() * layers * DType::BF16.size()) as u64;
    out.set(Category::Activations, full.of(Category::Activations) + act);
    out
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
