//! Rollout decode throughput (generated tokens/s) of a small Qwen2 model on the CPU.
//! Peer: `tools/bench_generate_torch.py` (transformers `generate`, same model shape and batch).
//!
//! Shape: hidden 256, 4 layers, 8 heads, 4 KV heads, intermediate 704, vocab 4096, tied
//! embeddings, f32; 8 prompts × 64 tokens, G = 8 samples each (64 sequences decoding together),
//! 64 new tokens per sample, plain softmax sampling (T = 1, no top-p/top-k), EOS ignored.
//! One iteration is one whole `rollout::generate` call (prefill included), as in the peer.
//!
//! `FCGPU_DECODE_ONCE=1 cargo bench --bench decode` skips criterion: one warmup call, one timed
//! call, and one JSON line with the peer's fields (tokens/s, process CPU seconds, tokens per
//! CPU-second, peak RSS) — for a ratio measured in the same session on a shared machine.

use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fcgpu::model::{Model, ModelConfig};
use fcgpu::rollout::{generate, SamplingConfig};
use serde_json::json;

fn setup() -> (Model, Vec<Vec<u32>>, SamplingConfig) {
    let cfg = json!({
        "model_type": "qwen2", "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 704,
        "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": true
    });
    let model = Model::init_random(ModelConfig::from_json(cfg, Path::new("bench")).unwrap(), 0).unwrap();
    let (prompts, prompt_len, g, new_tokens) = (8usize, 64usize, 8usize, 64usize);
    let ps: Vec<Vec<u32>> =
        (0..prompts).map(|b| (0..prompt_len).map(|i| ((i * 131 + b * 17) % 4093) as u32).collect()).collect();
    let sc = SamplingConfig {
        n: g,
        max_new_tokens: new_tokens,
        temperature: 1.0,
        seed: 0,
        ignore_eos: true,
        ..Default::default()
    };
    (model, ps, sc)
}

const ROWS: usize = 64;
const NEW: usize = 64;

/// (user + system CPU seconds, peak RSS in MiB) of this process, from /proc.
fn proc_usage() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    let cpu = (ticks(11) + ticks(12)) / 100.0; // utime, stime (USER_HZ = 100)
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|x| x.parse::<f64>().ok())
        .unwrap_or(0.0);
    (cpu, hwm / 1024.0)
}

fn once() {
    let (model, ps, sc) = setup();
    generate(&model, &ps, &SamplingConfig { max_new_tokens: 4, ..sc.clone() }, None).unwrap();
    let (c0, _) = proc_usage();
    let t0 = std::time::Instant::now();
    let out = generate(&model, &ps, &sc, None).unwrap();
    let elapsed = t0.elapsed().as_secs_f64();
    let (c1, rss) = proc_usage();
    assert!(out.iter().all(|c| c.new_ids.len() == NEW) && out.len() == ROWS);
    let tokens = (ROWS * NEW) as f64;
    println!(
        "{}",
        json!({
            "decode_tokens_per_s": tokens / elapsed, "elapsed_s": elapsed, "cpu_s": c1 - c0,
            "tokens_per_cpu_s": tokens / (c1 - c0).max(1e-9), "rows": ROWS, "new_tokens": NEW,
            "prompt_len": ps[0].len(), "threads": rayon::current_num_threads(), "peak_rss_mb": rss,
            "loadavg_1m_after": std::fs::read_to_string("/proc/loadavg").ok().and_then(|s| s.split_whitespace().next().map(String::from)),
        })
    );
}

fn bench(c: &mut Criterion) {
    if std::env::var_os("FCGPU_DECODE_ONCE").is_some() {
        return once();
    }
    let (model, ps, sc) = setup();
    let (prompts, g, new_tokens) = (ps.len(), sc.n, sc.max_new_tokens);
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
