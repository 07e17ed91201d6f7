//! The decode loop of `fcgpu serve` driven directly (no HTTP): the prefix cache, scheduling by
//! free KV blocks with preemption, and the batched device step give the texts of the plain loop.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use fcgpu::model::kv_cache::KvPool;
use fcgpu::model::tokenizer::Tokenizer;
use fcgpu::model::Model;
use fcgpu::rollout::SamplerParams;
use fcgpu::serve::engine::{self, EngineConfig, Event, Job, Stats};
use fcgpu::Device;
use tokio::sync::mpsc::unbounded_channel;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models").join(name)
}

/// Prompts that share a long start (a system prompt), as chat requests with tools do, and one
/// that shares nothing.
fn prompts(vocab: u32) -> Vec<Vec<u32>> {
    let system: Vec<u32> = (0..70).map(|i| (i * 7 + 3) % vocab).collect();
    let mut out: Vec<Vec<u32>> = (0..5u32)
        .map(|k| system.iter().copied().chain((0..4 + k).map(|i| (i * 13 + 5 * k + 1) % vocab)).collect())
        .collect();
    out.push((0..9).map(|i| (i * 5 + 2) % vocab).collect());
    out
}

/// Each job's samples' texts (by sample), after running every job through one decode loop
/// (submitted before it starts, so the order of admissions is fixed).
fn serve_all(m: &Model, tok: &Tokenizer, cfg: EngineConfig, bs: usize) -> (Vec<Vec<String>>, Arc<Stats>) {
    let (handle, rx) = engine::queue(64);
    let vocab = m.config.vocab_size as u32;
    let mut receivers = Vec::new();
    for (i, p) in prompts(vocab).into_iter().enumerate() {
        let (tx, erx) = unbounded_channel();
        let job = Job {
            prompt: p,
            n: 2,
            max_tokens: 24,
            params: SamplerParams { temperature: 1.0, top_p: 1.0, top_k: 0 },
            seed: 40 + i as u64,
            stop: vec![],
            then: None,
            events: tx,
        };
        assert!(handle.submit(job).is_ok());
        receivers.push(erx);
    }
    let stats = handle.stats.clone();
    drop(handle);
    let pool = KvPool::new(m.kv_shape(), bs).unwrap();
    engine::run(m, tok, rx, cfg, &pool, &stats);
    assert_eq!(pool.stats().in_use, 0, "every block is back in the pool when the loop ends");
    let texts = receivers
        .into_iter()
        .map(|mut r| {
            let mut t = vec![String::new(); 2];
            let mut done = 0;
            while let Ok(ev) = r.try_recv() {
                match ev {
                    Event::Text { sample, text } => t[sample].push_str(&text),
                    Event::Done { .. } => done += 1,
                    Event::Failed(e) => panic!("a job failed: {e}"),
                }
            }
            assert_eq!(done, 2, "every sample ends");
            t
        })
        .collect();
    (texts, stats)
}

fn cfg(max_batch_tokens: usize, prefix_cache_tokens: usize) -> EngineConfig {
    EngineConfig { max_batch: 8, max_batch_tokens, prefix_cache_tokens }
}

/// One job (two samples) at a time: every job after the first finds the shared start cached.
fn one_at_a_time(prefix_cache_tokens: usize) -> EngineConfig {
    EngineConfig { max_batch: 2, max_batch_tokens: 1 << 20, prefix_cache_tokens }
}

#[test]
fn prefix_cache_hits_give_the_same_texts() {
    let dir = fixture("qwen2-tiny");
    let (m, tok) = (Model::load(&dir).unwrap(), Tokenizer::load(&dir).unwrap());
    let (plain, s0) = serve_all(&m, &tok, one_at_a_time(0), 16);
    assert_eq!(s0.prefix_cache_hits.load(Ordering::Relaxed), 0);
    let (cached, s) = serve_all(&m, &tok, one_at_a_time(4096), 16);
    assert_eq!(cached, plain, "texts with the prefix cache");
    // The 4 prompts after the first share its 70-token start (64 positions: 4 whole blocks,
    // and 6 of a shared partial one, copied on write); the last prompt shares nothing.
    let (hits, saved) =
        (s.prefix_cache_hits.load(Ordering::Relaxed), s.prefix_cache_tokens.load(Ordering::Relaxed));
    let computed = s.prompt_tokens_computed.load(Ordering::Relaxed);
    assert_eq!(s0.prompt_tokens_computed.load(Ordering::Relaxed), computed + saved);
    eprintln!("prefix cache: {hits} hits, {saved} prompt tokens reused, {computed} computed");
    assert_eq!((hits, saved), (4, 4 * 70));
}

#[test]
fn a_tight_kv_budget_preempts_and_gives_the_same_texts() {
    let dir = fixture("qwen2-tiny");
    let (m, tok) = (Model::load(&dir).unwrap(), Tokenizer::load(&dir).unwrap());
    let (plain, s0) = serve_all(&m, &tok, cfg(1 << 20, 0), 4);
    assert_eq!(s0.preemptions.load(Ordering::Relaxed), 0);
    // Blocks of 4: one sample of the longest prompt (78 tokens + 24) needs 26 blocks; 40 hold
    // about one job's two samples.
    for prefix in [0, 4096] {
        let (tight, s) = serve_all(&m, &tok, cfg(160, prefix), 4);
        assert_eq!(tight, plain, "texts under a budget of 40 blocks (prefix cache {prefix})");
        let (pre, waits) = (s.preemptions.load(Ordering::Relaxed), s.block_waits.load(Ordering::Relaxed));
        let peak = s.peak_running.load(Ordering::Relaxed);
        eprintln!("budget 160 positions, prefix cache {prefix}: {pre} preemptions, {waits} steps waiting, peak batch {peak}");
        assert!(pre > 0 && waits > 0, "preemptions {pre}, waits {waits}");
        if prefix == 0 {
            assert!(peak < 8, "the budget holds fewer than the 8 slots ({peak})");
        }
    }
}

/// On a GPU device (f32) the loop's pure decode steps are the batched step and a prompt after a
/// prefix-cache hit goes through the block tables; the texts are the cpu's.
fn device_serves_the_cpus_texts(device: Device) {
    let dir = fixture("qwen2-tiny");
    let tok = Tokenizer::load(&dir).unwrap();
    let cpu = Model::load(&dir).unwrap();
    let dm = cpu.to_device_as(device, fcgpu::DType::F32).unwrap();
    assert!(dm.batched_decode_supported());
    // Prompts after a prefix-cache hit are several tokens after a cache: the paged kernel's
    // entry-per-token path.
    let (want, _) = serve_all(&cpu, &tok, one_at_a_time(4096), 16);
    let dev = dm.device().gpu().unwrap();
    let before = dev.counts();
    let (got, s) = serve_all(&dm, &tok, one_at_a_time(4096), 16);
    let c = dev.counts() - before;
    eprintln!(
        "{device}: {} launches, {} syncs, {} prefix hits",
        c.launches,
        c.syncs,
        s.prefix_cache_hits.load(Ordering::Relaxed)
    );
    assert_eq!(got, want, "texts on {device} (f32)");
}

#[test]
fn the_batched_device_step_gives_the_cpus_texts() {
    device_serves_the_cpus_texts(Device::Emu);
}

#[test]
#[cfg_attr(not(fcgpu_test_cuda), ignore = "needs a GPU: FCGPU_TEST_CUDA=1 cargo test")]
fn cuda_serves_the_cpus_texts() {
    device_serves_the_cpus_texts(Device::Cuda(0));
}
