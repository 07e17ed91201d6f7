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

pub struct MetricsWriter {
    path: PathBuf,
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
        Ok(MetricsWriter { path: path.to_path_buf() })
    }

    pub fn write<M: Serialize>(&mut self, m: &M) -> Result<()> {
        let mut f = crate::runfs::open_append(&self.path)?;
        writeln!(f, "{}", serde_json::to_string(m)?)
            .with_context(|| format!("cannot write {}", self.path.display()))
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
