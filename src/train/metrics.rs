//! `metrics.jsonl`: one line per optimizer step.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SftMetrics {
    pub step: u64,
    pub loss: f32,
    pub l_think: f32,
    pub l_result: f32,
    pub alpha: f32,
    pub lr: f32,
    pub grad_norm: f32,
    pub tokens: usize,
    pub tokens_per_s: f32,
    pub seconds: f32,
}

/// `--log`: where per-step metrics go besides metrics.jsonl, which is always written (resume
/// and `curves.svg` read it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// metrics.jsonl only.
    #[default]
    Jsonl,
    /// Also TensorBoard event files in the run directory (`train::tensorboard`).
    Tensorboard,
}

pub struct MetricsWriter {
    path: PathBuf,
    events: Option<crate::train::tensorboard::EventWriter>,
}

impl MetricsWriter {
    /// Opens `path` for appending, first dropping lines past `keep_through` (a resumed run
    /// rewrites the steps after its checkpoint) and any line that does not parse (a last line
    /// torn by a kill or a full disk). The rewrite is atomic.
    pub fn open(path: &Path, keep_through: u64) -> Result<MetricsWriter> {
        if path.exists() {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            let kept: Vec<&str> = text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s <= keep_through)
                })
                .collect();
            let mut out = kept.join("\n");
            if !out.is_empty() {
                out.push('\n');
            }
            crate::runfs::write_atomic(path, out.as_bytes())?;
        }
        Ok(MetricsWriter { path: path.to_path_buf(), events: None })
    }

    /// With `LogFormat::Tensorboard`, every line is also written as TensorBoard scalars to a new
    /// event file in `run_dir`: held-out fields (`heldout_*`) under `eval/`, the rest under
    /// `train/`.
    pub fn logging(mut self, log: LogFormat, run_dir: &Path) -> Result<MetricsWriter> {
        if log == LogFormat::Tensorboard {
            self.events = Some(crate::train::tensorboard::EventWriter::create(run_dir)?);
        }
        Ok(self)
    }

    /// Held-out results at `step` as `eval/<name>` scalars, for TensorBoard only (metrics.jsonl
    /// lines are per step; `sft` keeps its held-out results in eval.json and heldout-*.json).
    pub fn eval(&mut self, step: u64, values: &[(&str, f32)]) -> Result<()> {
        let Some(ev) = &mut self.events else { return Ok(()) };
        for (name, v) in values {
            ev.scalar(&format!("eval/{name}"), step, *v as f64)?;
        }
        ev.flush()
    }

    /// Histograms of one step (`(tag, values)`, tags under `train/`), for TensorBoard only.
    pub fn histograms(&mut self, step: u64, hists: &[(&str, Vec<f32>)]) -> Result<()> {
        let Some(ev) = &mut self.events else { return Ok(()) };
        for (tag, v) in hists {
            ev.histogram(&format!("train/{tag}"), step, v)?;
        }
        ev.flush()
    }

    pub fn write<M: Serialize>(&mut self, m: &M) -> Result<()> {
        let mut f = crate::runfs::open_append(&self.path)?;
        let line = serde_json::to_value(m)?;
        writeln!(f, "{line}").with_context(|| format!("cannot write {}", self.path.display()))?;
        if let Some(ev) = &mut self.events {
            let step = line["step"].as_u64().unwrap_or(0);
            for (k, v) in line.as_object().into_iter().flatten() {
                let Some(x) = v.as_f64().filter(|_| k != "step") else { continue };
                let group = if k.starts_with("heldout") { "eval" } else { "train" };
                ev.scalar(&format!("{group}/{k}"), step, x)?;
            }
            ev.flush()?;
        }
        Ok(())
    }
}

pub fn read(path: &Path) -> Result<Vec<SftMetrics>> {
    crate::jsonl::read(path)
}

/// Appends one step's device work by phase to `path` (`--counters`): this thread's phase
/// totals since the last step (`backend::counters::take_phases`), as one JSON line
/// `{"step": n, "phases": {"rollout": {"launches", "h2d_bytes", "d2h_bytes", "syncs", "allocs"}, ...}}`.
pub fn append_counters(path: &std::path::Path, step: u64) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    let line = serde_json::json!({"step": step, "phases": crate::backend::counters::take_phases()});
    let mut f = crate::runfs::open_append(path).with_context(|| format!("--counters {}", path.display()))?;
    writeln!(f, "{line}").with_context(|| format!("--counters {}: cannot write", path.display()))
}

/// `--counters` counts what a GPU device is asked to do: refused on the cpu.
pub fn check_counters(path: Option<&std::path::Path>, device: crate::tensor::Device) -> anyhow::Result<()> {
    if path.is_some() && !device.is_gpu() {
        anyhow::bail!("--counters counts what a GPU device is asked to do; --device {device} is not one (use cuda or emu)");
    }
    crate::backend::counters::take_phases(); // start from this run's first step
    Ok(())
}
