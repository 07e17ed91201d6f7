//! `fcgpu doctor`: what to run on a new machine. Versions and whether they pair, every kernel
//! compiled, every kernel family run on the device against the CPU op (forward and backward, at
//! a plain and an awkward shape), and ~20 s of speed measurement on cuda. Exits non-zero with one
//! line per failure.

use std::time::Instant;

use anyhow::{bail, Result};
use serde_json::{json, Value};

use crate::backend::sources::{KERNEL_FILES, KERNEL_FUNCTIONS};
use crate::backend::{emu, nvrtc, Gemm, GpuDevice, GpuKind};
use crate::ops;
use crate::tensor::{DType, Device, Tensor};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The device to check: cuda, cuda:N or emu.
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Print one JSON object: {"versions", "kernels": [{kernel, family, shape, max_abs_err, tol, ok}], "speed"}.
    #[arg(long)]
    pub json: bool,
}

/// One kernel family compared with the CPU op at one shape.
pub(super) struct Probe {
    pub(super) kernel: &'static str,
    pub(super) family: &'static str,
    pub(super) shape: String,
    pub(super) max_abs_err: f64,
    pub(super) tol: f64,
}

pub fn run(a: Args) -> Result<()> {
    let mut failures = Vec::new();
    let tag = Device::parse(&a.device)?;
    if !tag.is_gpu() {
        bail!("fcgpu doctor: --device {} is not a GPU device (expected cuda, cuda:N or emu)", a.device);
    }
    let dev = match tag.gpu() {
        Ok(d) => d,
        Err(e) => bail!("fcgpu doctor: cannot open --device {}: {e:#}", a.device),
    };
    let mut versions = json!({ "device": dev.name() });
    for (k, v) in dev.driver().versions() {
        versions[k] = json!(v);
    }
    if !a.json {
        println!("device: {}", dev.name());
        for (k, v) in dev.driver().versions() {
            println!("  {k}: {v}");
        }
    }
    let compiled = compile_all(&dev, &mut failures);
    versions["kernels_compiled"] = json!(compiled);
    if !a.json {
        println!("kernels compiled: {compiled} files");
    }
    let mut probes = run_probes(tag, &mut failures);
    probes.extend(super::doctor_kernels::run(&dev, &mut failures));
    if !a.json {
        println!("{:<28} {:<12} {:<26} {:>11} {:>9}  ok", "kernel", "family", "shape", "max_abs_err", "tol");
        for p in &probes {
            let ok = p.max_abs_err <= p.tol;
            println!(
                "{:<28} {:<12} {:<26} {:>11.3e} {:>9.1e}  {}",
                p.kernel,
                p.family,
                p.shape,
                p.max_abs_err,
                p.tol,
                if ok { "ok" } else { "FAIL" }
            );
        }
    }
    let speed = match dev.kind() {
        GpuKind::Emu | GpuKind::Meta => json!({ "skipped": "speed is only measured on cuda" }),
        GpuKind::Cuda => speed(&dev).unwrap_or_else(|e| {
            failures.push(format!("speed: {e:#}"));
            json!({ "error": format!("{e:#}") })
        }),
    };
    if a.json {
        let kernels: Vec<Value> = probes
            .iter()
            .map(|p| {
                json!({"kernel": p.kernel, "family": p.family, "shape": p.shape,
                       "max_abs_err": p.max_abs_err, "tol": p.tol, "ok": p.max_abs_err <= p.tol})
            })
            .collect();
        println!("{}", json!({ "versions": versions, "kernels": kernels, "speed": speed }));
    } else {
        println!("speed: {speed}");
    }
    if failures.is_empty() {
        if !a.json {
            println!("doctor: all checks passed");
        }
        return Ok(());
    }
    for f in &failures {
        eprintln!("FAIL {f}");
    }
    bail!("fcgpu doctor: {} check(s) failed on {}", failures.len(), dev.name())
}

/// cuda: NVRTC compiles every kernel file for the GPU's arch; emu: every kernel is in the emu
/// registry (compiled by build.rs). Returns the number of files.
fn compile_all(dev: &GpuDevice, failures: &mut Vec<String>) -> usize {
    match dev.kind() {
        GpuKind::Meta => {}
        GpuKind::Emu => {
            let names = emu::kernel_names();
            for (name, file, _) in KERNEL_FUNCTIONS {
                if !names.contains(name) {
                    failures.push(format!("compile: {name} ({file}) is not in the emu registry"));
                }
            }
        }
        GpuKind::Cuda => {
            let arch = dev.driver().versions().into_iter().find(|(k, _)| *k == "arch").map(|(_, v)| v);
            let arch = arch.unwrap_or_else(|| "sm_80".into());
            for (file, _) in KERNEL_FILES {
                match nvrtc::compile(file, &arch, false) {
                    Ok(c) if c.ok => {}
                    Ok(c) => failures
                        .push(format!("compile: {file} for {arch}: {}", c.log.lines().next().unwrap_or(""))),
                    Err(e) => failures.push(format!("compile: {file} for {arch}: {e:#}")),
                }
            }
        }
    }
    KERNEL_FILES.len()
}

/// Deterministic values in [-scale, scale).
pub(super) fn values(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let h = (i as u32).wrapping_mul(2654435761).wrapping_add(seed.wrapping_mul(40503)) >> 8;
            (h as f32 / 16777216.0 * 2.0 - 1.0) * scale
        })
        .collect()
}

pub(super) fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    a.iter().zip(b).map(|(x, y)| (x - y).abs() as f64).fold(0.0, |m, d| {
        if d.is_nan() {
            f64::INFINITY
        } else {
            m.max(d)
        }
    })
}

/// An op's forward output and the gradients of `Σ out·w` with respect to its inputs, on `device`.
type OpFn = dyn Fn(&[Tensor]) -> Result<Tensor>;

/// Leaves on a GPU are stored as `dtype` (the op's kernels follow their inputs' dtype); cpu leaves
/// stay f32 (the cpu ops are f32 only).
fn forward_backward(
    device: Device,
    dtype: DType,
    inputs: &[(Vec<f32>, Vec<usize>)],
    op: &OpFn,
) -> Result<Vec<Vec<f32>>> {
    let dtype = if device.is_gpu() { dtype } else { DType::F32 };
    let leaves: Vec<Tensor> = inputs
        .iter()
        .map(|(v, s)| Ok(Tensor::from_vec(v.clone(), s)?.to_dtype(dtype)?.to_device(device)?.requires_grad()))
        .collect::<Result<_>>()?;
    let out = op(&leaves)?;
    let w = values(out.numel(), 99, 1.0);
    let loss = ops::weighted_sum(&out, &w)?;
    let grads = loss.backward()?;
    let mut res = vec![out.to_vec()];
    for l in &leaves {
        res.push(grads.get(l).map(|g| g.to_vec()).unwrap_or_default());
    }
    Ok(res)
}

/// Run one family at one shape on the CPU and on `device`: one probe for the forward output and
/// one per input gradient (the backward kernels).
#[allow(clippy::too_many_arguments)]
fn compare(
    device: Device,
    family: &'static str,
    kernels: &[&'static str],
    shape: String,
    inputs: Vec<(Vec<f32>, Vec<usize>)>,
    tol: f64,
    op: &OpFn,
    out: &mut Vec<Probe>,
    failures: &mut Vec<String>,
) {
    compare_as((device, DType::F32), family, kernels, shape, inputs, tol, op, out, failures)
}

/// [`compare`] with the device's leaves stored as `dtype`; the inputs are rounded to it first, so
/// the cpu computes on the same values.
#[allow(clippy::too_many_arguments)]
fn compare_as(
    (device, dtype): (Device, DType),
    family: &'static str,
    kernels: &[&'static str],
    shape: String,
    mut inputs: Vec<(Vec<f32>, Vec<usize>)>,
    tol: f64,
    op: &OpFn,
    out: &mut Vec<Probe>,
    failures: &mut Vec<String>,
) {
    if dtype == DType::BF16 {
        for (v, _) in &mut inputs {
            v.iter_mut().for_each(|x| *x = half::bf16::from_f32(*x).to_f32());
        }
    }
    type Outputs = Vec<Vec<f32>>;
    let run = || -> Result<(Outputs, Outputs)> {
        Ok((
            forward_backward(Device::Cpu, dtype, &inputs, op)?,
            forward_backward(device, dtype, &inputs, op)?,
        ))
    };
    match run() {
        Ok((cpu, dev)) => {
            for (i, (c, d)) in cpu.iter().zip(&dev).enumerate() {
                if i > 0 && c.is_empty() {
                    continue; // an input without a gradient (ids)
                }
                let scale = c.iter().fold(1.0f64, |m, x| m.max(x.abs() as f64));
                let err = max_abs_diff(c, d);
                let kernel = kernels[i.min(kernels.len() - 1)];
                let p = Probe { kernel, family, shape: shape.clone(), max_abs_err: err, tol: tol * scale };
                if p.max_abs_err > p.tol {
                    failures.push(format!(
                        "{family} {kernel} at {shape}: max |device - cpu| {:.3e} > tolerance {:.1e}",
                        p.max_abs_err, p.tol
                    ));
                }
                out.push(p);
            }
        }
        Err(e) => failures.push(format!("{family} at {shape}: {e:#}")),
    }
}

/// Every kernel family, at a plain shape and an awkward one (sizes not multiples of the block or
/// tile, a length-1 sequence). Tolerances are relative to the largest CPU value: f32 kernels
/// agree to rounding; attention and the GEMM-backed families run bf16 tensor cores.
fn run_probes(device: Device, failures: &mut Vec<String>) -> Vec<Probe> {
    let mut out = Vec::new();
    for (rows, dim, awkward) in [(8usize, 64usize, false), (7, 37, true)] {
        let tag = if awkward { " (awkward)" } else { "" };
        let c =
            |f, k: &[&'static str], s: String, i, t, op: &OpFn, o: &mut Vec<Probe>, fl: &mut Vec<String>| {
                compare(device, f, k, s, i, t, op, o, fl)
            };
        let x = (values(rows * dim, 1, 1.0), vec![rows, dim]);
        c(
            "rms_norm",
            &["rms_norm_fwd", "rms_norm_bwd"],
            format!("{rows}x{dim}{tag}"),
            vec![x.clone(), (values(dim, 2, 1.0), vec![dim])],
            1e-4,
            &|t| ops::rms_norm(&t[0], &t[1], 1e-6),
            &mut out,
            failures,
        );
        c(
            "swiglu",
            &["swiglu_fwd", "swiglu_bwd"],
            format!("{rows}x{dim}{tag}"),
            vec![x.clone(), (values(rows * dim, 3, 1.0), vec![rows, dim])],
            1e-4,
            &|t| ops::swiglu(&t[0], &t[1]),
            &mut out,
            failures,
        );
        c(
            "elementwise",
            &["mul", "mul_bwd"],
            format!("{rows}x{dim}{tag}"),
            vec![x.clone(), (values(rows * dim, 4, 1.0), vec![rows, dim])],
            1e-5,
            &|t| ops::add(&ops::mul(&t[0], &t[1])?, &t[0]),
            &mut out,
            failures,
        );
        let out_f = dim + 3;
        c(
            "matmul",
            &["linear (gemm)", "linear_bwd"],
            format!("{rows}x{dim} @ {out_f}x{dim}{tag}"),
            vec![x.clone(), (values(out_f * dim, 5, 0.2), vec![out_f, dim])],
            1e-3,
            &|t| ops::linear(&t[0], &t[1], None),
            &mut out,
            failures,
        );
        let vocab = if awkward { 1003 } else { 512 };
        let targets: Vec<u32> = (0..rows as u32).map(|i| (i * 37 + 5) % vocab as u32).collect();
        c(
            "logprob",
            &["logprob_entropy_fwd", "logprob_entropy_bwd"],
            format!("{rows}x{dim}, vocab {vocab}{tag}"),
            vec![x.clone(), (values(vocab * dim, 6, 0.2), vec![vocab, dim])],
            2e-3,
            &move |t| ops::linear_logprob_entropy(&t[0], &t[1], &targets, 1.0),
            &mut out,
            failures,
        );
        let ids: Vec<u32> = (0..rows as u32).map(|i| (i * 7 + 3) % 50).collect();
        c(
            "embedding",
            &["embedding_fwd", "embedding_bwd"],
            format!("{rows} ids, 50x{dim}{tag}"),
            vec![(values(50 * dim, 7, 1.0), vec![50, dim])],
            1e-5,
            &move |t| ops::embedding(&t[0], &ids),
            &mut out,
            failures,
        );
        let (heads, hd) = (2usize, if awkward { 24 } else { 32 });
        let seqs: Vec<(usize, usize)> = if awkward { vec![(0, 1), (1, rows - 1)] } else { vec![(0, rows)] };
        let table = ops::RopeTable::new(hd, 10000.0, None);
        let pos: Vec<u32> = seqs.iter().flat_map(|&(_, l)| 0..l as u32).collect();
        let qkv = |s| (values(rows * heads * hd, s, 1.0), vec![rows, heads, hd]);
        c(
            "rope",
            &["rope_fwd", "rope_bwd"],
            format!("{rows}x{heads}x{hd}{tag}"),
            vec![qkv(8)],
            1e-4,
            &move |t| ops::rope(&t[0], &pos, &table),
            &mut out,
            failures,
        );
        let seqs32 = seqs.clone();
        compare_as(
            (device, DType::BF16),
            "attention",
            &["flash_attn_fwd", "flash_attn_bwd (dq)", "flash_attn_bwd (dk)", "flash_attn_bwd (dv)"],
            format!("{rows} tokens x{heads}x{hd}, seqs {seqs:?}{tag}"),
            vec![qkv(9), qkv(10), qkv(11)],
            3e-2,
            &move |t| ops::attention(&t[0], &t[1], &t[2], &seqs),
            &mut out,
            failures,
        );
        c(
            "attention_f32",
            &["fa_fwd_f32", "fa_bwd_dq_f32", "fa_bwd_dkdv_f32 (dk)", "fa_bwd_dkdv_f32 (dv)"],
            format!("{rows} tokens x{heads}x{hd}, seqs {seqs32:?}{tag}"),
            vec![qkv(9), qkv(10), qkv(11)],
            1e-5,
            &move |t| ops::attention(&t[0], &t[1], &t[2], &seqs32),
            &mut out,
            failures,
        );
        c(
            "cast",
            &["cast_f32_bf16/bf16_f32"],
            format!("{rows}x{dim}{tag}"),
            vec![x.clone()],
            1e-2,
            &|t| t[0].to_dtype(DType::BF16)?.to_dtype(DType::F32),
            &mut out,
            failures,
        );
    }
    out
}

/// Peak HBM bandwidth (B/s) and dense bf16 tensor-core FLOP/s of known GPUs, by name.
fn peaks(name: &str) -> Option<(f64, f64)> {
    let n = name.to_ascii_uppercase();
    [
        ("H200", 4.8e12, 989e12),
        ("H100", 3.35e12, 989e12),
        ("A100", 2.0e12, 312e12),
        ("L40S", 0.864e12, 362e12),
    ]
    .iter()
    .find(|(k, _, _)| n.contains(k))
    .map(|&(_, bw, fl)| (bw, fl))
}

/// Repeat `f` for about `secs` seconds (synchronised); seconds per call.
fn time_it(dev: &GpuDevice, secs: f64, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    dev.synchronize()?;
    let t0 = Instant::now();
    let mut n = 0u32;
    while t0.elapsed().as_secs_f64() < secs || n == 0 {
        f()?;
        n += 1;
        if n.is_multiple_of(4) {
            dev.synchronize()?;
        }
    }
    dev.synchronize()?;
    Ok(t0.elapsed().as_secs_f64() / n as f64)
}

/// ~20 s: device-to-device copy GB/s, bf16 GEMM TFLOP/s, flash-attention forward TFLOP/s.
fn speed(dev: &GpuDevice) -> Result<Value> {
    let peak = peaks(&dev.name());
    let frac = |v: f64, p: Option<f64>| p.map(|p| v / p);
    let bytes = 1usize << 30;
    let (a, b) = (dev.alloc(bytes)?, dev.alloc(bytes)?);
    a.zero()?;
    let t = time_it(dev, 5.0, || unsafe { dev.driver().dtod(a.ptr(), b.ptr(), bytes) })?;
    let copy = 2.0 * bytes as f64 / t;
    drop((a, b));
    let n = 8192usize;
    let (x, w, y) = (dev.zeros(n * n * 2)?, dev.zeros(n * n * 2)?, dev.alloc(n * n * 2)?);
    let g = Gemm::simple(DType::BF16, n, n, n, x.ptr(), w.ptr(), true, y.ptr());
    let t = time_it(dev, 6.0, || dev.gemm(&g))?;
    let gemm = 2.0 * (n as f64).powi(3) / t;
    drop((x, w, y));
    let attn = flash_fwd_flops(dev)?;
    Ok(json!({
        "copy_gb_s": copy / 1e9, "copy_frac_peak": frac(copy, peak.map(|p| p.0)),
        "gemm_bf16_tflop_s": gemm / 1e12, "gemm_frac_peak": frac(gemm, peak.map(|p| p.1)),
        "flash_fwd_tflop_s": attn / 1e12, "flash_fwd_frac_peak": frac(attn, peak.map(|p| p.1)),
        "peak_known": peak.is_some(),
    }))
}

/// Causal flash-attention forward, 8 sequences of 2048 tokens, 32 heads of 128, bf16.
fn flash_fwd_flops(dev: &GpuDevice) -> Result<f64> {
    let (seqs, len, heads, hd) = (8usize, 2048usize, 32usize, 128usize);
    let t = seqs * len;
    let mk = || -> Result<Tensor> {
        Tensor::from_vec(values(t * heads * hd, 3, 0.5), &[t, heads, hd])?
            .to_device(dev.tag())?
            .to_dtype(DType::BF16)
    };
    let (q, k, v) = (mk()?, mk()?, mk()?);
    let spans: Vec<(usize, usize)> = (0..seqs).map(|s| (s * len, len)).collect();
    let secs =
        crate::autograd::no_grad(|| time_it(dev, 6.0, || ops::attention(&q, &k, &v, &spans).map(|_| ())))?;
    // causal: half of the 4·len²·hd multiply-adds per head and sequence
    Ok(2.0 * (seqs * heads) as f64 * (len * len) as f64 * hd as f64 / secs)
}
