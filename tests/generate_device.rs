//! The GPU rollout path on emu (issue 14): the batched decode step against the per-op path and
//! the cpu, the device sampler's independence of the batch, `--host-sampler` against the cpu
//! token for token, and the device-work budgets of a steady decode step.

use std::path::{Path, PathBuf};
use std::process::Command;

use fcgpu::autograd::no_grad;
use fcgpu::backend::counters::Counts;
use fcgpu::model::decode::Step;
use fcgpu::model::decode_gpu::DecodeWorkspace;
use fcgpu::model::kv_cache::{KvPool, SeqCache};
use fcgpu::model::Model;
use fcgpu::rollout::{generate, generate_counted, SamplingConfig, StepCounts};
use fcgpu::{DType, Device};

/// The emu device's counters are per process: the budget test holds this for writing so no other
/// test's work lands in its counts; the others hold it for reading and run together.
static EMU: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn fixtures() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("config.json").exists())
        .collect();
    v.sort();
    assert!(v.len() >= 6, "expected the six fixture checkpoints in {}", root.display());
    v
}

fn name(dir: &Path) -> String {
    dir.file_name().unwrap().to_string_lossy().into_owned()
}

/// `count` prompts of 2 to 8 tokens inside the vocabulary.
fn prompts(vocab: usize, count: usize) -> Vec<Vec<u32>> {
    (0..count)
        .map(|i| (0..2 + (i * 5) % 7).map(|j| ((i * 13 + j * 7 + 1) % vocab) as u32).collect())
        .collect()
}

/// KV block size of these tests: small, so prompts and decodes cross blocks.
const BS: usize = 4;

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Prefills `caches` with `prompts` through the per-op path.
fn prefill(m: &Model, caches: &mut [SeqCache], prompts: &[Vec<u32>]) {
    let mut steps: Vec<Step> =
        caches.iter_mut().zip(prompts).map(|(c, p)| Step { cache: c, tokens: p }).collect();
    m.forward_cached(&mut steps).unwrap();
}

/// Decode steps of sequences of different lengths: the batched step's logits are the per-op
/// path's bit for bit (its kernels round where the ops store), in bf16 and f32, and in f32 the
/// cpu's to 1e-4.
#[test]
fn batched_decode_step_equals_the_per_op_path() {
    let _shared = EMU.read().unwrap_or_else(|e| e.into_inner());
    for dir in fixtures() {
        let cpu = Model::load(&dir).unwrap();
        let v = cpu.config.vocab_size;
        let ps = prompts(v, 3);
        let cpu_pool = KvPool::new(cpu.kv_shape(), BS).unwrap();
        let mut on_cpu: Vec<SeqCache> = ps.iter().map(|_| SeqCache::new(&cpu_pool)).collect();
        no_grad(|| prefill(&cpu, &mut on_cpu, &ps));
        for dt in [DType::BF16, DType::F32] {
            let m = cpu.to_device_as(Device::Emu, dt).unwrap();
            assert!(m.batched_decode_supported(), "{}", name(&dir));
            let pool = KvPool::new(m.kv_shape(), BS).unwrap();
            let new = |_: &Model| ps.iter().map(|_| SeqCache::new(&pool)).collect::<Vec<_>>();
            let (mut a, mut b) = (new(&m), new(&m));
            no_grad(|| {
                prefill(&m, &mut a, &ps);
                prefill(&m, &mut b, &ps);
            });
            let mut ws = DecodeWorkspace::new(&m, 4, BS).unwrap();
            let mut cpu_caches: Vec<SeqCache> = Vec::new();
            for step in 0..4 {
                let toks: Vec<[u32; 1]> =
                    (0..ps.len()).map(|i| [((i * 31 + step * 17 + 5) % v) as u32]).collect();
                let steps = |c: &mut Vec<SeqCache>| -> Vec<Vec<f32>> {
                    let mut s: Vec<Step> =
                        c.iter_mut().zip(&toks).map(|(c, t)| Step { cache: c, tokens: t }).collect();
                    vec![no_grad(|| m.forward_cached(&mut s)).unwrap()]
                };
                let want = steps(&mut a).remove(0);
                let mut s: Vec<Step> =
                    b.iter_mut().zip(&toks).map(|(c, t)| Step { cache: c, tokens: t }).collect();
                m.decode_step_gpu(&mut s, &mut ws).unwrap();
                let got = ws.download_logits(ps.len()).unwrap();
                let d = max_abs_diff(&got, &want);
                assert_eq!(
                    d,
                    0.0,
                    "{} {dt:?} step {step}: batched vs per-op logits differ by {d}",
                    name(&dir)
                );
                if dt == DType::F32 {
                    if step == 0 {
                        cpu_caches = std::mem::take(&mut on_cpu);
                    }
                    let mut s: Vec<Step> =
                        cpu_caches.iter_mut().zip(&toks).map(|(c, t)| Step { cache: c, tokens: t }).collect();
                    let c = no_grad(|| cpu.forward_cached(&mut s)).unwrap();
                    let scale = c.iter().fold(1.0f32, |a, x| a.max(x.abs()));
                    let d = max_abs_diff(&got, &c);
                    assert!(d <= 1e-4 * scale, "{} f32 step {step}: batched vs cpu {d}", name(&dir));
                }
            }
        }
    }
}

fn generate_cli(model: &Path, input: &Path, extra: &[&str]) -> Vec<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_fcgpu"))
        .args(["generate", "--model", model.to_str().unwrap(), "--input", input.to_str().unwrap()])
        .args(["--max-new-tokens", "6", "--ignore-eos", "--seed", "3", "--device", "emu"])
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// `fcgpu generate --device emu` samples on the device from per-(prompt, sample) Philox streams:
/// the same tokens for a seed at batch 1, 4 and 32.
#[test]
fn device_sampled_tokens_do_not_depend_on_the_batch() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("tests/fixtures/models/qwen2-tiny");
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    let lines: Vec<String> =
        prompts(384, 16).iter().map(|p| serde_json::json!({ "prompt_ids": p }).to_string()).collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let sampled = ["--n", "2", "--temperature", "1.0", "--top-p", "0.9", "--top-k", "50"];
    let runs: Vec<Vec<serde_json::Value>> = ["1", "4", "32"]
        .iter()
        .map(|b| generate_cli(&model, &input, &[&sampled[..], &["--batch-size", b]].concat()))
        .collect();
    assert_eq!(runs[0].len(), 32);
    for (run, b) in runs[1..].iter().zip(["4", "32"]) {
        for (x, y) in runs[0].iter().zip(run) {
            assert_eq!(x["new_ids"], y["new_ids"], "batch 1 vs batch {b}: {x} / {y}");
        }
    }
    let distinct: std::collections::BTreeSet<String> =
        runs[0].iter().map(|x| x["new_ids"].to_string()).collect();
    assert!(distinct.len() > 16, "samples should differ: {} distinct of 32", distinct.len());
}

/// `host_sampler` on emu with f32 weights draws the cpu's tokens for a seed, token for token, on
/// every fixture (temperature, top-k and top-p), with the cpu's log-probs and entropies.
#[test]
fn host_sampler_matches_the_cpu_token_for_token() {
    let _shared = EMU.read().unwrap_or_else(|e| e.into_inner());
    let (mut tokens, mut samples) = (0, 0);
    for dir in fixtures() {
        let cpu = Model::load(&dir).unwrap();
        let emu = cpu.to_device_as(Device::Emu, DType::F32).unwrap();
        let ps = prompts(cpu.config.vocab_size, 3);
        for (temperature, top_p, top_k) in [(1.0f32, 1.0f32, 0usize), (0.8, 0.9, 20)] {
            let cfg = SamplingConfig {
                n: 2,
                max_new_tokens: 6,
                temperature,
                top_p,
                top_k,
                seed: 11,
                ignore_eos: true,
                host_sampler: true,
                ..Default::default()
            };
            let want = no_grad(|| generate(&cpu, &ps, &cfg, None)).unwrap();
            let got = no_grad(|| generate(&emu, &ps, &cfg, None)).unwrap();
            for (w, g) in want.iter().zip(&got) {
                assert_eq!(w.new_ids, g.new_ids, "{} T={temperature}: emu vs cpu", name(&dir));
                assert!(max_abs_diff(&w.logprobs, &g.logprobs) < 1e-4, "{}: log-probs", name(&dir));
                assert!(max_abs_diff(&w.entropy, &g.entropy) < 1e-4, "{}: entropies", name(&dir));
                tokens += w.new_ids.len();
                samples += 1;
            }
        }
    }
    eprintln!("host sampler: {samples} samples, {tokens} tokens, all equal to the cpu's");
}

/// Device work of every decode step of a rollout of `count` prompts × 2 samples, all admitted
/// at once (the batch is 2·count).
fn decode_counts(m: &Model, count: usize, host_sampler: bool) -> StepCounts {
    let log = decode_counts_for(m, count, host_sampler, 6);
    assert_eq!(log.decode_steps.len(), 5, "6 tokens: one from the prefill step, 5 decode steps");
    log
}

fn decode_counts_for(m: &Model, count: usize, host_sampler: bool, max_new_tokens: usize) -> StepCounts {
    decode_counts_with(m, count, host_sampler, max_new_tokens, false)
}

fn decode_counts_with(
    m: &Model,
    count: usize,
    host_sampler: bool,
    max_new_tokens: usize,
    graphs: bool,
) -> StepCounts {
    let cfg = SamplingConfig {
        n: 2,
        max_new_tokens,
        temperature: 1.0,
        top_p: 0.9,
        seed: 1,
        ignore_eos: true,
        host_sampler,
        decode_graphs: Some(graphs),
        ..Default::default()
    };
    let mut log = StepCounts::default();
    no_grad(|| generate_counted(m, &prompts(m.config.vocab_size, count), 0, &cfg, None, Some(&mut log)))
        .unwrap();
    log
}

/// A sample that runs past the CPU cache's growth block (64 positions) allocates nothing after
/// its first decode step either: on a GPU its cache holds the whole sequence from the start.
#[test]
fn long_samples_allocate_only_at_their_first_decode_step() {
    let _alone = EMU.write().unwrap_or_else(|e| e.into_inner());
    let dir = fixtures().into_iter().next().unwrap();
    let m = Model::load(&dir).unwrap().to_device(Device::Emu).unwrap();
    let log = decode_counts_for(&m, 2, false, 80);
    assert_eq!(log.decode_steps.len(), 79);
    for (i, s) in log.decode_steps.iter().enumerate().skip(1) {
        assert_eq!(s.counts.allocs, 0, "decode step {}: {:?}", i + 1, s.counts);
    }
}

/// Issue 14's budgets for a steady decode step (every decode step after a sample's first, which
/// copies its prompt's prefix into its own cache) on every fixture, at batch 4 and 32: at most
/// 12 launches per layer + 16, the same count at both batches, at most 16 bytes down per
/// sequence, one synchronisation, no allocation. With decode graphs: the step's 12 per layer + 3
/// launches are one (2 with the sampler's draw) (the first decode step runs them as they are, the second captures them, and
/// both it and every later one replay the graph), the rest the same.
#[test]
fn steady_decode_steps_meet_the_budgets() {
    let _alone = EMU.write().unwrap_or_else(|e| e.into_inner());
    for dir in fixtures() {
        let m = Model::load(&dir).unwrap().to_device(Device::Emu).unwrap();
        let layers = m.config.num_layers as u64;
        let mut launches = Vec::new();
        for count in [2, 16] {
            let batch = 2 * count;
            let log = decode_counts(&m, count, false);
            let first = log.decode_steps[0].counts;
            for s in &log.decode_steps[1..] {
                let c: Counts = s.counts;
                let what = format!("{} batch {batch}: {c:?}", name(&dir));
                assert_eq!(s.batch, batch, "{what}");
                assert!(c.launches <= 12 * layers + 16, "{what}: launches over 12·{layers} + 16");
                assert!(c.d2h_bytes <= 16 * batch as u64, "{what}: more than 16 bytes per sequence down");
                assert!(c.syncs <= 1, "{what}: synchronisations");
                assert_eq!(c.allocs, 0, "{what}: allocations");
                launches.push(c.launches);
            }
            let graphed = decode_counts_with(&m, count, false, 6, true);
            assert_eq!(graphed.decode_steps[0].counts, first, "{}: the first step runs as it is", name(&dir));
            for (s, g) in log.decode_steps[1..].iter().zip(&graphed.decode_steps[1..]) {
                let (c, g) = (s.counts, g.counts);
                let what = format!("{} batch {batch} with graphs: {g:?} (without: {c:?})", name(&dir));
                // The step's own 12·layers + 3 (embedding, first norm, LM head) become one; the
                // sampler's draw is the other.
                assert_eq!(g.launches, c.launches - (12 * layers + 3) + 1, "{what}: one launch for the step");
                assert_eq!(g.launches, 2, "{what}: the graph and the sampler's draw");
                assert_eq!(Counts { launches: c.launches, ..g }, c, "{what}: all else the same");
                assert_eq!(g.allocs, 0, "{what}");
                assert!(g.syncs <= 1, "{what}");
            }
            let old = decode_counts(&m, count, true).decode_steps[1].counts;
            eprintln!(
                "{} ({layers} layers) batch {batch}: steady {:?}; with graphs {:?}; first decode step {first:?}; host sampler {old:?}",
                name(&dir),
                log.decode_steps[1].counts,
                graphed.decode_steps[2].counts
            );
        }
        assert!(
            launches.windows(2).all(|w| w[0] == w[1]),
            "{}: launches differ by batch: {launches:?}",
            name(&dir)
        );
    }
}

/// Decode graphs change nothing but the launch count: on every fixture at batch 4 and 32, generation with them gives the tokens, log-probs and entropies without them,
/// exactly (the replayed launches are the captured ones).
#[test]
fn decode_graphs_give_the_same_generations() {
    let _shared = EMU.read().unwrap_or_else(|e| e.into_inner());
    for dir in fixtures() {
        let m = Model::load(&dir).unwrap().to_device(Device::Emu).unwrap();
        {
            for count in [2, 16] {
                let cfg = SamplingConfig {
                    n: 2,
                    max_new_tokens: 6,
                    temperature: 1.0,
                    top_p: 0.9,
                    top_k: 20,
                    seed: 5,
                    ignore_eos: true,
                    decode_graphs: Some(false),
                    ..Default::default()
                };
                let ps = prompts(m.config.vocab_size, count);
                let want = no_grad(|| generate(&m, &ps, &cfg, None)).unwrap();
                let cfg = SamplingConfig { decode_graphs: Some(true), ..cfg };
                let got = no_grad(|| generate(&m, &ps, &cfg, None)).unwrap();
                assert_eq!(want.len(), 2 * count);
                for (w, g) in want.iter().zip(&got) {
                    let what = format!("{} batch {}", name(&dir), 2 * count);
                    assert_eq!(w.new_ids, g.new_ids, "{what}: tokens");
                    assert_eq!(w.logprobs, g.logprobs, "{what}: log-probs");
                    assert_eq!(w.entropy, g.entropy, "{what}: entropies");
                }
            }
        }
    }
}

/// A workspace captures a batch size's step at its second step there and replays it after; its
/// logits are those of the step without a graph, bit for bit, also when the batch size changes
/// and comes back, and another model (other weights) in the same workspace drops the graphs.
#[test]
fn decode_graphs_are_captured_per_batch_size() {
    let _shared = EMU.read().unwrap_or_else(|e| e.into_inner());
    let dir = fixtures().into_iter().next().unwrap();
    let cpu = Model::load(&dir).unwrap();
    let m = cpu.to_device(Device::Emu).unwrap();
    let v = m.config.vocab_size;
    let ps = prompts(v, 4);
    let pool = KvPool::new(m.kv_shape(), BS).unwrap();
    let new = |_: &Model| ps.iter().map(|_| SeqCache::new(&pool)).collect::<Vec<_>>();
    let (mut a, mut b) = (new(&m), new(&m));
    no_grad(|| {
        prefill(&m, &mut a, &ps);
        prefill(&m, &mut b, &ps);
    });
    let (mut plain, mut graphed) =
        (DecodeWorkspace::new(&m, 4, BS).unwrap(), DecodeWorkspace::new(&m, 4, BS).unwrap());
    plain.set_graphs(false);
    graphed.set_graphs(true);
    // Batch sizes 4, 4, 2, 4, 2, 2, 4: 4 is captured at its second step, 2 at its second.
    let sizes = [4usize, 4, 2, 4, 2, 2, 4];
    let captured = [vec![], vec![4], vec![4], vec![4], vec![2, 4], vec![2, 4], vec![2, 4]];
    for (step, (&n, want)) in sizes.iter().zip(&captured).enumerate() {
        let toks: Vec<[u32; 1]> = (0..n).map(|i| [((i * 31 + step * 17 + 5) % v) as u32]).collect();
        let mut logits = Vec::new();
        for (c, ws) in [(&mut a, &mut plain), (&mut b, &mut graphed)] {
            let mut s: Vec<Step> =
                c.iter_mut().zip(&toks).map(|(c, t)| Step { cache: c, tokens: t }).collect();
            m.decode_step_gpu(&mut s, ws).unwrap();
            logits.push(ws.download_logits(n).unwrap());
        }
        assert_eq!(logits[0], logits[1], "step {step} (batch {n})");
        assert_eq!(&graphed.captured_batches(), want, "step {step}");
        assert!(plain.captured_batches().is_empty());
    }
    // The same workspace with another copy of the model (same values, other buffers): the old
    // graphs are dropped, the batch size runs once as it is, and the logits stay the same.
    let m2 = cpu.to_device(Device::Emu).unwrap();
    let toks: Vec<[u32; 1]> = (0..4).map(|i| [(i * 7 % v) as u32]).collect();
    let mut logits = Vec::new();
    for (c, ws) in [(&mut a, &mut plain), (&mut b, &mut graphed)] {
        let mut s: Vec<Step> = c.iter_mut().zip(&toks).map(|(c, t)| Step { cache: c, tokens: t }).collect();
        m2.decode_step_gpu(&mut s, ws).unwrap();
        logits.push(ws.download_logits(4).unwrap());
    }
    assert_eq!(logits[0], logits[1]);
    assert!(graphed.captured_batches().is_empty(), "{:?}", graphed.captured_batches());
}

/// Generation does not depend on the KV block size: seeded samples (device sampler, bf16) with
/// blocks of 1, 16 and 4,096 positions (one block per sequence: a contiguous cache) are the same
/// tokens, on every fixture.
#[test]
fn generations_do_not_depend_on_the_kv_block_size() {
    let _shared = EMU.read().unwrap_or_else(|e| e.into_inner());
    for dir in fixtures() {
        let m = Model::load(&dir).unwrap().to_device(Device::Emu).unwrap();
        let ps = prompts(m.config.vocab_size, 3);
        let run = |bs: usize| {
            let cfg =
                SamplingConfig { n: 3, max_new_tokens: 24, seed: 7, kv_block_size: bs, ..Default::default() };
            let out = no_grad(|| generate(&m, &ps, &cfg, None)).unwrap();
            out.into_iter().map(|c| c.new_ids).collect::<Vec<_>>()
        };
        let contiguous = run(4096);
        for bs in [1, 16] {
            assert_eq!(run(bs), contiguous, "{}: blocks of {bs}", name(&dir));
        }
    }
}

/// A KV budget that preempts (`max_batch_tokens`) gives the tokens of an unbudgeted run on a
/// GPU device too: preempted samples are recomputed (prompt and tokens so far, prefilled again)
/// and the device sampler's streams follow the token index, not the step.
#[test]
fn preempted_samples_give_the_same_tokens_on_the_device() {
    let _shared = EMU.read().unwrap_or_else(|e| e.into_inner());
    for dir in fixtures() {
        let m = Model::load(&dir).unwrap().to_device_as(Device::Emu, fcgpu::DType::F32).unwrap();
        let ps = prompts(m.config.vocab_size, 3);
        let run = |budget: usize| {
            let cfg = SamplingConfig {
                n: 3,
                max_new_tokens: 24,
                seed: 7,
                kv_block_size: 4,
                ignore_eos: true,
                max_batch_tokens: budget,
                ..Default::default()
            };
            let mut log = StepCounts::default();
            let out =
                no_grad(|| fcgpu::rollout::generate_counted(&m, &ps, 0, &cfg, None, Some(&mut log))).unwrap();
            (out.into_iter().map(|c| c.new_ids).collect::<Vec<_>>(), log.kv)
        };
        let (free, _) = run(0);
        let longest = ps.iter().map(Vec::len).max().unwrap();
        let (tight, kv) = run(4 * (longest + 24).div_ceil(4) + 16);
        assert!(kv.preemptions > 0 && kv.recomputed_tokens > 0, "{}: {kv:?}", name(&dir));
        assert_eq!(tight, free, "{}: tokens after preemption", name(&dir));
    }
}
