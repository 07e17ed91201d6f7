//! Command-line interface: one file per subcommand, each with its `Args` and `run`.

use clap::{Parser, Subcommand};

pub mod eval;
pub mod init;
pub mod generate;
pub mod kernels;
pub mod logprobs;
pub mod prompt;
pub mod run_args;
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
    /// Print the exact prompt text for a BFCL entry.
    Prompt(prompt::Args),
    /// Score model answers (or a model) per BFCL category.
    Eval(eval::Args),
    /// GPU kernels: `kernels check` compiles each with NVRTC and reports registers/spills.
    Kernels(kernels::Args),
    /// GRPO with entropy-enhanced advantages (default: the embedded task end to end).
    Train(train::Args),
    /// Supervised fine-tuning with SRML (default: the tiny model on the embedded task).
    Sft(sft::Args),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Logprobs(a) => logprobs::run(a),
        Command::Init(a) => init::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Prompt(a) => prompt::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Kernels(a) => kernels::run(a),
        Command::Sft(a) => sft::run(a),
        Command::Train(a) => train::run(a),
    }
}

/// The devices the model commands accept today: `cpu`, and `auto` (which picks the CPU until the
/// model runs on the GPU devices). Anything else is a clear error naming the command.
pub(crate) fn require_cpu(device: &str, command: &str) -> anyhow::Result<()> {
    match device {
        "cpu" | "auto" => Ok(()),
        other => anyhow::bail!("--device {other}: `{command}` runs on the cpu in this build (cpu, auto)"),
    }
}
