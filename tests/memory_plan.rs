//! The memory plan (`fcgpu plan`) against emu: the plan runs a step's code on the meta device
//! (no data); emu runs the same step with data and counts its allocations. For each of the
//! configurations below (tiny and 0.5B-shaped, checkpointing on and off, micro-batch 1 and 8)
//! the peaks of the SFT step, the GRPO rollout and the GRPO update agree within 1%.
//!
//! LoRA configurations are modelled from the full-training plan until the adapters exist in
//! the model (src/plan/mod.rs); their invariants are checked here, not a measurement.

use std::path::Path;

use fcgpu::backend::memory::Category;
use fcgpu::model::{Model, ModelConfig};
use fcgpu::plan::{measure, LoraSpec, Peak, Source, Spec};
use fcgpu::tensor::Device;

fn config(hidden: usize, inter: usize, heads: usize, kv: usize, vocab: usize, layers: usize) -> ModelConfig {
    let c = serde_json::json!({
        "model_type": "qwen2", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": true,
        "max_position_embeddings": 4096
    });
    ModelConfig::from_json(c, Path::new("config.json")).unwrap()
}

fn tiny() -> ModelConfig {
    config(64, 160, 4, 2, 97, 3)
}

/// Qwen2.5-0.5B's widths (hidden 896, MLP 4864, 14 query and 2 KV heads), two of its 24
/// layers and a 32K vocabulary (its 152K would make emu's LM-head GEMMs take minutes), so the
/// test stays fast.
fn half_b() -> ModelConfig {
    config(896, 4864, 14, 2, 32768, 2)
}

fn spec(config: ModelConfig, checkpoint: bool, micro: usize) -> Spec {
    Spec {
        config,
        checkpoint,
        lora: None,
        sft_batch: micro,
        sft_len: 24,
        grad_accum: 2,
        prompts: 2,
        group: 4,
        prompt_len: 12,
        new_tokens: 6,
        micro_batch: micro,
        ppo_epochs: 1,
        beta: 0.04,
    }
}

fn close(what: &str, plan: Peak, emu: Peak) {
    let (p, e) = (plan.total() as f64, emu.total() as f64);
    let err = (p - e).abs() / e;
    eprintln!("{what}: plan {p} bytes, emu {e} bytes ({:.3}% off)", err * 100.0);
    for c in Category::ALL {
        eprintln!("    {:>14}: plan {:>12} emu {:>12}", c.name(), plan.of(c), emu.of(c));
    }
    assert!(err <= 0.01, "{what}: the plan says {p} bytes, emu measured {e} ({:.2}% off)", err * 100.0);
}

fn check(name: &str, config: ModelConfig) {
    let host = Model::init_random(config.clone(), 5).unwrap();
    for checkpoint in [false, true] {
        for micro in [1, 8] {
            let s = spec(config.clone(), checkpoint, micro);
            let plan = measure(&s, Device::Meta, Source::Meta).unwrap();
            let emu = measure(&s, Device::Emu, Source::Host(&host)).unwrap();
            let what = format!("{name}, checkpointing {checkpoint}, micro-batch {micro}");
            close(&format!("{what}: SFT step"), plan.sft, emu.sft);
            close(&format!("{what}: GRPO rollout"), plan.rollout, emu.rollout);
            close(&format!("{what}: GRPO update"), plan.update, emu.update);
            assert!(plan.update.of(Category::Gradients) > 0 && plan.rollout.of(Category::KvCache) > 0);
        }
    }
}

#[test]
fn the_plan_equals_emu_for_a_tiny_model() {
    check("tiny", tiny());
}

#[test]
fn the_plan_equals_emu_for_a_half_b_shaped_model() {
    check("0.5B-shaped", half_b());
}

#[test]
fn checkpointing_and_lora_lower_the_plan() {
    let c = config(896, 4864, 14, 2, 151936, 4);
    let plan = |checkpoint: bool, lora: bool| {
        let mut s = spec(c.clone(), checkpoint, 8);
        s.lora = lora.then(|| LoraSpec { rank: 16, targets: vec!["q_proj".into(), "v_proj".into()] });
        measure(&s, Device::Meta, Source::Meta).unwrap()
    };
    let (full, ck, lora, both) = (plan(false, false), plan(true, false), plan(false, true), plan(true, true));
    assert!(ck.update.of(Category::Activations) < full.update.of(Category::Activations));
    assert!(lora.grpo().total() < full.grpo().total());
    assert!(both.grpo().total() <= lora.grpo().total());
    // LoRA: no base optimizer state or gradients, one copy of the base (the reference is the
    // base with the adapters off), the adapters' bytes exactly.
    let p =
        fcgpu::plan::lora_params(&c, &LoraSpec { rank: 16, targets: vec!["q_proj".into(), "v_proj".into()] });
    // q: 896 in, 896 out; v: 896 in, 2 KV heads x 64 out; 4 layers.
    assert_eq!(p, (16 * ((896 + 896) + (896 + 128)) * 4) as u64);
    assert_eq!(lora.update.of(Category::Optimizer), p * 12);
    assert_eq!(lora.update.of(Category::Adapters), p * 2);
    assert_eq!(lora.update.of(Category::Weights) * 2, full.update.of(Category::Weights));
}

#[test]
fn bad_plans_are_clear_errors() {
    let err = |s: Spec| format!("{:#}", measure(&s, Device::Meta, Source::Meta).unwrap_err());
    let mut s = spec(tiny(), false, 1);
    s.lora = Some(LoraSpec { rank: 0, targets: vec!["q_proj".into()] });
    assert!(err(s.clone()).contains("--lora-rank must be at least 1"));
    s.lora = Some(LoraSpec { rank: 1000, targets: vec!["q_proj".into()] });
    assert!(err(s.clone()).contains("larger than the narrowest"));
    s.lora = Some(LoraSpec { rank: 4, targets: vec!["qproj".into()] });
    assert!(err(s.clone()).contains("unknown target `qproj`"));
    let mut s = spec(tiny(), false, 1);
    s.new_tokens = 10_000;
    assert!(err(s).contains("exceeds the model's context"));
    let mut s = spec(tiny(), false, 1);
    s.prompts = 1 << 20;
    assert!(err(s).contains("sequences in a step"));
    let mut s = spec(tiny(), false, 1);
    s.micro_batch = 0;
    assert!(err(s).contains("--micro-batch must be at least 1"));
    let s = spec(tiny(), false, 1);
    assert!(format!("{:#}", measure(&s, Device::Cpu, Source::Meta).unwrap_err()).contains("not cpu"));
}
