//! The options every training command shares (`[run]` in a config file): model, data, run
//! directory, optimizer, schedule, seed, checkpointing and the embedded default's size; and how
//! config files are read: a file's values are laid over the command's defaults, table by
//! table, so a `[run]` table may name only the fields it changes.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Model directory (HF layout). None: the embedded tiny model, built in the run directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<PathBuf>,
    /// Training data (fcgpu / xLAM JSONL; `train` also takes a BFCL question file). None: the
    /// embedded synthetic task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<PathBuf>,
    /// Held-out data. None: the task's eval split, or the last `eval_fraction` of `data`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_data: Option<PathBuf>,
    pub run_dir: PathBuf,
    pub steps: u64,
    pub lr: f32,
    pub warmup_steps: u64,
    /// The cosine schedule ends at `min_lr_ratio · lr`.
    pub min_lr_ratio: f32,
    pub weight_decay: f32,
    pub max_grad_norm: f32,
    pub seed: u64,
    /// Checkpoint every N steps (0: only at the end).
    pub save_every: u64,
    /// Held-out examples scored (greedy) at the end, and for `train` also before (0: skip).
    pub eval_samples: usize,
    /// Embedded default: model size (tiny, small, micro).
    pub preset: String,
    /// Embedded default: training and held-out samples of the synthetic task.
    pub task_train: usize,
    pub task_eval: usize,
    /// Embedded default: size of the byte-level BPE tokenizer trained on the task.
    pub vocab_size: usize,
    /// Embedded default: copy pre-training steps of a freshly built model (random token
    /// strings shown twice, loss on the second copy) before it is saved. 0 skips it.
    pub copy_warmup_steps: u64,
    /// Embedded default: start the tiny model with a previous-token and an induction head
    /// (`train::copy_heads`), so it can copy values from the request.
    pub copy_heads: bool,
    /// Embedded default: what the model starts from: `fc-tiny`, the shipped base checkpoint
    /// (`train::base`), or `scratch`, a fresh tiny model built from `preset`, `vocab_size` and
    /// `copy_heads`.
    pub base: String,
    /// LoRA adapters (`--lora-rank` ...): only they train, the base stays frozen. None: full
    /// fine-tuning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<crate::model::lora::LoraConfig>,
    /// On a GPU device: each step's device work by phase (`backend::counters`), one JSON line
    /// per step appended to this file (`--counters`). An output, not a setting: not saved in
    /// config.toml, not compared on resume.
    #[serde(skip)]
    pub counters: Option<PathBuf>,
    /// Where metrics go besides metrics.jsonl (`--log`). An output like `counters`.
    #[serde(skip)]
    pub log: crate::train::metrics::LogFormat,
    /// Recompute each layer's forward in the backward pass (`--checkpoint-activations`).
    #[serde(default)]
    pub checkpoint_activations: crate::model::checkpoint::Checkpointing,
}

impl RunConfig {
    /// `fcgpu sft`'s defaults.
    pub fn sft() -> Self {
        RunConfig {
            run_dir: PathBuf::from("runs/sft"),
            steps: 200,
            lr: 3e-3,
            warmup_steps: 10,
            weight_decay: 0.01,
            save_every: 100,
            eval_samples: 200,
            base: crate::train::base::SCRATCH.into(),
            ..Self::common()
        }
    }

    /// `fcgpu train`'s defaults.
    pub fn grpo() -> Self {
        RunConfig {
            run_dir: PathBuf::from("runs/train"),
            steps: 100,
            lr: 3e-4,
            warmup_steps: 2,
            weight_decay: 0.0,
            save_every: 50,
            eval_samples: 200,
            base: crate::train::base::SHIPPED.into(),
            ..Self::common()
        }
    }

    fn common() -> Self {
        RunConfig {
            model: None,
            data: None,
            eval_data: None,
            run_dir: PathBuf::from("runs"),
            steps: 0,
            lr: 0.0,
            warmup_steps: 0,
            min_lr_ratio: 0.1,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            seed: 0,
            save_every: 0,
            eval_samples: 0,
            preset: "tiny".into(),
            task_train: 20000,
            task_eval: 200,
            vocab_size: 512,
            copy_warmup_steps: 0,
            copy_heads: true,
            base: crate::train::base::SCRATCH.into(),
            lora: None,
            counters: None,
            log: Default::default(),
            checkpoint_activations: Default::default(),
        }
    }

    /// Range checks of the numeric options every training command shares: learning rate,
    /// schedule, weight decay, clipping and the embedded default's sizes. A config file and
    /// the flags go through the same check, whose error names the field and its flag.
    pub fn validate(&self) -> Result<()> {
        check::in_range("lr", self.lr, 0.0, false, MAX_LR)?;
        check::in_range("min_lr_ratio", self.min_lr_ratio, 0.0, true, 1.0)?;
        check::in_range("weight_decay", self.weight_decay, 0.0, true, 1.0)?;
        // 0 would silently mean "no clipping"; a norm is a positive number.
        check::in_range("max_grad_norm", self.max_grad_norm, 0.0, false, f32::MAX)?;
        check::count("vocab_size", self.vocab_size, 1, MAX_VOCAB)?;
        if let Some(l) = &self.lora {
            l.validate()?;
            // A recomputed layer would draw a fresh dropout mask, so its gradient would not be
            // the gradient of the forward that made the loss.
            anyhow::ensure!(
                l.dropout == 0.0
                    || self.checkpoint_activations == crate::model::checkpoint::Checkpointing::None,
                "--lora-dropout {} cannot be combined with --checkpoint-activations {:?}: a recomputed \
                 layer would draw another dropout mask; use --lora-dropout 0 or --checkpoint-activations none",
                l.dropout,
                self.checkpoint_activations
            );
        }
        Ok(())
    }

    /// True when the run builds the embedded default model (no `model` given).
    pub fn embedded_model(&self) -> bool {
        self.model.is_none()
    }
}

/// Largest learning rate accepted: AdamW's step is about `lr` per weight, and weights are of
/// order 0.02 to 1; above 1 a step overwrites them.
pub const MAX_LR: f32 = 1.0;
/// Largest vocabulary of the embedded default's tokenizer.
pub const MAX_VOCAB: usize = 1 << 20;

/// The checks that every config's `validate` is written with: an error names the field as
/// the config file spells it and as a flag (`max_grad_norm` (--max-grad-norm)).
pub mod check {
    use anyhow::{bail, Result};

    /// `name` (--name).
    pub fn named(field: &str) -> String {
        format!("`{field}` (--{})", field.replace('_', "-"))
    }

    /// A finite `v` with `lo < v` (`lo <= v` when `lo_inclusive`) and `v <= hi`.
    pub fn in_range(field: &str, v: f32, lo: f32, lo_inclusive: bool, hi: f32) -> Result<()> {
        let above = if lo_inclusive { v >= lo } else { v > lo };
        if v.is_finite() && above && v <= hi {
            return Ok(());
        }
        let low = if lo_inclusive { format!("at least {lo}") } else { format!("above {lo}") };
        let high = if hi == f32::MAX { String::new() } else { format!(" and at most {hi}") };
        bail!("{} must be a finite number {low}{high}, got {v}", named(field))
    }

    /// An integer `lo <= v <= hi`.
    pub fn count(field: &str, v: usize, lo: usize, hi: usize) -> Result<()> {
        if (lo..=hi).contains(&v) {
            return Ok(());
        }
        if hi == usize::MAX {
            bail!("{} must be at least {lo}, got {v}", named(field))
        }
        bail!("{} must be between {lo} and {hi}, got {v}", named(field))
    }
}

/// Names of [`RunConfig`]'s fields: in a config file they belong in the `[run]` table.
pub const RUN_FIELDS: [&str; 22] = [
    "model",
    "data",
    "eval_data",
    "run_dir",
    "steps",
    "lr",
    "warmup_steps",
    "min_lr_ratio",
    "weight_decay",
    "max_grad_norm",
    "seed",
    "save_every",
    "eval_samples",
    "preset",
    "task_train",
    "task_eval",
    "vocab_size",
    "copy_warmup_steps",
    "copy_heads",
    "base",
    "lora",
    "checkpoint_activations",
];

/// Moves top-level keys that now live under `[run]` into that table: config files written
/// before the `[run]` table existed (and the `config.toml` of older run directories) keep
/// loading. Returns the keys moved; a key given both at the top level and under `[run]` is an
/// error naming both, since either reading would silently drop the other.
pub fn migrate_flat(table: &mut toml::Table) -> Result<Vec<String>> {
    let moved: Vec<String> =
        RUN_FIELDS.iter().filter(|k| table.contains_key(**k)).map(|k| k.to_string()).collect();
    if moved.is_empty() {
        return Ok(moved);
    }
    if let Some(toml::Value::Table(run)) = table.get("run") {
        if let Some(k) = moved.iter().find(|k| run.contains_key(k.as_str())) {
            anyhow::bail!("`{k}` is given both at the top level and as `run.{k}`; keep only `run.{k}`");
        }
    }
    let flat: Vec<(String, toml::Value)> =
        moved.iter().filter_map(|k| table.remove(k).map(|v| (k.clone(), v))).collect();
    let run = table.entry("run").or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let toml::Value::Table(run) = run {
        run.extend(flat);
    } else {
        anyhow::bail!("`run` must be a table ([run])");
    }
    Ok(moved)
}

/// Lays `over` onto `base`: tables merge key by key, any other value replaces.
fn overlay(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => overlay(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// A command's config: `defaults`, with the file at `path` (if any) laid over them. Unknown
/// fields are errors naming the file; fields of an older flat layout are moved into `[run]`
/// with a note on stderr.
pub fn load<C: Serialize + DeserializeOwned>(path: Option<&Path>, defaults: C, what: &str) -> Result<C> {
    let Some(p) = path else { return Ok(defaults) };
    let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
    let mut file: toml::Table =
        toml::from_str(&text).with_context(|| format!("{}: invalid {what} config", p.display()))?;
    let moved = migrate_flat(&mut file).with_context(|| format!("{}: invalid {what} config", p.display()))?;
    if !moved.is_empty() {
        eprintln!(
            "note: {}: {} now belong in the [run] table; read as run.{} (write them under [run] to silence this)",
            p.display(),
            moved.join(", "),
            moved.join(", run.")
        );
    }
    let mut merged = toml::Table::try_from(&defaults).context("cannot serialize the default config")?;
    overlay(&mut merged, file);
    merged.try_into().with_context(|| format!("{}: invalid {what} config", p.display()))
}

/// Every leaf of `t` as (dotted key, value): `run.steps`, `beta`, ...
pub fn leaves(t: &toml::Table) -> Vec<(String, toml::Value)> {
    let mut out = Vec::new();
    for (k, v) in t {
        match v {
            toml::Value::Table(sub) => {
                out.extend(leaves(sub).into_iter().map(|(sk, sv)| (format!("{k}.{sk}"), sv)))
            }
            v => out.push((k.clone(), v.clone())),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Cmd {
        run: RunConfig,
        beta: f32,
    }

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.toml");
        std::fs::write(&p, text).unwrap();
        (d, p)
    }

    #[test]
    fn a_partial_run_table_keeps_the_commands_other_defaults() {
        let (_d, p) = write("beta = 0.5\n[run]\nsteps = 7\n");
        let c = load(Some(&p), Cmd { run: RunConfig::grpo(), beta: 0.1 }, "test").unwrap();
        assert_eq!(c.run.steps, 7);
        assert_eq!(c.run.lr, RunConfig::grpo().lr);
        assert_eq!(c.beta, 0.5);
    }

    #[test]
    fn an_old_flat_file_still_loads() {
        let (_d, p) = write("steps = 9\nlr = 0.25\nbeta = 0.5\n");
        let c = load(Some(&p), Cmd { run: RunConfig::sft(), beta: 0.1 }, "test").unwrap();
        assert_eq!((c.run.steps, c.run.lr, c.beta), (9, 0.25, 0.5));
    }

    #[test]
    fn a_field_given_flat_and_under_run_is_an_error_naming_both() {
        let (_d, p) = write("steps = 9\n[run]\nsteps = 7\n");
        let e =
            format!("{:#}", load(Some(&p), Cmd { run: RunConfig::sft(), beta: 0.1 }, "test").unwrap_err());
        assert!(e.contains("c.toml") && e.contains("`steps`") && e.contains("run.steps"), "{e}");
    }

    #[test]
    fn unknown_fields_are_errors_at_every_level() {
        for text in ["bogus = 1\n", "[run]\nbogus = 1\n"] {
            let (_d, p) = write(text);
            let e = format!(
                "{:#}",
                load(Some(&p), Cmd { run: RunConfig::sft(), beta: 0.1 }, "test").unwrap_err()
            );
            assert!(e.contains("bogus") && e.contains("c.toml"), "{e}");
        }
    }

    #[test]
    fn leaves_are_dotted() {
        let t: toml::Table = toml::from_str("a = 1\n[run]\nsteps = 2\n").unwrap();
        let mut l: Vec<String> = leaves(&t).into_iter().map(|(k, _)| k).collect();
        l.sort();
        assert_eq!(l, ["a", "run.steps"]);
    }
}
