//! `curves.svg`: reward, rollout call validity, zero-variance groups, CoT entropy, KL and loss
//! over steps, redrawn as training goes (metric names as in docs/metrics.md).

use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;

use crate::train::grpo::GrpoMetrics;

type Series = (&'static str, fn(&GrpoMetrics) -> f32);

const PANELS: [Series; 6] = [
    ("reward_mean (first draw)", |m| m.reward_mean),
    ("rollout_call_valid (first draw; BFCL checker, format ignored)", |m| m.rollout_call_valid),
    ("zero_var_groups (trained batch)", |m| m.zero_var_groups),
    ("cot_entropy (entropy segment)", |m| m.cot_entropy),
    ("kl (k3, to the reference)", |m| m.kl),
    ("loss (policy)", |m| m.loss),
];

/// Draws one panel per series from the step lines of `metrics` (the step-0 eval line skipped).
pub fn curves(metrics: &Path, out: &Path) -> Result<()> {
    let lines: Vec<GrpoMetrics> = crate::jsonl::read(metrics)?;
    let lines: Vec<&GrpoMetrics> = lines.iter().filter(|m| m.step > 0).collect();
    let tmp = out.with_extension("svg.tmp");
    {
        let root = SVGBackend::new(&tmp, (900, 1200)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
        let max_step = lines.iter().map(|m| m.step).max().unwrap_or(1).max(1) as f32;
        for ((title, f), area) in PANELS.iter().zip(root.split_evenly((PANELS.len(), 1))) {
            let ys: Vec<(f32, f32)> =
                lines.iter().map(|m| (m.step as f32, f(m))).filter(|(_, y)| y.is_finite()).collect();
            let (lo, hi) =
                ys.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &(_, y)| (a.min(y), b.max(y)));
            let (lo, hi) = if lo.is_finite() && hi > lo {
                (lo, hi)
            } else if lo.is_finite() {
                (lo - 0.5, lo + 0.5)
            } else {
                (0.0, 1.0)
            };
            let pad = 0.05 * (hi - lo);
            let mut chart = ChartBuilder::on(&area)
                .caption(*title, ("sans-serif", 16))
                .margin(8)
                .x_label_area_size(24)
                .y_label_area_size(56)
                .build_cartesian_2d(0f32..max_step, (lo - pad)..(hi + pad))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            chart
                .configure_mesh()
                .light_line_style(WHITE.mix(0.0))
                .draw()
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            chart.draw_series(LineSeries::new(ys, &BLUE)).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))
}
