//! `fcgpu plan`: prints the memory plan of a run, and the check `fcgpu train`/`sft` make on cuda
//! before loading anything.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::{device_memory, measure, Peak, Plan, Source, Spec, GB};
use crate::backend::memory::Category;
use crate::model::checkpoint::Checkpointing;
use crate::model::lora::LoraConfig;
use crate::model::ModelConfig;
use crate::tensor::Device;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A model's config.json, or a model directory holding one (shapes only: no weights are
    /// read). configs/models/ has Qwen2.5's.
    #[arg(long)]
    pub model: PathBuf,
    /// The GPU to plan for: h100 (80 GB), h200 (141 GB) or emu (no limit).
    #[arg(long, default_value = "h100")]
    pub device: String,
    /// none, layer or auto (layer when the run does not fit without it).
    #[arg(long, value_enum, default_value = "none")]
    pub checkpoint_activations: Checkpointing,
    /// LoRA rank (0 or absent: full training).
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// Projections LoRA adapts, comma-separated (or all-linear).
    #[arg(long, default_value = "all-linear")]
    pub lora_targets: String,
    /// LoRA dropout (its masks are activations; refused with checkpointing, as by train).
    #[arg(long, default_value_t = 0.0)]
    pub lora_dropout: f32,
    /// GRPO: prompts per step.
    #[arg(long, default_value_t = 32)]
    pub prompts_per_step: usize,
    /// GRPO: samples per prompt.
    #[arg(long, default_value_t = 8)]
    pub group_size: usize,
    /// GRPO: tokens per prompt.
    #[arg(long, default_value_t = 512)]
    pub prompt_len: usize,
    /// GRPO: new tokens per completion (every completion is planned at this length).
    #[arg(long, default_value_t = 1024)]
    pub max_new_tokens: usize,
    /// GRPO: completions per micro-batch of the update.
    #[arg(long, default_value_t = 8)]
    pub micro_batch: usize,
    #[arg(long, default_value_t = 1)]
    pub ppo_epochs: usize,
    /// GRPO: KL coefficient (0: no reference pass, no reference copy).
    #[arg(long, default_value_t = 0.001)]
    pub beta: f32,
    /// SFT: sequences per micro-batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// SFT: tokens per sequence (the plan's sequences are all this long).
    #[arg(long, default_value_t = 1536)]
    pub max_len: usize,
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also run the steps on this device (emu, cuda, cuda:N) with a random model of the
    /// config's shapes, and compare its counted peaks (and on cuda the memory pool's high-water
    /// mark) with the plan: an error when a phase is more than 1% off.
    #[arg(long)]
    pub measure: Option<String>,
}

/// A model's shapes from a config.json or a directory holding one.
pub fn model_config(path: &Path) -> Result<ModelConfig> {
    let file = if path.is_dir() { path.join("config.json") } else { path.to_path_buf() };
    ModelConfig::from_file(&file).with_context(|| format!("--model {}", path.display()))
}

impl Args {
    fn spec(&self, config: ModelConfig, checkpoint: bool) -> Result<Spec> {
        let lora = match self.lora_rank {
            None | Some(0) => None,
            // alpha scales values, not bytes: train's default (alpha = rank) stands in.
            Some(rank) => Some(
                LoraConfig::new(rank, rank as f32, self.lora_dropout, &self.lora_targets)
                    .context("--lora-rank, --lora-targets, --lora-dropout")?,
            ),
        };
        Ok(Spec {
            config,
            checkpoint,
            lora,
            sft_batch: self.batch_size,
            sft_len: self.max_len,
            grad_accum: self.grad_accum,
            prompts: self.prompts_per_step,
            group: self.group_size,
            prompt_len: self.prompt_len,
            new_tokens: self.max_new_tokens,
            micro_batch: self.micro_batch,
            ppo_epochs: self.ppo_epochs,
            beta: self.beta,
        })
    }
}

pub fn run(a: Args) -> Result<()> {
    let (gpu, mem) = device_memory(&a.device)?;
    if a.lora_rank.unwrap_or(0) > 0 && a.lora_dropout > 0.0 && a.checkpoint_activations != Checkpointing::None
    {
        bail!(
            "--lora-dropout {} cannot be combined with --checkpoint-activations {:?}: a recomputed layer would draw another dropout mask (fcgpu train refuses it too)",
            a.lora_dropout,
            a.checkpoint_activations
        );
    }
    let config = model_config(&a.model)?;
    let ck = match a.checkpoint_activations {
        Checkpointing::None => false,
        Checkpointing::Layer => true,
        Checkpointing::Auto => {
            let plain = measure(&a.spec(config.clone(), false)?, Device::Meta, Source::Meta)?;
            plain.grpo().total().max(plain.sft.total()) > usable(mem)
        }
    };
    let spec = a.spec(config, ck)?;
    let plan = measure(&spec, Device::Meta, Source::Meta)?;
    if let Some(on) = &a.measure {
        return measure_against(&spec, &plan, on);
    }
    let best = largest_micro_batches(&spec, mem)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&json(&spec, &plan, gpu, mem, best))?);
    } else {
        print!("{}", table(&spec, &plan, gpu, mem, best));
    }
    Ok(())
}

/// `--measure`: the plan's steps on a real device, compared phase by phase.
fn measure_against(spec: &Spec, plan: &Plan, on: &str) -> Result<()> {
    let device = Device::parse(on).with_context(|| format!("--measure {on}"))?;
    if !matches!(device, Device::Emu | Device::Cuda(_)) {
        bail!("--measure {on}: expected emu, cuda or cuda:N");
    }
    spec.config.check_memory("--measure (a random model of these shapes on the host)")?;
    let dev = device.gpu().with_context(|| format!("--measure {on}"))?;
    let host = crate::model::Model::init_random(spec.config.clone(), 1)?;
    let got = measure(spec, device, Source::Host(&host))?;
    let mut worst: f64 = 0.0;
    for (name, p, m) in [
        ("SFT step", plan.sft, got.sft),
        ("GRPO rollout", plan.rollout, got.rollout),
        ("GRPO update", plan.update, got.update),
    ] {
        let err = (p.total() as f64 - m.total() as f64).abs() / (m.total() as f64).max(1.0);
        worst = worst.max(err);
        println!(
            "{name:<13} plan {:>15} B  measured on {device} {:>15} B  ({:.3}% off)",
            p.total(),
            m.total(),
            err * 100.0
        );
    }
    if let Some(info) = dev.driver().memory_info() {
        let peak = plan.sft.total().max(plan.grpo().total());
        println!(
            "cuMemGetInfo: {} B used of {} B ({} B free)",
            info.total - info.free,
            info.total,
            info.free
        );
        match info.pool_used_high {
            Some(h) => println!(
                "memory pool high-water mark (CU_MEMPOOL_ATTR_USED_MEM_HIGH): {h} B; the plan's largest phase {peak} B ({:+.3}%)",
                (h as f64 - peak as f64) / peak as f64 * 100.0
            ),
            None => println!("memory pool high-water mark: not available (no stream-ordered pools)"),
        }
    }
    if worst > 0.01 {
        bail!("the plan is {:.2}% off the measured peak on {device} (more than 1%)", worst * 100.0);
    }
    println!("plan vs {device}: within 1%: passed");
    Ok(())
}

/// What fcgpu's allocations may use of a GPU's memory: all but an allowance for the CUDA
/// context, cuBLAS's workspace and the pool's rounding.
pub fn usable(mem: u64) -> u64 {
    mem.saturating_sub(CONTEXT_ALLOWANCE)
}

/// Bytes left for the CUDA context, kernels' modules and cuBLAS (an allowance, not counted by
/// the plan; `scripts/gpu-acceptance.sh` compares it with a GPU).
pub const CONTEXT_ALLOWANCE: u64 = 2 * GB;

/// The largest GRPO update micro-batch and SFT batch that fit (`None`: not even 1).
fn largest_micro_batches(spec: &Spec, mem: u64) -> Result<(Option<usize>, Option<usize>)> {
    if mem == u64::MAX {
        return Ok((Some(spec.group * spec.prompts), Some(spec.sft_batch)));
    }
    let grpo = largest(spec.group * spec.prompts, |mb| {
        let s = Spec { micro_batch: mb, ..spec.clone() };
        Ok(measure(&s, Device::Meta, Source::Meta)?.grpo().total() <= usable(mem))
    })?;
    let sft = largest(spec.sft_batch.max(64), |b| {
        let s = Spec { sft_batch: b, ..spec.clone() };
        Ok(measure(&s, Device::Meta, Source::Meta)?.sft.total() <= usable(mem))
    })?;
    Ok((grpo, sft))
}

/// The largest n in 1..=hi with fits(n) (fits is monotone), by bisection.
fn largest(hi: usize, mut fits: impl FnMut(usize) -> Result<bool>) -> Result<Option<usize>> {
    if !fits(1)? {
        return Ok(None);
    }
    let (mut lo, mut hi) = (1, hi.max(1));
    if fits(hi)? {
        return Ok(Some(hi));
    }
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if fits(mid)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(Some(lo))
}

fn gb(b: u64) -> String {
    format!("{:.2}", b as f64 / GB as f64)
}

fn describe(spec: &Spec) -> String {
    let c = &spec.config;
    let mode = match &spec.lora {
        None => "full training".to_string(),
        Some(l) => format!("LoRA r={} on {}", l.rank, l.targets.join(",")),
    };
    format!(
        "{} layers, hidden {}, vocab {}; {mode}; checkpointing {}\nGRPO: {} prompts x {} samples, {}-token prompts, {} new tokens, micro-batch {}, beta {}\nSFT: {} sequences x {} tokens, grad-accum {}",
        c.num_layers,
        c.hidden_size,
        c.vocab_size,
        if spec.checkpoint { "layer" } else { "none" },
        spec.prompts,
        spec.group,
        spec.prompt_len,
        spec.new_tokens,
        spec.micro_batch,
        spec.beta,
        spec.sft_batch,
        spec.sft_len,
        spec.grad_accum
    )
}

/// The plan as a table (GB = 10^9 bytes).
pub fn table(spec: &Spec, plan: &Plan, gpu: &str, mem: u64, best: (Option<usize>, Option<usize>)) -> String {
    let cols: [(&str, Peak); 4] = [
        ("SFT step", plan.sft),
        ("GRPO rollout", plan.rollout),
        ("GRPO update", plan.update),
        ("GRPO step", plan.grpo()),
    ];
    let mut s = format!(
        "{}\n\n| GB | {} |\n|---|{}\n",
        describe(spec),
        cols.map(|c| c.0).join(" | "),
        "---:|".repeat(4)
    );
    for c in Category::ALL {
        let row: Vec<String> = cols.iter().map(|(_, p)| gb(p.of(c))).collect();
        s += &format!("| {} | {} |\n", c.name(), row.join(" | "));
    }
    let totals: Vec<String> = cols.iter().map(|(_, p)| format!("**{}**", gb(p.total()))).collect();
    s += &format!("| **peak** | {} |\n\n", totals.join(" | "));
    if mem != u64::MAX {
        let fits = |p: Peak| if p.total() <= usable(mem) { "fits" } else { "does NOT fit" };
        s += &format!(
            "{gpu} ({} GB usable after a {} GB allowance for the CUDA context): SFT step {}, GRPO step {}\n",
            gb(usable(mem)),
            gb(CONTEXT_ALLOWANCE),
            fits(plan.sft),
            fits(plan.grpo())
        );
        let say = |x: Option<usize>| x.map_or("none (not even 1)".to_string(), |n| n.to_string());
        s += &format!(
            "largest GRPO --micro-batch that fits: {}; largest SFT --batch-size that fits: {}\n",
            say(best.0),
            say(best.1)
        );
    }
    s
}

fn json(
    spec: &Spec,
    plan: &Plan,
    gpu: &str,
    mem: u64,
    best: (Option<usize>, Option<usize>),
) -> serde_json::Value {
    let peak = |p: Peak| {
        let mut m = serde_json::Map::new();
        for c in Category::ALL {
            m.insert(c.name().into(), p.of(c).into());
        }
        m.insert("total".into(), p.total().into());
        serde_json::Value::Object(m)
    };
    serde_json::json!({
        "device": gpu,
        "device_bytes": if mem == u64::MAX { serde_json::Value::Null } else { mem.into() },
        "usable_bytes": if mem == u64::MAX { serde_json::Value::Null } else { usable(mem).into() },
        "checkpoint_activations": spec.checkpoint,
        "lora_rank": spec.lora.as_ref().map(|l| l.rank),
        "sft": peak(plan.sft),
        "grpo_rollout": peak(plan.rollout),
        "grpo_update": peak(plan.update),
        "grpo": peak(plan.grpo()),
        "sft_fits": plan.sft.total() <= usable(mem),
        "grpo_fits": plan.grpo().total() <= usable(mem),
        "largest_grpo_micro_batch": best.0,
        "largest_sft_batch": best.1,
    })
}

/// `fcgpu train` on cuda, before loading anything: the GRPO step's plan against the GPU's
/// memory. A run that does not fit is an error naming the flags that make it fit; `auto`
/// checkpointing is decided here.
pub fn check_fits_grpo(
    cfg: &crate::train::grpo::GrpoConfig,
    model_dir: &Path,
    device: Device,
    prompt_len: usize,
) -> Result<()> {
    on_cuda(device, |total| fits_grpo(cfg, model_dir, prompt_len, total))
}

/// `fcgpu sft` on cuda, before loading anything: one SFT step (`--batch-size` sequences of
/// the longest example) against the GPU's memory, as for train.
pub fn check_fits_sft(cfg: &crate::train::sft::SftConfig, model_dir: &Path, device: Device) -> Result<()> {
    on_cuda(device, |total| fits_sft(cfg, model_dir, total))
}

/// Runs a check against a cuda device's total memory and records `auto`'s decision; other
/// devices (and a driver that cannot tell its memory) are not checked.
fn on_cuda(device: Device, check: impl FnOnce(u64) -> Result<bool>) -> Result<()> {
    let Device::Cuda(_) = device else { return Ok(()) };
    let Some(info) = device.gpu()?.driver().memory_info() else { return Ok(()) };
    super::set_auto_checkpoint(device, check(info.total)?);
    Ok(())
}

/// Whether a GRPO step of `cfg` with `prompt_len`-token prompts fits a GPU of `total` bytes:
/// `Ok(checkpoint)` when it does (`checkpoint`: `auto` chose layer checkpointing), an error
/// naming the flags that would make it fit when it does not.
pub fn fits_grpo(
    cfg: &crate::train::grpo::GrpoConfig,
    model_dir: &Path,
    prompt_len: usize,
    total: u64,
) -> Result<bool> {
    let config = model_config(model_dir)?;
    let spec = |checkpoint: bool, micro_batch: usize| Spec {
        config: config.clone(),
        checkpoint,
        lora: cfg.run.lora.clone(),
        sft_batch: 1,
        sft_len: 2,
        grad_accum: 1,
        prompts: cfg.prompts_per_step,
        group: cfg.group_size,
        prompt_len,
        new_tokens: cfg.max_new_tokens,
        micro_batch,
        ppo_epochs: cfg.ppo_epochs,
        beta: cfg.beta,
    };
    let fit = Fit {
        command: "fcgpu train",
        step: "one GRPO step",
        batch_flag: "--micro-batch",
        batch: cfg.micro_batch,
        asked: cfg.run.checkpoint_activations,
        dropout: cfg.run.lora.as_ref().is_some_and(|l| l.dropout > 0.0),
        otherwise: format!(
            "lower --max-new-tokens, --prompts-per-step x --group-size ({} x {}), or --beta 0 (no reference copy), or train LoRA adapters (--lora-rank)",
            cfg.prompts_per_step, cfg.group_size
        ),
    };
    check_fits(&fit, total, &|ck, mb| Ok(measure(&spec(ck, mb), Device::Meta, Source::Meta)?.grpo().total()))
}

/// [`fits_grpo`] for one SFT step of `cfg` (`--batch-size` sequences of `--max-len` tokens).
pub fn fits_sft(cfg: &crate::train::sft::SftConfig, model_dir: &Path, total: u64) -> Result<bool> {
    let config = model_config(model_dir)?;
    let max_len = cfg.max_len.min(config.max_position_embeddings);
    let spec = |checkpoint: bool, batch: usize| Spec {
        config: config.clone(),
        checkpoint,
        lora: cfg.run.lora.clone(),
        sft_batch: batch,
        sft_len: max_len,
        grad_accum: cfg.grad_accum,
        prompts: 1,
        group: 2,
        prompt_len: 1,
        new_tokens: 1,
        micro_batch: 1,
        ppo_epochs: 1,
        beta: 0.0,
    };
    let fit = Fit {
        command: "fcgpu sft",
        step: "one SFT step",
        batch_flag: "--batch-size",
        batch: cfg.batch_size,
        asked: cfg.run.checkpoint_activations,
        dropout: cfg.run.lora.as_ref().is_some_and(|l| l.dropout > 0.0),
        otherwise: format!("lower --max-len ({max_len}), or train LoRA adapters (--lora-rank)"),
    };
    check_fits(&fit, total, &|ck, b| Ok(measure(&spec(ck, b), Device::Meta, Source::Meta)?.sft.total()))
}

/// What [`check_fits`] checks: a step of `command` with `batch` sequences per micro-batch.
struct Fit {
    command: &'static str,
    step: &'static str,
    batch_flag: &'static str,
    batch: usize,
    asked: Checkpointing,
    /// LoRA dropout: checkpointing cannot be offered (the recompute would draw other masks).
    dropout: bool,
    /// What to try when nothing the check can offer fits.
    otherwise: String,
}

/// The check of [`fits_grpo`] and [`fits_sft`] on a GPU of `total` bytes: `need(checkpoint,
/// batch)` is the plan's peak bytes.
fn check_fits(f: &Fit, total: u64, need: &dyn Fn(bool, usize) -> Result<u64>) -> Result<bool> {
    let ck = f.asked == Checkpointing::Layer;
    let have = usable(total);
    let plain = need(ck, f.batch)?;
    if plain <= have {
        return Ok(ck);
    }
    let can_ck = !f.dropout;
    if f.asked == Checkpointing::Auto && can_ck && need(true, f.batch)? <= have {
        eprintln!("plan: {} GB without checkpointing; --checkpoint-activations auto chose layer", gb(plain));
        return Ok(true);
    }
    let mut fixes = Vec::new();
    if !ck && can_ck && need(true, f.batch)? <= have {
        fixes.push("--checkpoint-activations layer".to_string());
    }
    if let Some(b) = largest(f.batch, |b| Ok(need(ck, b)? <= have))?.filter(|&b| b < f.batch) {
        fixes.push(format!("{} {b}", f.batch_flag));
    }
    if !ck && can_ck {
        if let Some(b) = largest(f.batch, |b| Ok(need(true, b)? <= have))?.filter(|&b| b < f.batch) {
            fixes.push(format!("--checkpoint-activations layer {} {b}", f.batch_flag));
        }
    }
    let ask = if fixes.is_empty() {
        format!("nothing fits at this size: {}; `fcgpu plan` shows the split", f.otherwise)
    } else {
        format!("it fits with {}", fixes.join(", or "))
    };
    bail!(
        "{}: {} needs {} GB of device memory by the plan, and this GPU has {} GB usable ({} GB total); {ask}",
        f.command,
        f.step,
        gb(plain),
        gb(have),
        gb(total)
    )
}
