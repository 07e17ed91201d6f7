//! Rollouts: batched generation with a KV cache, G samples per prompt.
//!
//! [`generate`] runs a continuous batch: up to `max_batch` sequences decode together, one token
//! per step each, and a sequence that stops leaves the batch at once while the next prompt in
//! line is admitted in the same step (its prefill rides along with the others' decode). A
//! prompt is prefilled once; its G samples share the blocks of that prefill in the paged KV
//! cache (`model::kv_cache`), each copying only the last, partial prompt block when it first
//! writes into it.
//!
//! Reproducibility: each (prompt index, sample index) draws from its own stream of `seed`, so a
//! sample's tokens do not depend on the batch size or on the other prompts: on the cpu (and on a
//! GPU with `host_sampler`) a ChaCha8 stream consumed by the host sampler; on a GPU device a
//! counter-based Philox stream of (prompt, sample, token index) read by the device sampler
//! ([`device_sampler`]), so only the drawn tokens, their log-probs and entropies come back.
//!
//! On a GPU the steady state (every running sequence decodes one token, no prompt admitted) is
//! one batched step ([`Model::decode_step_gpu`]) in a workspace allocated once per call.

pub mod chat;
pub mod device_sampler;
pub mod sampler;

use std::collections::VecDeque;
use std::io::IsTerminal;

use anyhow::{bail, ensure, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::backend::counters::Counts;
use crate::model::decode::Step;
use crate::model::decode_gpu::DecodeWorkspace;
use crate::model::kv_cache::{KvPool, OutOfBlocks, SeqCache, DEFAULT_BLOCK};
use crate::model::tokenizer::Tokenizer;
use crate::model::Model;
use crate::tensor::{DType, Tensor};
use device_sampler::{device_uniform, DeviceSampler, DrawJob};
pub use sampler::{Draw, SamplerParams};

#[derive(Clone, Debug)]
pub struct SamplingConfig {
    /// Samples per prompt (G).
    pub n: usize,
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 = off.
    pub top_k: usize,
    pub seed: u64,
    /// Token ids that end a sample besides the model's EOS ids (kept even with `ignore_eos`).
    pub stop_ids: Vec<u32>,
    /// Strings that end a sample once its text contains one (needs a tokenizer).
    pub stop_strings: Vec<String>,
    /// Don't stop at the model's EOS ids (`config.eos_token_ids`).
    pub ignore_eos: bool,
    /// Most sequences decoded at once; 0 = all of them.
    pub max_batch: usize,
    /// Progress bar on stderr (only drawn when stderr is a terminal).
    pub progress: bool,
    /// On a GPU device, sample on the host from downloaded logits with the cpu's ChaCha8
    /// streams (tokens then match the cpu's for a seed, up to the device's rounding) instead of
    /// on the device. No effect on the cpu.
    pub host_sampler: bool,
    /// On a GPU device, capture the batched decode step in a graph per batch size and replay it
    /// (see `model::decode_gpu`); `None`: `FCGPU_CUDA_GRAPHS` (off unless `=1`).
    pub decode_graphs: Option<bool>,
    /// Positions per block of the paged KV cache (`--kv-block-size`).
    pub kv_block_size: usize,
    /// Most positions the KV cache holds at once (`--max-batch-tokens`; 0: no cap). Samples
    /// are admitted while blocks remain; when they run out, the latest admitted gives its
    /// blocks up and is recomputed (prompt and tokens so far) once blocks free up.
    pub max_batch_tokens: usize,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            n: 1,
            max_new_tokens: 256,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            stop_ids: vec![],
            stop_strings: vec![],
            ignore_eos: false,
            kv_block_size: DEFAULT_BLOCK,
            max_batch_tokens: 0,
            max_batch: 0,
            progress: false,
            host_sampler: false,
            decode_graphs: None,
        }
    }
}

impl SamplingConfig {
    pub fn sampler(&self) -> SamplerParams {
        SamplerParams { temperature: self.temperature, top_p: self.top_p, top_k: self.top_k }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An EOS / stop id or a stop string.
    Stop,
    /// `max_new_tokens` reached.
    Length,
}

#[derive(Clone, Debug)]
pub struct Completion {
    pub prompt_index: usize,
    pub sample_index: usize,
    /// Generated ids, including the EOS / stop id that ended the sample.
    pub new_ids: Vec<u32>,
    /// log softmax(z/T) of each generated token (T = 1 when greedy), before top-p/top-k.
    pub logprobs: Vec<f32>,
    /// Entropy of the full softmax(z/T) at each generated position.
    pub entropy: Vec<f32>,
    pub finish_reason: FinishReason,
    /// The stop string that ended the sample, if one did.
    pub stop_string: Option<String>,
}

impl Completion {
    /// Decoded text (special tokens skipped), cut before the stop string that ended it.
    pub fn text(&self, tok: &Tokenizer) -> Result<String> {
        let mut t = tok.decode(&self.new_ids, true)?;
        if let Some(s) = &self.stop_string {
            if let Some(i) = t.find(s.as_str()) {
                t.truncate(i);
            }
        }
        Ok(t)
    }
}

/// The RNG of sample `sample` of prompt `prompt`: one ChaCha8 stream per pair.
pub fn sample_rng(seed: u64, prompt: usize, sample: usize) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    r.set_stream(((prompt as u64) << 32) | sample as u64);
    r
}

/// EOS ids to stop at for chat use: the model's, plus `<|im_end|>` (ChatML) and `<|eot_id|>`
/// (Llama 3) when the tokenizer has them.
pub fn chat_eos_ids(model: &Model, tok: Option<&Tokenizer>) -> Vec<u32> {
    let mut ids = model.config.eos_token_ids.clone();
    if let Some(t) = tok {
        for s in ["<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>"] {
            if let Some(i) = t.token_id(s) {
                if !ids.contains(&i) {
                    ids.push(i);
                }
            }
        }
    }
    ids
}

/// Generates `cfg.n` completions for every prompt; prompt i is numbered i.
pub fn generate(
    model: &Model,
    prompts: &[Vec<u32>],
    cfg: &SamplingConfig,
    tok: Option<&Tokenizer>,
) -> Result<Vec<Completion>> {
    generate_indexed(model, prompts, 0, cfg, tok)
}

/// New positions per sample a GPU rollout reserves KV blocks for when it admits a group (see
/// `generate_counted`); a longer completion takes more blocks as it goes.
const GPU_RESERVE: usize = 4096;

/// The most KV blocks a group of `n` samples of a `prompt`-token prompt can hold with up to
/// `new` new tokens each (and `ctx` positions at most): its full prompt blocks once, shared, and
/// every sample's blocks from the partial prompt block on (a copy each but for one).
pub fn group_blocks(pool: &KvPool, prompt: usize, n: usize, new: usize, ctx: usize) -> usize {
    let shared = prompt / pool.block_size();
    shared + n * (pool.blocks_for((prompt + new).min(ctx)) - shared)
}

/// Most prompt tokens prefilled in one step (a longer prompt still goes alone).
pub const MAX_PREFILL_TOKENS: usize = 8192;

struct Live {
    prompt: usize,
    sample: usize,
    cache: SeqCache,
    rng: ChaCha8Rng,
    last: u32,
    row: usize,
    draw: Option<Draw>,
    new_ids: Vec<u32>,
    logprobs: Vec<f32>,
    entropy: Vec<f32>,
    /// Admission order: when blocks run out, the latest admitted is preempted first.
    ticket: usize,
}

/// What one call's scheduler did with the KV cache (summed into [`KvCounts`]).
#[derive(Default)]
struct KvRun {
    /// Prompt tokens prefilled, and what prefilling every sample would have computed.
    prefilled: (usize, usize),
    /// Blocks the running samples would have held with nothing shared, at the peak.
    unshared_peak: usize,
    preemptions: usize,
    recomputed_tokens: usize,
    peak_batch: usize,
}

/// Device work of each generation step (`--counters`), from the device's counters: the steps
/// that prefilled prompts (and decoded the running sequences with them) summed, then every other
/// step, a pure decode step of `batch` sequences, on its own.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct StepCounts {
    pub prefill: Counts,
    pub prefill_steps: usize,
    pub decode_steps: Vec<DecodeStepCounts>,
    /// The paged KV cache (every device): see [`KvCounts`].
    pub kv: KvCounts,
}

/// What the paged KV cache saved: prompt tokens prefilled (once per prompt) against what
/// prefilling every sample would compute, and blocks held at the peak against what the same
/// sequences would hold with no block shared.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct KvCounts {
    pub block_size: usize,
    pub block_bytes: usize,
    pub prefill_tokens: usize,
    pub prefill_tokens_unshared: usize,
    pub peak_blocks: usize,
    pub peak_blocks_unshared: usize,
    pub peak_bytes: usize,
    pub cow_copies: u64,
    /// The most samples decoding at once (with `--max-batch-tokens`: what fits the budget).
    pub peak_batch: usize,
    /// Samples that gave their blocks up when the budget ran out, and the tokens prefilled
    /// again to bring them back (`--max-batch-tokens`).
    pub preemptions: usize,
    pub recomputed_tokens: usize,
}

impl KvCounts {
    /// Adds one call's figures (peaks: the larger).
    fn add(&mut self, pool: &KvPool, run: &KvRun) {
        let stats = pool.stats();
        self.block_size = pool.block_size();
        self.block_bytes = pool.block_bytes();
        self.prefill_tokens += run.prefilled.0;
        self.prefill_tokens_unshared += run.prefilled.1;
        self.peak_blocks = self.peak_blocks.max(stats.peak_in_use);
        self.peak_blocks_unshared = self.peak_blocks_unshared.max(run.unshared_peak);
        self.peak_bytes = self.peak_blocks * self.block_bytes;
        self.cow_copies += stats.cow_copies;
        self.peak_batch = self.peak_batch.max(run.peak_batch);
        self.preemptions += run.preemptions;
        self.recomputed_tokens += run.recomputed_tokens;
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct DecodeStepCounts {
    pub batch: usize,
    #[serde(flatten)]
    pub counts: Counts,
}

/// [`generate`] for prompts numbered from `first_index` (RNG streams follow the numbers, so a
/// file split into chunks samples exactly as in one call). Completions come back ordered by
/// (prompt, sample).
pub fn generate_indexed(
    model: &Model,
    prompts: &[Vec<u32>],
    first_index: usize,
    cfg: &SamplingConfig,
    tok: Option<&Tokenizer>,
) -> Result<Vec<Completion>> {
    generate_counted(model, prompts, first_index, cfg, tok, None)
}

/// [`generate_indexed`] that adds each step's device work to `log` (a model on a GPU device;
/// on the cpu there is no device work to count) and the KV cache's figures (every device).
pub fn generate_counted(
    model: &Model,
    prompts: &[Vec<u32>],
    first_index: usize,
    cfg: &SamplingConfig,
    tok: Option<&Tokenizer>,
    mut log: Option<&mut StepCounts>,
) -> Result<Vec<Completion>> {
    let counted = model.device().gpu().ok().filter(|_| log.is_some());
    ensure!(cfg.n >= 1, "n (samples per prompt) must be at least 1");
    ensure!(
        cfg.temperature >= 0.0 && cfg.temperature.is_finite(),
        "temperature must be ≥ 0, got {}",
        cfg.temperature
    );
    ensure!(cfg.top_p > 0.0 && cfg.top_p <= 1.0, "top_p must be in (0, 1], got {}", cfg.top_p);
    if !cfg.stop_strings.is_empty() && tok.is_none() {
        bail!("stop strings need a tokenizer");
    }
    let vocab = model.config.vocab_size;
    let ctx = model.config.max_position_embeddings;
    for (i, p) in prompts.iter().enumerate() {
        ensure!(!p.is_empty(), "prompt {} is empty", first_index + i);
        ensure!(p.len() < ctx, "prompt {} has {} tokens; the model's context (max_position_embeddings) is {ctx}, with room for at least one new token", first_index + i, p.len());
        if let Some(&bad) = p.iter().find(|&&t| t as usize >= vocab) {
            bail!("prompt {}: token id {bad} is outside the vocabulary of {vocab}", first_index + i);
        }
    }
    let n = cfg.n;
    let mut out: Vec<Option<Completion>> = vec![None; prompts.len() * n];
    if cfg.max_new_tokens == 0 {
        for (i, _) in prompts.iter().enumerate() {
            for j in 0..n {
                out[i * n + j] = Some(Completion {
                    prompt_index: first_index + i,
                    sample_index: j,
                    new_ids: vec![],
                    logprobs: vec![],
                    entropy: vec![],
                    finish_reason: FinishReason::Length,
                    stop_string: None,
                });
            }
        }
        return Ok(out.into_iter().map(Option::unwrap).collect());
    }
    let eos: Vec<u32> = if cfg.ignore_eos { vec![] } else { model.config.eos_token_ids.clone() };
    let max_batch = if cfg.max_batch == 0 { usize::MAX } else { cfg.max_batch };
    let params = cfg.sampler();
    let pool = KvPool::new(model.kv_shape(), cfg.kv_block_size)?;
    let limited = cfg.max_batch_tokens > 0;
    if limited {
        let (longest, budget) = (prompts.iter().map(Vec::len).max().unwrap_or(0), cfg.max_batch_tokens);
        let one = pool.blocks_for((longest + cfg.max_new_tokens).min(ctx));
        ensure!(
            pool.blocks_for(budget) >= one,
            "--max-batch-tokens {budget} is too small: one sample of the longest prompt ({longest} tokens) with up to {} new tokens needs {} positions ({one} blocks of {})",
            cfg.max_new_tokens,
            one * pool.block_size(),
            pool.block_size()
        );
        pool.set_limit(pool.blocks_for(budget));
        if model.device().is_gpu() {
            // The budget is the user's to spend: allocated once, no decode step allocates.
            pool.reserve(pool.blocks_for(budget))?;
        }
    }
    let mut kv = KvRun::default();
    // Without a budget, a GPU pool holds from a group's admission every block its samples can
    // need (up to GPU_RESERVE new positions each), so no decode step allocates; `committed`
    // counts those of the groups running, `left` their running samples.
    let reserve = |p: usize| {
        if model.device().is_gpu() && !limited {
            group_blocks(&pool, prompts[p].len(), n, cfg.max_new_tokens.min(GPU_RESERVE), ctx)
        } else {
            0
        }
    };
    let (mut committed, mut left) = (0usize, vec![0usize; prompts.len()]);
    // Stop strings: the text of the last few tokens is enough to see one complete.
    let window = cfg.stop_strings.iter().map(|s| s.len()).max().unwrap_or(0) + 4;

    let mut gpu = GpuState::new(model, cfg, (prompts.len() * n).min(max_batch.max(n)), pool.block_size())?;
    let bar = progress_bar(cfg.progress, (prompts.len() * n) as u64);
    let mut queue: VecDeque<usize> = (0..prompts.len()).collect();
    let mut live: Vec<Live> = Vec::new();
    // Samples preempted for blocks, oldest admission first: they come back before new prompts.
    let mut parked: VecDeque<Live> = VecDeque::new();
    let mut tickets = 0usize;
    loop {
        // The running samples' next positions first, the latest admitted giving its blocks up
        // when the budget runs out (vLLM's policy: it is recomputed later).
        live.sort_by_key(|s| s.ticket);
        let mut i = 0;
        while i < live.len() {
            match live[i].cache.prepare(1) {
                Ok(()) => i += 1,
                Err(e) if e.is::<OutOfBlocks>() && live.len() > 1 => {
                    let mut v = live.pop().expect("a running sample");
                    v.cache = SeqCache::new(&pool);
                    kv.preemptions += 1;
                    let at = parked.partition_point(|p| p.ticket < v.ticket);
                    parked.insert(at, v);
                }
                Err(e) => return Err(e),
            }
        }
        // Then preempted samples, then whole prompt groups, while slots and blocks remain (always
        // one when nothing runs). Prompt tokens per step are capped too, so a burst of long
        // prompts does not make one huge prefill (its activations scale with its tokens).
        let mut resumed: Vec<(Live, Vec<u32>)> = Vec::new();
        let mut prefill_tokens = 0;
        while let Some(s) = parked.front() {
            let feed: Vec<u32> = prompts[s.prompt].iter().chain(&s.new_ids).copied().collect();
            let running = live.len() + resumed.len();
            let fits = running < max_batch
                && (prefill_tokens + feed.len() <= MAX_PREFILL_TOKENS || resumed.is_empty())
                && pool.free_blocks() > pool.blocks_for(feed.len());
            if !fits && running > 0 {
                break;
            }
            let mut s = parked.pop_front().expect("a parked sample");
            s.cache.prepare(feed.len())?;
            prefill_tokens += feed.len();
            kv.recomputed_tokens += feed.len();
            resumed.push((s, feed));
        }
        let mut admitted: Vec<(usize, SeqCache)> = Vec::new();
        let (mut prompt_blocks, mut reserved) = (0, 0);
        while let Some(&p) = queue.front().filter(|_| parked.is_empty()) {
            let (len, others) = (prompts[p].len(), live.len() + resumed.len());
            let slots = others + (admitted.len() + 1) * n <= max_batch;
            let blocks = !limited || pool.free_blocks() >= pool.blocks_for(len) + n;
            if !(slots && blocks && prefill_tokens + len <= MAX_PREFILL_TOKENS) {
                // What does not fit waits, but for the first group of a step: a long prompt
                // still goes (alone among prefills), and so does a group larger than the batch
                // or than the free blocks when nothing else runs.
                if !admitted.is_empty() || (others > 0 && !(slots && blocks)) {
                    break;
                }
            }
            // The prompts' blocks before the prefill, the rest of the groups' after it (so the
            // reservation does not stand beside the prefill's activations).
            prompt_blocks += pool.blocks_for(len);
            if model.device().is_gpu() && !limited {
                pool.reserve(committed + prompt_blocks)?;
            }
            let mut c = SeqCache::new(&pool);
            c.prepare(len)?;
            queue.pop_front();
            prefill_tokens += len;
            reserved += reserve(p);
            admitted.push((p, c));
            left[p] = n;
        }
        committed += reserved;
        kv.prefilled.0 += admitted.iter().map(|(p, _)| prompts[*p].len()).sum::<usize>();
        kv.prefilled.1 += n * admitted.iter().map(|(p, _)| prompts[*p].len()).sum::<usize>();
        if live.is_empty() && resumed.is_empty() && admitted.is_empty() {
            ensure!(queue.is_empty() && parked.is_empty(), "the rollout scheduler admitted nothing");
            break;
        }
        let before = counted.as_ref().map(|d| (d.counts(), live.len(), resumed.len() + admitted.len() > 0));
        let lasts: Vec<[u32; 1]> = live.iter().map(|s| [s.last]).collect();
        let pure_decode = admitted.is_empty() && resumed.is_empty();
        let logits = {
            let mut steps: Vec<Step> = Vec::with_capacity(live.len() + resumed.len() + admitted.len());
            for (s, t) in live.iter_mut().zip(&lasts) {
                steps.push(Step { cache: &mut s.cache, tokens: t });
            }
            for (s, feed) in resumed.iter_mut() {
                steps.push(Step { cache: &mut s.cache, tokens: feed });
            }
            for (p, c) in admitted.iter_mut() {
                steps.push(Step { cache: c, tokens: &prompts[*p] });
            }
            forward_step(model, gpu.as_mut(), &mut steps, pure_decode)?
        };
        if !limited {
            pool.reserve(committed)?;
        }
        live.extend(resumed.into_iter().map(|(s, _)| s));
        for (i, s) in live.iter_mut().enumerate() {
            s.row = i;
        }
        let (base, rows) = (live.len(), live.len() + admitted.len());
        for (k, (p, c)) in admitted.into_iter().enumerate() {
            for j in 0..n {
                live.push(Live {
                    prompt: p,
                    sample: j,
                    cache: c.fork(),
                    rng: sample_rng(cfg.seed, first_index + p, j),
                    last: 0,
                    row: base + k,
                    draw: None,
                    new_ids: Vec::with_capacity(cfg.max_new_tokens),
                    logprobs: Vec::with_capacity(cfg.max_new_tokens),
                    entropy: Vec::with_capacity(cfg.max_new_tokens),
                    ticket: tickets,
                });
                tickets += 1;
            }
        }
        kv.peak_batch = kv.peak_batch.max(live.len());
        if let Some(GpuState { ws, sampler: Some(d) }) = gpu.as_mut() {
            let (buf, dtype, rows) = logits.on_device(ws.as_ref(), vocab)?;
            let jobs: Vec<DrawJob> = live
                .iter()
                .map(|s| DrawJob {
                    row: s.row,
                    u: device_uniform(cfg.seed, first_index + s.prompt, s.sample, s.new_ids.len()),
                })
                .collect();
            for (s, dr) in live.iter_mut().zip(d.draw(buf, dtype, rows, vocab, &params, &jobs)?) {
                s.draw = Some(dr);
            }
        } else {
            let host = logits.on_host(gpu.as_ref().and_then(|g| g.ws.as_ref()), rows)?;
            live.par_iter_mut().for_each(|s| {
                s.draw =
                    Some(sampler::sample(&host[s.row * vocab..(s.row + 1) * vocab], &params, &mut s.rng));
            });
        }
        // Blocks these sequences would hold with nothing shared (each its own prompt copy).
        let held: usize = live.iter().map(|s| pool.blocks_for(s.cache.len())).sum();
        kv.unshared_peak = kv.unshared_peak.max(held);
        let mut still = Vec::with_capacity(live.len());
        for mut s in live.drain(..) {
            let d = s.draw.take().unwrap();
            s.new_ids.push(d.token);
            s.logprobs.push(d.logprob);
            s.entropy.push(d.entropy);
            s.last = d.token;
            let mut finish = None;
            let mut stop_string = None;
            if eos.contains(&d.token) || cfg.stop_ids.contains(&d.token) {
                finish = Some(FinishReason::Stop);
            } else if let (false, Some(t)) = (cfg.stop_strings.is_empty(), tok) {
                let from = s.new_ids.len().saturating_sub(window);
                let text = t.decode(&s.new_ids[from..], false)?;
                if let Some(hit) = cfg.stop_strings.iter().find(|x| text.contains(x.as_str())) {
                    finish = Some(FinishReason::Stop);
                    stop_string = Some(hit.clone());
                }
            }
            // The context ends like the token budget does: no position left for another token.
            if finish.is_none()
                && (s.new_ids.len() >= cfg.max_new_tokens || prompts[s.prompt].len() + s.new_ids.len() >= ctx)
            {
                finish = Some(FinishReason::Length);
            }
            match finish {
                Some(reason) => {
                    bar.inc(1);
                    left[s.prompt] -= 1;
                    if left[s.prompt] == 0 {
                        committed -= reserve(s.prompt);
                    }
                    out[s.prompt * n + s.sample] = Some(Completion {
                        prompt_index: first_index + s.prompt,
                        sample_index: s.sample,
                        new_ids: s.new_ids,
                        logprobs: s.logprobs,
                        entropy: s.entropy,
                        finish_reason: reason,
                        stop_string,
                    });
                }
                None => still.push(s),
            }
        }
        live = still;
        if let (Some(d), Some((c0, batch, prefill)), Some(log)) = (&counted, before, log.as_deref_mut()) {
            let counts = d.counts() - c0;
            if prefill {
                log.prefill += counts;
                log.prefill_steps += 1;
            } else {
                log.decode_steps.push(DecodeStepCounts { batch, counts });
            }
        }
    }
    bar.finish_and_clear();
    if let Some(log) = log {
        log.kv.add(&pool, &kv);
    }
    Ok(out.into_iter().map(|c| c.expect("every sample finishes")).collect())
}

/// What a rollout keeps on a GPU device from step to step: the batched decode step's workspace
/// (`None` when the model has no batched step) and the device sampler (`None` with
/// `host_sampler`). Allocated once per call, sized for its largest batch.
pub(crate) struct GpuState {
    pub(crate) ws: Option<DecodeWorkspace>,
    sampler: Option<DeviceSampler>,
}

impl GpuState {
    pub(crate) fn new(
        model: &Model,
        cfg: &SamplingConfig,
        cap: usize,
        block_size: usize,
    ) -> Result<Option<GpuState>> {
        let Ok(dev) = model.device().gpu() else { return Ok(None) };
        let mut ws = if model.batched_decode_supported() {
            Some(DecodeWorkspace::new(model, cap, block_size)?)
        } else {
            None
        };
        if let (Some(ws), Some(on)) = (ws.as_mut(), cfg.decode_graphs) {
            ws.set_graphs(on);
        }
        let sampler = if cfg.host_sampler { None } else { Some(DeviceSampler::new(&dev, cap)?) };
        Ok(Some(GpuState { ws, sampler }))
    }
}

/// The logits of one step: on the host, in the batched step's workspace (its first rows), or a
/// device tensor `[rows, vocab]` (the per-op path, for steps that prefill prompts).
pub(crate) enum StepLogits {
    Host(Vec<f32>),
    Workspace(usize),
    Device(Tensor),
}

impl StepLogits {
    /// The device buffer, its dtype and rows (for the device sampler).
    fn on_device<'a>(
        &'a self,
        ws: Option<&'a DecodeWorkspace>,
        vocab: usize,
    ) -> Result<(&'a crate::backend::GpuBuffer, DType, usize)> {
        match self {
            StepLogits::Workspace(rows) => {
                let (b, dt) = ws.expect("a workspace step has a workspace").logits();
                Ok((b, dt, *rows))
            }
            StepLogits::Device(t) => {
                let g = t.gpu_storage().ok_or_else(|| anyhow::anyhow!("device logits on the cpu"))?;
                Ok((&g.buf, g.dtype, g.len / vocab))
            }
            StepLogits::Host(_) => bail!("the device sampler needs the logits on the device"),
        }
    }

    /// The logits on the host as f32 (the host sampler).
    pub(crate) fn on_host(self, ws: Option<&DecodeWorkspace>, rows: usize) -> Result<Vec<f32>> {
        match self {
            StepLogits::Host(v) => Ok(v),
            StepLogits::Workspace(_) => ws.expect("a workspace step has a workspace").download_logits(rows),
            StepLogits::Device(t) => Ok(t.host_f32()?.into_owned()),
        }
    }
}

/// One generation step's forward: the batched decode step when every step decodes one token
/// (`pure_decode`) and the model has one, else the per-op path, leaving the logits on the device
/// for the device sampler.
pub(crate) fn forward_step(
    model: &Model,
    gpu: Option<&mut GpuState>,
    steps: &mut [Step],
    pure_decode: bool,
) -> Result<StepLogits> {
    let Some(g) = gpu else { return Ok(StepLogits::Host(model.forward_cached(steps)?)) };
    if let Some(ws) = g.ws.as_mut().filter(|w| pure_decode && steps.len() <= w.capacity()) {
        model.decode_step_gpu(steps, ws)?;
        return Ok(StepLogits::Workspace(steps.len()));
    }
    if g.sampler.is_some() {
        let t = model.forward_cached_device(steps)?;
        // The sampler reads bf16 or f32 (an f16 model computes its logits in f32 anyway).
        let t = if t.dtype() == DType::F16 { t.to_dtype(DType::F32)? } else { t };
        return Ok(StepLogits::Device(t));
    }
    Ok(StepLogits::Host(model.forward_cached(steps)?))
}

fn progress_bar(on: bool, total: u64) -> indicatif::ProgressBar {
    if !on || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} generate [{elapsed_precise}] {bar:30} {pos}/{len} samples ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}
