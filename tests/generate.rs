//! Rollout engine: KV-cache decode against the full forward, the sampler's statistics, seeded
//! reproducibility, stopping, chat rendering, and the `generate` command.

use std::collections::HashMap;
use std::sync::Arc;

use fcgpu::autograd::no_grad;
use fcgpu::model::decode::Step;
use fcgpu::model::kv_cache::{KvPool, SeqCache};
use fcgpu::model::tokenizer::Tokenizer;
use fcgpu::model::{Batch, Model};
use fcgpu::rollout::chat::{tojson, ChatFormat, ChatTemplate};
use fcgpu::rollout::sampler::{sample, SamplerParams};
use fcgpu::rollout::{generate, generate_indexed, sample_rng, FinishReason, SamplingConfig};
use serde_json::json;

mod model_common;

fn model(kind: &str, seed: u64) -> Model {
    model_common::model(kind, seed, 1.0, 0.2)
}

/// Logits `[tokens, vocab]` of the full (training) forward of one sequence.
fn full_logits(m: &Model, seq: &[u32]) -> Vec<f32> {
    no_grad(|| {
        let h = m.hidden_states(&Batch::from_sequences(&[seq.to_vec()]))?;
        fcgpu::ops::linear(&h, m.lm_head_weight(), None)
    })
    .unwrap()
    .to_vec()
}

/// A pool of `bs`-position blocks for `m`'s caches.
fn pool(m: &Model, bs: usize) -> Arc<KvPool> {
    KvPool::new(m.kv_shape(), bs).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

const FAMILIES: [&str; 3] = ["qwen2", "qwen3", "llama"];

/// Prefill of mixed lengths in one call, then one token at a time for every sequence still
/// running, in a pool of `bs`-position blocks: the logits of every position, in order.
fn incremental_logits(m: &Model, seqs: &[Vec<u32>], prompt_lens: &[usize], bs: usize) -> Vec<Vec<f32>> {
    let v = m.config.vocab_size;
    let pool = pool(m, bs);
    let mut caches: Vec<SeqCache> = seqs.iter().map(|_| SeqCache::new(&pool)).collect();
    let mut out: Vec<Vec<f32>> = vec![Vec::new(); seqs.len()];
    let all = {
        let mut steps: Vec<Step> = caches
            .iter_mut()
            .zip(seqs)
            .zip(prompt_lens)
            .map(|((c, s), &p)| Step { cache: c, tokens: &s[..p] })
            .collect();
        m.forward_cached_all(&mut steps).unwrap()
    };
    let mut off = 0;
    for (i, &p) in prompt_lens.iter().enumerate() {
        out[i].extend_from_slice(&all[off * v..(off + p) * v]);
        off += p;
    }
    let mut pos = prompt_lens.to_vec();
    loop {
        let live: Vec<usize> = (0..seqs.len()).filter(|&i| pos[i] < seqs[i].len()).collect();
        if live.is_empty() {
            break;
        }
        let logits = {
            let mut steps = Vec::new();
            for (i, c) in caches.iter_mut().enumerate() {
                if live.contains(&i) {
                    steps.push(Step { cache: c, tokens: &seqs[i][pos[i]..pos[i] + 1] });
                }
            }
            m.forward_cached(&mut steps).unwrap()
        };
        for (r, &i) in live.iter().enumerate() {
            out[i].extend_from_slice(&logits[r * v..(r + 1) * v]);
            pos[i] += 1;
        }
    }
    for (c, s) in caches.iter().zip(seqs) {
        assert_eq!(c.len(), s.len());
        assert_eq!(c.blocks().len(), s.len().div_ceil(bs), "blocks follow the tokens cached");
    }
    drop(caches);
    assert_eq!(pool.stats().in_use, 0, "dropped caches give their blocks back");
    out
}

#[test]
fn incremental_decode_equals_full_forward() {
    // Block sizes 1 and 4 put sequences across many blocks (prefills and decodes crossing block
    // boundaries); 64 holds every sequence in one block, as a contiguous cache would.
    for kind in FAMILIES {
        let m = model(kind, 3);
        let seqs: Vec<Vec<u32>> = vec![
            (0..14).map(|i| (i * 7 + 3) % 61).collect(),
            (0..9).map(|i| (i * 13 + 5) % 61).collect(),
            (0..17).map(|i| (i * 29 + 1) % 61).collect(),
        ];
        let full: Vec<Vec<f32>> = seqs.iter().map(|s| full_logits(&m, s)).collect();
        let one_block = incremental_logits(&m, &seqs, &[5, 1, 8], 64);
        for (i, f) in full.iter().enumerate() {
            let d = max_diff(&one_block[i], f);
            assert!(d < 1e-4, "{kind}: sequence {i}: incremental logits differ from the full forward by {d}");
        }
        for bs in [1, 4, 16] {
            let paged = incremental_logits(&m, &seqs, &[5, 1, 8], bs);
            let worst = (0..seqs.len()).map(|i| max_diff(&paged[i], &one_block[i])).fold(0.0, f32::max);
            assert!(worst < 1e-5, "{kind}: blocks of {bs} differ from one block by {worst}");
            eprintln!("{kind}: blocks of {bs} against one block: max |Δlogit| = {worst:.2e}");
        }
    }
}

#[test]
fn shared_prefix_decode_equals_full_forward() {
    // A 6-token prompt in blocks of 4: its first block is shared by the three continuations for
    // good, its last (partial) block is copied by the first two that write into it; the third
    // finds it no longer shared (the prefill's own cache is gone) and writes in place.
    for kind in FAMILIES {
        let m = model(kind, 4);
        let v = m.config.vocab_size;
        let pool = pool(&m, 4);
        let prompt: Vec<u32> = vec![4, 8, 15, 16, 23, 42];
        let mut c = SeqCache::new(&pool);
        m.forward_cached(&mut [Step { cache: &mut c, tokens: &prompt }]).unwrap();
        let conts: Vec<Vec<u32>> = vec![vec![1, 2, 3, 4], vec![60, 59, 58, 57], vec![7, 7, 7, 7]];
        let mut caches: Vec<SeqCache> = conts.iter().map(|_| c.fork()).collect();
        drop(c);
        assert_eq!(pool.stats().in_use, 2, "the forks share the prompt's two blocks");
        for t in 0..4 {
            let logits = {
                let mut steps: Vec<Step> = caches
                    .iter_mut()
                    .zip(&conts)
                    .map(|(c, s)| Step { cache: c, tokens: &s[t..t + 1] })
                    .collect();
                m.forward_cached(&mut steps).unwrap()
            };
            for (r, s) in conts.iter().enumerate() {
                let seq: Vec<u32> = prompt.iter().chain(&s[..=t]).copied().collect();
                let full = full_logits(&m, &seq);
                let last = seq.len() - 1;
                let d = max_diff(&logits[r * v..(r + 1) * v], &full[last * v..(last + 1) * v]);
                assert!(d < 1e-4, "{kind}: continuation {r} step {t}: logits differ by {d}");
            }
        }
        let st = pool.stats();
        assert_eq!(st.cow_copies, 2, "{kind}: copies on write");
        // 1 shared + 3 own copies of the second block + 3 third blocks (positions 8, 9).
        assert_eq!(st.in_use, 7, "{kind}: blocks in use");
        assert_eq!(caches[0].blocks()[0], caches[2].blocks()[0], "the full prompt block stays shared");
        // A fork of a running sequence decodes on from where it was, beside it.
        let mut f = caches[2].fork();
        let l = m.forward_cached(&mut [Step { cache: &mut f, tokens: &[9] }]).unwrap();
        let seq: Vec<u32> = prompt.iter().chain(&conts[2]).chain(&[9]).copied().collect();
        let full = full_logits(&m, &seq);
        let last = seq.len() - 1;
        assert!(max_diff(&l, &full[last * v..(last + 1) * v]) < 1e-4, "{kind}: a fork decodes on");
        drop((caches, f));
        assert_eq!(pool.stats().in_use, 0, "{kind}: every block back in the pool");
    }
}

fn prompts() -> Vec<Vec<u32>> {
    vec![vec![3, 1, 4, 1, 5, 9, 2, 6], vec![27], vec![18, 28, 18, 28, 45]]
}

/// Log-probs and entropies of `new_ids` after `prompt` under the full forward at temperature t.
fn reference_stats(m: &Model, prompt: &[u32], new_ids: &[u32], t: f32) -> (Vec<f32>, Vec<f32>) {
    let seq: Vec<u32> = prompt.iter().chain(new_ids).copied().collect();
    let lp = no_grad(|| m.token_logprobs(&Batch::from_sequences(&[seq.clone()]), t)).unwrap().to_vec();
    let n = seq.len();
    let r = prompt.len() - 1..prompt.len() - 1 + new_ids.len();
    (lp[r.clone()].to_vec(), lp[n + r.start..n + r.end].to_vec())
}

/// Generation does not depend on the KV block size: seeded samples with blocks of 1, 4 and 16
/// positions are those of one block per sequence (a contiguous cache), on every family.
#[test]
fn generations_do_not_depend_on_the_kv_block_size() {
    for kind in FAMILIES {
        let m = model(kind, 6);
        let run = |bs: usize| {
            let cfg =
                SamplingConfig { n: 3, max_new_tokens: 20, seed: 9, kv_block_size: bs, ..Default::default() };
            generate(&m, &prompts(), &cfg, None).unwrap().into_iter().map(|c| c.new_ids).collect::<Vec<_>>()
        };
        let contiguous = run(4096);
        for bs in [1, 4, 16] {
            assert_eq!(run(bs), contiguous, "{kind}: blocks of {bs}");
        }
    }
}

/// A KV budget too small for every sample at once (`max_batch_tokens`) preempts the latest
/// admitted samples and recomputes them later: the seeded tokens are those of an unlimited run,
/// on every family, and the counters show the preemptions.
#[test]
fn preempted_samples_are_recomputed_to_the_same_tokens() {
    for kind in FAMILIES {
        let m = model(kind, 6);
        let run = |budget: usize| {
            let cfg = SamplingConfig {
                n: 3,
                max_new_tokens: 24,
                seed: 9,
                kv_block_size: 4,
                ignore_eos: true,
                max_batch_tokens: budget,
                ..Default::default()
            };
            let mut log = fcgpu::rollout::StepCounts::default();
            let out =
                fcgpu::rollout::generate_counted(&m, &prompts(), 0, &cfg, None, Some(&mut log)).unwrap();
            (out.into_iter().map(|c| (c.new_ids, c.logprobs)).collect::<Vec<_>>(), log.kv)
        };
        let (free, kv_free) = run(0);
        assert_eq!(kv_free.preemptions, 0);
        assert_eq!(kv_free.peak_batch, 9, "{kind}: every sample at once without a budget");
        // 8 + 24 positions for the longest sample: 8 blocks of 4. The 9 samples hold up to 18
        // blocks at once unbudgeted; 12 blocks make the latest admitted give theirs up.
        let (tight, kv) = run(48);
        assert!(kv.preemptions > 0, "{kind}: a budget of 12 blocks preempts ({kv:?})");
        assert!(kv.recomputed_tokens > 0 && kv.peak_blocks <= 12, "{kind}: {kv:?}");
        for (i, ((a, la), (b, lb))) in free.iter().zip(&tight).enumerate() {
            assert_eq!(a, b, "{kind}: sample {i}: tokens after preemption");
            let d = la.iter().zip(lb).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            assert!(d < 1e-4, "{kind}: sample {i}: log-probs differ by {d}");
        }
        let err = fcgpu::rollout::generate(
            &m,
            &prompts(),
            &SamplingConfig {
                max_new_tokens: 24,
                kv_block_size: 4,
                max_batch_tokens: 20,
                ..Default::default()
            },
            None,
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("--max-batch-tokens 20 is too small"), "{err:#}");
    }
}

/// A pool capped at a number of blocks refuses a step that needs more, and the caches stay as
/// they were: the step can run once blocks are free.
#[test]
fn out_of_blocks_is_an_error_that_leaves_the_cache_usable() {
    let m = model("qwen2", 5);
    let pool = pool(&m, 4);
    pool.set_limit(3);
    let seq: Vec<u32> = (0..16).map(|i| (i * 11 + 2) % 61).collect();
    let mut a = SeqCache::new(&pool);
    m.forward_cached(&mut [Step { cache: &mut a, tokens: &seq[..8] }]).unwrap();
    assert_eq!(pool.free_blocks(), 1);
    let mut b = SeqCache::new(&pool);
    let err = m.forward_cached(&mut [Step { cache: &mut b, tokens: &seq[..8] }]).unwrap_err();
    assert!(format!("{err:#}").contains("out of KV blocks"), "{err:#}");
    assert_eq!((b.len(), b.blocks().len(), pool.free_blocks()), (0, 0, 1), "a failed prepare takes nothing");
    drop(a);
    let l = m.forward_cached(&mut [Step { cache: &mut b, tokens: &seq[..8] }]).unwrap();
    let full = full_logits(&m, &seq[..8]);
    let v = m.config.vocab_size;
    assert!(max_diff(&l, &full[7 * v..8 * v]) < 1e-4);
}

#[test]
fn sampled_logprobs_and_entropies_equal_the_full_forward() {
    for kind in FAMILIES {
        let m = model(kind, 5);
        for (t, top_p, top_k) in [(0.7f32, 0.9f32, 0usize), (1.0, 1.0, 0), (1.3, 1.0, 7), (0.0, 1.0, 0)] {
            let cfg = SamplingConfig {
                n: 3,
                max_new_tokens: 10,
                temperature: t,
                top_p,
                top_k,
                seed: 11,
                ignore_eos: true,
                ..Default::default()
            };
            let ps = prompts();
            let out = generate(&m, &ps, &cfg, None).unwrap();
            assert_eq!(out.len(), ps.len() * 3);
            let mut worst = 0.0f32;
            for c in &out {
                assert_eq!(c.new_ids.len(), 10);
                assert_eq!(c.finish_reason, FinishReason::Length);
                let (lp, ent) =
                    reference_stats(&m, &ps[c.prompt_index], &c.new_ids, if t == 0.0 { 1.0 } else { t });
                worst = worst.max(max_diff(&lp, &c.logprobs)).max(max_diff(&ent, &c.entropy));
                if t == 0.0 {
                    // Greedy: every token is the argmax of the full forward's logits.
                    let seq: Vec<u32> = ps[c.prompt_index].iter().chain(&c.new_ids).copied().collect();
                    let full = full_logits(&m, &seq);
                    let v = m.config.vocab_size;
                    for (j, &tok) in c.new_ids.iter().enumerate() {
                        let row = &full[(ps[c.prompt_index].len() - 1 + j) * v..][..v];
                        assert_eq!(
                            tok as usize,
                            fcgpu::rollout::sampler::argmax(row),
                            "{kind}: greedy token {j}"
                        );
                    }
                }
            }
            assert!(
                worst < 1e-4,
                "{kind} T={t} top_p={top_p} top_k={top_k}: log-prob/entropy differ by {worst}"
            );
            eprintln!("{kind} T={t} top_p={top_p} top_k={top_k}: max |Δ| log-prob/entropy vs token_logprobs = {worst:.2e}");
        }
    }
}

#[test]
fn seeded_sampling_does_not_depend_on_the_batch() {
    let m = model("qwen3", 6);
    let ps = prompts();
    let base = SamplingConfig {
        n: 4,
        max_new_tokens: 12,
        temperature: 0.9,
        top_p: 0.95,
        seed: 1234,
        ignore_eos: true,
        ..Default::default()
    };
    let all = generate(&m, &ps, &base, None).unwrap();
    for max_batch in [1, 3, 5] {
        let other = generate(&m, &ps, &SamplingConfig { max_batch, ..base.clone() }, None).unwrap();
        for (a, b) in all.iter().zip(&other) {
            assert_eq!((a.prompt_index, a.sample_index), (b.prompt_index, b.sample_index));
            assert_eq!(
                a.new_ids, b.new_ids,
                "max_batch {max_batch}: prompt {} sample {}",
                a.prompt_index, a.sample_index
            );
            assert!(max_diff(&a.logprobs, &b.logprobs) < 1e-5);
        }
    }
    // The last prompt alone, numbered as in the full run, samples the same.
    let alone = generate_indexed(&m, &ps[2..], 2, &base, None).unwrap();
    assert_eq!(alone.len(), 4);
    for (a, b) in alone.iter().zip(&all[8..]) {
        assert_eq!(a.new_ids, b.new_ids);
    }
    // Samples of one prompt differ from each other, and another seed changes them.
    assert!(all[0..4].iter().any(|c| c.new_ids != all[0].new_ids), "4 samples all identical");
    let reseeded = generate(&m, &ps, &SamplingConfig { seed: 1235, ..base.clone() }, None).unwrap();
    assert!(reseeded.iter().zip(&all).any(|(a, b)| a.new_ids != b.new_ids), "seed has no effect");
}

/// The truncated sampling distribution computed independently of the sampler: sort by
/// probability, keep the top k, then the smallest prefix whose mass reaches top_p.
fn expected_distribution(z: &[f32], t: f32, top_p: f32, top_k: usize) -> Vec<f64> {
    let w: Vec<f64> = z.iter().map(|&x| (x as f64 / t as f64).exp()).collect();
    let mut order: Vec<usize> = (0..z.len()).collect();
    order.sort_by(|&a, &b| w[b].partial_cmp(&w[a]).unwrap());
    if top_k > 0 {
        order.truncate(top_k);
    }
    let mass: f64 = order.iter().map(|&i| w[i]).sum();
    let mut keep = Vec::new();
    let mut acc = 0.0;
    for &i in &order {
        keep.push(i);
        acc += w[i] / mass;
        if acc >= top_p as f64 - 1e-12 {
            break;
        }
    }
    let kept: f64 = keep.iter().map(|&i| w[i]).sum();
    let mut p = vec![0.0; z.len()];
    for &i in &keep {
        p[i] = w[i] / kept;
    }
    p
}

/// Upper critical value of χ² with `df` degrees of freedom at p = 0.001 (Wilson–Hilferty).
fn chi2_crit(df: usize) -> f64 {
    let d = df as f64;
    let z = 3.090; // standard normal upper 0.001 quantile
    d * (1.0 - 2.0 / (9.0 * d) + z * (2.0 / (9.0 * d)).sqrt()).powi(3)
}

#[test]
fn sampler_frequencies_match_the_distribution() {
    let z: Vec<f32> =
        vec![2.0, 1.5, 1.4, 0.3, -0.2, 0.9, -1.0, 0.0, 1.1, -2.5, 0.5, 0.45, -0.7, 1.8, -3.0, 0.1];
    let draws = 20_000usize;
    for (t, top_p, top_k) in
        [(1.0f32, 1.0f32, 0usize), (0.7, 1.0, 5), (1.3, 0.8, 0), (0.8, 0.9, 8), (2.0, 0.5, 3)]
    {
        let p = SamplerParams { temperature: t, top_p, top_k };
        let expect = expected_distribution(&z, t, top_p, top_k);
        let mut rng = sample_rng(42, 0, 0);
        let mut counts = vec![0usize; z.len()];
        for _ in 0..draws {
            let d = sample(&z, &p, &mut rng);
            counts[d.token as usize] += 1;
            // Log-prob and entropy are of the untruncated softmax(z/T).
            let lse = z.iter().map(|&x| (x as f64 / t as f64).exp()).sum::<f64>().ln();
            assert!((d.logprob as f64 - (z[d.token as usize] as f64 / t as f64 - lse)).abs() < 1e-5);
        }
        let support: Vec<usize> = (0..z.len()).filter(|&i| expect[i] > 0.0).collect();
        for i in 0..z.len() {
            assert!(
                expect[i] > 0.0 || counts[i] == 0,
                "T={t} top_p={top_p} top_k={top_k}: token {i} outside the truncated support was drawn"
            );
        }
        let chi2: f64 = support
            .iter()
            .map(|&i| {
                let e = expect[i] * draws as f64;
                (counts[i] as f64 - e).powi(2) / e
            })
            .sum();
        let tv: f64 =
            0.5 * (0..z.len()).map(|i| (counts[i] as f64 / draws as f64 - expect[i]).abs()).sum::<f64>();
        let df = support.len().saturating_sub(1).max(1);
        let crit = chi2_crit(df);
        eprintln!("T={t} top_p={top_p} top_k={top_k}: support {} χ²={chi2:.2} (df {df}, p=0.001 critical {crit:.2}), TV={tv:.4}", support.len());
        assert!(chi2 < crit, "T={t} top_p={top_p} top_k={top_k}: χ² {chi2} ≥ {crit}");
        assert!(tv < 0.02, "total variation {tv}");
    }
    // Entropy of the full distribution, and greedy at T = 1.
    let d = sample(&z, &SamplerParams { temperature: 0.0, top_p: 1.0, top_k: 0 }, &mut sample_rng(0, 0, 0));
    assert_eq!(d.token, 0);
    let w: Vec<f64> = z.iter().map(|&x| (x as f64).exp()).collect();
    let s: f64 = w.iter().sum();
    let h: f64 = -w.iter().map(|x| x / s * (x / s).ln()).sum::<f64>();
    assert!((d.entropy as f64 - h).abs() < 1e-5, "entropy {} vs {h}", d.entropy);
    assert!((d.logprob as f64 - (w[0] / s).ln()).abs() < 1e-5);
}

#[test]
fn sequences_stop_independently() {
    let mut m = model("llama", 7);
    let ps = prompts();
    let cfg = SamplingConfig {
        n: 2,
        max_new_tokens: 16,
        temperature: 1.0,
        seed: 5,
        ignore_eos: true,
        ..Default::default()
    };
    let free = generate(&m, &ps, &cfg, None).unwrap();
    // Make a token that sample (0, 0) draws at step 5 an EOS id.
    let eos = free[0].new_ids[5];
    m.config.eos_token_ids = vec![eos];
    let stopped = generate(&m, &ps, &SamplingConfig { ignore_eos: false, ..cfg.clone() }, None).unwrap();
    for (a, b) in free.iter().zip(&stopped) {
        match a.new_ids.iter().position(|&t| t == eos) {
            Some(k) => {
                assert_eq!(b.new_ids, a.new_ids[..=k], "cut at the first EOS, which is kept");
                assert_eq!(b.finish_reason, FinishReason::Stop);
                assert_eq!(b.logprobs, a.logprobs[..=k]);
            }
            None => {
                // Others run to the length limit, unaffected by the finished ones.
                assert_eq!(b.new_ids, a.new_ids);
                assert_eq!(b.finish_reason, FinishReason::Length);
            }
        }
    }
    assert!(stopped[0].new_ids.len() <= 6);
    // stop_ids apply even with ignore_eos.
    let by_id = generate(&m, &ps, &SamplingConfig { stop_ids: vec![eos], ..cfg.clone() }, None).unwrap();
    assert_eq!(by_id[0].new_ids, stopped[0].new_ids);
    // max_new_tokens = 0 and greedy.
    let none = generate(&m, &ps, &SamplingConfig { max_new_tokens: 0, ..cfg.clone() }, None).unwrap();
    assert!(none.iter().all(|c| c.new_ids.is_empty() && c.finish_reason == FinishReason::Length));
}

/// A word-level tokenizer over the 61 ids: token i is the word `t{i:02}`.
fn word_tokenizer() -> Tokenizer {
    use tokenizers::models::wordlevel::WordLevel;
    let vocab: HashMap<String, u32> = (0..61u32).map(|i| (format!("t{i:02}"), i)).collect();
    let wl = WordLevel::builder().vocab(vocab.into_iter().collect()).unk_token("t00".into()).build().unwrap();
    let mut t = tokenizers::Tokenizer::new(wl);
    t.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::whitespace::WhitespaceSplit));
    Tokenizer::from_inner(t)
}

#[test]
fn stop_strings_end_samples() {
    let m = model("qwen2", 8);
    let tok = word_tokenizer();
    let ps = prompts();
    let cfg = SamplingConfig {
        n: 3,
        max_new_tokens: 20,
        temperature: 1.0,
        seed: 9,
        ignore_eos: true,
        ..Default::default()
    };
    let free = generate(&m, &ps, &cfg, Some(&tok)).unwrap();
    let target = free[1].new_ids[7];
    let stop = format!("t{target:02}");
    let out =
        generate(&m, &ps, &SamplingConfig { stop_strings: vec![stop.clone()], ..cfg.clone() }, Some(&tok))
            .unwrap();
    let mut cut = 0;
    for (a, b) in free.iter().zip(&out) {
        if let Some(k) = a.new_ids.iter().position(|&t| t == target) {
            cut += 1;
            assert_eq!(b.new_ids, a.new_ids[..=k]);
            assert_eq!(b.finish_reason, FinishReason::Stop);
            let text = b.text(&tok).unwrap();
            assert!(!text.contains(&stop), "text keeps the stop string: {text}");
            assert_eq!(text.trim_end(), tok.decode(&a.new_ids[..k], true).unwrap());
        } else {
            assert_eq!(b.new_ids, a.new_ids);
        }
    }
    assert!(cut >= 1);
}

fn template(path: &str, specials: &[(&str, &str)]) -> ChatFormat {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    let src = std::fs::read_to_string(&p).unwrap();
    ChatFormat::Template(Arc::new(ChatTemplate::from_source(&src, path, specials).unwrap()))
}

/// The model's template renders the family formats: the Qwen ChatML tool block and call
/// syntax (fcgpu's built-in template), and Llama 3.1's headers with tools in the first user
/// message (a Llama-format template written for the tests).
#[test]
fn chat_templates_render_like_the_families() {
    let messages = vec![json!({"role": "user", "content": "What is 2+2?"})];
    let tools = vec![
        json!({"type": "function", "function": {"name": "add", "description": "Add ints.", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "x": {"type": "number", "default": 1.0}}, "required": ["a"]}}}),
    ];
    let qwen = template("prompts/templates/qwen-chatml.jinja", &[]);
    assert_eq!(
        qwen.render(&messages, None).unwrap(),
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    );
    let with_sys = vec![json!({"role": "system", "content": "Be brief."}), messages[0].clone()];
    assert_eq!(
        qwen.render(&with_sys, Some(&tools)).unwrap(),
        concat!(
            "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n",
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n",
            r#"{"type": "function", "function": {"name": "add", "description": "Add ints.", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "x": {"type": "number", "default": 1.0}}, "required": ["a"]}}}"#,
            "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n",
            "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n",
            "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
        )
    );
    let convo = vec![
        messages[0].clone(),
        json!({"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2}}}]}),
        json!({"role": "tool", "content": "4"}),
    ];
    assert!(qwen.render(&convo, None).unwrap().ends_with(
        "<|im_start|>assistant\n<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 2}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n4\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    ));
    let llama =
        template("tests/fixtures/templates/llama3-tools.jinja", &[("bos_token", "<|begin_of_text|>")]);
    let ChatFormat::Template(t) = &llama else { unreachable!() };
    let dated = serde_json::Map::from_iter([("date_string".to_string(), json!("26 Jul 2024"))]);
    assert_eq!(
        t.render_with(&with_sys, None, true, &dated).unwrap(),
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    let llama31 = t.render_with(&messages, Some(&tools), true, &dated).unwrap();
    assert!(llama31.starts_with("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nGiven the following functions"));
    assert!(
        llama31.contains("{\n    \"type\": \"function\",\n    \"function\": {\n        \"name\": \"add\",")
    );
    // Python json.dumps number and escape conventions.
    assert_eq!(
        tojson(&json!({"a": [1, 2.5, 1e-5, 1e20, "é\n"]}), None),
        r#"{"a": [1, 2.5, 1e-05, 1e+20, "é\n"]}"#
    );
    assert_eq!(tojson(&json!({"a": []}), Some(2)), "{\n  \"a\": []\n}");
}

/// The embedded task's compact prompt for a chat: OpenAI tools as signature lines, an earlier
/// call as the Python list the model answers with; and how each format forces a call (a
/// template's call syntax is the one it writes for earlier calls).
#[test]
fn compact_chat_format_and_forced_calls() {
    let tools = vec![json!({"type": "function", "function": {"name": "add", "description": "Add ints.",
        "parameters": {"type": "dict", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}, "required": ["a"]}}})];
    let convo = vec![
        json!({"role": "user", "content": "Add 2."}),
        json!({"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": "{\"a\": 2, \"b\": \"it's\"}"}}]}),
        json!({"role": "tool", "content": "4"}),
    ];
    let text = ChatFormat::Compact.render(&convo, Some(&tools)).unwrap();
    assert!(
        text.starts_with(
            "<|im_start|>system\nYou can call these functions:\n- add(a: int, b: str = None): Add ints.\n"
        ),
        "{text}"
    );
    assert!(
        text.ends_with("<|im_start|>user\nAdd 2.<|im_end|>\n<|im_start|>assistant\n[add(a=2, b='it\\'s')]<|im_end|>\n<|im_start|>tool\n4<|im_end|>\n<|im_start|>assistant\n"),
        "{text}"
    );
    let qwen = template("prompts/templates/qwen-chatml.jinja", &[]);
    assert_eq!(
        qwen.forced_call(Some("add")).unwrap(),
        ("<tool_call>\n{\"name\": \"add\", \"arguments\": ".into(), None)
    );
    let llama =
        template("tests/fixtures/templates/llama3-tools.jinja", &[("bos_token", "<|begin_of_text|>")]);
    assert_eq!(llama.forced_call(None).unwrap(), ("{\"name\": \"".into(), None));
    assert_eq!(
        llama.forced_call(Some("add")).unwrap(),
        ("{\"name\": \"add\", \"parameters\": ".into(), None)
    );
    assert_eq!(
        ChatFormat::Compact.forced_call(Some("add")).unwrap(),
        ("<think>".into(), Some(("</think>".into(), "\n\n[add(".into())))
    );
    // A template that writes no calls (the fixtures' plain ChatML) cannot force one.
    let plain = template("tests/fixtures/models/qwen2-tiny/chat_template.jinja", &[]);
    let e = plain.forced_call(Some("add")).unwrap_err();
    assert!(format!("{e:#}").contains("qwen2-tiny/chat_template.jinja"), "{e:#}");
}

#[test]
fn generate_command_writes_one_line_per_sample() {
    let m = model("qwen2", 9);
    let dir = tempfile::tempdir().unwrap();
    let mdir = dir.path().join("m");
    m.save(&mdir, None).unwrap();
    let input = dir.path().join("in.jsonl");
    let lines: Vec<String> = prompts().iter().map(|p| json!({"prompt_ids": p}).to_string()).collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_fcgpu"))
            .args([
                "generate",
                "--model",
                mdir.to_str().unwrap(),
                "--input",
                input.to_str().unwrap(),
                "--max-new-tokens",
                "6",
            ])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "generate failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .collect::<Vec<_>>()
    };
    let a = run(&[
        "--n",
        "3",
        "--seed",
        "7",
        "--temperature",
        "0.8",
        "--top-k",
        "20",
        "--ignore-eos",
        "--batch-size",
        "2",
    ]);
    assert_eq!(a.len(), 9);
    for (k, l) in a.iter().enumerate() {
        assert_eq!(l["index"], k / 3);
        assert_eq!(l["sample"], k % 3);
        assert_eq!(l["new_ids"].as_array().unwrap().len(), 6);
        assert_eq!(l["logprobs"].as_array().unwrap().len(), 6);
        assert_eq!(l["entropy"].as_array().unwrap().len(), 6);
        assert_eq!(l["finish_reason"], "length");
        assert!(l["text"].is_null(), "no tokenizer, no text");
    }
    // Same seed, other batch size: same samples; library and command agree.
    let b = run(&[
        "--n",
        "3",
        "--seed",
        "7",
        "--temperature",
        "0.8",
        "--top-k",
        "20",
        "--ignore-eos",
        "--batch-size",
        "64",
    ]);
    assert_eq!(
        a.iter().map(|l| &l["new_ids"]).collect::<Vec<_>>(),
        b.iter().map(|l| &l["new_ids"]).collect::<Vec<_>>()
    );
    let lib = generate(
        &m,
        &prompts(),
        &SamplingConfig {
            n: 3,
            max_new_tokens: 6,
            temperature: 0.8,
            top_k: 20,
            seed: 7,
            ignore_eos: true,
            ..Default::default()
        },
        None,
    )
    .unwrap();
    for (l, c) in a.iter().zip(&lib) {
        assert_eq!(l["new_ids"], json!(c.new_ids));
    }
    // Bad input is reported with its line.
    std::fs::write(&input, "{\"prompt_ids\": [1]}\n{\"prompt_ids\": [1], \"prompt\": \"x\"}\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fcgpu"))
        .args(["generate", "--model", mdir.to_str().unwrap(), "--input", input.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in.jsonl:2:"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn long_prompts_cross_attention_query_blocks() {
    // Prefill attention works in blocks of 64 query rows: 150 prompt tokens take three, then
    // decode continues after them (and after a shared prefix of that length).
    for kind in FAMILIES {
        let m = model(kind, 10);
        let v = m.config.vocab_size;
        let seq: Vec<u32> = (0..156u32).map(|i| (i * 37 + 11) % 61).collect();
        let full = full_logits(&m, &seq);
        let pool = pool(&m, 16);
        let mut c = SeqCache::new(&pool);
        let pre = m.forward_cached_all(&mut [Step { cache: &mut c, tokens: &seq[..150] }]).unwrap();
        let d = max_diff(&pre, &full[..150 * v]);
        assert!(d < 1e-4, "{kind}: long prefill differs by {d}");
        let mut s = c.fork();
        for p in 150..156 {
            let l = m.forward_cached(&mut [Step { cache: &mut s, tokens: &seq[p..p + 1] }]).unwrap();
            let d = max_diff(&l, &full[p * v..(p + 1) * v]);
            assert!(d < 1e-4, "{kind}: decode at {p} after a long prefix differs by {d}");
        }
    }
}

#[test]
fn multi_token_steps_after_cached_tokens() {
    // Chunked prefill: several new tokens after a non-empty cache, beside a one-token decode.
    for kind in FAMILIES {
        let m = model(kind, 12);
        let v = m.config.vocab_size;
        let a: Vec<u32> = (0..90u32).map(|i| (i * 17 + 2) % 61).collect();
        let b: Vec<u32> = (0..6u32).map(|i| (i * 5 + 9) % 61).collect();
        let (fa, fb) = (full_logits(&m, &a), full_logits(&m, &b));
        let pool = pool(&m, 16);
        let (mut ca, mut cb) = (SeqCache::new(&pool), SeqCache::new(&pool));
        m.forward_cached(&mut [
            Step { cache: &mut ca, tokens: &a[..5] },
            Step { cache: &mut cb, tokens: &b[..5] },
        ])
        .unwrap();
        let out = m
            .forward_cached_all(&mut [
                Step { cache: &mut ca, tokens: &a[5..90] },
                Step { cache: &mut cb, tokens: &b[5..6] },
            ])
            .unwrap();
        let d = max_diff(&out[..85 * v], &fa[5 * v..90 * v]);
        assert!(d < 1e-4, "{kind}: chunk after cached tokens differs by {d}");
        let d = max_diff(&out[85 * v..], &fb[5 * v..6 * v]);
        assert!(d < 1e-4, "{kind}: decode beside a chunk differs by {d}");
    }
}

#[test]
fn long_prompts_are_admitted_a_few_at_a_time() {
    // 3 × 3000 prompt tokens exceed one step's prefill budget (8192): they join over two steps
    // and sample exactly as each prompt does alone; a 9000-token prompt still runs (alone).
    let m = model("qwen2", 13);
    let ps: Vec<Vec<u32>> =
        (0..3u32).map(|k| (0..3000u32).map(|i| (i * (7 + k) + k) % 61).collect()).collect();
    let cfg = SamplingConfig {
        n: 2,
        max_new_tokens: 4,
        temperature: 1.0,
        seed: 77,
        ignore_eos: true,
        ..Default::default()
    };
    let all = generate(&m, &ps, &cfg, None).unwrap();
    for (i, p) in ps.iter().enumerate() {
        let alone = generate_indexed(&m, std::slice::from_ref(p), i, &cfg, None).unwrap();
        for (a, b) in alone.iter().zip(&all[i * 2..i * 2 + 2]) {
            assert_eq!(a.new_ids, b.new_ids, "prompt {i}");
        }
    }
    let long: Vec<u32> = ps.concat();
    let out =
        generate(&m, &[vec![1, 2, 3], long], &SamplingConfig { max_batch: 2, ..cfg.clone() }, None).unwrap();
    assert_eq!(out.len(), 4);
    assert!(out.iter().all(|c| c.new_ids.len() == 4));
}

/// `fcgpu generate` refuses inputs and sizes it could not hold, with a clear error and before
/// any large allocation: the child runs under an 8 GiB address-space limit, so a failure to
/// bound shows as an allocation abort instead of the error named here.
#[test]
fn generate_refuses_what_cannot_fit_before_allocating() {
    use std::os::unix::process::CommandExt;
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/qwen2-tiny");
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let small = file("small.jsonl", "{\"prompt\": \"def add(a, b):\"}\n");
    // The fixture's context is 512 positions: at 16 bytes of text per position, 8192 bytes.
    let huge_line = file("huge.jsonl", &format!("{}\n", json!({"prompt": "hello ".repeat(21_000_000 / 6)})));
    let long_text = file("long.jsonl", &format!("{}\n", json!({"prompt": "a".repeat(8200)})));
    let long_chat = file(
        "chat.jsonl",
        &format!("{}\n", json!({"messages": [{"role": "user", "content": "a".repeat(8200)}]})),
    );
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (
            vec!["--input".into(), small.clone(), "--n".into(), "1000000000".into()],
            vec!["--n 1000000000", "GiB", "memory"],
        ),
        (
            vec!["--input".into(), small.clone(), "--max-new-tokens".into(), "1000000000".into()],
            vec!["--max-new-tokens", "context of 512"],
        ),
        (
            vec!["--input".into(), small.clone(), "--max-new-tokens".into(), "512".into()],
            vec!["at most 511 new tokens"],
        ),
        (vec!["--input".into(), small, "--n".into(), "0".into()], vec!["--n must be at least 1"]),
        (vec!["--input".into(), huge_line], vec!["huge.jsonl:1: line longer than 8256 bytes"]),
        (vec!["--input".into(), "/dev/zero".into()], vec!["/dev/zero:1: line longer than 8256 bytes"]),
        (
            vec!["--input".into(), long_text],
            vec!["long.jsonl:1:", "8200 bytes", "limit 8192", "not tokenized"],
        ),
        (vec!["--input".into(), long_chat], vec!["chat.jsonl:1:", "limit 8192", "not tokenized"]),
    ];
    for (args, words) in cases {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_fcgpu"));
        cmd.args(["generate", "--model", fixture.to_str().unwrap(), "--device", "cpu"]).args(&args);
        // SAFETY: setrlimit is async-signal-safe and only touches the child.
        unsafe {
            cmd.pre_exec(|| {
                let lim = libc::rlimit { rlim_cur: 8 << 30, rlim_max: 8 << 30 };
                if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        for w in words {
            assert!(err.contains(w), "{args:?}: no {w:?} in {err}");
        }
    }
    // Left out, --max-new-tokens fits a context smaller than its usual 256 (this one has 256).
    let ids = file("ids.jsonl", "{\"prompt_ids\": [1, 2, 3]}\n");
    let llama = fixture.with_file_name("llama-tiny-bf16");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fcgpu"))
        .args([
            "generate",
            "--model",
            llama.to_str().unwrap(),
            "--input",
            &ids,
            "--device",
            "cpu",
            "--ignore-eos",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["new_ids"].as_array().unwrap().len(), 253, "3 prompt tokens + 253 fill 256 positions");
}
