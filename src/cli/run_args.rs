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
    /// Training samples of the embedded task (default 4000).
    #[arg(long)]
    pub task_train: Option<usize>,
    /// Held-out examples scored at the end (0: skip).
    #[arg(long)]
    pub eval_samples: Option<usize>,
    /// Continue from the latest checkpoint in the run directory.
    #[arg(long)]
    pub resume: bool,
    /// With --resume: continue even though the config differs from the one the run started with
    /// (seed, group size, ...; the differences are printed).
    #[arg(long, requires = "resume")]
    pub force: bool,
    /// Print the resolved config (defaults, file, flags) as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// cpu, cuda, cuda:N, emu, or auto (cuda when a GPU is usable, else cpu). On a GPU: bf16
    /// weights and activations, f32 master weights and AdamW state on the device.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

impl RunArgs {
    /// How the run starts: `--resume`, `--force`.
    pub fn start(&self) -> crate::train::checkpoint::Start {
        crate::train::checkpoint::Start { resume: self.resume, force: self.force }
    }
}

/// Copies the given flags of `args` (a `RunArgs`) and then of `extra` (more `Option` fields of
/// the command's own args with the same names) onto the config `cfg`.
macro_rules! apply_args {
    ($cfg:expr, $run:expr, $extra:expr; $($f:ident),*) => {{
        let (c, r) = (&mut $cfg, &$run);
        for (dst, src) in [(&mut c.model, &r.model), (&mut c.data, &r.data), (&mut c.eval_data, &r.eval_data)] {
            if src.is_some() {
                *dst = src.clone();
            }
        }
        if let Some(v) = r.run_dir.clone() { c.run_dir = v; }
        if let Some(v) = r.steps { c.steps = v; }
        if let Some(v) = r.lr { c.lr = v; }
        if let Some(v) = r.warmup_steps { c.warmup_steps = v; }
        if let Some(v) = r.max_grad_norm { c.max_grad_norm = v; }
        if let Some(v) = r.seed { c.seed = v; }
        if let Some(v) = r.save_every { c.save_every = v; }
        if let Some(v) = r.eval_samples { c.eval_samples = v; }
        if let Some(v) = r.preset.clone() { c.preset = v; }
        if let Some(v) = r.task_train { c.task_train = v; }
        $( if let Some(v) = $extra.$f.clone() { c.$f = v; } )*
    }};
}
pub(crate) use apply_args;
