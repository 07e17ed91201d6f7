//! Options shared by the training commands (`sft`, `train`).

use std::path::PathBuf;

#[derive(clap::Args, Debug, Default, Clone)]
pub struct RunArgs {
    /// TOML config (the fields of config.toml); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Model directory (HF layout). Default: the embedded tiny model, built in the run directory.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Training data (fcgpu or xLAM JSONL). Default: the embedded synthetic task.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Held-out data (same formats).
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Run directory (default runs/<command>).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    #[arg(long)]
    pub steps: Option<u64>,
    #[arg(long)]
    pub lr: Option<f32>,
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    #[arg(long)]
    pub max_grad_norm: Option<f32>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Checkpoint every N steps (0: only at the end).
    #[arg(long)]
    pub save_every: Option<u64>,
    /// Tiny model size when building the embedded default: tiny, small (2x compute) or micro.
    #[arg(long)]
    pub preset: Option<String>,
    /// Training samples of the embedded task.
    #[arg(long)]
    pub task_train: Option<usize>,
    /// Embedded default's starting model: fc-tiny (the shipped base checkpoint) or scratch (a
    /// fresh tiny model built from --preset).
    #[arg(long)]
    pub base: Option<String>,
    /// Held-out examples scored at the end (0: skip).
    #[arg(long)]
    pub eval_samples: Option<usize>,
    /// On a GPU device (cuda, emu): append each step's device work by phase (kernel launches,
    /// bytes each way, synchronisations, allocations) to this file as JSON lines.
    #[arg(long)]
    pub counters: Option<PathBuf>,
    /// Metrics besides metrics.jsonl: jsonl (only it) or tensorboard (also TensorBoard event
    /// files in the run directory: every per-step metric, histograms, held-out evals).
    #[arg(long, value_enum)]
    pub log: Option<crate::train::metrics::LogFormat>,
    /// Continue from the latest checkpoint in the run directory.
    #[arg(long)]
    pub resume: bool,
    /// With --resume: continue even though the config differs from the one the run started with
    /// or the one its checkpoint recorded (seed, group size, ...; the differences are printed).
    /// Without --resume: start a new run in a run directory that holds an earlier one, deleting
    /// that run first (only a run's own files: a directory holding others is refused).
    #[arg(long)]
    pub force: bool,
    /// Print the resolved config (defaults, file, flags) as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// cpu, cuda, cuda:N, emu, or auto (cuda when a GPU is usable, else cpu). On a GPU: bf16
    /// weights and activations, f32 master weights and AdamW state on the device.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Train LoRA adapters of this rank instead of every weight (the base stays frozen).
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// LoRA alpha: the adapters' output is scaled by alpha/rank (default: the rank).
    #[arg(long)]
    pub lora_alpha: Option<f32>,
    /// Dropout on the adapters' input in training forwards (default 0).
    #[arg(long)]
    pub lora_dropout: Option<f32>,
    /// Projections that get adapters, comma-separated (default all seven:
    /// q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj).
    #[arg(long)]
    pub lora_targets: Option<String>,
    /// Activation checkpointing: none, layer (keep only each layer's input, recompute the rest
    /// in the backward pass), auto (layer when the memory plan says the run needs it).
    #[arg(long, value_enum)]
    pub checkpoint_activations: Option<crate::model::checkpoint::Checkpointing>,
}

impl RunArgs {
    /// How the run starts: `--resume`, `--force`.
    pub fn start(&self) -> crate::train::checkpoint::Start {
        crate::train::checkpoint::Start { resume: self.resume, force: self.force }
    }
}

impl RunArgs {
    /// Lays the `--lora-*` flags over the run's LoRA config (from a config file or none):
    /// `--lora-rank` turns LoRA on; the other flags without a rank (given or from the file) are
    /// an error, not ignored.
    pub fn apply_lora(&self, c: &mut crate::train::run_config::RunConfig) -> anyhow::Result<()> {
        use crate::model::lora::LoraConfig;
        let others = self.lora_alpha.is_some() || self.lora_dropout.is_some() || self.lora_targets.is_some();
        let mut l = match (c.lora.take(), self.lora_rank) {
            (Some(l), _) => l,
            (None, Some(r)) => LoraConfig::new(r, r as f32, 0.0, "all-linear")?,
            (None, None) if others => {
                anyhow::bail!("--lora-alpha, --lora-dropout and --lora-targets need --lora-rank")
            }
            (None, None) => return Ok(()),
        };
        set_given(&mut l.rank, &self.lora_rank);
        set_given(&mut l.alpha, &self.lora_alpha);
        set_given(&mut l.dropout, &self.lora_dropout);
        if let Some(t) = &self.lora_targets {
            l.targets = LoraConfig::new(1, 1.0, 0.0, t)?.targets;
        }
        l.validate()?;
        c.lora = Some(l);
        Ok(())
    }

    /// Lays the given flags over the `[run]` options `c` (defaults and config file).
    pub fn apply(&self, c: &mut crate::train::run_config::RunConfig) {
        for (dst, src) in
            [(&mut c.model, &self.model), (&mut c.data, &self.data), (&mut c.eval_data, &self.eval_data)]
        {
            if src.is_some() {
                dst.clone_from(src);
            }
        }
        set_given(&mut c.run_dir, &self.run_dir);
        set_given(&mut c.steps, &self.steps);
        set_given(&mut c.lr, &self.lr);
        set_given(&mut c.warmup_steps, &self.warmup_steps);
        set_given(&mut c.max_grad_norm, &self.max_grad_norm);
        set_given(&mut c.seed, &self.seed);
        set_given(&mut c.save_every, &self.save_every);
        set_given(&mut c.eval_samples, &self.eval_samples);
        c.counters = self.counters.clone();
        set_given(&mut c.log, &self.log);
        set_given(&mut c.preset, &self.preset);
        set_given(&mut c.task_train, &self.task_train);
        set_given(&mut c.base, &self.base);
        set_given(&mut c.checkpoint_activations, &self.checkpoint_activations);
    }
}

/// `*dst = flag` when the flag was given.
pub fn set_given<T: Clone>(dst: &mut T, flag: &Option<T>) {
    if let Some(v) = flag {
        *dst = v.clone();
    }
}

/// `*dst = Some(flag)` when the flag was given (for options a run resolves when unset).
pub fn set_some<T: Copy>(dst: &mut Option<T>, flag: Option<T>) {
    if flag.is_some() {
        *dst = flag;
    }
}

/// Lays a command's own flags (`Option` fields of `$args` named like fields of `$cfg`) over
/// `$cfg`.
macro_rules! apply_flags {
    ($cfg:expr, $args:expr; $($f:ident),*) => {{
        $( $crate::cli::run_args::set_given(&mut $cfg.$f, &$args.$f); )*
    }};
}
pub(crate) use apply_flags;
