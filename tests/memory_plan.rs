//! The memory plan (`fcgpu plan`) against emu: the plan runs a step's code on the meta device
//! (no data); emu runs the same step with data and counts its allocations. For each of the
//! configurations below (tiny and 0.5B-shaped, checkpointing on and off, micro-batch 1 and 8)
//! the peaks of the SFT step, the GRPO rollout and the GRPO update agree within 1%.
//!
//! LoRA runs are measured the same way: the plan's model gets its adapters on meta, emu's on
//! emu, with data.

use std::path::Path;

use fcgpu::backend::memory::Category;
use fcgpu::model::lora::LoraConfig;
use fcgpu::model::{Model, ModelConfig};
use fcgpu::plan::{measure, Peak, Source, Spec};
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

fn lora(rank: usize, dropout: f32, targets: &str) -> LoraConfig {
    LoraConfig::new(rank, 2.0 * rank as f32, dropout, targets).unwrap()
}

/// One measurement at a time in this process: device-wide caches (the RoPE tables, cleared at
/// each measurement) are shared, so a concurrent test's measurement would move this one's peak.
static MEASURING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Full training at checkpointing on/off and micro-batch 1/8, then LoRA with dropout, and (with
/// `both_lora`) LoRA with checkpointing.
fn check(name: &str, config: ModelConfig, both_lora: bool) {
    let host = Model::init_random(config.clone(), 5).unwrap();
    let mut cases: Vec<(bool, usize, Option<LoraConfig>)> =
        [(false, 1), (false, 8), (true, 1), (true, 8)].map(|(c, m)| (c, m, None)).to_vec();
    cases.push((false, 8, Some(lora(4, 0.1, "q_proj,v_proj,down_proj"))));
    if both_lora {
        cases.push((true, 8, Some(lora(8, 0.0, "all-linear"))));
    }
    for (checkpoint, micro, l) in cases {
        {
            let mut s = spec(config.clone(), checkpoint, micro);
            s.lora = l.clone();
            let plan = measure(&s, Device::Meta, Source::Meta).unwrap();
            let emu = measure(&s, Device::Emu, Source::Host(&host)).unwrap();
            let what = format!(
                "{name}, checkpointing {checkpoint}, micro-batch {micro}, LoRA {:?}",
                l.as_ref().map(|l| (l.rank, l.dropout, l.targets.len()))
            );
            close(&format!("{what}: SFT step"), plan.sft, emu.sft);
            close(&format!("{what}: GRPO rollout"), plan.rollout, emu.rollout);
            close(&format!("{what}: GRPO update"), plan.update, emu.update);
            assert!(plan.rollout.of(Category::KvCache) > 0);
            // Full training's peak holds the base's gradients; LoRA's small ones may be freed
            // before its peak.
            assert!(l.is_some() || plan.update.of(Category::Gradients) > 0);
        }
    }
}

#[test]
fn the_plan_equals_emu_for_a_tiny_model() {
    let _alone = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    check("tiny", tiny(), true);
}

#[test]
fn the_plan_equals_emu_for_a_half_b_shaped_model() {
    let _alone = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    check("0.5B-shaped", half_b(), false);
}

#[test]
fn checkpointing_and_lora_lower_the_plan() {
    let _alone = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let c = config(896, 4864, 14, 2, 151936, 4);
    let l = lora(16, 0.0, "q_proj,v_proj");
    let plan = |checkpoint: bool, with_lora: bool| {
        let mut s = spec(c.clone(), checkpoint, 8);
        s.lora = with_lora.then(|| l.clone());
        measure(&s, Device::Meta, Source::Meta).unwrap()
    };
    let (full, ck, lora, both) = (plan(false, false), plan(true, false), plan(false, true), plan(true, true));
    assert!(ck.update.of(Category::Activations) < full.update.of(Category::Activations));
    assert!(lora.grpo().total() < full.grpo().total());
    assert!(both.grpo().total() <= lora.grpo().total());
    // LoRA: no base optimizer state or gradients, one copy of the base (the reference is the
    // base with the adapters off), the adapters' bytes exactly.
    let p = l.params(&c);
    // q: 896 in, 896 out; v: 896 in, 2 KV heads x 64 out; 4 layers.
    assert_eq!(p, (16 * ((896 + 896) + (896 + 128)) * 4) as u64);
    // bf16 adapters (every matrix here a multiple of 256 bytes, so no rounding); f32 master
    // weights and two moments (with some rounding); one copy of the base.
    assert_eq!(lora.update.of(Category::Adapters), p * 2);
    assert!(
        lora.update.of(Category::Optimizer) >= p * 12
            && lora.update.of(Category::Optimizer) < p * 12 + 64 * 1024
    );
    // (Gradients: whatever is live at the moment of the peak, here none.)
    assert!(lora.update.of(Category::Gradients) < p * 4 + 64 * 1024);
    assert_eq!(lora.update.of(Category::Weights) * 2, full.update.of(Category::Weights));
    // An adapted projection keeps `[tokens, r]` for its backward, not three more
    // `[tokens, out]` tensors: LoRA's update holds no more activations than full training's.
    assert!(
        lora.update.of(Category::Activations) <= full.update.of(Category::Activations),
        "LoRA update activations {} above full training's {}",
        lora.update.of(Category::Activations),
        full.update.of(Category::Activations)
    );
}

#[test]
fn bad_plans_are_clear_errors() {
    let _alone = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let err = |s: Spec| format!("{:#}", measure(&s, Device::Meta, Source::Meta).unwrap_err());
    let mut s = spec(tiny(), false, 1);
    let mut bad = lora(4, 0.0, "q_proj");
    bad.rank = 0;
    s.lora = Some(bad);
    assert!(err(s.clone()).contains("rank must be at least 1"));
    s.lora = Some(lora(1000, 0.0, "q_proj"));
    assert!(err(s.clone()).contains("LoRA rank 1000 is larger than q_proj's width"));
    let mut bad = lora(4, 0.0, "q_proj");
    bad.targets = vec!["qproj".into()];
    s.lora = Some(bad);
    assert!(err(s.clone()).contains("unknown LoRA target `qproj`"));
    s.lora = Some(lora(4, 0.1, "q_proj"));
    s.checkpoint = true;
    assert!(err(s.clone()).contains("--lora-dropout 0.1 with activation checkpointing"));
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

/// The check `fcgpu train`/`sft` make on cuda before loading, on a GPU of a given size: a run
/// that fits passes; one that fits only with checkpointing gets it from `auto` and is refused
/// with `none`, the message naming the flags; one that fits nowhere says so.
#[test]
fn the_fit_check_passes_chooses_checkpointing_or_names_the_flags() {
    let _alone = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    use fcgpu::model::checkpoint::Checkpointing;
    use fcgpu::plan::cli::{fits_grpo, fits_sft, CONTEXT_ALLOWANCE};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/qwen2-tiny");
    let mut grpo = fcgpu::train::grpo::GrpoConfig {
        prompts_per_step: 2,
        group_size: 8,
        max_new_tokens: 48,
        micro_batch: 16,
        ..Default::default()
    };
    let mut sft = fcgpu::train::sft::SftConfig { batch_size: 16, max_len: 96, ..Default::default() };
    for ck in [Checkpointing::None, Checkpointing::Auto] {
        grpo.run.checkpoint_activations = ck;
        sft.run.checkpoint_activations = ck;
        assert!(!fits_grpo(&grpo, &dir, 16, u64::MAX / 2).unwrap());
        assert!(!fits_sft(&sft, &dir, u64::MAX / 2).unwrap());
    }
    // The smallest GPU each run fits without checkpointing (bisection on the total).
    let smallest = |ok: &dyn Fn(u64) -> bool| {
        let (mut lo, mut hi) = (CONTEXT_ALLOWANCE, CONTEXT_ALLOWANCE + (1 << 30));
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            if ok(mid) {
                hi = mid
            } else {
                lo = mid
            }
        }
        hi
    };
    grpo.run.checkpoint_activations = Checkpointing::None;
    sft.run.checkpoint_activations = Checkpointing::None;
    let g = smallest(&|t| fits_grpo(&grpo, &dir, 16, t).is_ok());
    let s = smallest(&|t| fits_sft(&sft, &dir, t).is_ok());
    let err = format!("{:#}", fits_grpo(&grpo, &dir, 16, g - 1).unwrap_err());
    assert!(err.contains("fcgpu train: one GRPO step needs") && err.contains("it fits with"), "{err}");
    let err = format!("{:#}", fits_sft(&sft, &dir, s - 1).unwrap_err());
    assert!(err.contains("fcgpu sft: one SFT step needs") && err.contains("it fits with"), "{err}");
    // One byte short, `auto` turns checkpointing on (it saves more than a byte here).
    grpo.run.checkpoint_activations = Checkpointing::Auto;
    sft.run.checkpoint_activations = Checkpointing::Auto;
    assert!(fits_grpo(&grpo, &dir, 16, g - 1).unwrap());
    assert!(fits_sft(&sft, &dir, s - 1).unwrap());
    // Nothing fits a GPU with nothing left after the allowance.
    let err = format!("{:#}", fits_sft(&sft, &dir, CONTEXT_ALLOWANCE).unwrap_err());
    assert!(err.contains("nothing fits at this size"), "{err}");
}
