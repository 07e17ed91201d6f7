//! Rollout decode throughput (generated tokens/s) of a small Qwen2 model on the CPU.
//! Peer: `tools/bench_generate_torch.py` (transformers `generate`, same model shape and batch).
//!
//! Shape: hidden 256, 4 layers, 8 heads, 4 KV heads, intermediate 704, vocab 4096, tied
//! embeddings, f32; 8 prompts × 64 tokens, G = 8 samples each (64 sequences decoding together),
//! 64 new tokens per sample, plain softmax sampling (T = 1, no top-p/top-k), EOS ignored.
//! One iteration is one whole `rollout::generate` call (prefill included), as in the peer.

use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fcgpu::model::{Model, ModelConfig};
use fcgpu::rollout::{generate, SamplingConfig};
use serde_json::json;

fn bench(c: &mut Criterion) {
    let cfg = json!({
        "model_type": "qwen2", "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 704,
        "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": true
    });
    let model = Model::init_random(ModelConfig::from_json(cfg, Path::new("bench")).unwrap(), 0).unwrap();
    let (prompts, prompt_len, g, new_tokens) = (8usize, 64usize, 8usize, 64usize);
    let ps: Vec<Vec<u32>> = (0..prompts).map(|b| (0..prompt_len).map(|i| ((i * 131 + b * 17) % 4093) as u32).collect()).collect();
    let sc = SamplingConfig { n: g, max_new_tokens: new_tokens, temperature: 1.0, seed: 0, ignore_eos: true, ..Default::default() };
    let mut group = c.benchmark_group("decode");
    group.sample_size(10);
    group.throughput(Throughput::Elements((prompts * g * new_tokens) as u64));
    group.bench_function("qwen2_h256_l4_8x8_p64_n64", |b| {
        b.iter(|| {
            let out = generate(&model, &ps, &sc, None).unwrap();
            assert_eq!(out.len(), prompts * g);
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
