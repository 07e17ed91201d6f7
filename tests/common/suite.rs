//! The kernel test suite, run on the emu device (tests/gpu_emu.rs) and on a real GPU
//! (tests/gpu_cuda.rs): every kernel against the CPU op or a straightforward f64 reference.
//! Tolerances: f32 kernels ~1e-5 relative; bf16 storage ~2e-2 relative (8-bit mantissa).
#![allow(dead_code)]

use fcgpu::backend::GpuDevice;
use fcgpu::DType;

use super::*;

pub fn swiglu_fwd_bwd(dev: &GpuDevice) {
    let d = dev.clone();
    use fcgpu::kernels::swiglu::{swiglu_bwd, swiglu_fwd};
    for &n in &[1usize, 255, 257, 1000] {
        let g = randn(n, 1, 2.0);
        let u = randn(n, 2, 1.0);
        let dout = randn(n, 3, 1.0);
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let want: Vec<f64> = (0..n).map(|i| g[i] as f64 * sig(g[i] as f64) * u[i] as f64).collect();
        let want_dg: Vec<f64> = (0..n)
            .map(|i| {
                let (x, s) = (g[i] as f64, sig(g[i] as f64));
                dout[i] as f64 * u[i] as f64 * s * (1.0 + x * (1.0 - s))
            })
            .collect();
        let want_du: Vec<f64> = (0..n).map(|i| dout[i] as f64 * g[i] as f64 * sig(g[i] as f64)).collect();
        for (dt, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
            let (gb, ub, db) = (up(&d, &g, dt), up(&d, &u, dt), up(&d, &dout, dt));
            let out = d.zeros(n * dt.size()).unwrap();
            swiglu_fwd(&d, dt, &gb, &ub, &out, n).unwrap();
            assert_close(&down(&out, dt), &want, tol, &format!("swiglu fwd {dt:?} n={n}"));
            let (dg, du) = (d.zeros(n * dt.size()).unwrap(), d.zeros(n * dt.size()).unwrap());
            swiglu_bwd(&d, dt, &gb, &ub, &db, &dg, &du, n).unwrap();
            assert_close(&down(&dg, dt), &want_dg, tol, &format!("swiglu dgate {dt:?} n={n}"));
            assert_close(&down(&du, dt), &want_du, tol, &format!("swiglu dup {dt:?} n={n}"));
        }
    }
}

// ---------------------------------------------------------------- the execution model itself

pub fn shared_memory_is_per_block_and_barriers_hold(dev: &GpuDevice) {
    let d = dev.clone();
    use fcgpu::backend::{Kernel, KernelArgs, LaunchCfg};
    for &(blocks, n) in &[(1usize, 1usize), (7, 96), (5, 1024), (9, 33)] {
        let input: Vec<i32> = (0..(blocks * n) as i32).map(|x| x * 7 + 3).collect();
        let ib = d.upload_i32(&input).unwrap();
        let ob = d.zeros(input.len() * 4).unwrap();
        let mut a = KernelArgs::new();
        a.buf(&ib).buf(&ob);
        d.launch(
            Kernel::new("selftest.cu", "selftest_block_reverse"),
            LaunchCfg::linear(blocks as u32, n as u32),
            &mut a,
        )
        .unwrap();
        let out = ob.download_i32().unwrap();
        for b in 0..blocks {
            for t in 0..n {
                assert_eq!(out[b * n + t], input[b * n + n - 1 - t], "block {b} thread {t} (n={n})");
            }
        }
        // dynamic shared memory scan, many barriers
        let x: Vec<f32> = (0..blocks * n).map(|i| (i % 13) as f32 - 6.0).collect();
        let xb = d.upload_f32(&x).unwrap();
        let yb = d.zeros(x.len() * 4).unwrap();
        let mut a = KernelArgs::new();
        a.buf(&xb).buf(&yb);
        let cfg = LaunchCfg::linear(blocks as u32, n as u32).with_shared((n * 4) as u32);
        d.launch(Kernel::new("selftest.cu", "selftest_scan"), cfg, &mut a).unwrap();
        let y = yb.download_f32().unwrap();
        for b in 0..blocks {
            let mut s = 0.0;
            for t in 0..n {
                s += x[b * n + t];
                assert_eq!(y[b * n + t], s, "scan block {b} thread {t}");
            }
        }
    }
}

pub fn warp_shuffles_votes_and_atomics(dev: &GpuDevice) {
    let d = dev.clone();
    use fcgpu::backend::{Kernel, KernelArgs, LaunchCfg};
    let v: Vec<i32> = (0..64).map(|i| i * i % 37).collect();
    let ib = d.upload_i32(&v).unwrap();
    let bufs: Vec<_> = (0..6).map(|_| d.zeros(64 * 4).unwrap()).collect();
    let total = d.zeros(4).unwrap();
    let mut a = KernelArgs::new();
    a.buf(&ib);
    for b in &bufs {
        a.buf(b);
    }
    a.buf(&total);
    d.launch(Kernel::new("selftest.cu", "selftest_warp"), LaunchCfg::linear(1, 64), &mut a).unwrap();
    let (x, dn, bc, upv) = (
        bufs[0].download_i32().unwrap(),
        bufs[1].download_i32().unwrap(),
        bufs[2].download_i32().unwrap(),
        bufs[3].download_i32().unwrap(),
    );
    let ballot = bufs[4].download_i32().unwrap();
    let ws = bufs[5].download_f32().unwrap();
    for t in 0..64 {
        let (w, l) = (t / 32 * 32, t % 32);
        assert_eq!(x[t], v[w + (l ^ 16)], "xor lane {t}");
        assert_eq!(dn[t], if l + 3 < 32 { v[t + 3] } else { v[t] }, "down lane {t}");
        assert_eq!(bc[t], v[w + 5], "bcast lane {t}");
        assert_eq!(upv[t], if l >= 1 { v[t - 1] } else { v[t] }, "up lane {t}");
        let want_ballot = (0..32).filter(|&i| v[w + i] & 1 == 1).fold(0u32, |m, i| m | 1 << i);
        assert_eq!(ballot[t] as u32, want_ballot, "ballot lane {t}");
        assert_eq!(ws[t], v[w..w + 32].iter().sum::<i32>() as f32, "warp_sum lane {t}");
    }
    assert_eq!(total.download_f32().unwrap()[0], v.iter().sum::<i32>() as f32);
}

pub fn mma_and_ldmatrix_follow_the_ptx_fragment_layouts(dev: &GpuDevice) {
    let d = dev.clone();
    use fcgpu::backend::{Kernel, KernelArgs, LaunchCfg};
    let a: Vec<f32> = quant(&randn(256, 11, 1.0), DType::BF16);
    let b: Vec<f32> = quant(&randn(128, 12, 1.0), DType::BF16); // B[k][n], 16 x 8
    let bt: Vec<f32> = (0..128).map(|i| b[(i % 16) * 8 + i / 16]).collect(); // Bt[n][k]
    let want: Vec<f64> = (0..128)
        .map(|i| (0..16).map(|k| a[(i / 8) * 16 + k] as f64 * b[k * 8 + i % 8] as f64).sum())
        .collect();
    let (ab, bb, btb) = (up(&d, &a, DType::BF16), up(&d, &b, DType::BF16), up(&d, &bt, DType::BF16));
    let d0 = d.zeros(512).unwrap();
    let mut args = KernelArgs::new();
    args.buf(&ab).buf(&btb).buf(&d0);
    d.launch(Kernel::new("selftest.cu", "selftest_mma_direct"), LaunchCfg::linear(1, 32), &mut args).unwrap();
    assert_close(&d0.download_f32().unwrap(), &want, 1e-5, "mma direct");
    let (d1, d2) = (d.zeros(512).unwrap(), d.zeros(512).unwrap());
    let mut args = KernelArgs::new();
    args.buf(&ab).buf(&btb).buf(&bb).buf(&d1).buf(&d2);
    d.launch(Kernel::new("selftest.cu", "selftest_mma_ldmatrix"), LaunchCfg::linear(1, 32), &mut args)
        .unwrap();
    assert_close(&d1.download_f32().unwrap(), &want, 1e-5, "mma via ldmatrix");
    assert_close(&d2.download_f32().unwrap(), &want, 1e-5, "mma via ldmatrix.trans");
}

// ---------------------------------------------------------------- model ops vs the CPU ops

const DTS: [(DType, f64); 2] = [(DType::F32, 2e-5), (DType::BF16, 2e-2)];

pub fn swiglu_matches_cpu_op(dev: &GpuDevice) {
    let d = dev.clone();
    use fcgpu::kernels::swiglu::{swiglu_bwd, swiglu_fwd};
    use fcgpu::ops::swiglu::cpu;
    for &n in &[1usize, 777] {
        for (dt, tol) in DTS {
            let (g, u, dy) =
                (quant(&randn(n, 4, 2.0), dt), quant(&randn(n, 5, 1.0), dt), quant(&randn(n, 6, 1.0), dt));
            let (gb, ub, db) = (up(&d, &g, dt), up(&d, &u, dt), up(&d, &dy, dt));
            let out = d.zeros(n * dt.size()).unwrap();
            swiglu_fwd(&d, dt, &gb, &ub, &out, n).unwrap();
            assert_close(&down(&out, dt), &cpu::forward(&g, &u), tol, "swiglu fwd");
            let (dg, du) = (d.zeros(n * dt.size()).unwrap(), d.zeros(n * dt.size()).unwrap());
            swiglu_bwd(&d, dt, &gb, &ub, &db, &dg, &du, n).unwrap();
            let (wg, wu) = cpu::backward(&g, &u, &dy);
            assert_close(&down(&dg, dt), &wg, tol, "swiglu dgate");
            assert_close(&down(&du, dt), &wu, tol, "swiglu dup");
        }
    }
}

pub fn rms_norm_matches_cpu_op(dev: &GpuDevice) {
    let d = dev.clone();
    use fcgpu::kernels::rms_norm::{rms_norm_bwd, rms_norm_fwd};
    use fcgpu::ops::rms_norm::cpu;
    // 700 × 128: Qwen3's q/k-norm width over rows spanning 11 row chunks of the dw reduction.
    for &(rows, dim) in &[(1usize, 1usize), (3, 257), (5, 64), (700, 128)] {
        for (dt, tol) in DTS {
            let x = quant(&randn(rows * dim, 7, 1.5), dt);
            let w = quant(&randn(dim, 8, 1.0).iter().map(|v| v + 1.0).collect::<Vec<_>>(), dt);
            let dy = quant(&randn(rows * dim, 9, 1.0), dt);
            let (xb, wb, dyb) = (up(&d, &x, dt), up(&d, &w, dt), up(&d, &dy, dt));
            let y = d.zeros(rows * dim * dt.size()).unwrap();
            let rstd = d.zeros(rows * 4).unwrap();
            rms_norm_fwd(&d, dt, &xb, &wb, &y, &rstd, rows, dim, 1e-6).unwrap();
            assert_close(
                &down(&y, dt),
                &cpu::forward(&x, &w, 1e-6),
                tol,
                &format!("rmsnorm fwd {dt:?} {rows}x{dim}"),
            );
            let dx = d.zeros(rows * dim * dt.size()).unwrap();
            let dw = d.zeros(dim * 4).unwrap();
            rms_norm_bwd(&d, dt, &xb, &wb, &dyb, &rstd, &dx, &dw, rows, dim, false).unwrap();
            let (wdx, wdw) = cpu::backward(&x, &w, &dy, 1e-6);
            assert_close(&down(&dx, dt), &wdx, tol * 2.0, &format!("rmsnorm dx {dt:?} {rows}x{dim}"));
            assert_close(&dw.download_f32().unwrap(), &wdw, tol, &format!("rmsnorm dw {dt:?} {rows}x{dim}"));
        }
    }
}

pub fn rope_matches_cpu_op(dev: &GpuDevice) {
    let d = dev.clone();
    use fcgpu::kernels::rope::rope;
    use fcgpu::ops::rope::{cpu, RopeTable};
    let (tokens, heads, hd) = (5usize, 3usize, 16usize);
    let table = RopeTable::new(hd, 10000.0, None);
    let positions: Vec<u32> = vec![0, 1, 2, 7, 4096];
    let (mut cs, mut sn) = (Vec::new(), Vec::new());
    for &p in &positions {
        let (c, s) = table.cos_sin(p);
        cs.extend(c);
        sn.extend(s);
    }
    let (cb, sb) = (d.upload_f32(&cs).unwrap(), d.upload_f32(&sn).unwrap());
    for (dt, tol) in DTS {
        let x = quant(&randn(tokens * heads * hd, 10, 1.0), dt);
        let xb = up(&d, &x, dt);
        for inverse in [false, true] {
            let y = d.zeros(x.len() * dt.size()).unwrap();
            rope(&d, dt, &xb, &cb, &sb, &y, tokens, heads, hd, inverse).unwrap();
            let want = cpu::apply(&x, heads, hd, &positions, &table, inverse);
            assert_close(&down(&y, dt), &want, tol, &format!("rope {dt:?} inverse={inverse}"));
        }
    }
}

pub fn embedding_matches_cpu_op(dev: &GpuDevice) {
    let d = dev.clone();
    use fcgpu::kernels::embedding::{embedding_bwd, embedding_fwd};
    use fcgpu::ops::embedding::cpu;
    let (vocab, dim) = (11usize, 37usize);
    let ids: Vec<u32> = vec![3, 0, 10, 3, 3, 7];
    let idb = d.upload_i32(&ids.iter().map(|&i| i as i32).collect::<Vec<_>>()).unwrap();
    for (dt, tol) in DTS {
        let table = quant(&randn(vocab * dim, 13, 1.0), dt);
        let tb = up(&d, &table, dt);
        let out = d.zeros(ids.len() * dim * dt.size()).unwrap();
        embedding_fwd(&d, dt, &idb, &tb, &out, ids.len(), vocab, dim).unwrap();
        assert_eq!(down(&out, dt), cpu::forward(&table, dim, &ids), "embedding fwd is a copy");
        let g = quant(&randn(ids.len() * dim, 14, 1.0), dt);
        let dtab = d.zeros(vocab * dim * 4).unwrap();
        embedding_bwd(&d, dt, &idb, &up(&d, &g, dt), &dtab, ids.len(), vocab, dim).unwrap();
        assert_close(
            &dtab.download_f32().unwrap(),
            &cpu::backward(&g, dim, &ids, vocab),
            tol.min(1e-5),
            "embedding bwd",
        );
    }
}

pub fn logprob_entropy_rows_match_cpu_op(dev: &GpuDevice) {
    let d = dev.clone();
    use fcgpu::kernels::logprob::{lpe_bwd, lpe_fwd};
    use fcgpu::ops::logprob::cpu;
    // vocab not a multiple of the block, length-1 vocab, a single row
    for &(rows, vocab, temp) in &[(3usize, 1000usize, 0.7f32), (1, 1, 1.0), (4, 257, 1.3)] {
        for (dt, tol) in DTS {
            let z = quant(&randn(rows * vocab, 15, 3.0), dt);
            let targets: Vec<i32> = (0..rows).map(|r| ((r * 7919) % vocab) as i32).collect();
            let (zb, tb) = (up(&d, &z, dt), d.upload_i32(&targets).unwrap());
            let (lp, h, lz) =
                (d.zeros(rows * 4).unwrap(), d.zeros(rows * 4).unwrap(), d.zeros(rows * 4).unwrap());
            lpe_fwd(&d, dt, &zb, vocab, Some(&tb), rows, vocab, temp, Some(&lp), Some(&h), Some(&lz))
                .unwrap();
            let stats: Vec<cpu::RowStats> = (0..rows)
                .map(|r| cpu::row_stats(&z[r * vocab..(r + 1) * vocab], targets[r] as usize, 1.0 / temp))
                .collect();
            let f32tol = if dt == DType::F32 { 1e-5 } else { 1e-4 }; // stats are f32 from exact inputs
            assert_close(
                &lp.download_f32().unwrap(),
                &stats.iter().map(|s| s.logp).collect::<Vec<_>>(),
                f32tol,
                "logp",
            );
            assert_close(
                &h.download_f32().unwrap(),
                &stats.iter().map(|s| s.entropy).collect::<Vec<_>>(),
                f32tol,
                "entropy",
            );
            assert_close(
                &lz.download_f32().unwrap(),
                &stats.iter().map(|s| s.log_z()).collect::<Vec<_>>(),
                f32tol,
                "logZ",
            );
            // backward: the CPU op's per-logit formula
            let (gl, gh) = (randn(rows, 16, 1.0), randn(rows, 17, 1.0));
            let dz = d.zeros(rows * vocab * dt.size()).unwrap();
            lpe_bwd(
                &d,
                dt,
                &zb,
                vocab,
                Some(&tb),
                rows,
                vocab,
                temp,
                &lz,
                &h,
                Some(&d.upload_f32(&gl).unwrap()),
                Some(&d.upload_f32(&gh).unwrap()),
                &dz,
                vocab,
            )
            .unwrap();
            let mut want = vec![0f64; rows * vocab];
            for r in 0..rows {
                let s = stats[r];
                for k in 0..vocab {
                    let logp = (z[r * vocab + k] / temp - s.log_z()) as f64;
                    let p = logp.exp();
                    want[r * vocab + k] =
                        (-gl[r] as f64 * p - gh[r] as f64 * p * (logp + s.entropy as f64)) / temp as f64;
                }
                want[r * vocab + targets[r] as usize] += gl[r] as f64 / temp as f64;
            }
            assert_close(&down(&dz, dt), &want, tol.max(1e-4), &format!("dlogits {dt:?} {rows}x{vocab}"));
        }
    }
}

pub fn logprob_ignored_targets_and_masked_vocab(dev: &GpuDevice) {
    let d = dev.clone();
    use fcgpu::kernels::logprob::{lpe_bwd, lpe_fwd};
    let vocab = 70;
    let mut z = randn(2 * vocab, 18, 1.0);
    z[..vocab / 2].fill(f32::NEG_INFINITY); // masked half of row 0
    let zb = d.upload_f32(&z).unwrap();
    let tb = d.upload_i32(&[-1, 5]).unwrap();
    let (lp, h, lz) = (d.zeros(8).unwrap(), d.zeros(8).unwrap(), d.zeros(8).unwrap());
    lpe_fwd(&d, DType::F32, &zb, vocab, Some(&tb), 2, vocab, 1.0, Some(&lp), Some(&h), Some(&lz)).unwrap();
    let lpv = lp.download_f32().unwrap();
    assert_eq!(lpv[0], 0.0, "ignored target gives logp 0");
    // row 0 entropy equals the entropy over the unmasked half alone
    let live = &z[vocab / 2..vocab];
    let m = live.iter().copied().fold(f32::MIN, f32::max) as f64;
    let s: f64 = live.iter().map(|&x| (x as f64 - m).exp()).sum();
    let want_h = -live
        .iter()
        .map(|&x| {
            let lp = x as f64 - m - s.ln();
            lp.exp() * lp
        })
        .sum::<f64>();
    assert!((h.download_f32().unwrap()[0] as f64 - want_h).abs() < 1e-5);
    let dz = d.zeros(2 * vocab * 4).unwrap();
    lpe_bwd(
        &d,
        DType::F32,
        &zb,
        vocab,
        Some(&tb),
        2,
        vocab,
        1.0,
        &lz,
        &h,
        Some(&d.upload_f32(&[1.0, 1.0]).unwrap()),
        None,
        &dz,
        vocab,
    )
    .unwrap();
    let g = dz.download_f32().unwrap();
    assert!(g[..vocab / 2].iter().all(|&x| x == 0.0), "masked logits get no gradient");
    // ignored target: no logp gradient at all for row 0
    assert!(g[..vocab].iter().all(|&x| x == 0.0));
    assert!(g[vocab..].iter().sum::<f32>().abs() < 1e-5, "logp gradient sums to 0 over the vocabulary");
}

pub fn linear_logprob_entropy_matches_cpu_op(dev: &GpuDevice) {
    let d = dev.clone();
    use fcgpu::kernels::logprob::{linear_lpe_bwd, linear_lpe_fwd};
    use fcgpu::ops::logprob::cpu;
    let (rows, hidden, vocab, temp) = (7usize, 24usize, 301usize, 0.8f32);
    for (dt, tol) in DTS {
        let h = quant(&randn(rows * hidden, 19, 1.0), dt);
        let w = quant(&randn(vocab * hidden, 20, 0.5), dt);
        let targets: Vec<u32> = (0..rows as u32).map(|r| (r * 37) % vocab as u32).collect();
        let (hb, wb) = (up(&d, &h, dt), up(&d, &w, dt));
        let tb = d.upload_i32(&targets.iter().map(|&t| t as i32).collect::<Vec<_>>()).unwrap();
        let (lp, en, lz) =
            (d.zeros(rows * 4).unwrap(), d.zeros(rows * 4).unwrap(), d.zeros(rows * 4).unwrap());
        linear_lpe_fwd(&d, dt, &hb, &wb, &tb, rows, hidden, vocab, temp, 3, &lp, &en, &lz).unwrap();
        let (stats, _) = cpu::forward(&h, &w, &targets, temp, false);
        // bf16 logits are rounded before the row kernel: log-probs move by ~|z|·2^-8
        let stol = if dt == DType::F32 { 1e-4 } else { 3e-2 };
        assert_close(
            &lp.download_f32().unwrap(),
            &stats.iter().map(|s| s.logp).collect::<Vec<_>>(),
            stol,
            "linear logp",
        );
        assert_close(
            &en.download_f32().unwrap(),
            &stats.iter().map(|s| s.entropy).collect::<Vec<_>>(),
            stol,
            "linear entropy",
        );
        let (gl, gh) = (randn(rows, 21, 1.0), randn(rows, 22, 1.0));
        let dh = d.zeros(rows * hidden * dt.size()).unwrap();
        let dw = d.zeros(vocab * hidden * dt.size()).unwrap();
        linear_lpe_bwd(
            &d,
            dt,
            &hb,
            &wb,
            &tb,
            rows,
            hidden,
            vocab,
            temp,
            3,
            &lz,
            &en,
            Some(&d.upload_f32(&gl).unwrap()),
            Some(&d.upload_f32(&gh).unwrap()),
            &dh,
            Some(&dw),
        )
        .unwrap();
        let (wdh, wdw) = cpu::backward(&h, &w, &targets, temp, &stats, &gl, &gh, true, None);
        assert_close(&down(&dh, dt), &wdh, tol.max(1e-4) * 2.0, "linear dh");
        assert_close(&down(&dw, dt), &wdw.unwrap(), tol.max(1e-4) * 2.0, "linear dw");
    }
}

// ---------------------------------------------------------------- optimizer, casts, reductions

pub fn adamw_matches_reference(dev: &GpuDevice) {
    let d = dev.clone();
    use fcgpu::kernels::adamw::{adamw_step, AdamW};
    let n = 1003;
    let p0 = randn(n, 23, 1.0);
    let (m0, v0) = (randn(n, 24, 0.1), randn(n, 25, 0.1).iter().map(|x| x * x).collect::<Vec<_>>());
    let g = randn(n, 26, 1.0);
    let h =
        AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step: 3, grad_scale: 0.5 };
    for gdt in [DType::F32, DType::BF16] {
        let gq = quant(&g, gdt);
        let (pb, mb, vb) =
            (d.upload_f32(&p0).unwrap(), d.upload_f32(&m0).unwrap(), d.upload_f32(&v0).unwrap());
        let copy = d.zeros(n * 2).unwrap();
        adamw_step(&d, &h, &pb, &mb, &vb, &up(&d, &gq, gdt), gdt, Some(&copy), n).unwrap();
        let (bc1, bc2) = (1.0 - 0.9f64.powi(3), 1.0 - 0.95f64.powi(3));
        let (mut wp, mut wm, mut wv) = (vec![0f64; n], vec![0f64; n], vec![0f64; n]);
        for i in 0..n {
            let gi = gq[i] as f64 * 0.5;
            let mut p = p0[i] as f64 * (1.0 - 1e-2 * 0.1);
            wm[i] = 0.9 * m0[i] as f64 + 0.1 * gi;
            wv[i] = 0.95 * v0[i] as f64 + 0.05 * gi * gi;
            p -= 1e-2 * (wm[i] / bc1) / ((wv[i] / bc2).sqrt() + 1e-8);
            wp[i] = p;
        }
        assert_close(&pb.download_f32().unwrap(), &wp, 1e-5, "adamw params");
        assert_close(&mb.download_f32().unwrap(), &wm, 1e-5, "adamw m");
        assert_close(&vb.download_f32().unwrap(), &wv, 1e-5, "adamw v");
        let c: Vec<f32> = copy.download_bf16().unwrap().iter().map(|x| x.to_f32()).collect();
        assert_eq!(
            c,
            quant(&pb.download_f32().unwrap(), DType::BF16),
            "bf16 copy is the rounded master weight"
        );
    }
}

/// Grad-norm clipping on the device: Σg² → clip factor → AdamW reading it, equal to passing the
/// factor from the host.
pub fn grad_clip_on_device(dev: &GpuDevice) {
    use fcgpu::kernels::adamw::{adamw_step, adamw_step_scaled, grad_clip_scale, AdamW};
    use fcgpu::kernels::cast::sum_squares;
    let d = dev.clone();
    let n = 517;
    let g = randn(n, 60, 3.0);
    let gb = d.upload_f32(&g).unwrap();
    let ss = d.zeros(4).unwrap();
    sum_squares(&d, &gb, DType::F32, n, &ss, false).unwrap();
    let norm_want = g.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    for max_norm in [1.0f32, 1e9, 0.0] {
        let (scale, norm) = (d.zeros(4).unwrap(), d.zeros(4).unwrap());
        grad_clip_scale(&d, &ss, max_norm, &scale, Some(&norm)).unwrap();
        let nv = norm.download_f32().unwrap()[0] as f64;
        assert!((nv - norm_want).abs() < 1e-5 * norm_want, "norm {nv} vs {norm_want}");
        let want_scale = if max_norm > 0.0 { (max_norm as f64 / (norm_want + 1e-6)).min(1.0) } else { 1.0 };
        let sv = scale.download_f32().unwrap()[0];
        assert!((sv as f64 - want_scale).abs() < 1e-6 * want_scale.max(1e-3), "scale {sv} vs {want_scale}");
        let h = AdamW {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.0,
            step: 1,
            grad_scale: 1.0,
        };
        let p0 = randn(n, 61, 1.0);
        let mk = || (d.upload_f32(&p0).unwrap(), d.zeros(n * 4).unwrap(), d.zeros(n * 4).unwrap());
        let (pa, ma, va) = mk();
        adamw_step_scaled(&d, &h, &pa, &ma, &va, &gb, DType::F32, None, Some(&scale), n).unwrap();
        let (pb, mb, vb) = mk();
        adamw_step(&d, &AdamW { grad_scale: sv, ..h }, &pb, &mb, &vb, &gb, DType::F32, None, n).unwrap();
        assert_eq!(pa.download_f32().unwrap(), pb.download_f32().unwrap());
        assert_eq!(ma.download_f32().unwrap(), mb.download_f32().unwrap());
    }
}

pub fn casts_round_like_the_half_crate(dev: &GpuDevice) {
    let d = dev.clone();
    use fcgpu::kernels::cast::cast;
    let mut x = randn(999, 27, 100.0);
    x.extend([
        0.0,
        -0.0,
        1e-8,
        -3e-6,
        6.0e-5,
        65504.0,
        65520.0,
        1e30,
        f32::INFINITY,
        f32::NEG_INFINITY,
        3.3895e38,
    ]);
    x.extend((0..64).map(|i| 1.0 + i as f32 * 2f32.powi(-9))); // ties of bf16
    let n = x.len();
    let xb = d.upload_f32(&x).unwrap();
    for to in [DType::BF16, DType::F16] {
        let y = d.zeros(n * 2).unwrap();
        cast(&d, &xb, DType::F32, &y, to, n).unwrap();
        let got = down(&y, to);
        let want = quant(&x, to);
        for i in 0..n {
            assert!(
                got[i] == want[i] || (got[i].is_nan() && want[i].is_nan()),
                "{to:?} cast of {}: {} vs {}",
                x[i],
                got[i],
                want[i]
            );
        }
        let back = d.zeros(n * 4).unwrap();
        cast(&d, &y, to, &back, DType::F32, n).unwrap();
        assert_eq!(
            back.download_f32().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }
    let nan = d.upload_f32(&[f32::NAN]).unwrap();
    let y = d.zeros(2).unwrap();
    cast(&d, &nan, DType::F32, &y, DType::BF16, 1).unwrap();
    assert!(down(&y, DType::BF16)[0].is_nan());
}

pub fn sum_of_squares_is_exactish_and_deterministic(dev: &GpuDevice) {
    let d = dev.clone();
    use fcgpu::kernels::cast::sum_squares;
    for &n in &[1usize, 1000, 300_001] {
        let x = randn(n, 28, 1.0);
        let want: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
        let xb = d.upload_f32(&x).unwrap();
        let out = d.zeros(4).unwrap();
        sum_squares(&d, &xb, DType::F32, n, &out, false).unwrap();
        let a = out.download_f32().unwrap()[0];
        assert!(((a as f64) - want).abs() <= 1e-5 * want, "{a} vs {want}");
        sum_squares(&d, &xb, DType::F32, n, &out, true).unwrap();
        assert_eq!(out.download_f32().unwrap()[0], a + a, "same order twice, accumulate");
    }
}

// ---------------------------------------------------------------- RL: advantages, policy loss

pub fn group_advantages_match_cpu(dev: &GpuDevice) {
    let d = dev.clone();
    use fcgpu::rl::advantage::{self as adv, gpu, AdvScale, EntropyBonus};
    // G = 1, G = 8 with one zero-variance group, G = 33 (a partial warp), G = 1024 (maximum)
    for &(groups, g) in &[(3usize, 1usize), (4, 8), (2, 33), (1, 1024)] {
        let n = groups * g;
        let mut r: Vec<f32> = (0..n).map(|i| ((i * 2654435761usize) >> 7 & 1) as f32).collect();
        if g == 8 {
            r[8..16].fill(1.0);
        }
        let h: Vec<f32> = randn(n, 29, 1.0).iter().map(|x| x.abs()).collect();
        for scale in [AdvScale::Group, AdvScale::Batch, AdvScale::None] {
            for bonus in [EntropyBonus::default(), EntropyBonus { lambda: 0.0, alpha: 2.0 }] {
                let want = adv::group_advantages(&r, g, scale, Some(&h), bonus).unwrap();
                let (rb, hb) = (d.upload_f32(&r).unwrap(), d.upload_f32(&h).unwrap());
                let (ab, rawb, zb) =
                    (d.zeros(n * 4).unwrap(), d.zeros(n * 4).unwrap(), d.zeros(groups * 4).unwrap());
                gpu::group_advantages(
                    &d,
                    &rb,
                    groups,
                    g,
                    scale,
                    Some(&hb),
                    bonus,
                    &ab,
                    Some(&rawb),
                    Some(&zb),
                )
                .unwrap();
                assert_close(&ab.download_f32().unwrap(), &want.adv, 1e-4, &format!("A' G={g} {scale:?}"));
                assert_close(&rawb.download_f32().unwrap(), &want.raw, 1e-4, &format!("A G={g} {scale:?}"));
                let zv: Vec<bool> = zb.download_i32().unwrap().iter().map(|&z| z != 0).collect();
                assert_eq!(zv, want.zero_var);
            }
        }
    }
}

pub fn token_advantages_and_row_means_match_cpu(dev: &GpuDevice) {
    let d = dev.clone();
    use fcgpu::rl::advantage::{self as adv, gpu, EntropyBonus};
    let (n_seq, t) = (3usize, 45usize);
    let raw = vec![0.5f32, -1.5, 0.0];
    let h: Vec<f32> = randn(n_seq * t, 30, 1.0).iter().map(|x| x.abs()).collect();
    let mut mask: Vec<f32> = (0..n_seq * t).map(|k| (k % 5 != 0) as i32 as f32).collect();
    mask[2 * t..].fill(0.0); // a fully masked row
    let bonus = EntropyBonus::default();
    let (rb, hb, mb) = (d.upload_f32(&raw).unwrap(), d.upload_f32(&h).unwrap(), d.upload_f32(&mask).unwrap());
    let out = d.zeros(n_seq * t * 4).unwrap();
    gpu::token_advantages(&d, &rb, &hb, Some(&mb), n_seq, t, bonus, &out).unwrap();
    assert_close(
        &out.download_f32().unwrap(),
        &adv::token_advantages(&raw, &h, Some(&mask), t, bonus),
        1e-6,
        "token A'",
    );
    let mean = d.zeros(n_seq * 4).unwrap();
    gpu::masked_row_mean(&d, &hb, Some(&mb), n_seq, t, &mean).unwrap();
    let m = mean.download_f32().unwrap();
    assert_close(&m, &adv::masked_row_mean(&h, Some(&mask), t), 1e-5, "H_i");
    assert_eq!(m[2], 0.0, "fully masked row");
}

pub fn policy_loss_matches_cpu(dev: &GpuDevice) {
    let d = dev.clone();
    use fcgpu::rl::policy_loss::{gpu, policy_loss, LossAgg, PolicyLossCfg, PolicyLossInput};
    for &(n_seq, t) in &[(1usize, 1usize), (4, 37), (3, 300)] {
        let n = n_seq * t;
        let logp: Vec<f32> = randn(n, 31, 1.0).iter().map(|x| -x.abs()).collect();
        let old: Vec<f32> = logp.iter().zip(randn(n, 32, 0.3)).map(|(l, e)| l + e).collect();
        let refl: Vec<f32> = logp.iter().zip(randn(n, 33, 0.2)).map(|(l, e)| l + e).collect();
        let mut mask: Vec<f32> = (0..n).map(|k| (k % 7 != 3) as i32 as f32).collect();
        if n_seq > 2 {
            mask[t..2 * t].fill(0.0); // a fully masked sequence
        }
        // The last sequence is a plain answer (no think segment): srml gives it all the weight.
        let seg: Vec<i32> =
            (0..n).map(|k| if k % t < t / 3 && (n_seq == 1 || k / t + 1 < n_seq) { 1 } else { 2 }).collect();
        let adv_seq = randn(n_seq, 34, 1.0);
        let adv_tok = randn(n, 35, 1.0);
        let bufs = |v: &[f32]| d.upload_f32(v).unwrap();
        let (lb, ob, rfb, mb) = (bufs(&logp), bufs(&old), bufs(&refl), bufs(&mask));
        let sb = d.upload_i32(&seg).unwrap();
        for per_tok in [false, true] {
            let adv = if per_tok { &adv_tok } else { &adv_seq };
            let ab = bufs(adv);
            for agg in [LossAgg::TokenMean, LossAgg::SeqMean, LossAgg::Srml] {
                for beta in [0.0f32, 0.04] {
                    let cfg = PolicyLossCfg { eps_low: 0.2, eps_high: 0.28, beta, agg, srml_alpha: 0.5 };
                    let x = PolicyLossInput {
                        logp: &logp,
                        old_logp: &old,
                        ref_logp: Some(&refl),
                        adv,
                        adv_per_token: per_tok,
                        mask: &mask,
                        seg: Some(&seg),
                        n_seq,
                        t,
                    };
                    let (want, wgrad) = policy_loss(&x, &cfg, 0.7).unwrap();
                    let xb = gpu::PolicyLossBuffers {
                        logp: &lb,
                        old_logp: &ob,
                        ref_logp: Some(&rfb),
                        adv: &ab,
                        adv_per_token: per_tok,
                        mask: &mb,
                        seg: Some(&sb),
                        n_seq,
                        t,
                    };
                    let counts = gpu::counts(&d, &xb).unwrap();
                    let out = d.zeros(16).unwrap();
                    gpu::policy_loss_fwd(&d, &xb, &counts, &cfg, &out).unwrap();
                    let o = out.download_f32().unwrap();
                    let what = format!("{n_seq}x{t} {agg:?} beta={beta} per_tok={per_tok}");
                    assert_close(&o, &[want.loss, want.kl, want.clip_frac, want.tokens], 1e-4, &what);
                    let dl = d.zeros(n * 4).unwrap();
                    gpu::policy_loss_bwd(&d, &xb, &counts, &cfg, Some(&bufs(&[0.7])), &dl).unwrap();
                    assert_close(&dl.download_f32().unwrap(), &wgrad, 1e-4, &format!("dlogp {what}"));
                }
            }
        }
    }
    policy_loss_corrections_match_cpu(dev);
}

/// The rollout corrections and GSPO's sequence ratio on the device against the CPU op: every
/// (level, correction) pair, each with one aggregation, β and advantage kind (rotated).
fn policy_loss_corrections_match_cpu(d: &GpuDevice) {
    use fcgpu::rl::policy_loss::{
        gpu, policy_loss_with, ImportanceLevel, LossAgg, PolicyLossCfg, PolicyLossInput, RatioCfg,
        RolloutCorrection as C,
    };
    let mut run = 0usize;
    for &(n_seq, t) in &[(1usize, 1usize), (4, 37), (3, 300)] {
        let n = n_seq * t;
        let logp: Vec<f32> = randn(n, 41, 1.0).iter().map(|x| -x.abs()).collect();
        let old: Vec<f32> = logp.iter().zip(randn(n, 42, 0.3)).map(|(l, e)| l + e).collect();
        let refl: Vec<f32> = logp.iter().zip(randn(n, 43, 0.2)).map(|(l, e)| l + e).collect();
        // Per-sequence shifts put some sequences' geometric-mean ratios above the cap.
        let roll: Vec<f32> = old
            .iter()
            .zip(randn(n, 44, 0.6))
            .enumerate()
            .map(|(k, (o, e))| o + e - [0.9, 0.0, -0.2, 0.4][(k / t) % 4])
            .collect();
        let mut mask: Vec<f32> = (0..n).map(|k| (k % 7 != 3) as i32 as f32).collect();
        if n_seq > 2 {
            mask[t..2 * t].fill(0.0); // a fully masked sequence
        }
        let seg: Vec<i32> = (0..n).map(|k| if k % t < t / 3 { 1 } else { 2 }).collect();
        let (adv_seq, adv_tok) = (randn(n_seq, 45, 1.0), randn(n, 46, 1.0));
        let bufs = |v: &[f32]| d.upload_f32(v).unwrap();
        let (lb, ob, rfb, rob, mb) = (bufs(&logp), bufs(&old), bufs(&refl), bufs(&roll), bufs(&mask));
        let sb = d.upload_i32(&seg).unwrap();
        for level in [ImportanceLevel::Token, ImportanceLevel::Sequence] {
            for correction in [C::None, C::TokenTis, C::TokenMis, C::SeqTis, C::SeqMis] {
                run += 1;
                let agg = [LossAgg::TokenMean, LossAgg::SeqMean, LossAgg::Srml][run % 3];
                let (per_tok, beta) = (run % 2 == 1, if run % 4 < 2 { 0.04 } else { 0.0 });
                let eps = if level == ImportanceLevel::Sequence && run % 2 == 0 {
                    (3e-4, 4e-4)
                } else {
                    (0.2, 0.28)
                };
                let adv = if per_tok { &adv_tok } else { &adv_seq };
                let cfg = PolicyLossCfg { eps_low: eps.0, eps_high: eps.1, beta, agg, srml_alpha: 0.3 };
                let rc = RatioCfg { level, correction, cap: 1.5 };
                let x = PolicyLossInput {
                    logp: &logp,
                    old_logp: &old,
                    ref_logp: Some(&refl),
                    adv,
                    adv_per_token: per_tok,
                    mask: &mask,
                    seg: Some(&seg),
                    n_seq,
                    t,
                };
                let (want, wgrad) = policy_loss_with(&x, Some(&roll), &cfg, &rc, 0.7).unwrap();
                let ab = bufs(adv);
                let xb = gpu::PolicyLossBuffers {
                    logp: &lb,
                    old_logp: &ob,
                    ref_logp: Some(&rfb),
                    adv: &ab,
                    adv_per_token: per_tok,
                    mask: &mb,
                    seg: Some(&sb),
                    n_seq,
                    t,
                };
                let counts = gpu::counts(d, &xb).unwrap();
                let out = d.zeros(gpu::STATS_WITH * 4).unwrap();
                gpu::policy_loss_fwd_with(d, &xb, Some(&rob), &counts, &cfg, &rc, &out).unwrap();
                let what =
                    format!("{n_seq}x{t} {level:?} {correction:?} {agg:?} beta={beta} per_tok={per_tok}");
                let stats = [
                    want.loss,
                    want.kl,
                    want.clip_frac,
                    want.tokens,
                    want.rollout_masked_frac,
                    want.rollout_capped_frac,
                ];
                assert_close(&out.download_f32().unwrap(), &stats, 1e-4, &what);
                let dl = d.zeros(n * 4).unwrap();
                let up = bufs(&[0.7]);
                gpu::policy_loss_bwd_with(d, &xb, Some(&rob), &counts, &cfg, &rc, Some(&up), &dl).unwrap();
                assert_close(&dl.download_f32().unwrap(), &wgrad, 1e-4, &format!("dlogp {what}"));
            }
        }
    }
}

/// Row-major GEMM (cuBLAS through the (B, A) trick on cuda, the gemm crate on emu), every
/// transpose combination, a strided batch, and beta = 1 accumulation.
pub fn gemm_row_major(d: &GpuDevice) {
    use fcgpu::backend::Gemm;
    let (m, n, k, batch) = (37usize, 29usize, 70usize, 2usize);
    for (dt, tol) in [(DType::F32, 1e-4), (DType::BF16, 2e-2)] {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let a = quant(&randn(batch * m * k, 1, 1.0), dt);
            let b = quant(&randn(batch * n * k, 2, 1.0), dt);
            let c0 = quant(&randn(batch * m * n, 3, 1.0), dt);
            let (ab, bb, cb) = (up(d, &a, dt), up(d, &b, dt), up(d, &c0, dt));
            let g = Gemm {
                dtype: dt,
                m,
                n,
                k,
                a: ab.ptr(),
                lda: if ta { m } else { k },
                trans_a: ta,
                b: bb.ptr(),
                ldb: if tb { k } else { n },
                trans_b: tb,
                c: cb.ptr(),
                ldc: n,
                alpha: 0.5,
                beta: 1.0,
                batch,
                stride_a: m * k,
                stride_b: n * k,
                stride_c: m * n,
            };
            d.gemm(&g).unwrap();
            let av =
                |bi: usize, i: usize, p: usize| a[bi * m * k + if ta { p * m + i } else { i * k + p }] as f64;
            let bv =
                |bi: usize, p: usize, j: usize| b[bi * n * k + if tb { j * k + p } else { p * n + j }] as f64;
            let want: Vec<f64> = (0..batch * m * n)
                .map(|x| {
                    let (bi, i, j) = (x / (m * n), x % (m * n) / n, x % n);
                    0.5 * (0..k).map(|p| av(bi, i, p) * bv(bi, p, j)).sum::<f64>() + c0[x] as f64
                })
                .collect();
            assert_close(&down(&cb, dt), &want, tol, &format!("gemm {dt:?} ta={ta} tb={tb}"));
        }
    }
}

// ---------------------------------------------------------------- attention

/// Flash attention forward and backward against the CPU op (on the same bf16-rounded inputs):
/// lengths 1, not multiples of the 64-row tiles, several packed sequences, GQA, head dims 64 and 128.
pub fn flash_attention_fwd_bwd(d: &GpuDevice) {
    use fcgpu::kernels::attention::{cu_seqlens, flash_attn_bwd, flash_attn_fwd, FlashDims};
    use fcgpu::ops::attention::{cpu, Dims};
    let bf = DType::BF16;
    for &(q_heads, kv_heads, hd, ref seqs) in &[
        (4usize, 2usize, 64usize, vec![(0usize, 1usize), (1, 70), (71, 130)]),
        (2, 1, 128, vec![(0, 33), (33, 1)]),
        (4, 2, 16, vec![(0, 65), (65, 1), (66, 7)]),
        (2, 2, 32, vec![(0, 3), (3, 129)]),
    ] {
        let tokens: usize = seqs.iter().map(|s| s.1).sum();
        let (cu, max_len) = cu_seqlens(seqs).unwrap();
        let q = quant(&randn(tokens * q_heads * hd, 40, 1.0), bf);
        let k = quant(&randn(tokens * kv_heads * hd, 41, 1.0), bf);
        let v = quant(&randn(tokens * kv_heads * hd, 42, 1.0), bf);
        let dout = quant(&randn(tokens * q_heads * hd, 43, 1.0), bf);
        let dims = Dims { q_heads, kv_heads, head_dim: hd };
        let (want_o, want_lse) = cpu::forward(&q, &k, &v, dims, seqs);
        let fd =
            FlashDims { tokens, n_seq: seqs.len(), max_len, q_heads, kv_heads, head_dim: hd, shared: false };
        let (qb, kb, vb) = (up(d, &q, bf), up(d, &k, bf), up(d, &v, bf));
        let cub = d.upload_i32(&cu).unwrap();
        let ob = d.zeros(q.len() * 2).unwrap();
        let lseb = d.zeros(tokens * q_heads * 4).unwrap();
        flash_attn_fwd(d, &fd, &qb, &kb, &vb, &cub, &ob, &lseb).unwrap();
        let what = format!("hd={hd} heads={q_heads}/{kv_heads}");
        assert_close(&down(&ob, bf), &want_o, 2e-2, &format!("flash fwd out {what}"));
        assert_close(&lseb.download_f32().unwrap(), &want_lse, 1e-3, &format!("flash fwd lse {what}"));
        // backward from the kernel's own (bf16) output, as training does
        let o_used = down(&ob, bf);
        let lse_used = lseb.download_f32().unwrap();
        let saved = cpu::Saved { out: &o_used, lse: &lse_used };
        let (wdq, wdk, wdv) = cpu::backward(&q, &k, &v, saved, &dout, dims, seqs);
        let (dqb, dkb, dvb) =
            (d.zeros(q.len() * 2).unwrap(), d.zeros(k.len() * 2).unwrap(), d.zeros(v.len() * 2).unwrap());
        flash_attn_bwd(d, &fd, &qb, &kb, &vb, &cub, &ob, &lseb, &up(d, &dout, bf), &dqb, &dkb, &dvb).unwrap();
        assert_close(&down(&dvb, bf), &wdv, 3e-2, &format!("flash dv {what}"));
        assert_close(&down(&dkb, bf), &wdk, 3e-2, &format!("flash dk {what}"));
        assert_close(&down(&dqb, bf), &wdq, 3e-2, &format!("flash dq {what}"));
    }
}

/// Packed sequences (start, len) and each one's prefix sequence.
type SharedLayout = (Vec<(usize, usize)>, Vec<Option<usize>>);

/// Shared-prefix layouts: (seqs, prefix). Sequence 0 (70 tokens: two key and query tiles) is the
/// prefix of three, one of them a single token and one longer than a tile; a plain sequence
/// follows, then a two-token prefix with one dependant.
fn shared_layouts() -> Vec<SharedLayout> {
    vec![
        (
            vec![(0, 70), (70, 5), (75, 1), (76, 66), (142, 3), (145, 2), (147, 4)],
            vec![None, Some(0), Some(0), Some(0), None, None, Some(5)],
        ),
        (vec![(0, 20), (20, 3), (23, 17)], vec![None, Some(0), Some(0)]),
    ]
}

/// The flash kernels (bf16 and f32) over sequences with shared prefixes (`seq_table`,
/// `FlashDims::shared`) against the cpu op on the same layout, forward and backward: the prefix's
/// dK/dV collect the gradient of its own queries and of every dependant's.
pub fn flash_attention_shared_prefix(d: &GpuDevice) {
    use fcgpu::kernels::attention::{
        flash_attn_bwd, flash_attn_bwd_f32, flash_attn_fwd, flash_attn_fwd_f32, seq_table, FlashDims,
    };
    use fcgpu::ops::attention::{cpu, Dims};
    let layouts = shared_layouts();
    for &(q_heads, kv_heads, hd, li, dt) in &[
        (4usize, 2usize, 64usize, 0usize, DType::BF16),
        (2, 1, 128, 1, DType::BF16),
        (4, 2, 8, 0, DType::F32),
    ] {
        let (seqs, prefix) = &layouts[li];
        let tokens: usize = seqs.iter().map(|s| s.1).sum();
        let (table, max_len) = seq_table(seqs, prefix).unwrap();
        let q = quant(&randn(tokens * q_heads * hd, 60, 1.0), dt);
        let k = quant(&randn(tokens * kv_heads * hd, 61, 1.0), dt);
        let v = quant(&randn(tokens * kv_heads * hd, 62, 1.0), dt);
        let dout = quant(&randn(tokens * q_heads * hd, 63, 1.0), dt);
        let dims = Dims { q_heads, kv_heads, head_dim: hd };
        let (want_o, want_lse) = cpu::forward_shared(&q, &k, &v, dims, seqs, prefix);
        let fd =
            FlashDims { tokens, n_seq: seqs.len(), max_len, q_heads, kv_heads, head_dim: hd, shared: true };
        let (qb, kb, vb) = (up(d, &q, dt), up(d, &k, dt), up(d, &v, dt));
        let tb = d.upload_i32(&table).unwrap();
        let es = dt.size();
        let ob = d.zeros(q.len() * es).unwrap();
        let lseb = d.zeros(tokens * q_heads * 4).unwrap();
        let scale = 1.0 / (hd as f32).sqrt();
        let (dqb, dkb, dvb) =
            (d.zeros(q.len() * es).unwrap(), d.zeros(k.len() * es).unwrap(), d.zeros(v.len() * es).unwrap());
        let db = up(d, &dout, dt);
        let (tol_o, tol_g) = if dt == DType::F32 { (1e-5, 1e-5) } else { (2e-2, 3e-2) };
        if dt == DType::F32 {
            flash_attn_fwd_f32(d, &fd, &qb, &kb, &vb, &tb, &ob, &lseb, scale).unwrap();
        } else {
            flash_attn_fwd(d, &fd, &qb, &kb, &vb, &tb, &ob, &lseb).unwrap();
        }
        let what = format!("shared prefix {dt:?} hd={hd} heads={q_heads}/{kv_heads}");
        assert_close(&down(&ob, dt), &want_o, tol_o, &format!("{what}: out"));
        assert_close(&lseb.download_f32().unwrap(), &want_lse, 1e-3, &format!("{what}: lse"));
        // The backward from the kernel's own output, as training does.
        let (o_used, lse_used) = (down(&ob, dt), lseb.download_f32().unwrap());
        let saved = cpu::Saved { out: &o_used, lse: &lse_used };
        let (wdq, wdk, wdv) = cpu::backward_shared(&q, &k, &v, saved, &dout, dims, seqs, prefix);
        if dt == DType::F32 {
            flash_attn_bwd_f32(d, &fd, &qb, &kb, &vb, &tb, &ob, &lseb, &db, (&dqb, &dkb, &dvb), scale)
                .unwrap();
        } else {
            flash_attn_bwd(d, &fd, &qb, &kb, &vb, &tb, &ob, &lseb, &db, &dqb, &dkb, &dvb).unwrap();
        }
        assert_close(&down(&dvb, dt), &wdv, tol_g, &format!("{what}: dv"));
        assert_close(&down(&dkb, dt), &wdk, tol_g, &format!("{what}: dk"));
        assert_close(&down(&dqb, dt), &wdq, tol_g, &format!("{what}: dq"));
    }
}

/// The f32 attention kernels against the cpu op, to f32 rounding: head dims the bf16 kernels
/// would pad (8, 48) and one they have (64), GQA, a one-token sequence, a sequence longer than
/// one 4-row block, and the gradients of the op through autograd.
pub fn flash_attention_f32_matches_cpu(d: &GpuDevice) {
    use fcgpu::kernels::attention::{cu_seqlens, flash_attn_bwd_f32, flash_attn_fwd_f32, FlashDims};
    use fcgpu::ops::attention::{cpu, Dims};
    let f = DType::F32;
    for &(q_heads, kv_heads, hd, ref seqs) in &[
        (4usize, 2usize, 8usize, vec![(0usize, 1usize), (1, 37), (38, 6)]),
        (2, 1, 48, vec![(0, 21), (21, 1)]),
        (2, 2, 64, vec![(0, 9)]),
    ] {
        let tokens: usize = seqs.iter().map(|s| s.1).sum();
        let (cu, max_len) = cu_seqlens(seqs).unwrap();
        let q = randn(tokens * q_heads * hd, 50, 1.0);
        let k = randn(tokens * kv_heads * hd, 51, 1.0);
        let v = randn(tokens * kv_heads * hd, 52, 1.0);
        let dout = randn(tokens * q_heads * hd, 53, 1.0);
        let dims = Dims { q_heads, kv_heads, head_dim: hd };
        let (want_o, want_lse) = cpu::forward(&q, &k, &v, dims, seqs);
        let fd =
            FlashDims { tokens, n_seq: seqs.len(), max_len, q_heads, kv_heads, head_dim: hd, shared: false };
        let (qb, kb, vb) = (up(d, &q, f), up(d, &k, f), up(d, &v, f));
        let cub = d.upload_i32(&cu).unwrap();
        let ob = d.zeros(q.len() * 4).unwrap();
        let lseb = d.zeros(tokens * q_heads * 4).unwrap();
        let scale = 1.0 / (hd as f32).sqrt();
        flash_attn_fwd_f32(d, &fd, &qb, &kb, &vb, &cub, &ob, &lseb, scale).unwrap();
        let what = format!("hd={hd} heads={q_heads}/{kv_heads}");
        assert_close(&down(&ob, f), &want_o, 1e-5, &format!("f32 attention out {what}"));
        assert_close(&lseb.download_f32().unwrap(), &want_lse, 1e-5, &format!("f32 attention lse {what}"));
        let saved = cpu::Saved { out: &want_o, lse: &want_lse };
        let (wdq, wdk, wdv) = cpu::backward(&q, &k, &v, saved, &dout, dims, seqs);
        let (dqb, dkb, dvb) =
            (d.zeros(q.len() * 4).unwrap(), d.zeros(k.len() * 4).unwrap(), d.zeros(v.len() * 4).unwrap());
        let grads = (&dqb, &dkb, &dvb);
        flash_attn_bwd_f32(d, &fd, &qb, &kb, &vb, &cub, &ob, &lseb, &up(d, &dout, f), grads, scale).unwrap();
        assert_close(&down(&dvb, f), &wdv, 1e-5, &format!("f32 attention dv {what}"));
        assert_close(&down(&dkb, f), &wdk, 1e-5, &format!("f32 attention dk {what}"));
        assert_close(&down(&dqb, f), &wdq, 1e-5, &format!("f32 attention dq {what}"));
        // Through the op: f32 tensors on the device select these kernels; the gradients match
        // the cpu op's.
        let dev = d.tag();
        let t = |x: &[f32], h: usize| fcgpu::Tensor::from_vec(x.to_vec(), &[tokens, h, hd]).unwrap();
        let (qc, kc, vc) = (
            t(&q, q_heads).requires_grad(),
            t(&k, kv_heads).requires_grad(),
            t(&v, kv_heads).requires_grad(),
        );
        let (qg, kg, vg) = (
            t(&q, q_heads).to_device(dev).unwrap().requires_grad(),
            t(&k, kv_heads).to_device(dev).unwrap().requires_grad(),
            t(&v, kv_heads).to_device(dev).unwrap().requires_grad(),
        );
        let w = fcgpu::Tensor::from_vec(dout.clone(), &[tokens, q_heads, hd]).unwrap();
        let loss = |q: &fcgpu::Tensor, k: &fcgpu::Tensor, v: &fcgpu::Tensor, w: &fcgpu::Tensor| {
            let y = fcgpu::ops::attention(q, k, v, seqs).unwrap();
            assert_eq!(y.dtype(), DType::F32, "f32 in, f32 out");
            fcgpu::ops::sum(&fcgpu::ops::mul(&y, w).unwrap()).unwrap()
        };
        let gc = loss(&qc, &kc, &vc, &w).backward().unwrap();
        let gg = loss(&qg, &kg, &vg, &w.to_device(dev).unwrap()).backward().unwrap();
        for (a, b, name) in [(&qc, &qg, "q"), (&kc, &kg, "k"), (&vc, &vg, "v")] {
            let (a, b) = (gc.get(a).unwrap().to_vec(), gg.get(b).unwrap().to_vec());
            assert_close(&b, &a, 1e-5, &format!("op gradient of {name} {what}"));
        }
    }
}

/// Column sums (bias gradients) over many rows: the two-pass reduction against an f64 sum, the
/// same bits on a second run, and `accumulate` adding to what is there.
pub fn col_sum_is_exactish_over_many_rows_and_deterministic(d: &GpuDevice) {
    use fcgpu::kernels::elementwise::col_sum;
    for &(rows, cols) in &[(5000usize, 37usize), (64, 1), (65, 300), (1, 5)] {
        for dt in [DType::F32, DType::BF16] {
            let x = quant(&randn(rows * cols, 60, 1.0), dt);
            let want: Vec<f64> = (0..cols).map(|c| (0..rows).map(|r| x[r * cols + c] as f64).sum()).collect();
            let xb = up(d, &x, dt);
            let (a, b) = (d.zeros(cols * 4).unwrap(), d.zeros(cols * 4).unwrap());
            col_sum(d, dt, &xb, &a, rows, cols, false).unwrap();
            col_sum(d, dt, &xb, &b, rows, cols, false).unwrap();
            let (ga, gb) = (a.download_f32().unwrap(), b.download_f32().unwrap());
            let what = format!("col_sum {rows}x{cols} {dt:?}");
            assert_close(&ga, &want, 1e-5, &what);
            assert_eq!(
                ga.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                gb.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "{what}: not deterministic"
            );
            col_sum(d, dt, &xb, &a, rows, cols, true).unwrap();
            let twice: Vec<f64> = want.iter().map(|w| 2.0 * w).collect();
            assert_close(&a.download_f32().unwrap(), &twice, 1e-5, &format!("{what} accumulate"));
        }
    }
}

/// Decode attention against a straightforward f64 reference: GQA, a length-1 cache, a cache
/// shorter than its capacity, head dims 64, 128 and an odd 40, token-major and head-major cache
/// layouts; bf16 (within bf16 rounding) and f32 (within f32 rounding) caches.
pub fn decode_attention(d: &GpuDevice) {
    use fcgpu::kernels::attention::{decode_attn_strided, CacheLayout};
    for &(bf, batch, q_heads, kv_heads, hd, max_len) in &[
        (DType::BF16, 3usize, 4usize, 2usize, 64usize, 37usize),
        (DType::BF16, 2, 2, 1, 128, 5),
        (DType::F32, 3, 4, 2, 40, 37),
    ] {
        for head_major in [false, true] {
            let layout = if head_major {
                CacheLayout::head_major(max_len, kv_heads, hd)
            } else {
                CacheLayout::token_major(max_len, kv_heads, hd)
            };
            let lens: Vec<i32> =
                (0..batch).map(|b| [max_len as i32, 1, (max_len / 2) as i32][b % 3]).collect();
            let q = quant(&randn(batch * q_heads * hd, 44, 1.0), bf);
            let kc = quant(&randn(batch * max_len * kv_heads * hd, 45, 1.0), bf);
            let vc = quant(&randn(batch * max_len * kv_heads * hd, 46, 1.0), bf);
            let ob = d.zeros(q.len() * bf.size()).unwrap();
            decode_attn_strided(
                d,
                &up(d, &q, bf),
                &up(d, &kc, bf),
                &up(d, &vc, bf),
                &d.upload_i32(&lens).unwrap(),
                &ob,
                batch,
                q_heads,
                kv_heads,
                hd,
                max_len,
                layout,
                bf,
            )
            .unwrap();
            let mut want = vec![0f64; q.len()];
            let scale = 1.0 / (hd as f64).sqrt();
            for b in 0..batch {
                for h in 0..q_heads {
                    let kvh = h / (q_heads / kv_heads);
                    let qr = &q[(b * q_heads + h) * hd..][..hd];
                    let row = |c: &[f32], j: usize| -> Vec<f64> {
                        c[b * layout.batch_stride + j * layout.pos_stride + kvh * layout.head_stride..][..hd]
                            .iter()
                            .map(|&x| x as f64)
                            .collect()
                    };
                    let s: Vec<f64> = (0..lens[b] as usize)
                        .map(|j| row(&kc, j).iter().zip(qr).map(|(a, &b)| a * b as f64).sum::<f64>() * scale)
                        .collect();
                    let m = s.iter().copied().fold(f64::MIN, f64::max);
                    let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                    for (j, sj) in s.iter().enumerate() {
                        let p = (sj - m).exp() / z;
                        for (x, vv) in want[(b * q_heads + h) * hd..][..hd].iter_mut().zip(row(&vc, j)) {
                            *x += p * vv;
                        }
                    }
                }
            }
            let tol = if bf == DType::F32 { 1e-5 } else { 2e-2 };
            assert_close(
                &down(&ob, bf),
                &want,
                tol,
                &format!("decode attention {bf:?} hd={hd} head_major={head_major}"),
            );
        }
    }
}

/// The paged decode attention (the batched decode step's, and the per-op decoder's) reads
/// through block tables whatever their order: on caches scattered over shuffled blocks of 1, 4
/// and 16 positions (layer 1 of 2, layer 0 garbage), its output is the strided kernel's on the
/// same keys laid out contiguously, bit for bit (the same accumulation).
pub fn paged_decode_attention(d: &GpuDevice) {
    use fcgpu::kernels::attention::{decode_attn_strided, CacheLayout};
    use fcgpu::kernels::decode_step::{decode_attn_batch, HeadDims, StepTable};
    for &(dt, batch, q_heads, kv_heads, hd, max_len) in
        &[(DType::BF16, 3usize, 4usize, 2usize, 64usize, 37usize), (DType::F32, 2, 2, 1, 40, 9)]
    {
        let row = kv_heads * hd;
        let lens: Vec<i32> = (0..batch).map(|b| [max_len as i32, 1, (max_len / 2) as i32][b % 3]).collect();
        let q = quant(&randn(batch * q_heads * hd, 54, 1.0), dt);
        let kc = quant(&randn(batch * max_len * row, 55, 1.0), dt);
        let vc = quant(&randn(batch * max_len * row, 56, 1.0), dt);
        let lens_buf = d.upload_i32(&lens).unwrap();
        let want = d.zeros(q.len() * dt.size()).unwrap();
        let layout = CacheLayout::token_major(max_len, kv_heads, hd);
        let (kb, vb, qb) = (up(d, &kc, dt), up(d, &vc, dt), up(d, &q, dt));
        decode_attn_strided(
            d, &qb, &kb, &vb, &lens_buf, &want, batch, q_heads, kv_heads, hd, max_len, layout, dt,
        )
        .unwrap();
        for bs in [1usize, 4, 16] {
            let (layers, nblk) = (2usize, max_len.div_ceil(bs));
            let half = layers * bs * row;
            let blocks = batch * nblk;
            // Block i of sequence b is pool block perm[b·nblk + i] (a fixed shuffle).
            let perm: Vec<usize> = (0..blocks).map(|i| (i * 7 + 3) % blocks).collect();
            assert!(blocks % 7 != 0, "the shuffle is a permutation");
            let mut pool = quant(&randn(blocks * 2 * half, 57, 1.0), dt);
            for b in 0..batch {
                for j in 0..max_len {
                    let blk = perm[b * nblk + j / bs] * 2 * half;
                    let at = blk + (bs + j % bs) * row; // layer 1, slot j % bs
                    let src = (b * max_len + j) * row;
                    pool[at..at + row].copy_from_slice(&kc[src..src + row]);
                    pool[half + at..half + at + row].copy_from_slice(&vc[src..src + row]);
                }
            }
            let pool_buf = up(d, &pool, dt);
            let bytes = (2 * half * dt.size()) as u64;
            let mut table = vec![0u8; 8];
            table[..4].copy_from_slice(&(nblk as i32).to_le_bytes());
            for &id in &perm {
                table.extend_from_slice(&(pool_buf.ptr() + id as u64 * bytes).to_le_bytes());
            }
            let table = d.upload_bytes(&table).unwrap();
            let t = StepTable {
                blocks: table.ptr() + 8,
                nblk: table.ptr(),
                block_size: bs,
                vofs: half,
                ids: 0,
                pos: 0,
                lens: lens_buf.ptr(),
                cos: 0,
                sin: 0,
            };
            let got = d.zeros(q.len() * dt.size()).unwrap();
            let hdims = HeadDims { batch, q_heads, kv_heads, head_dim: hd };
            // SAFETY: q and got hold batch rows; the table's blocks hold layer 1 of lens[b] keys.
            unsafe { decode_attn_batch(d, dt, qb.ptr(), got.ptr(), &t, 1, hdims).unwrap() };
            assert_eq!(
                got.download_bytes().unwrap(),
                want.download_bytes().unwrap(),
                "paged decode attention {dt:?}, blocks of {bs}"
            );
        }
    }
}

// ---------------------------------------------------------------- elementwise, storage

/// add, mul, scale, axpy, bias add and column sums against plain loops.
pub fn elementwise_ops(d: &GpuDevice) {
    use fcgpu::kernels::elementwise as ew;
    let (rows, cols) = (7usize, 300usize);
    let n = rows * cols;
    for (dt, tol) in [(DType::F32, 1e-6), (DType::BF16, 8e-3)] {
        let (a, b) = (quant(&randn(n, 50, 1.0), dt), quant(&randn(n, 51, 1.0), dt));
        let (ab, bb) = (up(d, &a, dt), up(d, &b, dt));
        let out = d.zeros(n * dt.size()).unwrap();
        ew::add(d, dt, &ab, &bb, &out, n).unwrap();
        assert_close(&down(&out, dt), &a.iter().zip(&b).map(|(x, y)| x + y).collect::<Vec<_>>(), tol, "add");
        ew::mul(d, dt, &ab, &bb, &out, n).unwrap();
        assert_close(&down(&out, dt), &a.iter().zip(&b).map(|(x, y)| x * y).collect::<Vec<_>>(), tol, "mul");
        ew::scale(d, dt, &ab, -0.3, &out, n).unwrap();
        assert_close(&down(&out, dt), &a.iter().map(|x| -0.3 * x).collect::<Vec<_>>(), tol, "scale");
        let y = d.upload_f32(&b).unwrap();
        ew::axpy(d, dt, &ab, 2.0, &y, n).unwrap();
        assert_close(
            &y.download_f32().unwrap(),
            &a.iter().zip(&b).map(|(x, y)| y + 2.0 * x).collect::<Vec<_>>(),
            1e-6,
            "axpy",
        );
        let bias = quant(&randn(cols, 52, 1.0), dt);
        ew::bias_add(d, dt, &ab, &up(d, &bias, dt), &out, rows, cols).unwrap();
        assert_close(
            &down(&out, dt),
            &(0..n).map(|i| a[i] + bias[i % cols]).collect::<Vec<_>>(),
            tol,
            "bias_add",
        );
        let cs = d.zeros(cols * 4).unwrap();
        ew::col_sum(d, dt, &ab, &cs, rows, cols, false).unwrap();
        ew::col_sum(d, dt, &ab, &cs, rows, cols, true).unwrap();
        let want: Vec<f64> =
            (0..cols).map(|c| 2.0 * (0..rows).map(|r| a[r * cols + c] as f64).sum::<f64>()).collect();
        assert_close(&cs.download_f32().unwrap(), &want, 1e-5, "col_sum");
        // copy_2d: columns 5..5+11 of rows of 300 into rows of 13 at column 2 (the rest stays 0)
        let c2 = d.zeros(rows * 13 * dt.size()).unwrap();
        ew::copy_2d(d, dt, &ab, 5, cols, &c2, 2, 13, rows, 11).unwrap();
        let want: Vec<f32> = (0..rows * 13)
            .map(|i| {
                let (r, c) = (i / 13, i % 13);
                if (2..13).contains(&c) {
                    a[r * cols + 5 + c - 2]
                } else {
                    0.0
                }
            })
            .collect();
        assert_eq!(down(&c2, dt), want, "copy_2d {dt:?}");
        assert!(
            ew::copy_2d(d, dt, &ab, 0, cols, &c2, 3, 13, rows, 11).is_err(),
            "copy_2d past the end is refused"
        );
    }
}

/// Host <-> device storage round trips, and device-side dtype conversion.
pub fn storage_round_trip(d: &GpuDevice) {
    use fcgpu::backend::storage::GpuStorage;
    use fcgpu::tensor::CpuStorage;
    let v = randn(333, 53, 10.0);
    for s in [
        CpuStorage::F32(v.clone()),
        CpuStorage::F32(v.clone()).to_dtype(DType::BF16),
        CpuStorage::F32(v.clone()).to_dtype(DType::F16),
    ] {
        let g = GpuStorage::from_cpu(d, &s).unwrap();
        assert_eq!((g.dtype, g.len), (s.dtype(), s.len()));
        assert_eq!(g.to_cpu().unwrap().as_bytes(), s.as_bytes());
        let f = g.to_dtype(DType::F32).unwrap();
        assert_eq!(f.to_f32_vec().unwrap(), s.to_f32_vec());
    }
}

/// `linear` forward and backward (with bias) against the CPU op's autograd.
pub fn linear_matches_cpu_op(d: &GpuDevice) {
    use fcgpu::kernels::matmul::{linear_bwd, linear_fwd, LinearDims};
    use fcgpu::Tensor;
    let dims = LinearDims { rows: 5, in_f: 33, out_f: 17 };
    let x = randn(dims.rows * dims.in_f, 70, 1.0);
    let w = randn(dims.out_f * dims.in_f, 71, 0.5);
    let b = randn(dims.out_f, 72, 1.0);
    let dy = randn(dims.rows * dims.out_f, 73, 1.0);
    for (dt, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
        let (xq, wq, bq, dyq) = (quant(&x, dt), quant(&w, dt), quant(&b, dt), quant(&dy, dt));
        // CPU op: y = linear(x, w, b); backward of Σ y ⊙ dy
        let xt = Tensor::from_vec(xq.clone(), &[dims.rows, dims.in_f]).unwrap().requires_grad();
        let wt = Tensor::from_vec(wq.clone(), &[dims.out_f, dims.in_f]).unwrap().requires_grad();
        let bt = Tensor::from_vec(bq.clone(), &[dims.out_f]).unwrap().requires_grad();
        let yt = fcgpu::ops::linear(&xt, &wt, Some(&bt)).unwrap();
        let grads =
            yt.backward_with(Tensor::from_vec(dyq.clone(), &[dims.rows, dims.out_f]).unwrap()).unwrap();
        let g = |t: &Tensor| grads.get(t).unwrap().to_vec();
        let (xb, wb, bb) = (up(d, &xq, dt), up(d, &wq, dt), up(d, &bq, dt));
        let y = d.zeros(dims.rows * dims.out_f * dt.size()).unwrap();
        linear_fwd(d, dt, dims, &xb, &wb, Some(&bb), &y).unwrap();
        assert_close(&down(&y, dt), &yt.to_vec(), tol, &format!("linear y {dt:?}"));
        let (dx, dw, db) = (
            d.zeros(xq.len() * dt.size()).unwrap(),
            d.zeros(wq.len() * dt.size()).unwrap(),
            d.zeros(dims.out_f * 4).unwrap(),
        );
        linear_bwd(d, dt, dims, &xb, &wb, &up(d, &dyq, dt), Some(&dx), Some(&dw), Some(&db)).unwrap();
        assert_close(&down(&dx, dt), &g(&xt), tol, &format!("linear dx {dt:?}"));
        assert_close(&down(&dw, dt), &g(&wt), tol, &format!("linear dw {dt:?}"));
        assert_close(&db.download_f32().unwrap(), &g(&bt), 1e-5, &format!("linear db {dt:?}"));
    }
}

/// Device sampling against the CPU sampler's truncated distribution: on a grid of quantiles
/// u = (i + ½)/R every token is drawn R·p ± 2 times and nothing outside the nucleus; greedy is
/// the first argmax.
pub fn sampling_matches_cpu_distribution(d: &GpuDevice) {
    use fcgpu::kernels::logprob::sample_rows;
    use fcgpu::rollout::sampler::{argmax, truncated_distribution, SamplerParams};
    let vocab = 50;
    let mut z = randn(vocab, 80, 2.0);
    z[7] = 3.5;
    z[31] = 3.5; // a tie for the maximum
    let rows = 400;
    let zz: Vec<f32> = (0..rows).flat_map(|_| z.iter().copied()).collect();
    let zb = d.upload_f32(&zz).unwrap();
    let u: Vec<f32> = (0..rows).map(|i| (i as f32 + 0.5) / rows as f32).collect();
    let ub = d.upload_f32(&u).unwrap();
    let tb = d.zeros(rows * 4).unwrap();
    for (temperature, top_p) in [(0.8f32, 0.9f32), (1.0, 1.0), (0.5, 0.3)] {
        sample_rows(d, DType::F32, &zb, vocab, rows, vocab, temperature, top_p, &ub, &tb).unwrap();
        let got = tb.download_i32().unwrap();
        let dist = truncated_distribution(&z, &SamplerParams { temperature, top_p, top_k: 0 });
        let mut count = vec![0usize; vocab];
        for &t in &got {
            assert!(t >= 0 && (t as usize) < vocab);
            count[t as usize] += 1;
        }
        for k in 0..vocab {
            let p = dist.iter().find(|(i, _)| *i as usize == k).map_or(0.0, |x| x.1);
            let want = p * rows as f64;
            assert!(
                (count[k] as f64 - want).abs() <= 2.0,
                "T={temperature} top_p={top_p} token {k}: {} draws, want {want:.1}",
                count[k]
            );
            if p == 0.0 {
                assert_eq!(count[k], 0, "token {k} outside the nucleus was drawn");
            }
        }
    }
    sample_rows(d, DType::F32, &zb, vocab, rows, vocab, 0.0, 1.0, &ub, &tb).unwrap();
    assert!(tb.download_i32().unwrap().iter().all(|&t| t as usize == argmax(&z)), "greedy = first argmax");
    assert_eq!(argmax(&z), 7);
}

/// Rows where no token has positive weight (every logit NaN or −inf) draw token 0, as the
/// CPU's argmax does, instead of reading before the row (which returned a negative token).
pub fn sampling_rows_without_mass_draw_token_zero(d: &GpuDevice) {
    use fcgpu::kernels::logprob::sample_rows;
    use fcgpu::rollout::sampler::argmax;
    let vocab = 300;
    let rows: Vec<Vec<f32>> = vec![
        vec![f32::NAN; vocab],
        vec![f32::NEG_INFINITY; vocab],
        (0..vocab).map(|i| if i % 2 == 0 { f32::NAN } else { f32::NEG_INFINITY }).collect(),
    ];
    let zz: Vec<f32> = rows.iter().flatten().copied().collect();
    let zb = d.upload_f32(&zz).unwrap();
    let ub = d.upload_f32(&vec![0.999; rows.len()]).unwrap();
    let tb = d.zeros(rows.len() * 4).unwrap();
    for (temperature, top_p) in [(1.0f32, 1.0f32), (0.7, 0.9), (0.0, 1.0)] {
        sample_rows(d, DType::F32, &zb, vocab, rows.len(), vocab, temperature, top_p, &ub, &tb).unwrap();
        let got = tb.download_i32().unwrap();
        for (r, &t) in got.iter().enumerate() {
            assert_eq!(t as usize, argmax(&rows[r]), "row {r}, T={temperature} top_p={top_p}: token {t}");
        }
    }
}

/// The rollout's device sampler (`draw_rows`: one launch draws every sample, with log-prob and
/// entropy) against the CPU sampler: on a grid of quantiles u = (i + ½)/R each token is drawn
/// R·p ± 2 times under temperature, top-k, top-p and both (nothing outside the kept set; the
/// logits have no ties at the top-k boundary), greedy is the first argmax, and the log-prob and
/// entropy of every draw are the CPU's (full distribution at T; T = 1 for greedy).
pub fn draw_rows_matches_cpu_sampler(d: &GpuDevice) {
    use fcgpu::rollout::device_sampler::{DeviceSampler, DrawJob};
    use fcgpu::rollout::sampler::{argmax, sample, truncated_distribution, SamplerParams};
    let vocab = 61;
    let mut z = randn(vocab, 81, 2.0);
    z[7] = 3.5;
    z[31] = 3.5; // a tie for the maximum
    z[40] = f32::NEG_INFINITY; // a masked token
    let r = 400;
    let jobs: Vec<DrawJob> = (0..r).map(|i| DrawJob { row: i % 2, u: (i as f32 + 0.5) / r as f32 }).collect();
    let two_rows: Vec<f32> = z.iter().chain(&z).copied().collect();
    let mut s = DeviceSampler::new(d, 8).unwrap();
    for dt in [DType::F32, DType::BF16] {
        let zq = quant(&z, dt);
        let zb = up(d, &two_rows, dt);
        for (temperature, top_p, top_k) in
            [(0.8f32, 0.9f32, 0usize), (1.0, 1.0, 0), (0.7, 1.0, 5), (1.3, 0.6, 9), (0.0, 1.0, 0)]
        {
            let p = SamplerParams { temperature, top_p, top_k };
            let got = s.draw(&zb, dt, 2, vocab, &p, &jobs).unwrap();
            let what = format!("{dt:?} T={temperature} top_p={top_p} top_k={top_k}");
            let mut count = vec![0usize; vocab];
            let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
            for g in &got {
                count[g.token as usize] += 1;
                // The CPU's stats of the same token: a greedy draw is deterministic; a sampled one's
                // log-prob is the full distribution's at T whatever was drawn.
                let c = sample(&zq, &p, &mut rng);
                let want_lp = if temperature == 0.0 {
                    c.logprob
                } else {
                    c.logprob + (zq[g.token as usize] - zq[c.token as usize]) / temperature
                };
                assert!(
                    (g.logprob - want_lp).abs() < 1e-4 * (1.0 + want_lp.abs()),
                    "{what}: logp {} vs {want_lp}",
                    g.logprob
                );
                assert!(
                    (g.entropy - c.entropy).abs() < 1e-4,
                    "{what}: entropy {} vs {}",
                    g.entropy,
                    c.entropy
                );
            }
            if temperature == 0.0 {
                assert_eq!(count[argmax(&zq)], r, "{what}: greedy = first argmax");
                continue;
            }
            let dist = truncated_distribution(&zq, &p);
            for k in 0..vocab {
                let pk = dist.iter().find(|(i, _)| *i as usize == k).map_or(0.0, |x| x.1);
                let want = pk * r as f64;
                assert!(
                    (count[k] as f64 - want).abs() <= 2.0,
                    "{what}: token {k} drawn {} times, want {want:.1}",
                    count[k]
                );
                if pk == 0.0 {
                    assert_eq!(count[k], 0, "{what}: token {k} outside the kept set was drawn");
                }
            }
        }
    }
}

/// Rows without a distribution (all −inf, all NaN, NaN and −inf, a +inf) draw token 0 with NaN
/// log-prob and entropy under every setting, as the CPU sampler does; NaN logits among finite
/// ones are never drawn.
pub fn draw_rows_without_a_distribution(d: &GpuDevice) {
    use fcgpu::rollout::device_sampler::{DeviceSampler, DrawJob};
    use fcgpu::rollout::sampler::SamplerParams;
    let vocab = 300;
    let mut inf = vec![0.5f32; vocab];
    inf[17] = f32::INFINITY;
    let partial: Vec<f32> = (0..vocab).map(|i| if i % 3 == 0 { 0.1 * i as f32 } else { f32::NAN }).collect();
    let rows: Vec<Vec<f32>> = vec![
        vec![f32::NAN; vocab],
        vec![f32::NEG_INFINITY; vocab],
        (0..vocab).map(|i| if i % 2 == 0 { f32::NAN } else { f32::NEG_INFINITY }).collect(),
        inf,
        partial,
    ];
    let zb = d.upload_f32(&rows.concat()).unwrap();
    let jobs: Vec<DrawJob> =
        (0..5).flat_map(|row| [0.0f32, 0.5, 0.999].map(|u| DrawJob { row, u })).collect();
    let mut s = DeviceSampler::new(d, 4).unwrap();
    for (temperature, top_p, top_k) in [(1.0f32, 1.0f32, 0usize), (0.7, 0.9, 0), (1.0, 1.0, 3), (0.0, 1.0, 0)]
    {
        let p = SamplerParams { temperature, top_p, top_k };
        for (j, g) in jobs.iter().zip(s.draw(&zb, DType::F32, 5, vocab, &p, &jobs).unwrap()) {
            let what = format!("row {} T={temperature} top_p={top_p} top_k={top_k}: {g:?}", j.row);
            if j.row < 4 {
                assert!(g.token == 0 && g.logprob.is_nan() && g.entropy.is_nan(), "{what}");
            } else {
                assert!(g.token % 3 == 0 && g.logprob.is_finite() && g.entropy.is_finite(), "{what}");
            }
        }
    }
}
