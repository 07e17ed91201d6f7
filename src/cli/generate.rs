//! `fcgpu generate`: sample completions of prompts with a KV cache, G samples per prompt.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;

use crate::jsonl;
use crate::model::{tokenizer::Tokenizer, Model};
use crate::rollout::{self, chat::ChatFormat, SamplingConfig};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Hugging Face model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// JSON lines, each {"prompt_ids": [..]}, {"prompt": ".."} or {"messages": [..], "tools": [..]}.
    #[arg(long)]
    pub input: PathBuf,
    /// Samples per prompt (G).
    #[arg(long, default_value_t = 1)]
    pub n: usize,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
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
    /// On a GPU device: write what each step asked of the device (kernel launches, bytes each
    /// way, synchronisations, allocations) as JSON: `{"prefill": {...}, "prefill_steps": n,
    /// "decode_steps": [{"batch", "launches", "h2d_bytes", "d2h_bytes", "syncs", "allocs"}, ...]}`.
    #[arg(long)]
    pub counters: Option<PathBuf>,
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

/// Token ids of every input line.
pub fn prompts(path: &Path, model: &Model, tok: Option<&Tokenizer>) -> Result<Vec<Vec<u32>>> {
    let lines: Vec<Line> = jsonl::read(path)?;
    let need_tok =
        || tok.with_context(|| format!("{}: text prompts need the model's tokenizer.json", path.display()));
    let mut format = None;
    let mut out = Vec::with_capacity(lines.len());
    for (i, l) in lines.into_iter().enumerate() {
        let at = || format!("{}: entry {}", path.display(), i + 1);
        let ids = match (l.prompt_ids, l.prompt, l.messages) {
            (Some(ids), None, None) if l.tools.is_none() => ids,
            (None, Some(text), None) if l.tools.is_none() => need_tok()?.encode(&text, true).with_context(at)?,
            (None, None, Some(messages)) => {
                let f = match format.take() {
                    Some(f) => f,
                    None => ChatFormat::for_model(model).with_context(at)?,
                };
                let text = f.render(&messages, l.tools.as_deref()).with_context(at)?;
                format = Some(f);
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

pub fn run(a: Args) -> Result<()> {
    check_stops(&a.stop)?;
    let device = super::device(&a.device, "generate")?;
    if a.counters.is_some() && !device.is_gpu() {
        bail!("--counters counts what a GPU device is asked to do; --device {device} is not one (use cuda or emu)");
    }
    let mut model = super::load_model(&a.model, device, a.dtype.as_deref())?;
    let tok = if a.model.join("tokenizer.json").exists() { Some(Tokenizer::load(&a.model)?) } else { None };
    if !a.stop.is_empty() && tok.is_none() {
        bail!("--stop needs the model's tokenizer.json in {}", a.model.display());
    }
    let prompts = prompts(&a.input, &model, tok.as_ref())?;
    model.config.eos_token_ids = rollout::chat_eos_ids(&model, tok.as_ref());
    let cfg = SamplingConfig {
        n: a.n,
        max_new_tokens: a.max_new_tokens,
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
