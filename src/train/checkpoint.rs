//! Checkpoints: `checkpoint-<step>/` = the model in Hugging Face layout (f32, exact) +
//! `fcgpu.json` (the prompt style and think rule it was trained with) +
//! `optimizer.safetensors` (AdamW m and v) + `trainer_state.json`, written to a temporary
//! directory and renamed into place.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::model::{save::replace_dir, weights, Model};
use crate::tensor::{DType, Tensor};
use crate::train::optim::AdamW;
use crate::train::prompt::{self, TrainFormat};
use crate::train::schedule::Schedule;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: u64,
    /// Data order: the epoch (its order is a function of seed and epoch) and the next
    /// micro-batch within it.
    pub epoch: u64,
    pub cursor: usize,
    pub seed: u64,
    pub schedule: Schedule,
    /// SRML learnable α = sigmoid(alpha_logit).
    pub alpha_logit: f32,
    pub adam_step: u64,
}

pub fn dir_for(run_dir: &Path, step: u64) -> PathBuf {
    run_dir.join(format!("checkpoint-{step}"))
}

pub fn save(
    run_dir: &Path,
    model: &Model,
    opt: &AdamW,
    state: &TrainerState,
    format: &TrainFormat,
) -> Result<PathBuf> {
    if opt.device.is_some() {
        // On a GPU: the f32 master weights (not the bf16 working copy) and the device moments.
        let (model, opt) = opt.host_state(model)?;
        return save(run_dir, &model, &opt, state, format);
    }
    let dir = dir_for(run_dir, state.step);
    let tmp = crate::runfs::temp_sibling(&dir, "partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("cannot clear {}", tmp.display()))?;
    }
    let done = write_parts(&tmp, model, opt, state)
        .and_then(|_| prompt::record(&tmp, format))
        .and_then(|_| replace_dir(&tmp, &dir));
    if done.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    done?;
    Ok(dir)
}

/// The checkpoint's files in the temporary directory `tmp`.
fn write_parts(tmp: &Path, model: &Model, opt: &AdamW, state: &TrainerState) -> Result<()> {
    model.save(tmp, Some(DType::F32))?;
    let mut tensors = Vec::new();
    for (prefix, map) in [("m", &opt.m), ("v", &opt.v)] {
        for (name, v) in map {
            tensors.push((format!("{prefix}.{name}"), Tensor::from_vec(v.clone(), &[v.len()])?));
        }
    }
    weights::save(&tmp.join("optimizer.safetensors"), &tensors, DType::F32)?;
    let st = tmp.join("trainer_state.json");
    std::fs::write(&st, serde_json::to_string_pretty(state)? + "\n")
        .with_context(|| format!("cannot write {}", st.display()))
}

/// The checkpoint with the highest step in `run_dir`.
pub fn latest(run_dir: &Path) -> Option<(u64, PathBuf)> {
    all(run_dir).into_iter().next()
}

/// Every complete checkpoint in `run_dir` (one with a `trainer_state.json`), highest step first.
pub fn all(run_dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(run_dir) else { return vec![] };
    let mut v: Vec<(u64, PathBuf)> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step: u64 = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path().join("trainer_state.json").exists().then_some((step, e.path()))
        })
        .collect();
    v.sort_by(|a, b| b.0.cmp(&a.0));
    v
}

/// The newest checkpoint of `run_dir` that loads. One that does not (truncated weights, bad
/// JSON, non-finite values) is skipped with a warning naming it and the reason, and the one
/// before it is tried. `None` when there is no checkpoint; an error when none loads.
pub fn load_latest_good(run_dir: &Path) -> Result<Option<(PathBuf, Model, AdamW, TrainerState)>> {
    let found = all(run_dir);
    if found.is_empty() {
        return Ok(None);
    }
    let mut failures = Vec::new();
    for (_, dir) in found {
        match load(&dir) {
            Ok((m, o, s)) => {
                if !failures.is_empty() {
                    eprintln!("warning: falling back to {} (step {})", dir.display(), s.step);
                }
                return Ok(Some((dir, m, o, s)));
            }
            Err(e) => {
                eprintln!(
                    "warning: checkpoint {} cannot be loaded ({e:#}); trying the previous one",
                    dir.display()
                );
                failures.push(format!("{}: {e:#}", dir.display()));
            }
        }
    }
    anyhow::bail!("no checkpoint in {} can be loaded:\n  {}", run_dir.display(), failures.join("\n  "))
}

pub fn load(dir: &Path) -> Result<(Model, AdamW, TrainerState)> {
    let model = Model::load(dir)?;
    let text = std::fs::read_to_string(dir.join("trainer_state.json"))
        .with_context(|| format!("cannot read {}/trainer_state.json", dir.display()))?;
    let state: TrainerState = serde_json::from_str(&text)
        .with_context(|| format!("{}/trainer_state.json: malformed", dir.display()))?;
    let tensors = weights::load_all(&dir.join("optimizer.safetensors"))?;
    let (mut m, mut v) = (BTreeMap::new(), BTreeMap::new());
    for (name, t) in tensors {
        let t = t.to_vec();
        anyhow::ensure!(
            t.iter().all(|x| x.is_finite()),
            "{}/optimizer.safetensors: tensor `{name}` has non-finite values",
            dir.display()
        );
        if let Some(n) = name.strip_prefix("m.") {
            m.insert(n.to_string(), t);
        } else if let Some(n) = name.strip_prefix("v.") {
            v.insert(n.to_string(), t);
        }
    }
    Ok((model, AdamW { step: state.adam_step, m, v, device: None }, state))
}

/// How a training run starts in its run directory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Start {
    /// Continue from the newest loadable checkpoint.
    pub resume: bool,
    /// With `resume`: continue although the config differs from the one saved in the run
    /// directory (the differences are listed as a warning).
    pub force: bool,
}

impl Start {
    /// A new run (the run directory must not hold one already).
    pub const FRESH: Start = Start { resume: false, force: false };
    /// Continue from the newest loadable checkpoint, refusing a changed config.
    pub const RESUME: Start = Start { resume: true, force: false };
}

/// Fields that may change between a run and its resumption: how long to train and how often
/// to save or score. Any other difference changes what the resumed steps compute.
const MAY_CHANGE_ON_RESUME: [&str; 4] = ["run.steps", "run.save_every", "run.eval_samples", "run.run_dir"];

/// Fields a trainer resolves at start when unset (from the model and the data): compared only
/// when both configs hold them, since the trainer checks again once they are resolved, and a
/// run started before they existed has none.
const RESOLVED_AT_START: [&str; 2] = ["style", "think"];

/// Compares the config of a resumed run with `<run_dir>/config.toml` (written when the run
/// started). A difference in any field but [`MAY_CHANGE_ON_RESUME`] is an error naming each
/// field with its saved and new values, unless `force` (then a warning). No saved config: no
/// check.
pub fn check_resume_config<C: Serialize>(run_dir: &Path, cfg: &C, force: bool) -> Result<()> {
    let path = run_dir.join("config.toml");
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(()) };
    let mut saved: toml::Table =
        toml::from_str(&text).with_context(|| format!("{}: not valid TOML", path.display()))?;
    // Run directories started before the `[run]` table have its fields at the top level.
    crate::train::run_config::migrate_flat(&mut saved).with_context(|| format!("{}", path.display()))?;
    // Through text, as config.toml was written: f32 fields then compare by their printed value.
    let now: toml::Table =
        toml::from_str(&toml::to_string_pretty(cfg).context("cannot serialize the config")?)
            .context("cannot re-read the config")?;
    let (saved, now): (toml::Table, toml::Table) = (flat(&saved), flat(&now));
    let mut keys: Vec<&String> = saved.keys().chain(now.keys()).collect();
    keys.sort();
    keys.dedup();
    let show = |v: Option<&toml::Value>| v.map(|v| v.to_string()).unwrap_or_else(|| "(unset)".into());
    let drift: Vec<String> = keys
        .into_iter()
        .filter(|k| !MAY_CHANGE_ON_RESUME.contains(&k.as_str()) && saved.get(*k) != now.get(*k))
        .filter(|k| {
            !RESOLVED_AT_START.contains(&k.as_str()) || (saved.contains_key(*k) && now.contains_key(*k))
        })
        .map(|k| format!("{k}: {} -> {}", show(saved.get(k)), show(now.get(k))))
        .collect();
    if drift.is_empty() {
        return Ok(());
    }
    if force {
        eprintln!(
            "warning: resuming with a config that differs from {} (--force): {}",
            path.display(),
            drift.join(", ")
        );
        return Ok(());
    }
    anyhow::bail!(
        "--resume: the config differs from the one this run started with ({}): {}; resuming would not continue the same run. Use the saved values, a new --run-dir, or --force",
        path.display(),
        drift.join(", ")
    )
}

/// `t` with every nested field as one dotted key (`run.steps`).
fn flat(t: &toml::Table) -> toml::Table {
    crate::train::run_config::leaves(t).into_iter().collect()
}

/// A resumed checkpoint must not be past the configured number of steps: that run is not the
/// one configured, and there is nothing to continue.
pub fn check_resume_step(dir: &Path, step: u64, steps: u64) -> Result<()> {
    anyhow::ensure!(
        step <= steps,
        "--resume: {} is at step {step}, past the configured {steps} steps; nothing to do (raise --steps to train further)",
        dir.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::sft::SftConfig;

    #[test]
    fn a_flat_config_of_an_older_run_is_compared_field_by_field() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SftConfig::default();
        // The layout before the `[run]` table: every field at the top level.
        let mut old: toml::Table = toml::from_str(&toml::to_string_pretty(&cfg).unwrap()).unwrap();
        let run = old.remove("run").unwrap();
        old.extend(run.as_table().unwrap().clone());
        std::fs::write(dir.path().join("config.toml"), toml::to_string(&old).unwrap()).unwrap();
        check_resume_config(dir.path(), &cfg, false).unwrap();
        let mut other = cfg.clone();
        other.run.seed = 7;
        other.run.steps = 9999;
        let e = check_resume_config(dir.path(), &other, false).unwrap_err().to_string();
        assert!(e.contains("run.seed: 0 -> 7") && !e.contains("run.steps"), "{e}");
    }
}
