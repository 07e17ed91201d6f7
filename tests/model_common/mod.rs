//! Random test models shared by the integration tests.

use std::path::Path;

use fcgpu::model::{Model, ModelConfig};
use serde_json::json;

/// A 2-layer GQA config of `kind` (qwen2 tied, qwen3 with explicit head_dim, llama with llama3
/// rope scaling).
pub fn config(kind: &str) -> ModelConfig {
    let mut c = json!({
        "model_type": kind, "vocab_size": 61, "hidden_size": 24, "intermediate_size": 40,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": kind == "qwen2",
        "torch_dtype": "float32"
    });
    if kind == "qwen3" {
        c["head_dim"] = json!(8);
    }
    if kind == "llama" {
        c["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16});
    }
    ModelConfig::from_json(c, Path::new("config.json")).unwrap()
}

/// A random model with every parameter (norms and biases too) moved off its init value by
/// noise of amplitude `amp` (`embed_amp` for the embedding, which sets how peaked the
/// next-token distribution is).
pub fn model(kind: &str, seed: u64, embed_amp: f32, amp: f32) -> Model {
    let mut m = Model::init_random(config(kind), seed).unwrap();
    let mut k = 0;
    m.visit_mut(&mut |name, t| {
        k += 1;
        let noise = fcgpu::ops::gradcheck::rand_vec(t.numel(), seed * 100 + k);
        let a = if name.contains("embed") { embed_amp } else { amp };
        let v: Vec<f32> = t.to_vec().iter().zip(noise).map(|(x, n)| x + a * n).collect();
        t.replace_data(v).unwrap();
    });
    m
}
