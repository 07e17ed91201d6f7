//! Group-normalized advantages with the entropy bonus (SPEC §3.2–3.4).
//!
//! `A_i = (r_i − mean_group(r)) / (std + 1e-6)` (std unbiased, 0 for a single sample; over the
//! group, the whole batch, or no division), `ψ_i = min(λ·H_i, |A_i|/α)`, `A'_i = A_i + ψ_i`;
//! token granularity: `A'_{i,t} = A_i + min(λ·H_{i,t}, |A_i|/α)`. No gradient flows through
//! advantages (rewards and π_old entropies are data), so there is no backward.

use anyhow::{ensure, Result};

/// How group advantages are scaled (`--adv-scale`, `adv_scale` in config.toml): by the group's
/// reward std (GRPO), the batch's, or not at all (Dr. GRPO).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AdvScale {
    Group,
    Batch,
    /// Dr. GRPO: `A = r − mean`.
    None,
}

impl AdvScale {
    pub fn code(self) -> i32 {
        match self {
            AdvScale::Group => 0,
            AdvScale::Batch => 1,
            AdvScale::None => 2,
        }
    }
}

/// λ and α of the entropy bonus (λ = 0: plain GRPO).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EntropyBonus {
    pub lambda: f32,
    pub alpha: f32,
}

impl Default for EntropyBonus {
    fn default() -> Self {
        EntropyBonus { lambda: 0.4, alpha: 2.0 }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Advantages {
    /// A'_i = A_i + ψ_i, one per sequence.
    pub adv: Vec<f32>,
    /// A_i.
    pub raw: Vec<f32>,
    /// Per group: all rewards equal (no gradient from this group).
    pub zero_var: Vec<bool>,
}

fn mean_std(r: &[f32]) -> (f64, f64) {
    let n = r.len() as f64;
    let mean = r.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = r.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>();
    (mean, if r.len() > 1 { (var / (n - 1.0)).sqrt() } else { 0.0 })
}

/// Advantages of `rewards` laid out as consecutive groups of `g`; `h_seq` is the mean CoT
/// entropy of each sequence (None = 0).
pub fn group_advantages(
    rewards: &[f32],
    g: usize,
    scale: AdvScale,
    h_seq: Option<&[f32]>,
    bonus: EntropyBonus,
) -> Result<Advantages> {
    ensure!(
        g >= 1 && rewards.len().is_multiple_of(g),
        "{} rewards do not split into groups of {g}",
        rewards.len()
    );
    if let Some(h) = h_seq {
        ensure!(h.len() == rewards.len(), "entropies {} vs rewards {}", h.len(), rewards.len());
    }
    let batch_std = mean_std(rewards).1;
    let mut out = Advantages { adv: Vec::new(), raw: Vec::new(), zero_var: Vec::new() };
    for (gi, grp) in rewards.chunks(g).enumerate() {
        let (mean, std) = mean_std(grp);
        let std = if scale == AdvScale::Batch { batch_std } else { std };
        out.zero_var.push(grp.iter().all(|&x| x == grp[0]));
        for (j, &r) in grp.iter().enumerate() {
            let d = r as f64 - mean;
            let a = if scale == AdvScale::None { d } else { d / (std + 1e-6) };
            let h = h_seq.map_or(0.0, |h| h[gi * g + j] as f64);
            let psi = (bonus.lambda as f64 * h).min(a.abs() / bonus.alpha as f64);
            out.raw.push(a as f32);
            out.adv.push((a + psi) as f32);
        }
    }
    Ok(out)
}

/// Token-granularity advantages `[n_seq, t]` from `raw` (A_i) and per-token entropies; tokens
/// with mask 0 get 0.
pub fn token_advantages(
    raw: &[f32],
    h_tok: &[f32],
    mask: Option<&[f32]>,
    t: usize,
    bonus: EntropyBonus,
) -> Vec<f32> {
    (0..raw.len() * t)
        .map(|k| {
            let a = raw[k / t];
            if mask.is_some_and(|m| m[k] == 0.0) {
                0.0
            } else {
                a + (bonus.lambda * h_tok[k]).min(a.abs() / bonus.alpha)
            }
        })
        .collect()
}

/// Per row of `x` `[rows, cols]`: Σ x·mask / Σ mask (0 for an all-masked row). H_i from H_{i,t}.
pub fn masked_row_mean(x: &[f32], mask: Option<&[f32]>, cols: usize) -> Vec<f32> {
    x.chunks(cols)
        .enumerate()
        .map(|(i, row)| {
            let (mut s, mut c) = (0.0f64, 0.0f64);
            for (t, &v) in row.iter().enumerate() {
                let m = mask.map_or(1.0, |m| m[i * cols + t]) as f64;
                s += v as f64 * m;
                c += m;
            }
            if c > 0.0 {
                (s / c) as f32
            } else {
                0.0
            }
        })
        .collect()
}

/// GPU launch wrappers for `kernels/advantage.cu`.
pub mod gpu {
    use anyhow::{ensure, Result};

    use super::{AdvScale, EntropyBonus};
    use crate::backend::{GpuBuffer, GpuDevice, Kernel, KernelArgs, LaunchCfg};

    /// One block per group. `rewards`, `h_seq`, `adv`, `raw`: f32 `[num_groups·g]`; `zero_var`: i32 per group.
    #[allow(clippy::too_many_arguments)]
    pub fn group_advantages(
        dev: &GpuDevice,
        rewards: &GpuBuffer,
        num_groups: usize,
        g: usize,
        scale: AdvScale,
        h_seq: Option<&GpuBuffer>,
        bonus: EntropyBonus,
        adv: &GpuBuffer,
        raw: Option<&GpuBuffer>,
        zero_var: Option<&GpuBuffer>,
    ) -> Result<()> {
        ensure!((1..=1024).contains(&g), "group size {g} must be in 1..=1024");
        ensure!(
            rewards.bytes() >= num_groups * g * 4 && adv.bytes() >= num_groups * g * 4,
            "advantage: buffers too small"
        );
        if num_groups == 0 {
            return Ok(());
        }
        let mut a = KernelArgs::new();
        a.buf(rewards)
            .i32(num_groups as i32)
            .i32(g as i32)
            .i32(scale.code())
            .opt(h_seq)
            .f32(bonus.lambda)
            .f32(bonus.alpha)
            .buf(adv)
            .opt(raw)
            .opt(zero_var);
        let block = g.div_ceil(32) as u32 * 32;
        dev.launch(
            Kernel::new("advantage.cu", "grpo_advantage"),
            LaunchCfg::linear(num_groups as u32, block),
            &mut a,
        )
    }

    /// `out[i·t + k] = A_i + min(λ·H_{i,k}, |A_i|/α)` (0 where mask = 0).
    #[allow(clippy::too_many_arguments)]
    pub fn token_advantages(
        dev: &GpuDevice,
        raw: &GpuBuffer,
        h_tok: &GpuBuffer,
        mask: Option<&GpuBuffer>,
        n_seq: usize,
        t: usize,
        bonus: EntropyBonus,
        out: &GpuBuffer,
    ) -> Result<()> {
        ensure!(
            out.bytes() >= n_seq * t * 4 && h_tok.bytes() >= n_seq * t * 4,
            "token advantages: buffers too small"
        );
        if n_seq * t == 0 {
            return Ok(());
        }
        let mut a = KernelArgs::new();
        a.buf(raw)
            .buf(h_tok)
            .opt(mask)
            .i32(n_seq as i32)
            .i32(t as i32)
            .f32(bonus.lambda)
            .f32(bonus.alpha)
            .buf(out);
        dev.launch(
            Kernel::new("advantage.cu", "grpo_advantage_token"),
            LaunchCfg::elementwise(n_seq * t),
            &mut a,
        )
    }

    /// `out[i] = Σ_t x·mask / Σ_t mask` per row of `[rows, cols]`.
    pub fn masked_row_mean(
        dev: &GpuDevice,
        x: &GpuBuffer,
        mask: Option<&GpuBuffer>,
        rows: usize,
        cols: usize,
        out: &GpuBuffer,
    ) -> Result<()> {
        ensure!(
            x.bytes() >= rows * cols * 4 && out.bytes() >= rows * 4,
            "masked_row_mean: buffers too small"
        );
        if rows == 0 {
            return Ok(());
        }
        let mut a = KernelArgs::new();
        a.buf(x).opt(mask).i32(cols as i32).buf(out);
        dev.launch(
            Kernel::new("advantage.cu", "masked_row_mean"),
            LaunchCfg::linear(rows as u32, 256),
            &mut a,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_rewards_give_zero_advantage_and_no_bonus() {
        let a = group_advantages(
            &[1.0, 1.0, 1.0, 0.0, 1.0, 0.0],
            3,
            AdvScale::Group,
            Some(&[2.0; 6]),
            EntropyBonus::default(),
        )
        .unwrap();
        assert_eq!(&a.adv[..3], &[0.0, 0.0, 0.0]);
        assert_eq!(a.zero_var, vec![true, false]);
        // second group: mean 1/3, std = sqrt(1/3); A(1) = (2/3)/0.57735 = 1.1547; ψ = min(0.8, 0.577)
        assert!((a.raw[4] - 1.154_700_5).abs() < 1e-4, "{}", a.raw[4]);
        assert!((a.adv[4] - (1.154_700_5 + 0.577_350_3)).abs() < 1e-4, "{}", a.adv[4]);
    }
}
