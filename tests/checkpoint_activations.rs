//! Activation checkpointing (`--checkpoint-activations layer`): the gradients equal those of
//! the plain backward pass bit for bit (cpu, and emu in f32), and the peak of a step's device
//! memory falls by what the recompute table of docs/memory.md predicts.

mod model_common;

use std::sync::Mutex;

use fcgpu::model::{Batch, Model};
use fcgpu::tensor::{DType, Device};

/// The emu device is one per process: memory is measured by one test at a time.
static EMU: Mutex<()> = Mutex::new(());

fn batch() -> Batch {
    // Three sequences, the last two sharing the first as their prompt (GRPO's layout).
    let groups =
        [fcgpu::model::Group { prompt: &[3, 9, 14, 2, 7], completions: vec![&[5, 8, 1, 30], &[11, 4]] }];
    let mut b = Batch::from_groups(&groups).unwrap();
    let extra = Batch::from_sequences(&[vec![17u32, 21, 40, 2, 6, 33, 12]]);
    let off = b.ids.len();
    b.ids.extend(&extra.ids);
    b.positions.extend(&extra.positions);
    b.seqs.extend(extra.seqs.iter().map(|&(s, l)| (s + off, l)));
    b.prefix.push(None);
    b
}

/// Every parameter's gradient of the batch's NLL, as f32 bits, by name.
fn grads(m: &Model, checkpoint: bool) -> Vec<(String, Vec<u32>)> {
    let mut m = m.clone();
    m.checkpoint_layers = checkpoint;
    let g = m.nll_loss(&batch()).unwrap().backward().unwrap();
    m.named_params()
        .into_iter()
        .map(|(n, t)| {
            let gt = g.get(&t).unwrap_or_else(|| panic!("no gradient for {n}"));
            let v = gt.to_device(Device::Cpu).unwrap().to_vec();
            (n, v.iter().map(|x| x.to_bits()).collect())
        })
        .collect()
}

fn assert_identical(a: &[(String, Vec<u32>)], b: &[(String, Vec<u32>)]) {
    assert_eq!(a.len(), b.len());
    for ((na, ga), (nb, gb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        let diff = ga.iter().zip(gb).filter(|(x, y)| x != y).count();
        assert_eq!(diff, 0, "{na}: {diff} of {} gradient values differ with checkpointing", ga.len());
    }
}

fn trainable(kind: &str) -> Model {
    let mut m = model_common::model(kind, 7, 0.5, 0.05);
    m.requires_grad();
    m
}

#[test]
fn checkpointed_gradients_are_bit_identical_on_the_cpu() {
    for kind in ["qwen2", "qwen3", "llama"] {
        let m = trainable(kind);
        assert_identical(&grads(&m, false), &grads(&m, true));
    }
}

#[test]
fn checkpointed_gradients_are_bit_identical_on_emu_in_f32() {
    let _one = EMU.lock().unwrap_or_else(|e| e.into_inner());
    for kind in ["qwen2", "qwen3"] {
        let mut m = model_common::model(kind, 7, 0.5, 0.05).to_device_as(Device::Emu, DType::F32).unwrap();
        m.requires_grad();
        assert_identical(&grads(&m, false), &grads(&m, true));
    }
}

#[test]
fn no_gradient_no_recompute_under_no_grad() {
    // Scoring (no graph) with checkpointing on is the plain forward: same values.
    let mut m = trainable("qwen2");
    let plain = fcgpu::autograd::no_grad(|| m.token_logprobs(&batch(), 1.0).unwrap().to_vec());
    m.checkpoint_layers = true;
    let ck = fcgpu::autograd::no_grad(|| m.token_logprobs(&batch(), 1.0).unwrap().to_vec());
    assert_eq!(plain, ck);
}

/// A wider, deeper model than the parity tests', so activations dominate the device memory.
fn wide(layers: usize) -> Model {
    let c = serde_json::json!({
        "model_type": "qwen2", "vocab_size": 61, "hidden_size": 64, "intermediate_size": 192,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": true
    });
    let c = fcgpu::model::ModelConfig::from_json(c, std::path::Path::new("config.json")).unwrap();
    let mut m = Model::init_random(c, 3).unwrap().to_device(Device::Emu).unwrap();
    m.requires_grad();
    m
}

fn long_batch() -> Batch {
    let seqs: Vec<Vec<u32>> =
        (0..4).map(|s| (0..96).map(|i| ((i * 7 + s * 13) % 61) as u32).collect()).collect();
    Batch::from_sequences(&seqs)
}

/// (live bytes after the forward, peak of forward + backward), both above what was live before.
fn step_memory(m: &Model) -> (u64, u64) {
    let dev = Device::Emu.gpu().unwrap();
    let before = dev.memory().live_total();
    dev.reset_peak_memory();
    let loss = m.nll_loss(&long_batch()).unwrap();
    let after_forward = dev.memory().live_total() - before;
    let g = loss.backward().unwrap();
    drop((g, loss));
    let peak = dev.memory().peak_total() - before;
    assert_eq!(dev.memory().live_total(), before, "the step leaked device memory");
    (after_forward, peak)
}

#[test]
fn checkpointing_lowers_the_peak_as_the_recompute_table_predicts() {
    let _one = EMU.lock().unwrap_or_else(|e| e.into_inner());
    let layers = 6;
    let mut m = wide(layers);
    // Device caches filled by the first step (rope tables) stay: measure from the second.
    drop(m.nll_loss(&long_batch()).unwrap().backward().unwrap());
    let (fwd_none, peak_none) = step_memory(&m);
    m.checkpoint_layers = true;
    let (fwd_layer, peak_layer) = step_memory(&m);
    // The table: without checkpointing a layer keeps R bytes for the backward pass, with it
    // only its input X = tokens x hidden x 2 bytes (bf16); the backward then holds one layer's
    // R again while it recomputes. So the forward keeps L (R - X) less, and the peak falls by
    // (L - 1) R - L X.
    let tokens = long_batch().ids.len() as u64;
    let x = fcgpu::backend::memory::counted(tokens as usize * 64 * 2);
    let r = (fwd_none - fwd_layer) / layers as u64 + x;
    assert_eq!(fwd_none - fwd_layer, layers as u64 * (r - x));
    let predicted = (layers as u64 - 1) * r - layers as u64 * x;
    let fell = peak_none - peak_layer;
    eprintln!(
        "R {r} X {x}: forward keeps {fwd_none} -> {fwd_layer}, peak {peak_none} -> {peak_layer} (fell {fell}, predicted {predicted})"
    );
    assert!(peak_layer < peak_none);
    let err = (fell as f64 - predicted as f64).abs() / predicted as f64;
    assert!(
        err < 0.05,
        "the peak fell by {fell} bytes, the table predicts {predicted} ({:.1}% off)",
        err * 100.0
    );
}
