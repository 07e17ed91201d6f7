//! Checkpoints: `checkpoint-<step>/` = the model in Hugging Face layout (f32, exact) +
//! `fcgpu.json` (the prompt style and think rule it was trained with) +
//! `optimizer.safetensors` (AdamW m and v) + `trainer_state.json` + `run_config.toml` (the
//! run's config when it was written), written to a temporary directory and renamed into
//! place. Weights and moments that are not all finite are never written.

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

/// The run's config as of the checkpoint, inside each checkpoint directory: a resume compares
/// against the state it continues from, not only the run directory's `config.toml`.
pub const RUN_CONFIG: &str = "run_config.toml";

pub fn dir_for(run_dir: &Path, step: u64) -> PathBuf {
    run_dir.join(format!("checkpoint-{step}"))
}

pub fn save(
    run_dir: &Path,
    model: &Model,
    opt: &AdamW,
    state: &TrainerState,
    format: &TrainFormat,
    config: &str,
) -> Result<PathBuf> {
    if opt.device.is_some() {
        // On a GPU: the f32 master weights (not the bf16 working copy) and the device moments.
        let (model, opt) = opt.host_state(model)?;
        return save(run_dir, &model, &opt, state, format, config);
    }
    let dir = dir_for(run_dir, state.step);
    check_finite(model, opt)
        .with_context(|| format!("step {}: not writing {}", state.step, dir.display()))?;
    let tmp = crate::runfs::temp_sibling(&dir, "partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("cannot clear {}", tmp.display()))?;
    }
    let done = write_parts(&tmp, model, opt, state)
        .and_then(|_| crate::runfs::write_atomic(&tmp.join(RUN_CONFIG), config.as_bytes()))
        .and_then(|_| prompt::record(&tmp, format))
        .and_then(|_| replace_dir(&tmp, &dir));
    if done.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    done?;
    Ok(dir)
}

/// Every weight and moment is finite: a NaN or an infinity (a learning rate that blew up) is
/// an error naming the first tensor that has one, so no checkpoint holds a broken model.
fn check_finite(model: &Model, opt: &AdamW) -> Result<()> {
    for (name, t) in model.named_params() {
        anyhow::ensure!(
            t.host_f32()?.iter().all(|x| x.is_finite()),
            "the weights of `{name}` are not all finite (NaN or infinite); the run diverged"
        );
    }
    for (prefix, map) in [("m", &opt.m), ("v", &opt.v)] {
        if let Some((name, _)) = map.iter().find(|(_, v)| !v.iter().all(|x| x.is_finite())) {
            anyhow::bail!(
                "the optimizer state `{prefix}.{name}` is not all finite (NaN or infinite); the run diverged"
            );
        }
    }
    Ok(())
}

/// The checkpoint's files in the temporary directory `tmp`.
fn write_parts(tmp: &Path, model: &Model, opt: &AdamW, state: &TrainerState) -> Result<()> {
    if model.lora().is_some() {
        // A LoRA run: the adapters in PEFT's files (the base stays where it was loaded from).
        std::fs::create_dir_all(tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        model.write_adapter_files(tmp)?;
    } else {
        model.save(tmp, Some(DType::F32))?;
    }
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
    let model = if dir.join(crate::model::lora::CONFIG_FILE).exists() {
        Model::load_with_adapter(dir, None)?
    } else {
        Model::load(dir)?
    };
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
        } else {
            anyhow::bail!(
                "{}/optimizer.safetensors: unknown tensor `{name}` (not m.* or v.*)",
                dir.display()
            );
        }
    }
    check_optimizer(&model, &m, &v).with_context(|| format!("{}/optimizer.safetensors", dir.display()))?;
    Ok((model, AdamW { step: state.adam_step, m, v, device: None }, state))
}

/// Optimizer state that is not the model's: the SRML learnable α (one value).
const EXTRA_STATE: [(&str, usize); 1] = [("srml.alpha_logit", 1)];

/// The moments map onto the model's parameters: every `m.X` has its `v.X` and the other way
/// round, `X` is a parameter of the model (or the SRML α) and has its size, and no second
/// moment is negative. Tensors swapped, renamed or cut in the file fail here.
fn check_optimizer(
    model: &Model,
    m: &BTreeMap<String, Vec<f32>>,
    v: &BTreeMap<String, Vec<f32>>,
) -> Result<()> {
    let mut sizes: BTreeMap<String, usize> =
        model.trainable_params().into_iter().map(|(n, t)| (n, t.numel())).collect();
    sizes.extend(EXTRA_STATE.iter().map(|(n, k)| (n.to_string(), *k)));
    if let Some(n) = m.keys().find(|n| !v.contains_key(*n)) {
        anyhow::bail!("`m.{n}` has no second moment `v.{n}`");
    }
    if let Some(n) = v.keys().find(|n| !m.contains_key(*n)) {
        anyhow::bail!("`v.{n}` has no first moment `m.{n}`");
    }
    for (prefix, map) in [("m", m), ("v", v)] {
        for (name, x) in map {
            let want = *sizes
                .get(name)
                .with_context(|| format!("`{prefix}.{name}` is the state of no parameter of the model"))?;
            anyhow::ensure!(
                x.len() == want,
                "`{prefix}.{name}` has {} values but the parameter has {want}",
                x.len()
            );
        }
    }
    if let Some((n, _)) = v.iter().find(|(_, x)| x.iter().any(|&y| y < 0.0)) {
        anyhow::bail!("`v.{n}` has negative values; a second moment cannot");
    }
    Ok(())
}

/// How a training run starts in its run directory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Start {
    /// Continue from the newest loadable checkpoint.
    pub resume: bool,
    /// With `resume`: continue although the config differs from the one saved in the run
    /// directory or in the checkpoint (the differences are listed as a warning). Without:
    /// start a new run in a run directory that holds an earlier one, deleting that run.
    pub force: bool,
}

/// Entries of a run directory that a run writes: what `--force` deletes to start a new run
/// there. Anything else makes the directory not a run directory, and it is left alone.
const RUN_FILES: [&str; 7] =
    ["config.toml", "metrics.jsonl", "curves.svg", "eval.json", "task", "sft", "base-model"];

/// Whether `name` is an entry a run writes in its run directory ([`RUN_FILES`], checkpoints,
/// held-out reports, TensorBoard event files, the lock).
fn is_run_entry(name: &str) -> bool {
    RUN_FILES.contains(&name)
        || name == crate::runfs::LOCK_FILE
        || name.starts_with("checkpoint-")
        || name.starts_with(".checkpoint-")
        || (name.starts_with("eval-") && (name.ends_with(".json") || name.ends_with(".jsonl")))
        || name.starts_with("events.out.tfevents.")
}

/// The entries that show an earlier run: its config, metrics or a checkpoint. A directory
/// with only the embedded default's inputs (`task`, `base-model`) holds no run.
fn earlier_run(run_dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(run_dir) else { return vec![] };
    let mut found: Vec<String> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n == "config.toml" || n == "metrics.jsonl" || n.starts_with("checkpoint-"))
        .collect();
    found.sort();
    found
}

/// Checks the run directory before a run starts in it (the caller holds its lock). It must not
/// be the current directory or contain it. Without `resume`, one that holds an earlier run is
/// refused, as `init` and `data prepare` refuse a used output; with `force` that run is
/// deleted first, but only when every entry is one a run writes.
pub fn prepare_run_dir(run_dir: &Path, start: Start) -> Result<()> {
    crate::runfs::ensure_not_cwd(run_dir, "--run-dir")?;
    let found = earlier_run(run_dir);
    if start.resume || found.is_empty() {
        return Ok(());
    }
    if !start.force {
        anyhow::bail!(
            "--run-dir {} holds an earlier run ({}); use --resume to continue it, --force to delete it and start a new run, or another --run-dir",
            run_dir.display(),
            found.join(", ")
        );
    }
    let entries: Vec<std::fs::DirEntry> = std::fs::read_dir(run_dir)
        .with_context(|| format!("cannot list {}", run_dir.display()))?
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("cannot list {}", run_dir.display()))?;
    let foreign: Vec<String> = entries
        .iter()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !is_run_entry(n))
        .collect();
    anyhow::ensure!(
        foreign.is_empty(),
        "--run-dir {} holds files no run writes ({}); --force deletes only a run's own files, so it refuses this directory; choose another --run-dir",
        run_dir.display(),
        foreign.join(", ")
    );
    eprintln!("--force: deleting the earlier run in {}", run_dir.display());
    for e in entries {
        let (p, name) = (e.path(), e.file_name());
        if name == crate::runfs::LOCK_FILE {
            continue;
        }
        let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
        let r = if is_dir { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        r.with_context(|| format!("--force: cannot delete {}", p.display()))?;
    }
    Ok(())
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
    check_config_file(&run_dir.join("config.toml"), cfg, force)
}

/// [`check_resume_config`] against the checkpoint `dir` a resume continues from: its own
/// `run_config.toml` (checkpoints written before it existed have none), and its trainer
/// state's seed and schedule, which every checkpoint has.
pub fn check_resume_checkpoint<C: Serialize>(
    dir: &Path,
    state: &TrainerState,
    run: &crate::train::run_config::RunConfig,
    cfg: &C,
    force: bool,
) -> Result<()> {
    check_config_file(&dir.join(RUN_CONFIG), cfg, force)?;
    let s = &state.schedule;
    let drift: Vec<String> = [
        ("run.seed", state.seed.to_string(), run.seed.to_string()),
        ("run.lr", s.lr.to_string(), run.lr.to_string()),
        ("run.warmup_steps", s.warmup_steps.to_string(), run.warmup_steps.to_string()),
        ("run.min_lr_ratio", s.min_ratio.to_string(), run.min_lr_ratio.to_string()),
    ]
    .into_iter()
    .filter(|(_, a, b)| a != b)
    .map(|(k, a, b)| format!("{k}: {a} -> {b}"))
    .collect();
    report_drift(&dir.join("trainer_state.json"), drift, force)
}

fn check_config_file<C: Serialize>(path: &Path, cfg: &C, force: bool) -> Result<()> {
    let path = path.to_path_buf();
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
    report_drift(&path, drift, force)
}

/// Nothing when `drift` is empty; else a warning with `force`, an error without.
fn report_drift(path: &Path, drift: Vec<String>, force: bool) -> Result<()> {
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
        "--resume: the config differs from the one recorded in {}: {}; resuming would not continue the same run. Use the saved values, a new --run-dir, or --force",
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
