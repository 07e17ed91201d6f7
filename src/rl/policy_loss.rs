//! Clipped GRPO policy loss with the k3 KL penalty and the aggregation weights (SPEC §3.5–3.7):
//! CPU reference (forward + d loss / d logp) and GPU wrappers for `kernels/policy_loss.cu`.
//!
//! Per completion token: `ρ = exp(logp − old)`, `ℓ = −min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A)`,
//! `k = exp(ref − logp) − (ref − logp) − 1`, `L = ℓ + β·k`; `loss = Σ w·L` with
//! token-mean `w = m/Σm`, seq-mean `w = m/(N_i·n_seq)`, srml `w = m·α_s/(N_think,i·n_seq)` on think
//! tokens (seg 1) and `m·(1−α_s)/(N_result,i·n_seq)` on result tokens (seg 2); a sequence with
//! only one segment gives it the whole weight, `m/(N_seg,i·n_seq)`.
//! `∂L/∂logp = −A·ρ` on the unclipped branch (ρ·A <= clip·A), else 0, `+ β·(1 − exp(ref − logp))`.

use anyhow::{ensure, Result};

use crate::tensor::Device;

/// `--loss-agg`: how token losses are weighted into the batch loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LossAgg {
    TokenMean,
    SeqMean,
    /// Think tokens weigh α_s/N_think, result tokens (1−α_s)/N_result, per sequence
    /// (α_s: [`PolicyLossCfg::srml_alpha`]).
    Srml,
}

impl LossAgg {
    /// The kernel's mode code.
    fn code(self) -> i32 {
        match self {
            LossAgg::TokenMean => 0,
            LossAgg::SeqMean => 1,
            LossAgg::Srml => 2,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PolicyLossCfg {
    pub eps_low: f32,
    pub eps_high: f32,
    /// KL coefficient (0: no reference model).
    pub beta: f32,
    pub agg: LossAgg,
    /// α_s of [`LossAgg::Srml`] (unused by the other aggregations).
    pub srml_alpha: f32,
}

impl Default for PolicyLossCfg {
    fn default() -> Self {
        PolicyLossCfg { eps_low: 0.2, eps_high: 0.28, beta: 0.001, agg: LossAgg::Srml, srml_alpha: 0.5 }
    }
}

/// Inputs, all `[n_seq, t]` row-major except `adv` (`[n_seq]`, or `[n_seq, t]` when
/// `adv_per_token`). `seg`: 1 think, 2 result, 0 other (needed for srml only).
#[derive(Clone, Copy, Debug)]
pub struct PolicyLossInput<'a> {
    pub logp: &'a [f32],
    pub old_logp: &'a [f32],
    pub ref_logp: Option<&'a [f32]>,
    pub adv: &'a [f32],
    pub adv_per_token: bool,
    pub mask: &'a [f32],
    pub seg: Option<&'a [i32]>,
    pub n_seq: usize,
    pub t: usize,
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PolicyLossStats {
    pub loss: f32,
    /// Mean k3 KL over completion tokens.
    pub kl: f32,
    /// Fraction of completion tokens on the clipped branch.
    pub clip_frac: f32,
    pub tokens: f32,
}

fn weights(x: &PolicyLossInput, agg: LossAgg, alpha: f32) -> Vec<f64> {
    let (t, n) = (x.t, x.n_seq);
    let total: f64 = x.mask.iter().map(|&m| m as f64).sum();
    let mut w = vec![0.0f64; n * t];
    for i in 0..n {
        let row = i * t..(i + 1) * t;
        let seg = |k: usize| x.seg.map_or(0, |s| s[k]);
        let cnt = |s: Option<i32>| -> f64 {
            row.clone().filter(|&k| s.is_none_or(|s| seg(k) == s)).map(|k| x.mask[k] as f64).sum()
        };
        let (ni, nt, nr) = (cnt(None), cnt(Some(1)), cnt(Some(2)));
        for k in row.clone() {
            let m = x.mask[k] as f64;
            w[k] = if m == 0.0 {
                0.0
            } else {
                match agg {
                    LossAgg::TokenMean => m / total,
                    LossAgg::SeqMean => m / (ni * n as f64),
                    LossAgg::Srml => {
                        // A sequence lacking one segment gives its whole weight to the other.
                        let both = nt > 0.0 && nr > 0.0;
                        match seg(k) {
                            1 => m * if both { alpha as f64 } else { 1.0 } / (nt * n as f64),
                            2 => m * if both { 1.0 - alpha as f64 } else { 1.0 } / (nr * n as f64),
                            _ => 0.0,
                        }
                    }
                }
            };
        }
    }
    w
}

fn check(x: &PolicyLossInput, cfg: &PolicyLossCfg) -> Result<()> {
    let n = x.n_seq * x.t;
    ensure!(
        x.logp.len() == n && x.old_logp.len() == n && x.mask.len() == n,
        "policy_loss: [n_seq, t] inputs"
    );
    ensure!(x.adv.len() == if x.adv_per_token { n } else { x.n_seq }, "policy_loss: advantages");
    ensure!(x.ref_logp.is_none_or(|r| r.len() == n), "policy_loss: reference log-probs");
    // The clip range must be a range: a negative or NaN ε would make clamp's min exceed its
    // max (a panic) or silently disable clipping.
    ensure!(
        (0.0..1.0).contains(&cfg.eps_low) && cfg.eps_high >= 0.0 && cfg.eps_high.is_finite(),
        "policy_loss: eps_low {} must be in [0, 1) and eps_high {} finite and >= 0",
        cfg.eps_low,
        cfg.eps_high
    );
    ensure!(
        cfg.beta.is_finite() && cfg.beta >= 0.0,
        "policy_loss: beta {} must be finite and >= 0",
        cfg.beta
    );
    if cfg.agg == LossAgg::Srml {
        ensure!(x.seg.is_some_and(|s| s.len() == n), "policy_loss: srml needs segments");
    }
    Ok(())
}

/// Forward and `d loss / d logp` (times `dloss`), in f64.
pub fn policy_loss(
    x: &PolicyLossInput,
    cfg: &PolicyLossCfg,
    dloss: f32,
) -> Result<(PolicyLossStats, Vec<f32>)> {
    let n = x.n_seq * x.t;
    check(x, cfg)?;
    let w = weights(x, cfg.agg, cfg.srml_alpha);
    let (mut loss, mut kl, mut clip, mut tok) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    let mut grad = vec![0.0f32; n];
    for k in 0..n {
        let m = x.mask[k] as f64;
        if m == 0.0 {
            continue;
        }
        let lp = x.logp[k] as f64;
        let a = x.adv[if x.adv_per_token { k } else { k / x.t }] as f64;
        let rho = (lp - x.old_logp[k] as f64).exp();
        let c = rho.clamp(1.0 - cfg.eps_low as f64, 1.0 + cfg.eps_high as f64);
        let (un, cl) = (rho * a, c * a);
        let mut l = -un.min(cl);
        let mut g = if un <= cl { -a * rho } else { 0.0 };
        let mut kk = 0.0;
        if let (Some(r), true) = (x.ref_logp, cfg.beta != 0.0) {
            let d = r[k] as f64 - lp;
            kk = d.exp() - d - 1.0;
            l += cfg.beta as f64 * kk;
            g += cfg.beta as f64 * (1.0 - d.exp());
        }
        loss += w[k] * l;
        kl += m * kk;
        clip += if un > cl { m } else { 0.0 };
        tok += m;
        grad[k] = (dloss as f64 * w[k] * g) as f32;
    }
    let stats = PolicyLossStats {
        loss: loss as f32,
        kl: if tok > 0.0 { (kl / tok) as f32 } else { 0.0 },
        clip_frac: if tok > 0.0 { (clip / tok) as f32 } else { 0.0 },
        tokens: tok as f32,
    };
    Ok((stats, grad))
}

/// [`policy_loss`] on `device`: the f64 reference on the cpu; on a GPU the fused kernels (counts,
/// forward, backward) on the uploaded inputs, with the stats and the gradient downloaded.
pub fn policy_loss_on(
    device: Device,
    x: &PolicyLossInput,
    cfg: &PolicyLossCfg,
    dloss: f32,
) -> Result<(PolicyLossStats, Vec<f32>)> {
    if device.is_cpu() {
        return policy_loss(x, cfg, dloss);
    }
    check(x, cfg)?;
    let dev = device.gpu()?;
    let (logp, old, adv, mask) = (
        dev.upload_f32(x.logp)?,
        dev.upload_f32(x.old_logp)?,
        dev.upload_f32(x.adv)?,
        dev.upload_f32(x.mask)?,
    );
    let refl = x.ref_logp.map(|r| dev.upload_f32(r)).transpose()?;
    let seg = x.seg.map(|s| dev.upload_i32(s)).transpose()?;
    let b = gpu::PolicyLossBuffers {
        logp: &logp,
        old_logp: &old,
        ref_logp: refl.as_ref(),
        adv: &adv,
        adv_per_token: x.adv_per_token,
        mask: &mask,
        seg: seg.as_ref(),
        n_seq: x.n_seq,
        t: x.t,
    };
    let counts = gpu::counts(&dev, &b)?;
    let out = dev.zeros(16)?;
    gpu::policy_loss_fwd(&dev, &b, &counts, cfg, &out)?;
    let (dl, grad) = (dev.upload_f32(&[dloss])?, dev.zeros(x.n_seq * x.t * 4)?);
    gpu::policy_loss_bwd(&dev, &b, &counts, cfg, Some(&dl), &grad)?;
    let o = out.download_f32()?;
    let stats = PolicyLossStats { loss: o[0], kl: o[1], clip_frac: o[2], tokens: o[3] };
    Ok((stats, grad.download_f32()?))
}

/// GPU launch wrappers for `kernels/policy_loss.cu`.
pub mod gpu {
    use anyhow::{ensure, Result};

    use super::PolicyLossCfg;
    use crate::backend::{GpuBuffer, GpuDevice, Kernel, KernelArgs, LaunchCfg};

    /// Device buffers of [`super::PolicyLossInput`] (f32 except `seg`: i32).
    #[derive(Clone, Copy, Debug)]
    pub struct PolicyLossBuffers<'a> {
        pub logp: &'a GpuBuffer,
        pub old_logp: &'a GpuBuffer,
        pub ref_logp: Option<&'a GpuBuffer>,
        pub adv: &'a GpuBuffer,
        pub adv_per_token: bool,
        pub mask: &'a GpuBuffer,
        pub seg: Option<&'a GpuBuffer>,
        pub n_seq: usize,
        pub t: usize,
    }

    fn args(x: &PolicyLossBuffers, counts: &GpuBuffer, cfg: &PolicyLossCfg) -> KernelArgs {
        let (mode, alpha) = (cfg.agg.code(), cfg.srml_alpha);
        let mut a = KernelArgs::new();
        a.buf(x.logp)
            .buf(x.old_logp)
            .opt(x.ref_logp)
            .buf(x.adv)
            .buf(x.mask)
            .opt(x.seg)
            .buf(counts)
            .i32(x.n_seq as i32)
            .i32(x.t as i32)
            .i32(mode)
            .i32(x.adv_per_token as i32)
            .f32(cfg.eps_low)
            .f32(cfg.eps_high)
            .f32(cfg.beta)
            .f32(alpha);
        a
    }

    /// Per-sequence token counts `[n_seq, 3]` (f32): all, think, result. Shared by fwd and bwd.
    pub fn counts(dev: &GpuDevice, x: &PolicyLossBuffers) -> Result<GpuBuffer> {
        let n = x.n_seq * x.t;
        ensure!(
            x.logp.bytes() >= n * 4 && x.old_logp.bytes() >= n * 4 && x.mask.bytes() >= n * 4,
            "policy loss: buffers too small"
        );
        let c = dev.zeros(x.n_seq.max(1) * 12)?;
        if x.n_seq > 0 {
            let mut a = KernelArgs::new();
            a.buf(x.mask).opt(x.seg).i32(x.t as i32).buf(&c);
            dev.launch(
                Kernel::new("policy_loss.cu", "pl_counts"),
                LaunchCfg::linear(x.n_seq as u32, 256),
                &mut a,
            )?;
        }
        Ok(c)
    }

    /// Loss and stats into `out` (f32 `[4]`: loss, mean KL, clip fraction, tokens).
    pub fn policy_loss_fwd(
        dev: &GpuDevice,
        x: &PolicyLossBuffers,
        counts: &GpuBuffer,
        cfg: &PolicyLossCfg,
        out: &GpuBuffer,
    ) -> Result<()> {
        ensure!(out.bytes() >= 16, "policy loss: out needs 4 floats");
        let partial = dev.zeros(x.n_seq.max(1) * 16)?;
        if x.n_seq > 0 {
            let mut a = args(x, counts, cfg);
            a.buf(&partial);
            dev.launch(
                Kernel::new("policy_loss.cu", "pl_fwd"),
                LaunchCfg::linear(x.n_seq as u32, 256),
                &mut a,
            )?;
        }
        let mut a = KernelArgs::new();
        a.buf(&partial).i32(x.n_seq as i32).buf(out);
        dev.launch(Kernel::new("policy_loss.cu", "pl_finalize"), LaunchCfg::linear(1, 256), &mut a)
    }

    /// `dlogp` (f32 `[n_seq, t]`) = `dloss[0]` (device f32; None = 1) · ∂loss/∂logp.
    pub fn policy_loss_bwd(
        dev: &GpuDevice,
        x: &PolicyLossBuffers,
        counts: &GpuBuffer,
        cfg: &PolicyLossCfg,
        dloss: Option<&GpuBuffer>,
        dlogp: &GpuBuffer,
    ) -> Result<()> {
        ensure!(dlogp.bytes() >= x.n_seq * x.t * 4, "policy loss: dlogp too small");
        if x.n_seq == 0 {
            return Ok(());
        }
        let mut a = args(x, counts, cfg);
        a.opt(dloss).buf(dlogp);
        dev.launch(Kernel::new("policy_loss.cu", "pl_bwd"), LaunchCfg::linear(x.n_seq as u32, 256), &mut a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A clip range that is not a range is an error, not a panic inside `clamp`.
    #[test]
    fn bad_clip_ranges_are_errors() {
        let (logp, mask, seg) = ([-0.5f32, -0.7], [1.0f32, 1.0], [2, 2]);
        for (lo, hi) in [(-0.1, 0.28), (f32::NAN, 0.28), (0.2, -1.0), (0.2, f32::NAN), (1.5, 0.28)] {
            let cfg =
                PolicyLossCfg { eps_low: lo, eps_high: hi, beta: 0.0, agg: LossAgg::Srml, srml_alpha: 0.5 };
            let x = PolicyLossInput {
                logp: &logp,
                old_logp: &logp,
                ref_logp: None,
                adv: &[1.0],
                adv_per_token: false,
                mask: &mask,
                seg: Some(&seg),
                n_seq: 1,
                t: 2,
            };
            let e = policy_loss(&x, &cfg, 1.0).unwrap_err().to_string();
            assert!(e.contains("eps_low"), "ε {lo}/{hi}: {e}");
        }
    }

    /// SRML over plain answers (no think segment) is the sequence mean, not half of it.
    #[test]
    fn srml_without_think_tokens_weighs_like_seq_mean() {
        let (n_seq, t) = (3, 4);
        let logp: Vec<f32> = (0..12).map(|i| -0.2 - 0.1 * i as f32).collect();
        let old: Vec<f32> = logp.iter().enumerate().map(|(i, l)| l + 0.05 * (i % 3) as f32).collect();
        let mask = [1., 1., 1., 0., 1., 1., 0., 0., 1., 1., 1., 1.];
        let seg = [2; 12];
        let run = |agg| {
            let cfg = PolicyLossCfg { eps_low: 0.2, eps_high: 0.28, beta: 0.0, agg, srml_alpha: 0.3 };
            let x = PolicyLossInput {
                logp: &logp,
                old_logp: &old,
                ref_logp: None,
                adv: &[0.9, -0.4, 1.3],
                adv_per_token: false,
                mask: &mask,
                seg: Some(&seg),
                n_seq,
                t,
            };
            policy_loss(&x, &cfg, 1.0).unwrap()
        };
        let ((a, ga), (b, gb)) = (run(LossAgg::Srml), run(LossAgg::SeqMean));
        assert!((a.loss - b.loss).abs() < 1e-6, "srml {} vs seq-mean {}", a.loss, b.loss);
        for (x, y) in ga.iter().zip(&gb) {
            assert!((x - y).abs() < 1e-6, "gradient {x} vs {y}");
        }
    }

    /// The analytic gradient against central differences of the loss.
    #[test]
    fn gradient_matches_finite_differences() {
        let (n_seq, t) = (2, 5);
        let logp: Vec<f32> = (0..10).map(|i| -0.3 - 0.17 * i as f32).collect();
        let old: Vec<f32> =
            (0..10).map(|i| -0.35 - 0.15 * i as f32 + if i == 3 { 0.5 } else { 0.0 }).collect();
        let refl: Vec<f32> = (0..10).map(|i| -0.2 - 0.2 * i as f32).collect();
        let mask = [1., 1., 1., 0., 1., 1., 1., 1., 1., 0.];
        let seg = [1, 1, 2, 2, 2, 1, 2, 2, 2, 0];
        for agg in [LossAgg::TokenMean, LossAgg::SeqMean, LossAgg::Srml] {
            let cfg = PolicyLossCfg { eps_low: 0.2, eps_high: 0.28, beta: 0.05, agg, srml_alpha: 0.3 };
            let input = |lp: &[f32]| -> f32 {
                let x = PolicyLossInput {
                    logp: lp,
                    old_logp: &old,
                    ref_logp: Some(&refl),
                    adv: &[0.7, -1.2],
                    adv_per_token: false,
                    mask: &mask,
                    seg: Some(&seg),
                    n_seq,
                    t,
                };
                policy_loss(&x, &cfg, 1.0).unwrap().0.loss
            };
            let x = PolicyLossInput {
                logp: &logp,
                old_logp: &old,
                ref_logp: Some(&refl),
                adv: &[0.7, -1.2],
                adv_per_token: false,
                mask: &mask,
                seg: Some(&seg),
                n_seq,
                t,
            };
            let (_, g) = policy_loss(&x, &cfg, 1.0).unwrap();
            for k in 0..10 {
                let h = 1e-3;
                let mut p = logp.clone();
                p[k] += h;
                let up = input(&p);
                p[k] -= 2.0 * h;
                let dn = input(&p);
                let fd = (up - dn) / (2.0 * h);
                assert!((fd - g[k]).abs() < 2e-3, "{agg:?} token {k}: fd {fd} vs {}", g[k]);
            }
        }
    }
}
