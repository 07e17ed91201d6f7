//! `fcgpu doctor`'s probes of the kernel families that are not autograd ops: the AdamW step,
//! group advantages, the policy loss, the sampler and decode attention. Each runs on the device
//! and is compared with its CPU reference at a plain and an awkward shape, like the op probes.

use anyhow::Result;

use super::doctor::{max_abs_diff, values, Probe};
use crate::backend::GpuDevice;
use crate::kernels::adamw::{adamw_step, AdamW};
use crate::kernels::attention::{decode_attn_strided, CacheLayout};
use crate::kernels::logprob::sample_rows;
use crate::rl::advantage::{self as adv, AdvScale, EntropyBonus};
use crate::rl::policy_loss::{self as pl, LossAgg, PolicyLossCfg, PolicyLossInput};
use crate::rollout::sampler::{truncated_distribution, SamplerParams};
use crate::tensor::DType;

/// Records one comparison (errors and tolerances relative to the largest reference value).
fn record(
    out: &mut Vec<Probe>,
    failures: &mut Vec<String>,
    (family, kernel, shape): (&'static str, &'static str, &str),
    result: Result<(Vec<f32>, Vec<f64>)>,
    tol: f64,
) {
    match result {
        Ok((got, want)) => {
            let want32: Vec<f32> = want.iter().map(|&x| x as f32).collect();
            let scale = want.iter().fold(1.0f64, |m, x| m.max(x.abs()));
            let p = Probe {
                kernel,
                family,
                shape: shape.to_string(),
                max_abs_err: max_abs_diff(&got, &want32),
                tol: tol * scale,
            };
            if p.max_abs_err > p.tol {
                failures.push(format!(
                    "{family} {kernel} at {shape}: max |device - cpu| {:.3e} > tolerance {:.1e}",
                    p.max_abs_err, p.tol
                ));
            }
            out.push(p);
        }
        Err(e) => failures.push(format!("{family} at {shape}: {e:#}")),
    }
}

/// Every family below at a plain and an awkward shape.
pub(super) fn run(dev: &GpuDevice, failures: &mut Vec<String>) -> Vec<Probe> {
    let mut out = Vec::new();
    for awkward in [false, true] {
        let tag = if awkward { " (awkward)" } else { "" };
        let n = if awkward { 1003 } else { 1024 };
        record(&mut out, failures, ("adamw", "adamw_step", &format!("{n}{tag}")), adamw(dev, n), 1e-5);
        let (groups, g) = if awkward { (3, 33) } else { (4, 8) };
        let shape = format!("{groups} groups x {g}{tag}");
        record(
            &mut out,
            failures,
            ("advantage", "group_advantages", &shape),
            advantages(dev, groups, g),
            1e-4,
        );
        let (n_seq, t) = if awkward { (3, 37) } else { (4, 32) };
        let shape = format!("{n_seq}x{t}{tag}");
        let (fwd, bwd) = match policy_loss(dev, n_seq, t) {
            Ok((f, b)) => (Ok(f), Ok(b)),
            Err(e) => (Err(anyhow::anyhow!("{e:#}")), Err(e)),
        };
        record(&mut out, failures, ("policy_loss", "policy_loss_fwd", &shape), fwd, 1e-4);
        record(&mut out, failures, ("policy_loss", "policy_loss_bwd", &shape), bwd, 1e-4);
        let vocab = if awkward { 1003 } else { 512 };
        let shape = format!("400 rows, vocab {vocab}{tag}");
        record(&mut out, failures, ("sampling", "sample_rows", &shape), sampling(dev, vocab), 0.0);
        let (hd, len) = if awkward { (40, 37) } else { (64, 64) };
        let shape = format!("3 seqs x 4/2 heads x {hd}, cache {len}{tag}");
        record(
            &mut out,
            failures,
            ("decode_attn", "decode_attn_bf16", &shape),
            decode(dev, hd, len, DType::BF16),
            2e-2,
        );
        record(
            &mut out,
            failures,
            ("decode_attn", "decode_attn_f32", &shape),
            decode(dev, hd, len, DType::F32),
            1e-5,
        );
    }
    out
}

/// One AdamW step (bf16 gradient, clipping scale 0.5, step 3) against the f64 formula.
fn adamw(dev: &GpuDevice, n: usize) -> Result<(Vec<f32>, Vec<f64>)> {
    let (p0, m0, g) = (values(n, 21, 1.0), values(n, 22, 0.1), values(n, 24, 1.0));
    let v0: Vec<f32> = values(n, 23, 0.1).iter().map(|x| x * x).collect();
    let h =
        AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step: 3, grad_scale: 0.5 };
    let (pb, mb, vb) = (dev.upload_f32(&p0)?, dev.upload_f32(&m0)?, dev.upload_f32(&v0)?);
    let gb = dev.upload_as(&g, DType::BF16)?;
    adamw_step(dev, &h, &pb, &mb, &vb, &gb, DType::BF16, None, n)?;
    let (bc1, bc2) = (1.0 - 0.9f64.powi(3), 1.0 - 0.95f64.powi(3));
    let want = (0..n)
        .map(|i| {
            let gi = half::bf16::from_f32(g[i]).to_f64() * 0.5;
            let m = 0.9 * m0[i] as f64 + 0.1 * gi;
            let v = 0.95 * v0[i] as f64 + 0.05 * gi * gi;
            p0[i] as f64 * (1.0 - 1e-3) - 1e-2 * (m / bc1) / ((v / bc2).sqrt() + 1e-8)
        })
        .collect();
    Ok((pb.download_f32()?, want))
}

/// A' and A of `groups` groups of `g` rewards (one group all equal) with the entropy bonus.
fn advantages(dev: &GpuDevice, groups: usize, g: usize) -> Result<(Vec<f32>, Vec<f64>)> {
    let n = groups * g;
    let mut r: Vec<f32> = values(n, 25, 1.0).iter().map(|&x| (x > 0.0) as i32 as f32).collect();
    r[..g].fill(1.0);
    let h: Vec<f32> = values(n, 26, 2.0).iter().map(|x| x.abs()).collect();
    let bonus = EntropyBonus::default();
    let want = adv::group_advantages(&r, g, AdvScale::Group, Some(&h), bonus)?;
    let (rb, hb) = (dev.upload_f32(&r)?, dev.upload_f32(&h)?);
    let (ab, rawb) = (dev.zeros(n * 4)?, dev.zeros(n * 4)?);
    adv::gpu::group_advantages(
        dev,
        &rb,
        groups,
        g,
        AdvScale::Group,
        Some(&hb),
        bonus,
        &ab,
        Some(&rawb),
        None,
    )?;
    let got = [ab.download_f32()?, rawb.download_f32()?].concat();
    Ok((got, want.adv.iter().chain(&want.raw).map(|&x| x as f64).collect()))
}

/// The srml policy loss with clipping and the KL term: (forward [loss, kl, clip fraction],
/// d/dlogp).
type LossPair = ((Vec<f32>, Vec<f64>), (Vec<f32>, Vec<f64>));

fn policy_loss(dev: &GpuDevice, n_seq: usize, t: usize) -> Result<LossPair> {
    let n = n_seq * t;
    let logp: Vec<f32> = values(n, 27, 3.0).iter().map(|x| -x.abs()).collect();
    let old: Vec<f32> = logp.iter().zip(values(n, 28, 0.3)).map(|(l, e)| l + e).collect();
    let refl: Vec<f32> = logp.iter().zip(values(n, 29, 0.2)).map(|(l, e)| l + e).collect();
    let mask: Vec<f32> = (0..n).map(|k| (k % 7 != 3) as i32 as f32).collect();
    let seg: Vec<i32> = (0..n).map(|k| if k % t < t / 3 { 1 } else { 2 }).collect();
    let adv = values(n_seq, 30, 1.0);
    let cfg = PolicyLossCfg { beta: 0.04, ..PolicyLossCfg::default() };
    let x = PolicyLossInput {
        logp: &logp,
        old_logp: &old,
        ref_logp: Some(&refl),
        adv: &adv,
        adv_per_token: false,
        mask: &mask,
        seg: Some(&seg),
        n_seq,
        t,
    };
    debug_assert_eq!(cfg.agg, LossAgg::Srml);
    let (want, wgrad) = pl::policy_loss(&x, &cfg, 1.0)?;
    let up = |v: &[f32]| dev.upload_f32(v);
    let (lb, ob, rb, ab, mb, sb) =
        (up(&logp)?, up(&old)?, up(&refl)?, up(&adv)?, up(&mask)?, dev.upload_i32(&seg)?);
    let b = pl::gpu::PolicyLossBuffers {
        logp: &lb,
        old_logp: &ob,
        ref_logp: Some(&rb),
        adv: &ab,
        adv_per_token: false,
        mask: &mb,
        seg: Some(&sb),
        n_seq,
        t,
    };
    let counts = pl::gpu::counts(dev, &b)?;
    let stats = dev.zeros(16)?;
    pl::gpu::policy_loss_fwd(dev, &b, &counts, &cfg, &stats)?;
    let dl = dev.zeros(n * 4)?;
    pl::gpu::policy_loss_bwd(dev, &b, &counts, &cfg, None, &dl)?;
    let fwd_want = [want.loss, want.kl, want.clip_frac].map(|x| x as f64).to_vec();
    let grad_want = wgrad.iter().map(|&x| x as f64).collect();
    Ok(((stats.download_f32()?[..3].to_vec(), fwd_want), (dl.download_f32()?, grad_want)))
}

/// 400 draws of one row (u = (i + 0.5) / 400, T 0.8, top-p 0.9) and a greedy draw: the error is
/// the largest gap between a token's draw count and 400 × its CPU probability beyond 2 (the
/// rounding of a stratified sample), plus one per wrong greedy token.
fn sampling(dev: &GpuDevice, vocab: usize) -> Result<(Vec<f32>, Vec<f64>)> {
    let rows = 400;
    let z = values(vocab, 31, 4.0);
    let zz: Vec<f32> = (0..rows).flat_map(|_| z.iter().copied()).collect();
    let u: Vec<f32> = (0..rows).map(|i| (i as f32 + 0.5) / rows as f32).collect();
    let (zb, ub, tb) = (dev.upload_f32(&zz)?, dev.upload_f32(&u)?, dev.zeros(rows * 4)?);
    let params = SamplerParams { temperature: 0.8, top_p: 0.9, top_k: 0 };
    sample_rows(dev, DType::F32, &zb, vocab, rows, vocab, params.temperature, params.top_p, &ub, &tb)?;
    let mut count = vec![0.0f64; vocab];
    for &t in &tb.download_i32()? {
        anyhow::ensure!(t >= 0 && (t as usize) < vocab, "sampled token {t} outside the vocabulary");
        count[t as usize] += 1.0;
    }
    let mut excess = 0.0f64;
    for (t, p) in truncated_distribution(&z, &params) {
        excess = excess.max((count[t as usize] - p * rows as f64).abs() - 2.0);
        count[t as usize] = 0.0;
    }
    excess = excess.max(count.iter().copied().fold(0.0, f64::max)); // draws outside the nucleus
    sample_rows(dev, DType::F32, &zb, vocab, 1, vocab, 0.0, 1.0, &ub, &tb)?;
    let greedy = tb.download_i32()?[0] as usize;
    let wrong = (greedy != crate::rollout::sampler::argmax(&z)) as i32 as f64;
    Ok((vec![(excess.max(0.0) + wrong) as f32], vec![0.0]))
}

/// Decode attention of 3 sequences (cache lengths len, 1 and len / 2) against an f64 softmax.
fn decode(dev: &GpuDevice, hd: usize, max_len: usize, dt: DType) -> Result<(Vec<f32>, Vec<f64>)> {
    let (batch, q_heads, kv_heads) = (3usize, 4usize, 2usize);
    let lens = [max_len as i32, 1, (max_len / 2) as i32];
    let round = |v: Vec<f32>| -> Vec<f32> {
        if dt == DType::BF16 {
            v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect()
        } else {
            v
        }
    };
    let q = round(values(batch * q_heads * hd, 32, 1.0));
    let kc = round(values(batch * max_len * kv_heads * hd, 33, 1.0));
    let vc = round(values(batch * max_len * kv_heads * hd, 34, 1.0));
    let layout = CacheLayout::token_major(max_len, kv_heads, hd);
    let ob = dev.zeros(q.len() * dt.size())?;
    let (qb, kb, vb) = (dev.upload_as(&q, dt)?, dev.upload_as(&kc, dt)?, dev.upload_as(&vc, dt)?);
    let lb = dev.upload_i32(&lens)?;
    decode_attn_strided(dev, &qb, &kb, &vb, &lb, &ob, batch, q_heads, kv_heads, hd, max_len, layout, dt)?;
    let mut want = vec![0f64; q.len()];
    let scale = 1.0 / (hd as f64).sqrt();
    for b in 0..batch {
        for h in 0..q_heads {
            let kvh = h / (q_heads / kv_heads);
            let at = |j: usize| b * layout.batch_stride + j * layout.pos_stride + kvh * layout.head_stride;
            let qr = &q[(b * q_heads + h) * hd..][..hd];
            let s: Vec<f64> = (0..lens[b] as usize)
                .map(|j| (0..hd).map(|d| qr[d] as f64 * kc[at(j) + d] as f64).sum::<f64>() * scale)
                .collect();
            let m = s.iter().copied().fold(f64::MIN, f64::max);
            let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
            for (j, sj) in s.iter().enumerate() {
                let p = (sj - m).exp() / z;
                for d in 0..hd {
                    want[(b * q_heads + h) * hd + d] += p * vc[at(j) + d] as f64;
                }
            }
        }
    }
    Ok((ob.download_as_f32(dt)?, want))
}
