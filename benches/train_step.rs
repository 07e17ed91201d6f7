//! Forward + backward throughput (tokens/s) of a small Qwen2 model on the CPU.
//! Peer: `tools/bench_torch.py` runs the same model and batch in PyTorch.
//!
//! Shape (same defaults as the peer): hidden 256, 4 layers, 8 heads, 4 KV heads,
//! intermediate 704, vocab 4096, batch 4 × 256 tokens, f32, loss = mean token NLL.

use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fcgpu::model::{Batch, Model, ModelConfig};
use serde_json::json;

fn bench(c: &mut Criterion) {
    let cfg = json!({
        "model_type": "qwen2", "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 704,
        "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": true
    });
    let mut model = Model::init_random(ModelConfig::from_json(cfg, Path::new("bench")).unwrap(), 0).unwrap();
    model.requires_grad();
    let (batch, len) = (4usize, 256usize);
    let seqs: Vec<Vec<u32>> =
        (0..batch).map(|b| (0..len).map(|i| ((i * 131 + b * 17) % 4096) as u32).collect()).collect();
    let packed = Batch::from_sequences(&seqs);
    let mut g = c.benchmark_group("train_step");
    g.sample_size(10);
    g.throughput(Throughput::Elements((batch * len) as u64));
    g.bench_function("qwen2_h256_l4_fwd_bwd", |b| {
        b.iter(|| {
            let loss = model.nll_loss(&packed).unwrap();
            let grads = loss.backward().unwrap();
            assert!(!grads.is_empty());
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
