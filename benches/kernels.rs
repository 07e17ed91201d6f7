//! One benchmark per kernel. On a machine with a CUDA GPU (`FCGPU_BENCH_DEVICE` unset or `cuda`)
//! the kernels run at Qwen2.5-7B-like sizes and each reports GB/s or TFLOP/s and the fraction of
//! H100 SXM peak (3.35 TB/s, 989 bf16 TFLOP/s); without one they run on the emu device at
//! correctness sizes (the numbers then only say that the launch path works, not how fast a GPU is).
//!
//! `cargo bench --bench kernels [-- <filter>]`

use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fcgpu::backend::{GpuBuffer, GpuDevice, GpuKind};
use fcgpu::kernels::adamw::{adamw_step, AdamW};
use fcgpu::kernels::cast::{cast, sum_squares};
use fcgpu::kernels::{attention, elementwise, embedding, logprob, matmul, rms_norm, rope, swiglu};
use fcgpu::rl::advantage::{gpu as adv, AdvScale, EntropyBonus};
use fcgpu::rl::policy_loss::{gpu as pl, PolicyLossCfg};
use fcgpu::roofline::{H100_BW, H100_FLOPS};
use fcgpu::DType;

struct Ctx {
    dev: GpuDevice,
    gpu: bool,
}

fn ctx() -> Ctx {
    let want = std::env::var("FCGPU_BENCH_DEVICE").unwrap_or_default();
    if want != "emu" {
        match GpuDevice::cuda(0) {
            Ok(dev) => return Ctx { dev, gpu: true },
            Err(e) => eprintln!("kernels bench: no CUDA device ({e:#}); running on emu at correctness sizes"),
        }
    }
    Ctx { dev: GpuDevice::emu(), gpu: false }
}

/// GPU size or emu size.
fn pick(c: &Ctx, gpu: usize, emu: usize) -> usize {
    if c.gpu {
        gpu
    } else {
        emu
    }
}

fn bf(c: &Ctx, n: usize, seed: u32) -> GpuBuffer {
    let v: Vec<f32> = (0..n)
        .map(|i| {
            (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / 16777216.0 - 0.5) * 2.0
        })
        .collect();
    c.dev.upload_as(&v, DType::BF16).unwrap()
}

fn f32buf(c: &Ctx, n: usize, val: f32) -> GpuBuffer {
    c.dev.upload_f32(&vec![val; n]).unwrap()
}

/// Criterion measurement plus one explicit timing that prints the fraction of H100 peak.
fn bench(cr: &mut Criterion, c: &Ctx, name: &str, bytes: f64, flops: f64, mut f: impl FnMut()) {
    let mut g = cr.benchmark_group("kernels");
    if flops / H100_FLOPS > bytes / H100_BW {
        g.throughput(Throughput::Elements(flops as u64)); // elements = FLOPs
    } else {
        g.throughput(Throughput::Bytes(bytes as u64));
    }
    if !c.gpu {
        g.sample_size(10);
    }
    g.bench_function(name, |b| {
        b.iter(|| {
            f();
            c.dev.synchronize().unwrap();
        })
    });
    g.finish();
    if c.gpu {
        let reps = 20;
        f();
        c.dev.synchronize().unwrap();
        let t0 = Instant::now();
        for _ in 0..reps {
            f();
        }
        c.dev.synchronize().unwrap();
        let s = t0.elapsed().as_secs_f64() / reps as f64;
        let (bw, fl) = (bytes / s, flops / s);
        if flops / H100_FLOPS > bytes / H100_BW {
            println!(
                "{name}: {:.1} TFLOP/s = {:.1}% of 989 TFLOP/s ({:.1} µs)",
                fl / 1e12,
                100.0 * fl / H100_FLOPS,
                s * 1e6
            );
        } else {
            println!(
                "{name}: {:.0} GB/s = {:.1}% of 3.35 TB/s ({:.1} µs)",
                bw / 1e9,
                100.0 * bw / H100_BW,
                s * 1e6
            );
        }
    }
}

fn kernels(cr: &mut Criterion) {
    let c = ctx();
    let d = &c.dev;
    assert!(c.gpu == (d.kind() == GpuKind::Cuda));
    let bf16 = DType::BF16;

    // elementwise / row kernels at 4096 x hidden (GPU) or 64 x 96 (emu)
    let (t, h, inter) = (pick(&c, 4096, 16), pick(&c, 3584, 96), pick(&c, 18944, 256));
    {
        let n = t * inter;
        let (g, u, o) = (bf(&c, n, 1), bf(&c, n, 2), bf(&c, n, 3));
        bench(cr, &c, "swiglu_fwd_bf16", 6.0 * n as f64, 6.0 * n as f64, || {
            swiglu::swiglu_fwd(d, bf16, &g, &u, &o, n).unwrap()
        });
        let (dg, du) = (bf(&c, n, 4), bf(&c, n, 5));
        bench(cr, &c, "swiglu_bwd_bf16", 10.0 * n as f64, 12.0 * n as f64, || {
            swiglu::swiglu_bwd(d, bf16, &g, &u, &o, &dg, &du, n).unwrap()
        });
    }
    {
        let (x, w, y, dy, dx) =
            (bf(&c, t * h, 1), bf(&c, h, 2), bf(&c, t * h, 3), bf(&c, t * h, 4), bf(&c, t * h, 5));
        let rstd = f32buf(&c, t, 1.0);
        let dw = f32buf(&c, h, 0.0);
        let th = (t * h) as f64;
        bench(cr, &c, "rmsnorm_fwd_bf16", 4.0 * th, 4.0 * th, || {
            rms_norm::rms_norm_fwd(d, bf16, &x, &w, &y, &rstd, t, h, 1e-6).unwrap()
        });
        bench(cr, &c, "rmsnorm_bwd_bf16", 10.0 * th, 8.0 * th, || {
            rms_norm::rms_norm_bwd(d, bf16, &x, &w, &dy, &rstd, &dx, &dw, t, h, false).unwrap()
        });
    }
    {
        let (heads, hd) = (pick(&c, 32, 4), 128);
        let n = t * heads * hd;
        let (x, cs, sn) = (bf(&c, n, 1), f32buf(&c, t * hd / 2, 0.6), f32buf(&c, t * hd / 2, 0.8));
        bench(cr, &c, "rope_bf16", 4.0 * n as f64, 3.0 * n as f64, || {
            rope::rope(d, bf16, &x, &cs, &sn, &x, t, heads, hd, false).unwrap()
        });
    }
    {
        let vocab = pick(&c, 152064, 500);
        let ids =
            d.upload_i32(&(0..t as i32).map(|i| (i * 7919) % vocab as i32).collect::<Vec<_>>()).unwrap();
        let (table, out) = (bf(&c, vocab * h, 1), bf(&c, t * h, 2));
        let dtab = f32buf(&c, vocab * h, 0.0);
        let th = (t * h) as f64;
        bench(cr, &c, "embedding_fwd_bf16", 4.0 * th, 0.0, || {
            embedding::embedding_fwd(d, bf16, &ids, &table, &out, t, vocab, h).unwrap()
        });
        bench(cr, &c, "embedding_bwd_bf16", 10.0 * th, th, || {
            embedding::embedding_bwd(d, bf16, &ids, &out, &dtab, t, vocab, h).unwrap()
        });
    }
    {
        let (rows, vocab) = (pick(&c, 1024, 8), pick(&c, 152064, 1000));
        let z = bf(&c, rows * vocab, 9);
        let tg = d.upload_i32(&(0..rows as i32).collect::<Vec<_>>()).unwrap();
        let (lp, en, lz) = (f32buf(&c, rows, 0.0), f32buf(&c, rows, 0.0), f32buf(&c, rows, 0.0));
        let rv = (rows * vocab) as f64;
        bench(cr, &c, "lpe_fwd_bf16", 2.0 * rv, 5.0 * rv, || {
            logprob::lpe_fwd(d, bf16, &z, vocab, Some(&tg), rows, vocab, 0.7, Some(&lp), Some(&en), Some(&lz))
                .unwrap()
        });
        let (gl, gh) = (f32buf(&c, rows, 1.0), f32buf(&c, rows, 0.5));
        let dz = bf(&c, rows * vocab, 3);
        bench(cr, &c, "lpe_bwd_bf16", 4.0 * rv, 8.0 * rv, || {
            logprob::lpe_bwd(
                d,
                bf16,
                &z,
                vocab,
                Some(&tg),
                rows,
                vocab,
                0.7,
                &lz,
                &en,
                Some(&gl),
                Some(&gh),
                &dz,
                vocab,
            )
            .unwrap()
        });
    }
    {
        let (rows, vocab) = (pick(&c, 64, 8), pick(&c, 152064, 1000));
        let z = bf(&c, rows * vocab, 9);
        let u = f32buf(&c, rows, 0.37);
        let tok = d.zeros(rows * 4).unwrap();
        let rv = (rows * vocab) as f64;
        bench(cr, &c, "sample_rows_bf16 (top_p 0.9)", 43.0 * 2.0 * rv, 3.0 * 43.0 * rv, || {
            logprob::sample_rows(d, bf16, &z, vocab, rows, vocab, 0.7, 0.9, &u, &tok).unwrap()
        });
        bench(cr, &c, "sample_rows_bf16 (top_p 1)", 3.0 * 2.0 * rv, 9.0 * rv, || {
            logprob::sample_rows(d, bf16, &z, vocab, rows, vocab, 0.7, 1.0, &u, &tok).unwrap()
        });
    }
    {
        let n = t * h;
        let (a, b, o) = (bf(&c, n, 1), bf(&c, n, 2), bf(&c, n, 3));
        let acc = f32buf(&c, n, 0.0);
        bench(cr, &c, "ew_add_bf16", 6.0 * n as f64, n as f64, || {
            elementwise::add(d, bf16, &a, &b, &o, n).unwrap()
        });
        bench(cr, &c, "axpy_bf16_f32", 10.0 * n as f64, 2.0 * n as f64, || {
            elementwise::axpy(d, bf16, &a, 1.0, &acc, n).unwrap()
        });
        let dims = matmul::LinearDims { rows: t, in_f: h, out_f: pick(&c, 18944, 128) };
        let (w, y) = (bf(&c, dims.out_f * h, 4), bf(&c, t * dims.out_f, 5));
        let flops = 2.0 * (t * h * dims.out_f) as f64;
        let bytes = 2.0 * (t * h + dims.out_f * h + t * dims.out_f) as f64;
        bench(cr, &c, "linear_fwd_bf16 (cuBLAS, MLP up)", bytes, flops, || {
            matmul::linear_fwd(d, bf16, dims, &a, &w, None, &y).unwrap()
        });
    }
    for hd in [64usize, 128] {
        let (n_seq, len, hq, hkv) = (pick(&c, 4, 2), pick(&c, 1024, 70), pick(&c, 28, 2), pick(&c, 4, 1));
        let tokens = n_seq * len;
        let cu: Vec<i32> = (0..=n_seq as i32).map(|i| i * len as i32).collect();
        let cub = d.upload_i32(&cu).unwrap();
        let fd = attention::FlashDims {
            tokens,
            n_seq,
            max_len: len,
            q_heads: hq,
            kv_heads: hkv,
            head_dim: hd,
            shared: false,
        };
        let (q, k, v, o, dout) = (
            bf(&c, tokens * hq * hd, 1),
            bf(&c, tokens * hkv * hd, 2),
            bf(&c, tokens * hkv * hd, 3),
            bf(&c, tokens * hq * hd, 4),
            bf(&c, tokens * hq * hd, 5),
        );
        let (dq, dk, dv) =
            (bf(&c, tokens * hq * hd, 6), bf(&c, tokens * hkv * hd, 7), bf(&c, tokens * hkv * hd, 8));
        let lse = f32buf(&c, tokens * hq, 0.0);
        let flops = (n_seq * hq) as f64 * 2.0 * (len * len * hd) as f64;
        let bytes = ((2 * hq + 2 * hkv) * tokens * hd * 2) as f64;
        bench(cr, &c, &format!("fa_fwd_d{hd}"), bytes, flops, || {
            attention::flash_attn_fwd(d, &fd, &q, &k, &v, &cub, &o, &lse).unwrap()
        });
        attention::flash_attn_fwd(d, &fd, &q, &k, &v, &cub, &o, &lse).unwrap();
        bench(cr, &c, &format!("fa_bwd_d{hd}"), 2.0 * bytes, 2.5 * flops, || {
            attention::flash_attn_bwd(d, &fd, &q, &k, &v, &cub, &o, &lse, &dout, &dq, &dk, &dv).unwrap()
        });
    }
    {
        let (batch, hq, hkv, hd, ctxl) =
            (pick(&c, 64, 2), pick(&c, 28, 4), pick(&c, 4, 2), 128, pick(&c, 1024, 40));
        let (q, kc, vc, o) = (
            bf(&c, batch * hq * hd, 1),
            bf(&c, batch * ctxl * hkv * hd, 2),
            bf(&c, batch * ctxl * hkv * hd, 3),
            bf(&c, batch * hq * hd, 4),
        );
        let lens = d.upload_i32(&vec![ctxl as i32; batch]).unwrap();
        bench(
            cr,
            &c,
            "decode_attn_bf16",
            (2 * batch * ctxl * hkv * hd * 2) as f64,
            (4 * batch * ctxl * hq * hd) as f64,
            || attention::decode_attn(d, &q, &kc, &vc, &lens, &o, batch, hq, hkv, hd, ctxl).unwrap(),
        );
    }
    {
        let n = pick(&c, 1 << 28, 10_000);
        let (p, m, v, g, copy) =
            (f32buf(&c, n, 0.1), f32buf(&c, n, 0.0), f32buf(&c, n, 0.0), bf(&c, n, 1), bf(&c, n, 2));
        let hp = AdamW {
            lr: 1e-6,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            step: 1,
            grad_scale: 1.0,
        };
        bench(cr, &c, "adamw_bf16grad", 26.0 * n as f64, 15.0 * n as f64, || {
            adamw_step(d, &hp, &p, &m, &v, &g, DType::BF16, Some(&copy), n).unwrap()
        });
        bench(cr, &c, "cast_f32_bf16", 6.0 * n as f64, 0.0, || {
            cast(d, &p, DType::F32, &copy, DType::BF16, n).unwrap()
        });
        let out = f32buf(&c, 1, 0.0);
        bench(cr, &c, "sumsq_bf16", 2.0 * n as f64, 2.0 * n as f64, || {
            sum_squares(d, &g, DType::BF16, n, &out, false).unwrap()
        });
    }
    {
        let (groups, g, t_len) = (pick(&c, 512, 4), 8, pick(&c, 1024, 33));
        let n = groups * g;
        let r = f32buf(&c, n, 1.0);
        let (a, raw, h) = (f32buf(&c, n, 0.0), f32buf(&c, n, 0.0), f32buf(&c, n, 0.5));
        bench(cr, &c, "grpo_advantage", (5 * n * 4) as f64, (20 * n) as f64, || {
            adv::group_advantages(
                d,
                &r,
                groups,
                g,
                AdvScale::Group,
                Some(&h),
                EntropyBonus::default(),
                &a,
                Some(&raw),
                None,
            )
            .unwrap()
        });
        let nt = n * t_len;
        let (lp, old, refl, mask) =
            (f32buf(&c, nt, -1.0), f32buf(&c, nt, -1.1), f32buf(&c, nt, -0.9), f32buf(&c, nt, 1.0));
        let seg = d.upload_i32(&vec![1; nt]).unwrap();
        let x = pl::PolicyLossBuffers {
            logp: &lp,
            old_logp: &old,
            ref_logp: Some(&refl),
            adv: &a,
            adv_per_token: false,
            mask: &mask,
            seg: Some(&seg),
            n_seq: n,
            t: t_len,
        };
        let cfg = PolicyLossCfg::default();
        let counts = pl::counts(d, &x).unwrap();
        let out = f32buf(&c, 4, 0.0);
        bench(cr, &c, "policy_loss_fwd", 20.0 * nt as f64, 22.0 * nt as f64, || {
            pl::policy_loss_fwd(d, &x, &counts, &cfg, &out).unwrap()
        });
        let dl = f32buf(&c, nt, 0.0);
        bench(cr, &c, "policy_loss_bwd", 28.0 * nt as f64, 22.0 * nt as f64, || {
            pl::policy_loss_bwd(d, &x, &counts, &cfg, None, &dl).unwrap()
        });
    }
}

criterion_group!(benches, kernels);
criterion_main!(benches);
