//! `fcgpu logprobs`: per-token log-probabilities and entropies of sequences under a model.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::model::{tokenizer::Tokenizer, Batch, Model};
use crate::{autograd, jsonl};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Hugging Face model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) for the
    /// model, applied as adapters (not merged).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// JSON lines, each {"input_ids": [..]} or {"text": ".."}.
    #[arg(long)]
    pub input: PathBuf,
    /// cpu, cuda, cuda:N, emu, or auto (cuda when a GPU is usable, else cpu).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Weight and activation dtype on a GPU device: bf16 (default) or f32 (closer to the cpu;
    /// attention still runs in bf16). The cpu computes in f32.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// On a GPU device (cuda, emu): write what each batch's forward pass asked of the device
    /// (kernel launches, bytes each way, synchronisations, allocations) as JSON:
    /// `{"batches": [{"sequences", "tokens", "launches", "h2d_bytes", "d2h_bytes", "syncs", "allocs"}, ...]}`.
    #[arg(long)]
    pub counters: Option<std::path::PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    input_ids: Option<Vec<u32>>,
    text: Option<String>,
}

#[derive(serde::Serialize)]
struct Out<'a> {
    logprobs: &'a [f32],
    entropy: &'a [f32],
}

fn sequences(path: &Path, model: &Model) -> Result<Vec<Vec<u32>>> {
    let ctx = model.config.max_position_embeddings;
    let max_text = crate::model::tokenizer::max_text_bytes(ctx);
    // A line of ids needs at most ~11 bytes per id; anything longer cannot fit the context.
    let max_line = crate::model::tokenizer::max_line_bytes(ctx);
    let lines: Vec<(usize, Line)> = jsonl::read_numbered(path, max_line).with_context(|| {
        format!(
            "reading {} (lines are limited to {max_line} bytes for the model's context of {ctx} tokens)",
            path.display()
        )
    })?;
    let mut tok: Option<Tokenizer> = None;
    let mut out = Vec::with_capacity(lines.len());
    for (n, l) in lines {
        let at = || format!("{}:{n}", path.display());
        let ids = match (l.input_ids, l.text) {
            (Some(ids), None) => ids,
            (None, Some(text)) => {
                if text.len() > max_text {
                    bail!("{}: text of {} bytes is too long for the model's context of {ctx} tokens (limit {max_text} bytes)", at(), text.len());
                }
                if tok.is_none() {
                    let dir = model.dir.as_deref().unwrap_or(Path::new("."));
                    tok = Some(Tokenizer::load(dir).with_context(|| format!("{}: has text", at()))?);
                }
                tok.as_ref().unwrap().encode(&text, true).with_context(at)?
            }
            _ => bail!("{}: give exactly one of `input_ids` and `text`", at()),
        };
        model.config.check_ids(&ids).with_context(at)?;
        if ids.len() > ctx {
            bail!(
                "{}: {} tokens exceed the model's context (max_position_embeddings = {ctx})",
                at(),
                ids.len()
            );
        }
        out.push(ids);
    }
    Ok(out)
}

pub fn run(a: Args) -> Result<()> {
    let device = super::device(&a.device, "logprobs")?;
    if a.counters.is_some() && !device.is_gpu() {
        bail!("--counters counts what a GPU device is asked to do; --device {device} is not one (use cuda or emu)");
    }
    let model = super::load_model(&a.model, a.adapter.as_deref(), device, a.dtype.as_deref())?;
    let seqs = sequences(&a.input, &model)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let (gpu, mut batches) = (device.gpu().ok(), Vec::new());
    for chunk in seqs.chunks(a.batch_size.max(1)) {
        let batch = Batch::from_sequences(chunk);
        let c0 = gpu.as_ref().map(|d| d.counts());
        let lp = autograd::no_grad(|| model.token_logprobs(&batch, 1.0))?;
        let v = lp.host_f32()?;
        if let (Some(d), Some(c0)) = (&gpu, c0) {
            let mut e = serde_json::to_value(d.counts() - c0)?;
            e["sequences"] = chunk.len().into();
            e["tokens"] = batch.ids.len().into();
            batches.push(e);
        }
        let n = batch.ids.len();
        for &(s, l) in &batch.seqs {
            let m = l.saturating_sub(1);
            serde_json::to_writer(&mut out, &Out { logprobs: &v[s..s + m], entropy: &v[n + s..n + s + m] })?;
            out.write_all(b"\n")?;
        }
        out.flush()?;
    }
    if let Some(p) = &a.counters {
        crate::runfs::write_atomic(p, &serde_json::to_vec_pretty(&serde_json::json!({"batches": batches}))?)?;
    }
    Ok(())
}
