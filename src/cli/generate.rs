//! `fcgpu generate`: sample completions of prompts with a KV cache, G samples per prompt.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;

use crate::jsonl;
use crate::model::tokenizer::{max_line_bytes, max_text_bytes, Tokenizer, TEXT_BYTES_PER_POSITION};
use crate::model::Model;
use crate::rollout::{self, chat::ChatFormat, SamplingConfig};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Hugging Face model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) for the
    /// model, applied as adapters (not merged).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// JSON lines, each {"prompt_ids": [..]}, {"prompt": ".."} or {"messages": [..], "tools": [..]}.
    #[arg(long)]
    pub input: PathBuf,
    /// Samples per prompt (G).
    #[arg(long, default_value_t = 1)]
    pub n: usize,
    /// New tokens per sample at most; below the model's context (default 256, or the context
    /// minus one where that is smaller).
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// 0 = greedy (log-probs and entropies are then reported at T = 1).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep generating through EOS tokens (until --max-new-tokens or a --stop string).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Stop a sample when its text contains this string (repeatable).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// cpu, cuda, cuda:N, emu, or auto (cuda when a GPU is usable, else cpu). On a GPU the KV
    /// cache lives there and the tokens are drawn there (see --host-sampler).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// On a GPU device: download each step's logits and sample on the host with the cpu's
    /// per-sample ChaCha8 streams, so a seed draws the cpu's tokens (up to the device's
    /// rounding; with --dtype f32, token for token on the fixtures). Default: sample on the
    /// device (Philox streams; only tokens, log-probs and entropies come back).
    #[arg(long)]
    pub host_sampler: bool,
    /// Weight and activation dtype on a GPU device: bf16 (default) or f32.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Most sequences decoded at once (finished ones are replaced by waiting prompts).
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Write what the run asked of the device and the KV cache as JSON: on a GPU device each
    /// step's work (`{"prefill": {...}, "prefill_steps": n, "decode_steps": [{"batch",
    /// "launches", "h2d_bytes", "d2h_bytes", "syncs", "allocs"}, ...]}`), and on every device
    /// `"kv"`: prompt tokens prefilled against prefilling every sample, and KV blocks held at the
    /// peak against holding them unshared (docs/performance.md).
    #[arg(long)]
    pub counters: Option<PathBuf>,
    /// Positions per block of the paged KV cache.
    #[arg(long, default_value_t = crate::model::kv_cache::DEFAULT_BLOCK)]
    pub kv_block_size: usize,
    /// Most positions the KV cache holds at once (0: no cap). Sequences are admitted while
    /// blocks remain; when they run out, the latest admitted is preempted and recomputed later,
    /// so memory, not the longest possible completion, sets the batch (docs/performance.md).
    #[arg(long, default_value_t = 0)]
    pub max_batch_tokens: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    prompt_ids: Option<Vec<u32>>,
    prompt: Option<String>,
    messages: Option<Vec<Value>>,
    tools: Option<Vec<Value>>,
}

#[derive(serde::Serialize)]
struct Out<'a> {
    index: usize,
    sample: usize,
    new_ids: &'a [u32],
    text: Option<String>,
    logprobs: &'a [f32],
    entropy: &'a [f32],
    finish_reason: rollout::FinishReason,
}

/// Token ids of every input line. Lines are read with a cap on their length, and a text is
/// refused before tokenizing when it has more bytes than the context could hold
/// (`tokenizer::max_text_bytes`, as `logprobs` does), so neither a huge line nor an endless
/// file (`/dev/zero`) is read or tokenized whole.
pub fn prompts(path: &Path, model: &Model, tok: Option<&Tokenizer>) -> Result<Vec<Vec<u32>>> {
    let ctx = model.config.max_position_embeddings;
    let (max_text, max_line) = (max_text_bytes(ctx), max_line_bytes(ctx));
    let lines: Vec<(usize, Line)> = jsonl::read_numbered(path, max_line).with_context(|| {
        format!(
            "reading {} (lines are limited to {max_line} bytes for the model's context of {ctx} tokens)",
            path.display()
        )
    })?;
    let need_tok =
        || tok.with_context(|| format!("{}: text prompts need the model's tokenizer.json", path.display()));
    let fits = |text: &str, at: &dyn Fn() -> String| {
        if text.len() > max_text {
            bail!("{}: a prompt of {} bytes of text is too long for the model's context of {ctx} tokens (limit {max_text} bytes, {TEXT_BYTES_PER_POSITION} per position); it was not tokenized", at(), text.len());
        }
        Ok(())
    };
    let mut format = None;
    let mut out = Vec::with_capacity(lines.len());
    for (n, l) in lines {
        let at = || format!("{}:{n}", path.display());
        let ids = match (l.prompt_ids, l.prompt, l.messages) {
            (Some(ids), None, None) if l.tools.is_none() => ids,
            (None, Some(text), None) if l.tools.is_none() => {
                fits(&text, &at)?;
                need_tok()?.encode(&text, true).with_context(at)?
            }
            (None, None, Some(messages)) => {
                let f = match format.take() {
                    Some(f) => f,
                    None => ChatFormat::for_model(model).with_context(at)?,
                };
                let text = f.render(&messages, l.tools.as_deref()).with_context(at)?;
                format = Some(f);
                fits(&text, &at)?;
                need_tok()?.encode(&text, false).with_context(at)?
            }
            _ => bail!("{}: give exactly one of `prompt_ids`, `prompt` and `messages` (`tools` only with `messages`)", at()),
        };
        if ids.is_empty() {
            bail!("{}: the prompt has no tokens", at());
        }
        model.config.check_ids(&ids).with_context(at)?;
        out.push(ids);
    }
    Ok(out)
}

/// An empty stop string is contained in every text, so it would end each sample after its
/// first token: refuse it.
fn check_stops(stop: &[String]) -> Result<()> {
    if let Some(i) = stop.iter().position(|s| s.is_empty()) {
        bail!("--stop: the stop string number {} is empty; an empty string would stop every sample after one token", i + 1);
    }
    Ok(())
}

/// `--max-new-tokens` within the context: a sample has at least one prompt token, so it can
/// never have more than `ctx - 1` new ones, and a larger number would only size buffers.
fn max_new_tokens(given: Option<usize>, ctx: usize) -> Result<usize> {
    let Some(max_new) = given else { return Ok(256.min(ctx.saturating_sub(1))) };
    if max_new >= ctx {
        bail!("--max-new-tokens {max_new} does not fit the model's context of {ctx} tokens (max_position_embeddings): a sample can have at most {} new tokens after a one-token prompt", ctx - 1);
    }
    Ok(max_new)
}

/// Bytes one running sample may hold at most: keys and values for each of its new positions
/// (f32 on the cpu; a GPU's bf16 needs half), its new ids, log-probs and entropies (12 bytes a
/// token), and a row of logits with the sampler's probabilities.
fn sample_bytes(model: &Model, max_new: usize) -> u128 {
    let c = &model.config;
    let kv_per_position = 2 * c.num_layers as u128 * c.num_kv_heads as u128 * c.head_dim as u128 * 4;
    max_new as u128 * (kv_per_position + 12) + c.vocab_size as u128 * 8
}

/// This machine's physical memory in bytes (None where the OS does not say).
fn physical_memory() -> Option<u128> {
    // SAFETY: sysconf only reads system constants.
    let (pages, size) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    (pages > 0 && size > 0).then(|| pages as u128 * size as u128)
}

/// `--n`: the `n` samples of a prompt run in one batch (a prompt group is admitted whole), so
/// together they must fit this machine's memory at their longest.
fn check_n(n: usize, max_new: usize, model: &Model) -> Result<()> {
    if n == 0 {
        bail!("--n must be at least 1 (samples per prompt)");
    }
    let need = sample_bytes(model, max_new).saturating_mul(n as u128);
    if let Some(have) = physical_memory().filter(|&have| need > have) {
        let gib = |b: u128| b as f64 / (1u64 << 30) as f64;
        bail!(
            "--n {n} with --max-new-tokens {max_new}: the {n} samples of a prompt run together and may need up to {:.1} GiB (keys and values, logits, outputs), more than this machine's {:.1} GiB of memory; lower --n or --max-new-tokens",
            gib(need),
            gib(have)
        );
    }
    Ok(())
}

pub fn run(a: Args) -> Result<()> {
    check_stops(&a.stop)?;
    let device = super::device(&a.device, "generate")?;
    let mut model = super::load_model(&a.model, a.adapter.as_deref(), device, a.dtype.as_deref())?;
    let max_new = max_new_tokens(a.max_new_tokens, model.config.max_position_embeddings)?;
    check_n(a.n, max_new, &model)?;
    let tok = if a.model.join("tokenizer.json").exists() { Some(Tokenizer::load(&a.model)?) } else { None };
    if !a.stop.is_empty() && tok.is_none() {
        bail!("--stop needs the model's tokenizer.json in {}", a.model.display());
    }
    let prompts = prompts(&a.input, &model, tok.as_ref())?;
    model.config.eos_token_ids = rollout::chat_eos_ids(&model, tok.as_ref());
    let cfg = SamplingConfig {
        n: a.n,
        max_new_tokens: max_new,
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        seed: a.seed,
        stop_ids: vec![],
        stop_strings: a.stop.clone(),
        ignore_eos: a.ignore_eos,
        max_batch: a.batch_size.max(1),
        progress: true,
        host_sampler: a.host_sampler,
        decode_graphs: None,
        kv_block_size: a.kv_block_size,
        max_batch_tokens: a.max_batch_tokens,
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    // Chunks of prompts so output streams; RNG streams follow global prompt numbers, so the
    // chunking does not change what is sampled.
    let chunk = (a.batch_size.max(1) * 4).div_ceil(a.n.max(1)).max(1);
    let mut log = rollout::StepCounts::default();
    for (c, ps) in prompts.chunks(chunk).enumerate() {
        let counted = a.counters.is_some().then_some(&mut log);
        for comp in rollout::generate_counted(&model, ps, c * chunk, &cfg, tok.as_ref(), counted)? {
            let text = tok.as_ref().map(|t| comp.text(t)).transpose()?;
            let o = Out {
                index: comp.prompt_index,
                sample: comp.sample_index,
                new_ids: &comp.new_ids,
                text,
                logprobs: &comp.logprobs,
                entropy: &comp.entropy,
                finish_reason: comp.finish_reason,
            };
            serde_json::to_writer(&mut out, &o)?;
            out.write_all(b"\n")?;
        }
        out.flush()?;
    }
    if let Some(p) = &a.counters {
        crate::runfs::write_atomic(p, &serde_json::to_vec_pretty(&log)?)?;
    }
    Ok(())
}
