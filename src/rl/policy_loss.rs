//! Clipped GRPO policy loss with the k3 KL penalty and the aggregation weights (SPEC §3.5–3.7),
//! rollout correction (TIS/MIS) and GSPO's sequence-level ratio: CPU reference (forward +
//! d loss / d logp) and GPU wrappers for `kernels/policy_loss.cu`.
//!
//! Per completion token: `ρ = exp(logp − old)` (or GSPO's `s_i`, below), `ℓ = −min(ρ·A,
//! clip(ρ, 1−ε_low, 1+ε_high)·A)`, `k = exp(ref − logp) − (ref − logp) − 1`, `L = c·ℓ + β·k`
//! with `c` the detached rollout-correction weight (1 without correction); `loss = Σ w·L` with
//! token-mean `w = m/Σm`, seq-mean `w = m/(N_i·n_seq)`, srml `w = m·α_s/(N_think,i·n_seq)` on think
//! tokens (seg 1) and `m·(1−α_s)/(N_result,i·n_seq)` on result tokens (seg 2); a sequence with
//! only one segment gives it the whole weight, `m/(N_seg,i·n_seq)`.
//! `∂L/∂logp = −c·A·ρ` on the unclipped branch (ρ·A <= clip·A), else 0, `+ β·(1 − exp(ref − logp))`.
//!
//! Rollout correction ([`RolloutCorrection`], docs/training.md "Rollout correction"): with
//! `r = exp(old − rollout)` per token, or `r_i = exp(Σ_t m·(old − rollout)/N_i)` (the geometric
//! mean of the sequence's token ratios) for `seq-*`, TIS sets `c = min(r, C)` and MIS sets
//! `c = 0` where `r > C` (else 1). `c` scales the policy-gradient term only: the KL term and the
//! aggregation weights (denominators) are unchanged, as in TRL.
//!
//! GSPO ([`ImportanceLevel::Sequence`]): every token of sequence i uses
//! `s_i = exp(Σ_t m·(logp − old)/N_i)`, clipped to [1−ε_low, 1+ε_high], and the gradient flows
//! through `s_i` into every token: `∂loss/∂logp_u = m_u·s_i/N_i · Σ_t w_t·c_t·g_t` with
//! `g_t = −A_t` on the unclipped branch (else 0), plus the token's own KL gradient.

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

/// `--rollout-correction`: how the policy-gradient term is corrected for the gap between the
/// sampler's log-probs (π_rollout) and the update's (π_old). See the module docs.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum RolloutCorrection {
    #[default]
    None,
    /// Truncated IS per token: `c = min(π_old/π_rollout, C)`.
    TokenTis,
    /// Masked IS per token: `c = 0` where `π_old/π_rollout > C`, else 1.
    TokenMis,
    /// Truncated IS with the sequence's geometric-mean ratio.
    SeqTis,
    /// Masked IS with the sequence's geometric-mean ratio (drops whole sequences).
    SeqMis,
}

impl RolloutCorrection {
    /// The kernel's code: 0 none, 1 token-tis, 2 token-mis, 3 seq-tis, 4 seq-mis.
    fn code(self) -> i32 {
        self as i32
    }

    fn per_sequence(self) -> bool {
        matches!(self, RolloutCorrection::SeqTis | RolloutCorrection::SeqMis)
    }

    fn masks(self) -> bool {
        matches!(self, RolloutCorrection::TokenMis | RolloutCorrection::SeqMis)
    }
}

/// `--importance-level`: the ratio the clipped objective uses.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum ImportanceLevel {
    /// PPO/GRPO: one ratio per token.
    #[default]
    Token,
    /// GSPO: the sequence's length-normalised ratio for all its tokens.
    Sequence,
}

/// The ratio options of issue 28, apart from [`PolicyLossCfg`] so that its existing struct
/// literals keep compiling. `Default` is the plain GRPO loss (token ratios, no correction).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RatioCfg {
    pub level: ImportanceLevel,
    pub correction: RolloutCorrection,
    /// C of the correction (`--rollout-correction-cap`), >= 1.
    pub cap: f32,
}

impl Default for RatioCfg {
    fn default() -> Self {
        RatioCfg { level: ImportanceLevel::Token, correction: RolloutCorrection::None, cap: 2.0 }
    }
}

impl RatioCfg {
    fn check(&self) -> Result<()> {
        ensure!(
            self.cap.is_finite() && self.cap >= 1.0,
            "policy_loss: rollout correction cap {} must be finite and >= 1",
            self.cap
        );
        Ok(())
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
    /// Fraction of completion tokens whose policy-gradient term MIS dropped (0 unless a `*-mis`
    /// correction).
    pub rollout_masked_frac: f32,
    /// Fraction of completion tokens whose TIS weight was capped at C (0 unless a `*-tis`
    /// correction).
    pub rollout_capped_frac: f32,
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

fn check_rollout(x: &PolicyLossInput, rollout: Option<&[f32]>, rc: &RatioCfg) -> Result<()> {
    rc.check()?;
    ensure!(
        rc.correction == RolloutCorrection::None || rollout.is_some(),
        "policy_loss: rollout correction {:?} needs the rollout log-probs",
        rc.correction
    );
    ensure!(
        rollout.is_none_or(|r| r.len() == x.n_seq * x.t),
        "policy_loss: rollout log-probs must be [n_seq, t]"
    );
    Ok(())
}

/// `Σ_t m·(a − b) / Σ_t m` over one sequence (0 when it has no tokens): the log of the
/// geometric mean of its token ratios `exp(a − b)`.
fn seq_mean_log_ratio(a: &[f32], b: &[f32], mask: &[f32], row: std::ops::Range<usize>) -> f64 {
    let (mut s, mut n) = (0.0f64, 0.0f64);
    for k in row {
        let m = mask[k] as f64;
        if m != 0.0 {
            s += m * (a[k] as f64 - b[k] as f64);
            n += m;
        }
    }
    if n > 0.0 {
        s / n
    } else {
        0.0
    }
}

/// The correction weight `c` of a rollout ratio `r`, and whether MIS masked it / TIS capped it.
fn correct(r: f64, rc: &RatioCfg) -> (f64, bool, bool) {
    if rc.correction == RolloutCorrection::None {
        return (1.0, false, false);
    }
    let (cap, over) = (rc.cap as f64, r > rc.cap as f64);
    if rc.correction.masks() {
        (if over { 0.0 } else { 1.0 }, over, false)
    } else {
        (r.min(cap), false, over)
    }
}

/// Forward and `d loss / d logp` (times `dloss`), in f64, of the plain loss (token ratios, no
/// rollout correction).
pub fn policy_loss(
    x: &PolicyLossInput,
    cfg: &PolicyLossCfg,
    dloss: f32,
) -> Result<(PolicyLossStats, Vec<f32>)> {
    policy_loss_with(x, None, cfg, &RatioCfg::default(), dloss)
}

/// Forward and `d loss / d logp` (times `dloss`), in f64, with the ratio options `rc`.
/// `rollout_logp` (`[n_seq, t]`, the sampler's log-probs) is required when `rc.correction` is
/// not `None` and ignored otherwise.
pub fn policy_loss_with(
    x: &PolicyLossInput,
    rollout_logp: Option<&[f32]>,
    cfg: &PolicyLossCfg,
    rc: &RatioCfg,
    dloss: f32,
) -> Result<(PolicyLossStats, Vec<f32>)> {
    check(x, cfg)?;
    check_rollout(x, rollout_logp, rc)?;
    let (n, t) = (x.n_seq * x.t, x.t);
    let w = weights(x, cfg.agg, cfg.srml_alpha);
    let gspo = rc.level == ImportanceLevel::Sequence;
    let rollout = rollout_logp.filter(|_| rc.correction != RolloutCorrection::None);
    // loss, Σ m·kl, clipped, tokens, masked, capped
    let mut acc = [0.0f64; 6];
    let mut grad = vec![0.0f64; n];
    for i in 0..x.n_seq {
        let row = i * t..(i + 1) * t;
        let s_i = seq_mean_log_ratio(x.logp, x.old_logp, x.mask, row.clone()).exp();
        let r_i = rollout
            .filter(|_| rc.correction.per_sequence())
            .map(|r| seq_mean_log_ratio(x.old_logp, r, x.mask, row.clone()).exp());
        // GSPO: Σ_t w_t·c_t·g_t, spread over the sequence's tokens through s_i below.
        let mut seq_g = 0.0f64;
        for k in row.clone() {
            let m = x.mask[k] as f64;
            if m == 0.0 {
                continue;
            }
            let (lp, old) = (x.logp[k] as f64, x.old_logp[k] as f64);
            let a = x.adv[if x.adv_per_token { k } else { i }] as f64;
            let rho = if gspo { s_i } else { (lp - old).exp() };
            let r = r_i.or(rollout.map(|r| (old - r[k] as f64).exp())).unwrap_or(1.0);
            let (c, masked, capped) = correct(r, rc);
            let clipped = rho.clamp(1.0 - cfg.eps_low as f64, 1.0 + cfg.eps_high as f64);
            let (un, cl) = (rho * a, clipped * a);
            let g = if un <= cl { -a } else { 0.0 };
            let mut l = -un.min(cl) * c;
            let mut gk = if gspo { 0.0 } else { c * g * rho };
            seq_g += w[k] * c * g;
            let mut kk = 0.0;
            if let (Some(r), true) = (x.ref_logp, cfg.beta != 0.0) {
                let d = r[k] as f64 - lp;
                kk = d.exp() - d - 1.0;
                l += cfg.beta as f64 * kk;
                gk += cfg.beta as f64 * (1.0 - d.exp());
            }
            let flags = [un > cl, true, masked, capped].map(|f| if f { m } else { 0.0 });
            acc[0] += w[k] * l;
            acc[1] += m * kk;
            acc[2] += flags[0];
            acc[3] += flags[1];
            acc[4] += flags[2];
            acc[5] += flags[3];
            grad[k] = w[k] * gk;
        }
        let n_i: f64 = row.clone().map(|k| x.mask[k] as f64).sum();
        if gspo && n_i > 0.0 {
            for k in row {
                grad[k] += x.mask[k] as f64 * s_i / n_i * seq_g;
            }
        }
    }
    let frac = |v: f64| if acc[3] > 0.0 { (v / acc[3]) as f32 } else { 0.0 };
    let stats = PolicyLossStats {
        loss: acc[0] as f32,
        kl: frac(acc[1]),
        clip_frac: frac(acc[2]),
        tokens: acc[3] as f32,
        rollout_masked_frac: frac(acc[4]),
        rollout_capped_frac: frac(acc[5]),
    };
    Ok((stats, grad.iter().map(|g| (dloss as f64 * g) as f32).collect()))
}

/// [`policy_loss`] on `device` (plain loss; see [`policy_loss_on_with`]).
pub fn policy_loss_on(
    device: Device,
    x: &PolicyLossInput,
    cfg: &PolicyLossCfg,
    dloss: f32,
) -> Result<(PolicyLossStats, Vec<f32>)> {
    policy_loss_on_with(device, x, None, cfg, &RatioCfg::default(), dloss)
}

/// [`policy_loss_with`] on `device`: the f64 reference on the cpu; on a GPU the fused kernels
/// (counts, forward, backward) on the uploaded inputs, with the stats and the gradient
/// downloaded.
pub fn policy_loss_on_with(
    device: Device,
    x: &PolicyLossInput,
    rollout_logp: Option<&[f32]>,
    cfg: &PolicyLossCfg,
    rc: &RatioCfg,
    dloss: f32,
) -> Result<(PolicyLossStats, Vec<f32>)> {
    if device.is_cpu() {
        return policy_loss_with(x, rollout_logp, cfg, rc, dloss);
    }
    check(x, cfg)?;
    check_rollout(x, rollout_logp, rc)?;
    let dev = device.gpu()?;
    let (logp, old, adv, mask) = (
        dev.upload_f32(x.logp)?,
        dev.upload_f32(x.old_logp)?,
        dev.upload_f32(x.adv)?,
        dev.upload_f32(x.mask)?,
    );
    let refl = x.ref_logp.map(|r| dev.upload_f32(r)).transpose()?;
    let seg = x.seg.map(|s| dev.upload_i32(s)).transpose()?;
    let roll = rollout_logp.map(|r| dev.upload_f32(r)).transpose()?;
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
    let out = dev.zeros(gpu::STATS_WITH * 4)?;
    gpu::policy_loss_fwd_with(&dev, &b, roll.as_ref(), &counts, cfg, rc, &out)?;
    let (dl, grad) = (dev.upload_f32(&[dloss])?, dev.zeros(x.n_seq * x.t * 4)?);
    gpu::policy_loss_bwd_with(&dev, &b, roll.as_ref(), &counts, cfg, rc, Some(&dl), &grad)?;
    let o = out.download_f32()?;
    let stats = PolicyLossStats {
        loss: o[0],
        kl: o[1],
        clip_frac: o[2],
        tokens: o[3],
        rollout_masked_frac: o[4],
        rollout_capped_frac: o[5],
    };
    Ok((stats, grad.download_f32()?))
}

/// GPU launch wrappers for `kernels/policy_loss.cu`.
pub mod gpu {
    use anyhow::{ensure, Result};

    use super::{PolicyLossCfg, RatioCfg, RolloutCorrection};
    use crate::backend::{GpuBuffer, GpuDevice, Kernel, KernelArgs, LaunchCfg};

    /// Floats [`policy_loss_fwd`] writes: loss, mean KL, clip fraction, tokens.
    pub const STATS: usize = 4;
    /// Floats [`policy_loss_fwd_with`] writes: [`STATS`], then the rollout-correction masked
    /// and capped fractions.
    pub const STATS_WITH: usize = 6;

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

    fn args(
        x: &PolicyLossBuffers,
        rollout: Option<&GpuBuffer>,
        counts: &GpuBuffer,
        cfg: &PolicyLossCfg,
        rc: &RatioCfg,
    ) -> KernelArgs {
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
            .f32(alpha)
            .opt(rollout)
            .i32(rc.level as i32)
            .i32(rc.correction.code())
            .f32(rc.cap);
        a
    }

    /// The ratio options are valid and a correction has its rollout log-probs.
    fn check_ratio(x: &PolicyLossBuffers, rollout: Option<&GpuBuffer>, rc: &RatioCfg) -> Result<()> {
        rc.check()?;
        ensure!(
            rc.correction == RolloutCorrection::None || rollout.is_some(),
            "policy loss: rollout correction {:?} needs the rollout log-probs",
            rc.correction
        );
        ensure!(
            rollout.is_none_or(|r| r.bytes() >= x.n_seq * x.t * 4),
            "policy loss: rollout log-probs too small"
        );
        Ok(())
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

    /// Plain loss and stats into `out` (f32 `[STATS]`: loss, mean KL, clip fraction, tokens).
    pub fn policy_loss_fwd(
        dev: &GpuDevice,
        x: &PolicyLossBuffers,
        counts: &GpuBuffer,
        cfg: &PolicyLossCfg,
        out: &GpuBuffer,
    ) -> Result<()> {
        fwd(dev, x, None, counts, cfg, &RatioCfg::default(), out, STATS)
    }

    /// Loss and stats with the ratio options `rc` into `out` (f32 `[STATS_WITH]`: loss, mean
    /// KL, clip fraction, tokens, rollout masked fraction, rollout capped fraction). `rollout`:
    /// the sampler's log-probs `[n_seq, t]`, required when `rc.correction` is not `None`.
    pub fn policy_loss_fwd_with(
        dev: &GpuDevice,
        x: &PolicyLossBuffers,
        rollout: Option<&GpuBuffer>,
        counts: &GpuBuffer,
        cfg: &PolicyLossCfg,
        rc: &RatioCfg,
        out: &GpuBuffer,
    ) -> Result<()> {
        fwd(dev, x, rollout, counts, cfg, rc, out, STATS_WITH)
    }

    #[allow(clippy::too_many_arguments)]
    fn fwd(
        dev: &GpuDevice,
        x: &PolicyLossBuffers,
        rollout: Option<&GpuBuffer>,
        counts: &GpuBuffer,
        cfg: &PolicyLossCfg,
        rc: &RatioCfg,
        out: &GpuBuffer,
        n_out: usize,
    ) -> Result<()> {
        ensure!(out.bytes() >= n_out * 4, "policy loss: out needs {n_out} floats");
        check_ratio(x, rollout, rc)?;
        let partial = dev.zeros(x.n_seq.max(1) * STATS_WITH * 4)?;
        if x.n_seq > 0 {
            let mut a = args(x, rollout, counts, cfg, rc);
            a.buf(&partial);
            dev.launch(
                Kernel::new("policy_loss.cu", "pl_fwd"),
                LaunchCfg::linear(x.n_seq as u32, 256),
                &mut a,
            )?;
        }
        let mut a = KernelArgs::new();
        a.buf(&partial).i32(x.n_seq as i32).i32(n_out as i32).buf(out);
        dev.launch(Kernel::new("policy_loss.cu", "pl_finalize"), LaunchCfg::linear(1, 256), &mut a)
    }

    /// Plain loss: `dlogp` (f32 `[n_seq, t]`) = `dloss[0]` (device f32; None = 1) · ∂loss/∂logp.
    pub fn policy_loss_bwd(
        dev: &GpuDevice,
        x: &PolicyLossBuffers,
        counts: &GpuBuffer,
        cfg: &PolicyLossCfg,
        dloss: Option<&GpuBuffer>,
        dlogp: &GpuBuffer,
    ) -> Result<()> {
        policy_loss_bwd_with(dev, x, None, counts, cfg, &RatioCfg::default(), dloss, dlogp)
    }

    /// [`policy_loss_bwd`] with the ratio options `rc` (see [`policy_loss_fwd_with`]).
    #[allow(clippy::too_many_arguments)]
    pub fn policy_loss_bwd_with(
        dev: &GpuDevice,
        x: &PolicyLossBuffers,
        rollout: Option<&GpuBuffer>,
        counts: &GpuBuffer,
        cfg: &PolicyLossCfg,
        rc: &RatioCfg,
        dloss: Option<&GpuBuffer>,
        dlogp: &GpuBuffer,
    ) -> Result<()> {
        ensure!(dlogp.bytes() >= x.n_seq * x.t * 4, "policy loss: dlogp too small");
        check_ratio(x, rollout, rc)?;
        if x.n_seq == 0 {
            return Ok(());
        }
        let mut a = args(x, rollout, counts, cfg, rc);
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

    fn small_case() -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, [f32; 10], [i32; 10]) {
        let logp: Vec<f32> = (0..10).map(|i| -0.3 - 0.17 * i as f32).collect();
        let old: Vec<f32> =
            (0..10).map(|i| -0.35 - 0.15 * i as f32 + if i == 3 { 0.5 } else { 0.0 }).collect();
        let refl: Vec<f32> = (0..10).map(|i| -0.2 - 0.2 * i as f32).collect();
        // Token ratios old/rollout around 1, two above 2 (tokens 1 and 6); sequence 1's
        // geometric mean above 1.5.
        let roll: Vec<f32> = old
            .iter()
            .enumerate()
            .map(|(i, o)| o - [0.1, 0.9, -0.2, 0.0, 0.3, 0.5, 1.2, 0.4, 0.3, 0.0][i])
            .collect();
        let mask = [1., 1., 1., 0., 1., 1., 1., 1., 1., 0.];
        let seg = [1, 1, 2, 2, 2, 1, 2, 2, 2, 0];
        (logp, old, refl, roll, mask, seg)
    }

    /// GSPO and every rollout correction: the analytic gradient (through the sequence ratio)
    /// against central differences, and the masked / capped fractions by hand.
    #[test]
    fn ratio_options_gradient_matches_finite_differences() {
        use ImportanceLevel as L;
        use RolloutCorrection as C;
        let (logp, old, refl, roll, mask, seg) = small_case();
        let adv = [0.7f32, -1.2, 0.4, 1.1, -0.3, 0.9, -0.8, 0.2, 1.5, 0.6];
        for level in [L::Token, L::Sequence] {
            for correction in [C::None, C::TokenTis, C::TokenMis, C::SeqTis, C::SeqMis] {
                for (agg, per_tok) in
                    [(LossAgg::TokenMean, false), (LossAgg::SeqMean, true), (LossAgg::Srml, true)]
                {
                    let cfg =
                        PolicyLossCfg { eps_low: 0.2, eps_high: 0.28, beta: 0.05, agg, srml_alpha: 0.3 };
                    let rc = RatioCfg { level, correction, cap: 1.5 };
                    let run = |lp: &[f32]| {
                        let x = PolicyLossInput {
                            logp: lp,
                            old_logp: &old,
                            ref_logp: Some(&refl),
                            adv: if per_tok { &adv } else { &adv[..2] },
                            adv_per_token: per_tok,
                            mask: &mask,
                            seg: Some(&seg),
                            n_seq: 2,
                            t: 5,
                        };
                        policy_loss_with(&x, Some(&roll), &cfg, &rc, 1.0).unwrap()
                    };
                    let (stats, g) = run(&logp);
                    for k in 0..10 {
                        let h = 1e-3;
                        let mut p = logp.clone();
                        p[k] += h;
                        let up = run(&p).0.loss;
                        p[k] -= 2.0 * h;
                        let fd = (up - run(&p).0.loss) / (2.0 * h);
                        assert!((fd - g[k]).abs() < 2e-3, "{rc:?} {agg:?} token {k}: fd {fd} vs {}", g[k]);
                    }
                    // 8 tokens; ratios above 1.5: tokens 1, 5 and 6 (e^0.9, e^0.5, e^1.2);
                    // sequence 1's mean log-ratio (0.5 + 1.2 + 0.4 + 0.3) / 4 = 0.6 > ln 1.5.
                    let over = match correction {
                        C::None => 0.0,
                        C::TokenTis | C::TokenMis => 3.0 / 8.0,
                        C::SeqTis | C::SeqMis => 4.0 / 8.0,
                    };
                    let (masked, capped) = if correction.masks() { (over, 0.0) } else { (0.0, over) };
                    assert_eq!(
                        (stats.rollout_masked_frac, stats.rollout_capped_frac),
                        (masked, capped),
                        "{rc:?}"
                    );
                }
            }
        }
    }

    /// GSPO with per-sequence advantages and seq-mean is the GSPO objective
    /// `−(1/G) Σ_i min(s_i·A_i, clip(s_i)·A_i)`, whatever the sequence lengths.
    #[test]
    fn gspo_seq_mean_is_the_sequence_objective() {
        let (logp, old, _, _, mask, seg) = small_case();
        let adv = [0.7f32, -1.2];
        let cfg =
            PolicyLossCfg { eps_low: 0.2, eps_high: 0.28, beta: 0.0, agg: LossAgg::SeqMean, srml_alpha: 0.5 };
        let rc = RatioCfg { level: ImportanceLevel::Sequence, ..RatioCfg::default() };
        let x = PolicyLossInput {
            logp: &logp,
            old_logp: &old,
            ref_logp: None,
            adv: &adv,
            adv_per_token: false,
            mask: &mask,
            seg: Some(&seg),
            n_seq: 2,
            t: 5,
        };
        let (stats, _) = policy_loss_with(&x, None, &cfg, &rc, 1.0).unwrap();
        let mut want = 0.0f64;
        for i in 0..2 {
            let row = i * 5..i * 5 + 5;
            let s = seq_mean_log_ratio(&logp, &old, &mask, row).exp();
            let a = adv[i] as f64;
            want -= (s * a).min(s.clamp(0.8, 1.28) * a) / 2.0;
        }
        assert!((stats.loss as f64 - want).abs() < 1e-6, "{} vs {want}", stats.loss);
    }

    /// A correction without rollout log-probs, or a cap below 1, is an error; a rollout given
    /// with no correction changes nothing.
    #[test]
    fn ratio_option_errors_and_no_op() {
        let (logp, old, _, roll, mask, seg) = small_case();
        let cfg = PolicyLossCfg::default();
        let x = PolicyLossInput {
            logp: &logp,
            old_logp: &old,
            ref_logp: None,
            adv: &[0.5, -0.5],
            adv_per_token: false,
            mask: &mask,
            seg: Some(&seg),
            n_seq: 2,
            t: 5,
        };
        let tis = RatioCfg { correction: RolloutCorrection::TokenTis, ..RatioCfg::default() };
        let e = policy_loss_with(&x, None, &cfg, &tis, 1.0).unwrap_err().to_string();
        assert!(e.contains("needs the rollout log-probs"), "{e}");
        for cap in [0.5, f32::NAN, f32::INFINITY] {
            let e = policy_loss_with(&x, Some(&roll), &cfg, &RatioCfg { cap, ..tis }, 1.0).unwrap_err();
            assert!(e.to_string().contains("cap"), "{e}");
        }
        let e = policy_loss_with(&x, Some(&roll[..4]), &cfg, &tis, 1.0).unwrap_err().to_string();
        assert!(e.contains("[n_seq, t]"), "{e}");
        let plain = policy_loss(&x, &cfg, 1.0).unwrap();
        assert_eq!(policy_loss_with(&x, Some(&roll), &cfg, &RatioCfg::default(), 1.0).unwrap(), plain);
    }
}
