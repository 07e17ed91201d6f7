//! Checkpoints: `checkpoint-<step>/` = the model in Hugging Face layout (f32, exact) +
//! `optimizer.safetensors` (AdamW m and v) + `trainer_state.json`, written to a temporary
//! directory and renamed into place.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::model::{save::replace_dir, weights, Model};
use crate::tensor::{DType, Tensor};
use crate::train::optim::AdamW;
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

pub fn save(run_dir: &Path, model: &Model, opt: &AdamW, state: &TrainerState) -> Result<PathBuf> {
    if opt.device.is_some() {
        // On a GPU: the f32 master weights (not the bf16 working copy) and the device moments.
        let (model, opt) = opt.host_state(model)?;
        return save(run_dir, &model, &opt, state);
    }
    let dir = dir_for(run_dir, state.step);
    let tmp = run_dir.join(format!(".checkpoint-{}.partial", state.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("cannot clear {}", tmp.display()))?;
    }
    model.save(&tmp, Some(DType::F32))?;
    let mut tensors = Vec::new();
    for (prefix, map) in [("m", &opt.m), ("v", &opt.v)] {
        for (name, v) in map {
            tensors.push((format!("{prefix}.{name}"), Tensor::from_vec(v.clone(), &[v.len()])?));
        }
    }
    weights::save(&tmp.join("optimizer.safetensors"), &tensors, DType::F32)?;
    std::fs::write(tmp.join("trainer_state.json"), serde_json::to_string_pretty(state)? + "\n")?;
    replace_dir(&tmp, &dir)?;
    Ok(dir)
}

/// The checkpoint with the highest step in `run_dir`.
pub fn latest(run_dir: &Path) -> Option<(u64, PathBuf)> {
    let rd = std::fs::read_dir(run_dir).ok()?;
    rd.filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step: u64 = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path().join("trainer_state.json").exists().then_some((step, e.path()))
        })
        .max_by_key(|(s, _)| *s)
}

pub fn load(dir: &Path) -> Result<(Model, AdamW, TrainerState)> {
    let model = Model::load(dir)?;
    let text = std::fs::read_to_string(dir.join("trainer_state.json")).with_context(|| format!("cannot read {}/trainer_state.json", dir.display()))?;
    let state: TrainerState = serde_json::from_str(&text).with_context(|| format!("{}/trainer_state.json: malformed", dir.display()))?;
    let all = weights::load_all(&dir.join("optimizer.safetensors"))?;
    let (mut m, mut v) = (BTreeMap::new(), BTreeMap::new());
    for (name, t) in all {
        if let Some(n) = name.strip_prefix("m.") {
            m.insert(n.to_string(), t.to_vec());
        } else if let Some(n) = name.strip_prefix("v.") {
            v.insert(n.to_string(), t.to_vec());
        }
    }
    Ok((model, AdamW { step: state.adam_step, m, v, device: None }, state))
}
