//! `fcgpu serve`: an OpenAI-compatible server for a model (docs/serve.md).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};

use crate::model::tokenizer::Tokenizer;
use crate::serve::{self, ServeConfig};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Hugging Face model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) for the
    /// model, applied as adapters (not merged).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// 0 picks a free port (printed on stderr).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// cpu, cuda, cuda:N, emu, or auto (cuda when a GPU is usable, else cpu).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Weight and activation dtype on a GPU device: bf16 (default) or f32.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Most samples decoded at once (requests join as slots free up).
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Positions per block of the paged KV cache (docs/serve.md).
    #[arg(long, default_value_t = crate::model::kv_cache::DEFAULT_BLOCK)]
    pub kv_block_size: usize,
    /// Most KV cache positions held at once: running samples and the prefix cache (0: room for
    /// --max-batch samples as long as the context). Requests wait while blocks are short; a
    /// request needing more on its own is answered 400.
    #[arg(long, default_value_t = 0)]
    pub max_batch_tokens: usize,
    /// Positions of recent prompts' KV blocks kept for requests that start the same way
    /// (shared system prompts and tool schemas); 0 turns the prefix cache off.
    #[arg(long, default_value_t = 32768)]
    pub prefix_cache_tokens: usize,
    /// Most requests waiting for a slot; one more is answered 429 (503 while the wait is for
    /// KV blocks), with Retry-After.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// The model name clients send (default: the model directory's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Seconds a client has to send a request's head (on a new connection, or between
    /// keep-alive requests), and then its body; a connection that takes longer is closed.
    #[arg(long, default_value_t = 30.0)]
    pub read_timeout: f64,
    /// Seconds in-flight requests get to finish after SIGTERM or Ctrl-C; connections still open
    /// then are dropped.
    #[arg(long, default_value_t = 30.0)]
    pub shutdown_timeout: f64,
    /// How chat requests become prompts.
    #[arg(long, value_enum, default_value = "template")]
    pub style: ServeStyle,
}

/// `--style` of `fcgpu serve`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ServeStyle {
    /// The model family's chat template (Qwen ChatML with JSON `<tool_call>`s, Llama 3).
    Template,
    /// The embedded task's compact prompt, for models trained by `fcgpu train` / `sft` on it
    /// (the shipped base `assets/fc-tiny` included): one signature line per tool, calls
    /// answered as a Python list.
    Compact,
}

pub fn run(a: Args) -> Result<()> {
    if !a.model.join("tokenizer.json").exists() {
        bail!(
            "fcgpu serve: {} has no tokenizer.json; the server needs the model's tokenizer",
            a.model.display()
        );
    }
    if a.max_queue == 0 {
        bail!("--max-queue must be at least 1");
    }
    let timeouts = serve::conn::Timeouts {
        read: seconds("--read-timeout", a.read_timeout, false)?,
        shutdown: seconds("--shutdown-timeout", a.shutdown_timeout, true)?,
    };
    let device = super::device(&a.device, "serve")?;
    let name = a.served_model_name.clone().unwrap_or_else(|| {
        let dir = a.model.canonicalize().unwrap_or_else(|_| a.model.clone());
        dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
    });
    let cfg = ServeConfig {
        addr: SocketAddr::new(a.host, a.port),
        model_name: name,
        max_batch: a.max_batch,
        max_batch_tokens: a.max_batch_tokens,
        prefix_cache_tokens: a.prefix_cache_tokens,
        max_queue: a.max_queue,
        compact: a.style == ServeStyle::Compact,
        kv_block_size: a.kv_block_size,
        timeouts,
    };
    let (dir, dtype, adapter) = (a.model.clone(), a.dtype.clone(), a.adapter.clone());
    serve::run(cfg, move || {
        let model = super::load_model(&dir, adapter.as_deref(), device, dtype.as_deref())?;
        Ok((model, Tokenizer::load(&dir)?))
    })
}

/// `value` seconds as a duration: finite, positive (or zero where `zero_ok`), at most a day.
fn seconds(flag: &str, value: f64, zero_ok: bool) -> Result<Duration> {
    let ok = value.is_finite() && value <= 86_400.0 && (value > 0.0 || (zero_ok && value == 0.0));
    if !ok {
        let range = if zero_ok { "0 to 86400" } else { "more than 0 and at most 86400" };
        bail!("{flag} must be a number of seconds, {range}; got {value}");
    }
    Ok(Duration::from_secs_f64(value))
}
