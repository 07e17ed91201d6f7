//! LoRA adapters: the adapted projection's gradients (cpu and emu), a frozen base, adapters off
//! as the base model, PEFT files written and read back, merging, and bad adapters refused
//! before any compute.

mod model_common;

use fcgpu::model::lora::{Adapter, LoraConfig, CONFIG_FILE, TARGETS, WEIGHTS_FILE};
use fcgpu::model::{Batch, Linear, Model};
use fcgpu::ops::gradcheck::{check, rand_tensor, rand_vec, to_device};
use fcgpu::{Device, Tensor};

const ALL: &str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj";

fn lora_linear_grad_on(dev: Device) {
    let cfg = LoraConfig::new(3, 6.0, 0.0, "q_proj").unwrap();
    // x, A and B trainable; the base weight and bias frozen (no gradient must reach them).
    let ins = to_device(&[rand_tensor(&[5, 12], 1), rand_tensor(&[3, 12], 2), rand_tensor(&[8, 3], 3)], dev)
        .unwrap();
    let w = Tensor::from_vec(rand_vec(8 * 12, 4), &[8, 12]).unwrap().to_device(dev).unwrap();
    let b = Tensor::from_vec(rand_vec(8, 5), &[8]).unwrap().to_device(dev).unwrap();
    let f = |t: &[Tensor]| {
        let lin = Linear {
            weight: w.clone(),
            bias: Some(b.clone()),
            lora: Some(Adapter::new(t[1].clone(), t[2].clone(), &cfg, 0)),
        };
        lin.forward(&t[0])
    };
    check(f, &ins, 1e-2, 2e-2, 64).unwrap();
    // Forward against y = W x + b + (alpha/r) B A x, written out.
    let y = f(&ins).unwrap().to_vec();
    let (x, a, bb, wv, bv) = (ins[0].to_vec(), ins[1].to_vec(), ins[2].to_vec(), w.to_vec(), b.to_vec());
    for r in 0..5 {
        for o in 0..8 {
            let base: f32 = (0..12).map(|i| wv[o * 12 + i] * x[r * 12 + i]).sum::<f32>() + bv[o];
            let ax: Vec<f32> = (0..3).map(|k| (0..12).map(|i| a[k * 12 + i] * x[r * 12 + i]).sum()).collect();
            let d: f32 = (0..3).map(|k| bb[o * 3 + k] * ax[k]).sum();
            let want = base + 2.0 * d;
            assert!(
                (y[r * 8 + o] - want).abs() < 1e-4 * (1.0 + want.abs()),
                "row {r} out {o}: {} vs {want}",
                y[r * 8 + o]
            );
        }
    }
}

/// `ops::lora_linear` with a separate adapter input (dropout's `x_d = x ⊙ mask`, a fixed mask
/// here): gradients into x through both paths, and into A and B.
fn lora_linear_dropped_input_grad_on(dev: Device) {
    let ins =
        to_device(&[rand_tensor(&[4, 10], 11), rand_tensor(&[2, 10], 12), rand_tensor(&[6, 2], 13)], dev)
            .unwrap();
    let w = Tensor::from_vec(rand_vec(6 * 10, 14), &[6, 10]).unwrap().to_device(dev).unwrap();
    let keep: Vec<f32> = (0..40).map(|i| if i % 3 == 0 { 0.0 } else { 1.5 }).collect();
    let mask = Tensor::from_vec(keep, &[4, 10]).unwrap().to_device(dev).unwrap();
    let f = |t: &[Tensor]| {
        let xd = fcgpu::ops::mul(&t[0], &mask)?;
        fcgpu::ops::lora_linear(&t[0], Some(&xd), &w, None, &t[1], &t[2], 0.5)
    };
    check(f, &ins, 1e-2, 2e-2, 64).unwrap();
}

#[test]
fn lora_linear_dropped_input_grad() {
    lora_linear_dropped_input_grad_on(Device::Cpu);
}

#[test]
fn lora_linear_dropped_input_grad_emu() {
    lora_linear_dropped_input_grad_on(Device::Emu);
}

#[test]
fn lora_linear_grad() {
    lora_linear_grad_on(Device::Cpu);
}

#[test]
fn lora_linear_grad_emu() {
    lora_linear_grad_on(Device::Emu);
}

/// A random qwen2 test model with adapters on every target, B random (so they change the output).
fn adapted(rank: usize, seed: u64) -> Model {
    let mut m = model_common::model("qwen2", seed, 0.5, 0.05);
    m.add_lora(&LoraConfig::new(rank, 2.0 * rank as f32, 0.0, ALL).unwrap(), seed).unwrap();
    let mut k = 0;
    m.visit_adapters_mut(&mut |n, t| {
        k += 1;
        if n.contains("lora_B") {
            t.replace_data(rand_vec(t.numel(), 700 + k).iter().map(|x| 0.3 * x).collect()).unwrap();
        }
    });
    m.requires_grad();
    m
}

fn batch() -> Batch {
    Batch::from_sequences(&[vec![1u32, 5, 7, 9, 2, 33], vec![3, 4, 8, 60]])
}

fn logprobs(m: &Model) -> Vec<f32> {
    fcgpu::autograd::no_grad(|| m.token_logprobs(&batch(), 1.0)).unwrap().to_vec()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn fresh_adapters_start_as_the_base_and_switch_off_to_it() {
    let base = model_common::model("qwen2", 1, 0.5, 0.05);
    let want = logprobs(&base);
    let mut m = base.clone();
    m.add_lora(&LoraConfig::new(4, 8.0, 0.1, ALL).unwrap(), 9).unwrap();
    // B = 0 at init (PEFT's init): the adapted model is the base exactly.
    assert_eq!(logprobs(&m), want);
    let m = adapted(4, 1);
    let on = logprobs(&m);
    assert!(max_diff(&on, &want) > 1e-3, "random B must change the output");
    let off = m.without_adapters(|| logprobs(&m));
    assert_eq!(off, want, "adapters off is the base model");
    assert_eq!(logprobs(&m), on, "adapters are back on after without_adapters");
}

#[test]
fn only_adapters_get_gradients_and_optimizer_state() {
    let mut m = adapted(2, 2);
    let names: Vec<String> = m.trainable_params().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.len(), 2 * 7 * 2, "A and B of 7 targets in 2 layers");
    assert!(names.iter().all(|n| n.contains(".lora_A.") || n.contains(".lora_B.")));
    let loss = m.nll_loss(&batch()).unwrap();
    let grads = loss.backward().unwrap();
    for (n, t) in m.named_params() {
        assert!(grads.get(&t).is_none(), "frozen `{n}` got a gradient");
    }
    let mut host = std::collections::HashMap::new();
    for (n, t) in m.trainable_params() {
        let g = grads.get(&t).unwrap_or_else(|| panic!("no gradient for `{n}`")).to_vec();
        assert!(g.iter().any(|&x| x != 0.0), "`{n}`: zero gradient");
        host.insert(n, g);
    }
    let before: Vec<Vec<f32>> = m.named_params().iter().map(|(_, t)| t.to_vec()).collect();
    let mut opt = fcgpu::train::optim::AdamW::default();
    let cfg = fcgpu::train::optim::AdamWConfig::default();
    fcgpu::train::optim::apply_gradients(&mut m, &mut opt, &cfg, 1e-2, host, 1.0).unwrap();
    let after: Vec<Vec<f32>> = m.named_params().iter().map(|(_, t)| t.to_vec()).collect();
    assert_eq!(before, after, "the base must not change");
    assert_eq!(opt.m.len(), names.len());
    assert!(opt.m.keys().all(|k| names.contains(k)), "optimizer state only for adapters");
    let loss2 = m.nll_loss(&batch()).unwrap().to_scalar().unwrap();
    assert!(
        loss2 < loss.to_scalar().unwrap(),
        "one step lowers the loss: {loss2} vs {}",
        loss.to_scalar().unwrap()
    );
}

#[test]
fn dropout_acts_in_training_forwards_only() {
    let base = model_common::model("qwen2", 3, 0.5, 0.05);
    let mut m = adapted(4, 3);
    let mut d = base.clone();
    d.add_lora(&LoraConfig::new(4, 8.0, 0.5, ALL).unwrap(), 3).unwrap();
    // The same adapter weights as `m`, with dropout 0.5.
    let ws: Vec<Tensor> = m.trainable_params().into_iter().map(|(_, t)| t).collect();
    let mut i = 0;
    d.visit_adapters_mut(&mut |_, t| {
        *t = ws[i].clone();
        i += 1;
    });
    m.requires_grad();
    assert_eq!(logprobs(&d), logprobs(&m), "no dropout under no_grad (rollouts, reference, eval)");
    let train_d = d.token_logprobs(&batch(), 1.0).unwrap().to_vec();
    let train_m = m.token_logprobs(&batch(), 1.0).unwrap().to_vec();
    assert!(max_diff(&train_d, &train_m) > 1e-4, "dropout changes a training forward");
}

#[test]
fn peft_files_round_trip_and_merge() {
    let m = adapted(3, 4);
    let dir = tempfile::tempdir().unwrap();
    m.write_adapter_files(dir.path()).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(CONFIG_FILE)).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 3);
    assert_eq!(cfg["lora_alpha"], 6.0);
    assert_eq!(cfg["target_modules"].as_array().unwrap().len(), TARGETS.len());
    let tensors = fcgpu::model::weights::load_all(&dir.path().join(WEIGHTS_FILE)).unwrap();
    assert_eq!(tensors.len(), 28);
    let a = &tensors["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"];
    assert_eq!(a.shape(), &[3, 40]);
    assert_eq!(tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"].shape(), &[12, 3]);
    let mut back = model_common::model("qwen2", 4, 0.5, 0.05);
    back.load_adapter(dir.path()).unwrap();
    let want = logprobs(&m);
    assert_eq!(logprobs(&back), want);
    let merged = m.merged().unwrap();
    assert!(merged.lora().is_none());
    let d = max_diff(&logprobs(&merged), &want);
    assert!(d < 1e-4, "merged vs adapted: {d}");
}

#[test]
fn adapters_on_emu_match_the_cpu() {
    let m = adapted(4, 5);
    let want = logprobs(&m);
    let e = m.to_device_as(Device::Emu, fcgpu::DType::F32).unwrap();
    assert!(e.lora().is_some());
    let d = max_diff(&logprobs(&e), &want);
    assert!(d < 1e-4, "emu f32 vs cpu: {d}");
    // Gradients of the adapters on emu against the cpu's.
    let gc = m.nll_loss(&batch()).unwrap().backward().unwrap();
    let ge = e.nll_loss(&batch()).unwrap().backward().unwrap();
    for ((n, tc), (_, te)) in m.trainable_params().iter().zip(e.trainable_params().iter()) {
        let (c, g) = (gc.get(tc).unwrap().to_vec(), ge.get(te).unwrap().to_vec());
        let norm = c.iter().map(|x| x * x).sum::<f32>().sqrt();
        let err = c.iter().zip(&g).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt();
        assert!(err <= 1e-4 * norm.max(1e-6), "`{n}`: gradient error {err} for norm {norm}");
    }
}

fn err_of(r: anyhow::Result<impl Sized>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn bad_configs_are_refused_before_any_compute() {
    assert!(err_of(LoraConfig::new(0, 8.0, 0.0, ALL)).contains("rank 0"));
    assert!(
        err_of(LoraConfig::new(4, 8.0, 0.0, "q_proj,qkv_proj")).contains("unknown LoRA target `qkv_proj`")
    );
    assert!(err_of(LoraConfig::new(4, 8.0, 1.0, ALL)).contains("dropout"));
    assert!(err_of(LoraConfig::new(4, 0.0, 0.0, ALL)).contains("alpha"));
    // k_proj of the test model is 12 wide (2 KV heads of 6): rank 13 is more than its width.
    let mut m = model_common::model("qwen2", 1, 0.5, 0.05);
    let e = err_of(m.add_lora(&LoraConfig::new(13, 8.0, 0.0, ALL).unwrap(), 0));
    assert!(e.contains("rank 13") && e.contains("k_proj"), "{e}");
    assert!(m.lora().is_none(), "nothing attached after a refusal");
}

#[test]
fn adapters_that_do_not_fit_the_base_are_refused() {
    let m = adapted(2, 6);
    let dir = tempfile::tempdir().unwrap();
    m.write_adapter_files(dir.path()).unwrap();
    // Another architecture and shapes: qwen3 (head_dim 8, 32-wide q) instead of qwen2.
    let mut other = model_common::model("qwen3", 6, 0.5, 0.05);
    let e = err_of(other.load_adapter(dir.path()));
    assert!(e.contains("has shape") && e.contains("another model"), "{e}");
    assert!(other.lora().is_none());
    // A missing key names the key.
    let file = dir.path().join(WEIGHTS_FILE);
    let mut ts = fcgpu::model::weights::load_all(&file).unwrap();
    let key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight";
    ts.remove(key).unwrap();
    let list: Vec<(String, Tensor)> = ts.clone().into_iter().collect();
    fcgpu::model::weights::save(&file, &list, fcgpu::DType::F32).unwrap();
    let mut base = model_common::model("qwen2", 6, 0.5, 0.05);
    let e = err_of(base.load_adapter(dir.path()));
    assert!(e.contains(&format!("missing tensor `{key}`")), "{e}");
    // A key the config does not account for (a third layer) is refused too.
    ts.insert(key.into(), Tensor::zeros(&[12, 2]));
    ts.insert(
        "base_model.model.model.layers.2.self_attn.v_proj.lora_B.weight".into(),
        Tensor::zeros(&[12, 2]),
    );
    let list: Vec<(String, Tensor)> = ts.into_iter().collect();
    fcgpu::model::weights::save(&file, &list, fcgpu::DType::F32).unwrap();
    let e = err_of(base.load_adapter(dir.path()));
    assert!(e.contains("layers.2.") && e.contains("not an adapter"), "{e}");
    // PEFT variants fcgpu does not compute are named.
    let cpath = dir.path().join(CONFIG_FILE);
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cpath).unwrap()).unwrap();
    c["use_dora"] = true.into();
    std::fs::write(&cpath, c.to_string()).unwrap();
    let e = err_of(base.load_adapter(dir.path()));
    assert!(e.contains("use_dora"), "{e}");
    c["use_dora"] = false.into();
    c["target_modules"] = serde_json::json!(["q_proj", "lm_head"]);
    std::fs::write(&cpath, c.to_string()).unwrap();
    let e = err_of(base.load_adapter(dir.path()));
    assert!(e.contains("unknown LoRA target `lm_head`"), "{e}");
    assert!(base.lora().is_none());
}

/// KV-cache decoding (the rollouts) runs the live adapters: each generated token's log-prob
/// equals the packed scoring forward's of the adapted model, on the cpu and on emu (f32 and
/// bf16, the batched decode step's adapter GEMM pair), and differs from the base's.
fn decode_uses_live_adapters_on(dev: Device, dt: fcgpu::DType, tol: f32) {
    use fcgpu::rollout::{generate, SamplingConfig};
    let cpu = adapted(4, 7);
    let m = if dev == Device::Cpu { cpu.clone() } else { cpu.to_device_as(dev, dt).unwrap() };
    if dev != Device::Cpu {
        assert!(m.batched_decode_supported(), "adapters keep the batched decode step");
    }
    let prompts = vec![vec![1u32, 5, 7], vec![3, 4, 8, 9, 10]];
    let cfg =
        SamplingConfig { n: 2, max_new_tokens: 6, temperature: 0.0, ignore_eos: true, ..Default::default() };
    let outs = fcgpu::autograd::no_grad(|| generate(&m, &prompts, &cfg, None)).unwrap();
    let mut far_from_base = 0.0f32;
    for c in &outs {
        let p = &prompts[c.prompt_index];
        let full: Vec<u32> = p.iter().chain(&c.new_ids).copied().collect();
        let b = Batch::from_sequences(&[full.clone()]);
        let score = |m: &Model| fcgpu::autograd::no_grad(|| m.token_logprobs(&b, 1.0)).unwrap().to_vec();
        let (on, off) = (score(&cpu), cpu.without_adapters(|| score(&cpu)));
        for (j, &lp) in c.logprobs.iter().enumerate() {
            let want = on[p.len() - 1 + j];
            assert!((lp - want).abs() <= tol * (1.0 + want.abs()), "{dev} {dt:?}: token {j}: {lp} vs {want}");
            far_from_base = far_from_base.max((lp - off[p.len() - 1 + j]).abs());
        }
    }
    assert!(far_from_base > 1e-3, "{dev}: decode looks like the base ({far_from_base})");
}

#[test]
fn decode_uses_live_adapters() {
    decode_uses_live_adapters_on(Device::Cpu, fcgpu::DType::F32, 1e-4);
}

#[test]
fn decode_uses_live_adapters_emu() {
    decode_uses_live_adapters_on(Device::Emu, fcgpu::DType::F32, 1e-4);
    decode_uses_live_adapters_on(Device::Emu, fcgpu::DType::BF16, 5e-2);
}
