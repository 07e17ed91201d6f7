//! The model on the GPU devices against the cpu: log-probs through `fcgpu logprobs`, a training
//! step's loss and gradients, one AdamW step, greedy KV-cache generation, and `fcgpu train`.
//! Every test runs on the emu device; the same tests run on cuda when built with
//! `FCGPU_TEST_CUDA=1` (otherwise they are #[ignore] and reported as ignored; with it, a
//! missing device fails them).
//!
//! Tolerances. With `--dtype f32` every kernel computes in f32 (attention and the KV cache
//! included), so the device must equal the cpu to f32 rounding: log-probs and entropies within
//! 1e-4, gradients within 1e-4 of their norm. In bf16 the budget of each fixture comes from a cpu
//! simulation of bf16 rounding (`fcgpu::tensor::with_bf16_rounding`: weights and every stored
//! activation rounded to bf16, as the device stores them): the device may differ from the f32 cpu
//! by at most [`BF16_SLACK`] times what the simulation differs by. The factor covers what the
//! simulation leaves out: the kernels' summation order and the f32 intermediates some keep.

use std::path::{Path, PathBuf};
use std::process::Command;

use fcgpu::autograd::no_grad;
use fcgpu::backend::GpuDevice;
use fcgpu::model::decode::Step;
use fcgpu::model::kv_cache::{KvPool, SeqCache};
use fcgpu::model::{weights::load_all, Batch, Model};
use fcgpu::rollout::{generate, SamplingConfig};
use fcgpu::train::optim::{apply_gradients, apply_step, AdamW, AdamWConfig, StepGrads};
use fcgpu::{Device, Tensor};

fn fixtures() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("reference.safetensors").exists())
        .collect();
    v.sort();
    assert!(v.len() >= 6, "expected the six fixture checkpoints in {}", root.display());
    v
}

fn name(dir: &Path) -> String {
    dir.file_name().unwrap().to_string_lossy().into_owned()
}

/// The reference sequences of a fixture.
fn sequences(dir: &Path) -> Vec<Vec<u32>> {
    let r = load_all(&dir.join("reference.safetensors")).unwrap();
    (0..)
        .map_while(|i| {
            r.get(&format!("input_ids.{i}")).map(|t| t.to_vec().iter().map(|&x| x as u32).collect())
        })
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt()
}

fn diff_norm(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt()
}

/// `fcgpu logprobs` on `dir`'s reference sequences: every line's log-probs then entropies.
fn logprobs_cli(dir: &Path, extra: &[&str]) -> (Vec<f32>, Vec<f32>) {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    let lines: String = sequences(dir).iter().map(|s| format!("{{\"input_ids\": {s:?}}}\n")).collect();
    std::fs::write(&input, lines).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fcgpu"))
        .args(["logprobs", "--model", dir.to_str().unwrap(), "--input", input.to_str().unwrap()])
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "{} {extra:?}: {}", name(dir), String::from_utf8_lossy(&out.stderr));
    let (mut lp, mut ent) = (Vec::new(), Vec::new());
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        lp.extend(v["logprobs"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32));
        ent.extend(v["entropy"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32));
    }
    (lp, ent)
}

/// How far the bf16 device may be from the f32 cpu, as a multiple of the simulated bf16 error.
const BF16_SLACK: f64 = 3.0;

/// A cpu copy of `m` with every weight rounded to bf16.
fn bf16_weights(m: &Model) -> Model {
    let mut m = m.clone();
    m.visit_mut(&mut |_, t| {
        let v: Vec<f32> = t.to_vec().iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
        *t = Tensor::from_vec(v, t.shape()).unwrap();
    });
    m
}

/// Log-probs then entropies of each reference sequence on the cpu; with `sim`, under simulated
/// bf16 rounding of the weights and of every stored activation.
fn cpu_logprobs(dir: &Path, sim: bool) -> Vec<f32> {
    let m = Model::load(dir).unwrap();
    let m = if sim { bf16_weights(&m) } else { m };
    let run = || -> Vec<f32> {
        sequences(dir)
            .iter()
            .flat_map(|s| {
                no_grad(|| m.token_logprobs(&Batch::from_sequences(&[s.as_slice()]), 1.0)).unwrap().to_vec()
            })
            .collect()
    };
    if sim {
        fcgpu::tensor::with_bf16_rounding(run)
    } else {
        run()
    }
}

/// (max, mean) |Δ| of simulated bf16 log-probs and entropies against the f32 cpu: a fixture's
/// bf16 error budget before [`BF16_SLACK`].
fn simulated_bf16_error(dir: &Path) -> (f32, f32) {
    let (a, b) = (cpu_logprobs(dir, false), cpu_logprobs(dir, true));
    let mean = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32;
    (max_abs_diff(&a, &b), mean)
}

/// `--device` spelling of a device.
fn flag(d: Device) -> String {
    d.to_string()
}

pub fn logprobs_command_agrees_with_cpu(dev: Device) {
    for dir in fixtures() {
        let (lp, ent) = logprobs_cli(&dir, &["--device", "cpu"]);
        let (glp, gent) = logprobs_cli(&dir, &["--device", &flag(dev)]);
        let (flp, fent) = logprobs_cli(&dir, &["--device", &flag(dev), "--dtype", "f32"]);
        let worst = max_abs_diff(&lp, &glp).max(max_abs_diff(&ent, &gent));
        let n = (lp.len() + ent.len()) as f32;
        let mean =
            (lp.iter().zip(&glp).chain(ent.iter().zip(&gent)).map(|(a, b)| (a - b).abs()).sum::<f32>()) / n;
        let worst32 = max_abs_diff(&lp, &flp).max(max_abs_diff(&ent, &fent));
        let (sim_worst, sim_mean) = simulated_bf16_error(&dir);
        eprintln!(
            "{} on {dev}: bf16 max |Δ| {worst:.4} (mean {mean:.5}), simulated bf16 {sim_worst:.4} (mean {sim_mean:.5}); \
             f32 max |Δ| {worst32:.2e}",
            name(&dir)
        );
        assert!(
            worst as f64 <= BF16_SLACK * sim_worst as f64 && mean as f64 <= BF16_SLACK * sim_mean as f64,
            "{}: bf16 on {dev} vs cpu: max |Δ| {worst}, mean {mean}; simulated bf16: {sim_worst}, {sim_mean}",
            name(&dir)
        );
        assert!(worst32 <= 1e-4, "{}: f32 on {dev} vs cpu: max |Δ| {worst32}", name(&dir));
    }
}

/// Loss and per-parameter gradients of one NLL step of `m` on `batch` (on `m`'s device).
fn loss_and_grads(m: &Model, batch: &Batch) -> (f32, Vec<(String, Vec<f32>)>) {
    let mut m = m.clone();
    m.requires_grad();
    let loss = m.nll_loss(batch).unwrap();
    assert_eq!(loss.device(), m.device(), "the loss stays on the model's device");
    let g = loss.backward().unwrap();
    let grads = m
        .named_params()
        .iter()
        .map(|(n, p)| (n.to_string(), g.get(p).unwrap_or_else(|| panic!("{n}: no gradient")).to_vec()))
        .collect();
    (loss.to_scalar().unwrap(), grads)
}

/// |Δ|/|g| over every parameter together, and the worst single parameter's.
fn grad_rel(want: &[(String, Vec<f32>)], got: &[(String, Vec<f32>)]) -> (f64, f64) {
    let (mut num, mut den, mut worst) = (0.0f64, 0.0f64, 0.0f64);
    for ((n, a), (_, b)) in want.iter().zip(got) {
        let (d, s) = (diff_norm(a, b), norm(a));
        assert!(d.is_finite(), "{n}: gradient not finite");
        num += d * d;
        den += s * s;
        worst = worst.max(d / s.max(1e-30));
    }
    ((num / den).sqrt(), worst)
}

pub fn training_step_gradients_agree_with_cpu(dev: Device) {
    for dir in fixtures() {
        let batch = Batch::from_sequences(&sequences(&dir));
        let cpu = Model::load(&dir).unwrap();
        let (lc, gc) = loss_and_grads(&cpu, &batch);
        let (ls, gs) = fcgpu::tensor::with_bf16_rounding(|| loss_and_grads(&bf16_weights(&cpu), &batch));
        let (lg, gg) = loss_and_grads(&cpu.to_device(dev).unwrap(), &batch);
        let (l32, g32) = loss_and_grads(&cpu.to_device_as(dev, fcgpu::DType::F32).unwrap(), &batch);
        let ((rel, worst), (sim, sim_worst), (rel32, _)) =
            (grad_rel(&gc, &gg), grad_rel(&gc, &gs), grad_rel(&gc, &g32));
        // The loss is a mean of token log-probs, so the simulated mean |Δ| per token bounds how
        // far bf16 can move it (the simulated loss itself can land near the f32 one by chance).
        let (_, sim_tok) = simulated_bf16_error(&dir);
        let (dl, dl32) = ((lc - lg).abs(), ((lc - l32) / lc).abs());
        eprintln!(
            "{} on {dev}: bf16 loss |Δ| {dl:.2e} (simulated mean token |Δ| {sim_tok:.2e}, simulated loss |Δ| {:.2e}), \
             gradient |Δ|/|g| {rel:.4} (simulated {sim:.4}; worst parameter {worst:.4}, simulated {sim_worst:.4}); \
             f32 loss {dl32:.1e}, gradient {rel32:.1e}",
            name(&dir),
            (lc - ls).abs()
        );
        assert!(
            rel <= BF16_SLACK * sim && dl as f64 <= BF16_SLACK * sim_tok as f64,
            "{}: bf16 gradients on {dev} differ from the cpu by {rel} of their norm (simulated bf16: {sim}), \
             loss by {dl} (simulated mean token |Δ| {sim_tok})",
            name(&dir)
        );
        assert!(
            rel32 <= 1e-4,
            "{}: f32 gradients on {dev} differ from the cpu by {rel32} of their norm",
            name(&dir)
        );
        assert!(dl32 <= 1e-5, "{}: f32 loss on {dev}: {l32} vs {lc} on the cpu", name(&dir));
    }
}

pub fn adamw_steps_agree_with_cpu(dev: Device) {
    let dir = fixtures().into_iter().find(|d| name(d) == "qwen2-tiny").unwrap();
    let batch = Batch::from_sequences(&sequences(&dir));
    let cfg = AdamWConfig { lr: 1e-2, weight_decay: 0.1, ..Default::default() };
    let mut cpu = Model::load(&dir).unwrap();
    let (mut opt_c, mut opt_g) = (AdamW::default(), AdamW::default());
    opt_g.attach(&cpu, dev).unwrap();
    let mut gpu = cpu.to_device(dev).unwrap();
    cpu.requires_grad();
    gpu.requires_grad();
    // Two steps with the same (cpu) gradients, the first clipped: isolates the optimizer.
    for (step, max_norm) in [(1, 0.5f32), (2, 100.0)] {
        let grads = cpu.nll_loss(&batch).unwrap().backward().unwrap();
        let params = cpu.named_params();
        let host: std::collections::HashMap<String, Vec<f32>> =
            params.iter().map(|(n, p)| (n.clone(), grads.get(p).unwrap().to_vec())).collect();
        let mut on_dev = StepGrads::on(dev);
        if let StepGrads::Device(map) = &mut on_dev {
            for (n, g) in &host {
                let shape = params.iter().find(|(m, _)| m == n).unwrap().1.shape().to_vec();
                map.insert(n.clone(), Tensor::from_vec(g.clone(), &shape).unwrap().to_device(dev).unwrap());
            }
        }
        let norm_d = on_dev.norm().unwrap();
        let norm_c = apply_gradients(&mut cpu, &mut opt_c, &cfg, cfg.lr, host, max_norm).unwrap();
        assert!(
            (norm_c - norm_d).abs() <= 1e-4 * norm_c,
            "step {step}: gradient norm {norm_c} on the cpu, {norm_d} on {dev}"
        );
        apply_step(&mut gpu, &mut opt_g, &cfg, cfg.lr, on_dev, max_norm).unwrap();
        let (masters, host_opt) = opt_g.host_state(&gpu).unwrap();
        for ((n, pc), ((_, pm), (_, pg))) in
            cpu.named_params().iter().zip(masters.named_params().iter().zip(gpu.named_params()))
        {
            let (a, b) = (pc.to_vec(), pm.to_vec());
            assert!(
                max_abs_diff(&a, &b) < 1e-5,
                "step {step}: {n}: f32 master weights on {dev} differ from the cpu by {}",
                max_abs_diff(&a, &b)
            );
            let want: Vec<f32> = b.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
            assert_eq!(
                pg.to_vec(),
                want,
                "step {step}: {n}: the working copy is the bf16 of the master weights"
            );
            assert!(pg.tracks_grad(), "{n} stays trainable");
            let (mc, mg) = (&opt_c.m[n], &host_opt.m[n]);
            assert!(
                max_abs_diff(mc, mg) < 1e-6 && max_abs_diff(&opt_c.v[n], &host_opt.v[n]) < 1e-8,
                "step {step}: {n}: moments differ"
            );
        }
    }
    eprintln!("AdamW on {dev}: two steps (one clipped) match the cpu");
}

/// Logits of every new token of one sequence fed in chunks through the KV cache (blocks of 4
/// positions, so the chunks cross blocks).
fn cached_logits(m: &Model, seq: &[u32], cuts: &[usize]) -> Vec<f32> {
    let pool = KvPool::new(m.kv_shape(), 4).unwrap();
    let mut c = SeqCache::new(&pool);
    let mut out = Vec::new();
    let mut at = 0;
    for &end in cuts.iter().chain([&seq.len()]) {
        out.extend(
            no_grad(|| m.forward_cached_all(&mut [Step { cache: &mut c, tokens: &seq[at..end] }])).unwrap(),
        );
        at = end;
    }
    out
}

/// Logits of a fixture's third sequence through the KV cache: a prefill, single tokens after it
/// (decode attention), several after a cache; then one call mixing a decode token after a cache,
/// a prefill, and a one-token prompt (as the rollout engine's continuous batch does); then one
/// mixing a decode token, several tokens after a cache, and a prefill.
fn kv_cache_logits(m: &Model, seq: &[u32]) -> Vec<f32> {
    let mut out = cached_logits(m, seq, &[5, 6, 7]);
    let pool = KvPool::new(m.kv_shape(), 4).unwrap();
    let (mut ca, mut cb, mut cc) = (SeqCache::new(&pool), SeqCache::new(&pool), SeqCache::new(&pool));
    no_grad(|| m.forward_cached(&mut [Step { cache: &mut ca, tokens: &seq[..5] }])).unwrap();
    let mut steps = [
        Step { cache: &mut ca, tokens: &seq[5..6] },
        Step { cache: &mut cb, tokens: &seq[2..9] },
        Step { cache: &mut cc, tokens: &seq[3..4] },
    ];
    out.extend(no_grad(|| m.forward_cached(&mut steps)).unwrap());
    // Several tokens after a cache next to a decode token and a prefill (a prefix-cache hit or
    // a recomputed sequence joining the batch): every new token through the block tables.
    let (mut cd, mut ce) = (SeqCache::new(&pool), SeqCache::new(&pool));
    no_grad(|| m.forward_cached(&mut [Step { cache: &mut cd, tokens: &seq[..3] }])).unwrap();
    let mut steps = [
        Step { cache: &mut ca, tokens: &seq[6..7] },
        Step { cache: &mut cd, tokens: &seq[3..9] },
        Step { cache: &mut ce, tokens: &seq[1..4] },
    ];
    out.extend(no_grad(|| m.forward_cached(&mut steps)).unwrap());
    out
}

pub fn kv_cache_decoding_agrees_with_cpu(dev: Device) {
    for dir in fixtures() {
        let cpu = Model::load(&dir).unwrap();
        let seq = &sequences(&dir)[2];
        let a = kv_cache_logits(&cpu, seq);
        let sim = fcgpu::tensor::with_bf16_rounding(|| kv_cache_logits(&bf16_weights(&cpu), seq));
        let b = kv_cache_logits(&cpu.to_device(dev).unwrap(), seq);
        let b32 = kv_cache_logits(&cpu.to_device_as(dev, fcgpu::DType::F32).unwrap(), seq);
        let scale = a.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let (d, ds, d32) = (max_abs_diff(&a, &b), max_abs_diff(&a, &sim), max_abs_diff(&a, &b32));
        eprintln!(
            "{} on {dev}: cached logits max |Δ| bf16 {d:.3} (simulated {ds:.3}), f32 {d32:.1e} (|logit| up to {scale:.1})",
            name(&dir)
        );
        assert!(
            d as f64 <= BF16_SLACK * ds as f64,
            "{}: bf16 KV-cache logits on {dev} differ from the cpu by {d} (simulated bf16: {ds})",
            name(&dir)
        );
        assert!(
            d32 <= 1e-4 * scale,
            "{}: f32 KV-cache logits on {dev} differ from the cpu by {d32}",
            name(&dir)
        );
    }
}

pub fn greedy_generation_agrees_with_cpu(dev: Device) {
    let (mut compared, mut total) = (0, 0);
    for dir in fixtures() {
        let cpu = Model::load(&dir).unwrap();
        let gpu = cpu.to_device(dev).unwrap();
        let prompts: Vec<Vec<u32>> =
            sequences(&dir).iter().filter(|s| s.len() >= 2).map(|s| s[..s.len().min(6)].to_vec()).collect();
        let cfg = SamplingConfig {
            n: 2,
            max_new_tokens: 6,
            temperature: 0.0,
            ignore_eos: true,
            ..Default::default()
        };
        let (want, got) = (
            no_grad(|| generate(&cpu, &prompts, &cfg, None)).unwrap(),
            no_grad(|| generate(&gpu, &prompts, &cfg, None)).unwrap(),
        );
        let v = cpu.config.vocab_size;
        for (w, g) in want.iter().zip(&got) {
            // Compare up to the first near tie on the cpu (top-2 logit gap < 0.3): bf16 noise may
            // flip an argmax there, and the sequences legitimately part.
            let mut seq = prompts[w.prompt_index].clone();
            seq.extend(&w.new_ids);
            let logits = cached_logits(&cpu, &seq, &[]);
            let p = prompts[w.prompt_index].len();
            for (j, &t) in w.new_ids.iter().enumerate() {
                let row = &logits[(p - 1 + j) * v..(p + j) * v];
                let mut s = row.to_vec();
                s.sort_by(|a, b| b.total_cmp(a));
                total += 1;
                if s[0] - s[1] < 0.3 {
                    break;
                }
                assert_eq!(
                    g.new_ids[j],
                    t,
                    "{}: greedy token {j} on {dev} ({:?}) vs cpu ({:?})",
                    name(&dir),
                    g.new_ids,
                    w.new_ids
                );
                compared += 1;
            }
        }
    }
    eprintln!(
        "greedy on {dev}: {compared} of {total} tokens compared (the rest follow a near tie), all equal"
    );
    assert!(compared * 2 > total, "too few tokens compared: {compared} of {total}");
}

pub fn train_command_runs_on_device(dev: Device) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("micro.toml");
    std::fs::write(
        &cfg,
        "preset = \"micro\"\nbase = \"scratch\"\ntask_train = 40\ntask_eval = 4\nwarmup_sft_steps = 2\n\
        group_size = 2\nprompts_per_step = 2\nmax_new_tokens = 8\neval_samples = 2\nseed = 1\n",
    )
    .unwrap();
    let run = dir.path().join("run");
    let t0 = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_fcgpu"))
        .args([
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--run-dir",
            run.to_str().unwrap(),
            "--device",
            &flag(dev),
            "--steps",
            "2",
            "--counters",
            dir.path().join("counters.jsonl").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    eprintln!("fcgpu train --device {dev} --steps 2 (micro): {:.1} s", t0.elapsed().as_secs_f32());
    // --counters: one line per GRPO step, the device work of each phase.
    let counts: Vec<serde_json::Value> = fcgpu::jsonl::read(&dir.path().join("counters.jsonl")).unwrap();
    assert_eq!(counts.iter().map(|l| l["step"].as_u64().unwrap()).collect::<Vec<_>>(), vec![1, 2]);
    for l in &counts {
        for phase in ["rollout", "reference pass", "update", "optimizer"] {
            assert!(l["phases"][phase]["launches"].as_u64().unwrap() > 0, "{phase}: {l}");
        }
        assert!(l["phases"]["rollout"]["d2h_bytes"].as_u64().unwrap() > 0, "{l}");
    }
    // Allocations per training step are bounded: the reference pass, the update and the optimizer
    // allocate the same number at every step (one per op output, set by the model and the
    // micro-batches), never more as the run goes on.
    for phase in ["reference pass", "update", "optimizer"] {
        let allocs: Vec<u64> =
            counts.iter().map(|l| l["phases"][phase]["allocs"].as_u64().unwrap()).collect();
        assert!(allocs.windows(2).all(|w| w[0] == w[1]), "{phase}: allocations by step {allocs:?}");
    }
    let lines: Vec<serde_json::Value> = fcgpu::jsonl::read(&run.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.iter().map(|l| l["step"].as_u64().unwrap()).collect::<Vec<_>>(), vec![0, 1, 2]);
    assert!(lines[1..].iter().all(
        |l| l["grad_norm"].as_f64().unwrap().is_finite() && l["completion_tokens"].as_u64().unwrap() > 0
    ));
    let ck = run.join("checkpoint-2");
    for f in ["model.safetensors", "optimizer.safetensors", "trainer_state.json"] {
        assert!(ck.join(f).exists(), "{f} missing in {}", ck.display());
    }
    // The checkpoint holds the f32 master weights, not the bf16 working copy.
    let m = Model::load(&ck).unwrap();
    let all: Vec<f32> = m.named_params().iter().flat_map(|(_, t)| t.to_vec()).collect();
    assert!(
        all.iter().any(|&x| half::bf16::from_f32(x).to_f32() != x),
        "checkpoint weights are all bf16 values"
    );
    // The SRML warm-up ran on the device too and resumes from its checkpoint.
    assert!(run.join("sft/checkpoint-2/trainer_state.json").exists());
}

/// `#[test]` functions running each parity test on the device `$dev` (an `Option<Device>`).
macro_rules! device_tests {
    // `needs_gpu`: #[ignore] unless built with FCGPU_TEST_CUDA=1 (cfg set by build.rs).
    (needs_gpu $dev:expr; $($name:ident),* $(,)?) => {
        $(
            #[test]
            #[cfg_attr(not(fcgpu_test_cuda), ignore = "needs a GPU: FCGPU_TEST_CUDA=1 cargo test")]
            fn $name() {
                if let Some(d) = $dev {
                    super::$name(d);
                }
            }
        )*
    };
    ($dev:expr; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                if let Some(d) = $dev {
                    super::$name(d);
                }
            }
        )*
    };
}

mod emu {
    device_tests!(Some(fcgpu::Device::Emu);
        logprobs_command_agrees_with_cpu,
        training_step_gradients_agree_with_cpu,
        adamw_steps_agree_with_cpu,
        kv_cache_decoding_agrees_with_cpu,
        greedy_generation_agrees_with_cpu,
        train_command_runs_on_device,
    );
}

/// cuda:0. These tests are built only with `FCGPU_TEST_CUDA=1` (otherwise #[ignore]); then a
/// missing or unusable device fails them: asked to run on a GPU, they never pass without one.
fn cuda() -> Option<Device> {
    match GpuDevice::shared_cuda(0) {
        Ok(_) => Some(Device::Cuda(0)),
        Err(e) => panic!("FCGPU_TEST_CUDA=1 but no usable CUDA device: {e:#}"),
    }
}

mod cuda {
    device_tests!(needs_gpu super::cuda();
        logprobs_command_agrees_with_cpu,
        training_step_gradients_agree_with_cpu,
        adamw_steps_agree_with_cpu,
        kv_cache_decoding_agrees_with_cpu,
        greedy_generation_agrees_with_cpu,
        train_command_runs_on_device,
    );
}

#[test]
fn devices_parse_and_unusable_cuda_is_a_clear_error() {
    assert_eq!(Device::parse("cpu").unwrap(), Device::Cpu);
    assert_eq!(Device::parse("emu").unwrap(), Device::Emu);
    assert_eq!(Device::parse("cuda").unwrap(), Device::Cuda(0));
    assert_eq!(Device::parse("cuda:3").unwrap(), Device::Cuda(3));
    assert_eq!(
        Device::parse("auto").unwrap(),
        if GpuDevice::cuda_available() { Device::Cuda(0) } else { Device::Cpu }
    );
    for bad in ["gpu", "cuda:", "cuda:x", "CPU"] {
        assert!(Device::parse(bad).unwrap_err().to_string().contains("expected cpu, cuda"), "{bad}");
    }
    assert_eq!(Device::Cuda(2).to_string(), "cuda:2");
    if GpuDevice::cuda_available() {
        return;
    }
    let dir = fixtures().remove(0);
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    std::fs::write(&input, "{\"input_ids\": [1, 2, 3]}\n").unwrap();
    for cmd in [
        vec!["logprobs", "--model", dir.to_str().unwrap(), "--input", input.to_str().unwrap()],
        vec!["train", "--run-dir", tmp.path().to_str().unwrap()],
    ] {
        let out =
            Command::new(env!("CARGO_BIN_EXE_fcgpu")).args(&cmd).args(["--device", "cuda"]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("--device cuda") && !err.contains("panicked"),
            "{cmd:?}: {err}"
        );
        assert!(
            err.contains("CUDA") || err.contains("NVRTC") || err.contains("cuBLAS") || err.contains("GPU"),
            "{err}"
        );
    }
}

#[test]
fn ops_refuse_mixed_devices() {
    let a = Tensor::from_vec(vec![1.0, 2.0], &[2]).unwrap();
    let b = a.to_device(Device::Emu).unwrap();
    let e = fcgpu::ops::add(&a, &b).unwrap_err().to_string();
    assert!(e.contains("add") && e.contains("cpu") && e.contains("emu"), "{e}");
    assert!(b.f32s().unwrap_err().to_string().contains("emu"));
    assert_eq!(b.to_vec(), vec![1.0, 2.0]);
    assert_eq!(fcgpu::ops::add(&b, &b).unwrap().to_vec(), vec![2.0, 4.0]);
}
