//! `fcgpu serve`: an OpenAI-compatible server for a model (docs/serve.md).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::model::tokenizer::Tokenizer;
use crate::serve::{self, ServeConfig};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Hugging Face model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
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
    /// Most requests waiting for a slot; one more is answered 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// The model name clients send (default: the model directory's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
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
    let device = super::device(&a.device, "serve")?;
    let name = a.served_model_name.clone().unwrap_or_else(|| {
        let dir = a.model.canonicalize().unwrap_or_else(|_| a.model.clone());
        dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
    });
    let cfg = ServeConfig {
        addr: SocketAddr::new(a.host, a.port),
        model_name: name,
        max_batch: a.max_batch,
        max_queue: a.max_queue,
        compact: a.style == ServeStyle::Compact,
    };
    let (dir, dtype) = (a.model.clone(), a.dtype.clone());
    serve::run(cfg, move || {
        let model = super::load_model(&dir, device, dtype.as_deref())?;
        Ok((model, Tokenizer::load(&dir)?))
    })
}
