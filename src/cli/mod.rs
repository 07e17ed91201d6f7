//! Command-line interface: one file per subcommand, each with its `Args` and `run`.

use clap::{Parser, Subcommand};

use crate::model::Model;
use crate::tensor::Device;

pub mod convert;
pub mod data;
pub mod doctor;
mod doctor_kernels;
pub mod eval;
pub mod generate;
pub mod init;
pub mod kernels;
pub mod logprobs;
pub mod merge;
pub mod prompt;
pub mod run_args;
pub mod serve;
pub mod sft;
pub mod train;

#[derive(Parser, Debug)]
#[command(name = "fcgpu", version, about = "Train language models to call functions reliably")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Per-token log-probabilities and entropies of sequences under a model.
    Logprobs(logprobs::Args),
    /// Write a randomly initialised model from a config.json.
    Init(init::Args),
    /// Sample completions of prompts (KV-cache decoding, G samples per prompt).
    Generate(generate::Args),
    /// Print the exact prompt (text or token ids) for a BFCL entry or a conversation.
    Prompt(prompt::Args),
    /// Score model answers (or a model) per BFCL category.
    Eval(eval::Args),
    /// GPU kernels: `kernels check` compiles each with NVRTC and reports registers/spills.
    Kernels(kernels::Args),
    /// Check a GPU device: versions, kernel compiles, every kernel family against the CPU, speed.
    Doctor(doctor::Args),
    /// GRPO with entropy-enhanced advantages (default: the embedded task end to end).
    Train(train::Args),
    /// Supervised fine-tuning with SRML (default: the tiny model on the embedded task).
    Sft(sft::Args),
    /// An OpenAI-compatible HTTP server for a model (chat, tool calls, streaming).
    Serve(serve::Args),
    /// Data preparation: `data prepare` refines a data set (LLM judge, AST validation).
    Data(data::Args),
    /// Convert a GGUF file (llama.cpp) to a Hugging Face model directory.
    Convert(convert::Args),
    /// Fold a LoRA adapter into its base: a plain model directory.
    Merge(merge::Args),
    /// Peak device memory of one SFT step and one GRPO step, by what it holds; whether it fits.
    Plan(crate::plan::cli::Args),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Logprobs(a) => logprobs::run(a),
        Command::Init(a) => init::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Prompt(a) => prompt::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Kernels(a) => kernels::run(a),
        Command::Doctor(a) => doctor::run(a),
        Command::Sft(a) => sft::run(a),
        Command::Train(a) => train::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Data(a) => data::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Plan(a) => crate::plan::cli::run(a),
    }
}

/// `--device` of the model commands: `cpu`, `cuda`, `cuda:N`, `emu`, or `auto` (empty = auto):
/// cuda when the driver, NVRTC, cuBLAS and a GPU are all present, else cpu. A GPU device that
/// cannot be opened is a clear error naming the command, before any work.
pub(crate) fn device(arg: &str, command: &str) -> anyhow::Result<Device> {
    Device::for_command(arg, command)
}

/// The model in `dir` on `device` ([`Model::load_on`]), with the PEFT adapter in `adapter` on it.
pub(crate) fn load_model(
    dir: &std::path::Path,
    adapter: Option<&std::path::Path>,
    device: Device,
    dtype: Option<&str>,
) -> anyhow::Result<Model> {
    Model::load_on_with_adapter(dir, adapter, device, dtype)
}
