//! The decode loop of `fcgpu serve`: one thread owns the model and runs a continuous batch.
//!
//! Requests wait in a bounded channel (the queue). Between two decode steps the loop admits
//! waiting requests while their samples fit in `max_batch` slots and the paged KV cache has
//! blocks for them (`--max-batch-tokens` positions in all); an admitted prompt is prefilled in
//! the same forward pass as the others' next token (as `rollout::generate` does), and its `n`
//! samples share the blocks of that prompt. A prompt that starts like a recent one prefills only
//! what follows the shared part: the prefix cache ([`super::prefix_cache`]) keeps recent
//! prompts' blocks until their room is needed. When blocks run out mid-decode, the prefix cache
//! gives its blocks up first, then the latest admitted sample, which is recomputed (its prompt
//! and tokens so far prefilled again) once blocks free up: vLLM's policy.
//!
//! On a GPU device a step where every sample feeds one token is the batched decode step
//! (`Model::decode_step_gpu`, a fixed number of launches whatever the batch) in a workspace
//! allocated once; the logits come to the host, where each request's sampler draws.
//!
//! Every sample streams its text back through the request's channel; a request whose receiver
//! is gone (client disconnected) leaves the batch at the next step, freeing its slots and
//! blocks. The loop ends once every sender of the queue is dropped and the batch is empty, so
//! dropping the [`EngineHandle`] drains in-flight work.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Arc;

use anyhow::Result;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use tokio::sync::mpsc::UnboundedSender;

use super::prefix_cache::PrefixCache;
use crate::model::decode::Step;
use crate::model::kv_cache::{KvPool, OutOfBlocks, SeqCache};
use crate::model::tokenizer::Tokenizer;
use crate::model::Model;
use crate::rollout::{sample_rng, sampler, GpuState, SamplerParams};

/// What a request asks of the decode loop.
pub struct Job {
    pub prompt: Vec<u32>,
    pub n: usize,
    /// Already capped so that prompt + new tokens fit the context.
    pub max_tokens: usize,
    pub params: SamplerParams,
    pub seed: u64,
    pub stop: Vec<String>,
    /// Once a sample's text contains `.0`, the tokens `.1` are appended to it (fed to the model,
    /// sent as its text) and sampling goes on: how a forced tool call starts after the model's
    /// reasoning.
    pub then: Option<(String, Vec<u32>)>,
    pub events: UnboundedSender<Event>,
}

/// Why a sample ended (OpenAI's `finish_reason`, before tool calls are recognised).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    Stop,
    Length,
}

/// What the decode loop sends back for one request.
#[derive(Debug)]
pub enum Event {
    /// New text of sample `sample` (may be empty when a token only completes nothing yet).
    Text { sample: usize, text: String },
    /// Sample `sample` ended after `tokens` generated tokens.
    Done { sample: usize, finish: Finish, tokens: usize },
    /// The forward pass failed; the request's samples are dropped.
    Failed(String),
}

/// Counters the decode loop keeps, shown by `GET /health`.
#[derive(Default, Debug)]
pub struct Stats {
    /// Samples in the running batch.
    pub running: AtomicUsize,
    /// Samples ended early because their client went away.
    pub cancelled: AtomicU64,
    /// Samples finished.
    pub finished: AtomicU64,
    /// Blocks of the paged KV cache in use (running samples and the prefix cache), allocated in
    /// all, the budget (`--max-batch-tokens`), and held by the prefix cache.
    pub kv_blocks_in_use: AtomicUsize,
    pub kv_blocks_allocated: AtomicUsize,
    pub kv_blocks_limit: AtomicUsize,
    pub prefix_cache_blocks: AtomicUsize,
    /// Prompt tokens prefilled, and those a prefix-cache hit spared (requests that hit).
    pub prompt_tokens_computed: AtomicU64,
    pub prefix_cache_hits: AtomicU64,
    pub prefix_cache_tokens: AtomicU64,
    /// Samples that gave their blocks up for older ones (recomputed later).
    pub preemptions: AtomicU64,
    /// A request waits for KV blocks (not for a batch slot): the queue then answers 503.
    pub waiting_for_blocks: AtomicBool,
    /// Steps at which a request waited for KV blocks.
    pub block_waits: AtomicU64,
    /// The most samples decoded at once so far (with a budget: what fits it).
    pub peak_running: AtomicUsize,
}

impl Stats {
    fn set_running(&self, live: usize, pool: &KvPool, prefix: &PrefixCache) {
        self.running.store(live, Ordering::Relaxed);
        self.peak_running.fetch_max(live, Ordering::Relaxed);
        let kv = pool.stats();
        self.kv_blocks_in_use.store(kv.in_use, Ordering::Relaxed);
        self.kv_blocks_allocated.store(kv.allocated, Ordering::Relaxed);
        self.prefix_cache_blocks.store(prefix.blocks(), Ordering::Relaxed);
    }
}

/// The submitting side of the queue.
#[derive(Clone)]
pub struct EngineHandle {
    tx: SyncSender<Job>,
    pub stats: Arc<Stats>,
}

/// Why a job was not queued.
pub enum SubmitError {
    QueueFull,
    ShuttingDown,
}

impl EngineHandle {
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        self.tx.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => SubmitError::QueueFull,
            TrySendError::Disconnected(_) => SubmitError::ShuttingDown,
        })
    }
}

/// A bounded queue of `max_queue` waiting jobs and its receiving end for [`run`].
pub fn queue(max_queue: usize) -> (EngineHandle, Receiver<Job>) {
    let (tx, rx) = std::sync::mpsc::sync_channel(max_queue.max(1));
    (EngineHandle { tx, stats: Arc::default() }, rx)
}

/// How the decode loop schedules (see `fcgpu serve --help`).
#[derive(Clone, Copy, Debug)]
pub struct EngineConfig {
    /// Most samples decoded at once.
    pub max_batch: usize,
    /// Most KV positions held at once (running samples and the prefix cache).
    pub max_batch_tokens: usize,
    /// Most positions the prefix cache keeps (0: off).
    pub prefix_cache_tokens: usize,
}

/// One running sample.
struct Live {
    job: Arc<JobShared>,
    sample: usize,
    cache: SeqCache,
    rng: ChaCha8Rng,
    last: u32,
    row: usize,
    ids: Vec<u32>,
    /// Bytes of the decoded text already sent.
    sent: usize,
    /// Forced tokens to feed after `last` at the next step (see [`Job::then`]).
    pending: Vec<u32>,
    /// `then` has been applied (once per sample).
    forced: bool,
    /// Admission order: when blocks run out, the latest admitted gives its blocks up first.
    ticket: u64,
}

/// The parts of a job its samples share.
struct JobShared {
    prompt: Vec<u32>,
    max_tokens: usize,
    params: SamplerParams,
    stop: Vec<String>,
    then: Option<(String, Vec<u32>)>,
    events: UnboundedSender<Event>,
}

/// What runs at the next step besides the running samples' next tokens.
#[derive(Default)]
struct Admitted {
    /// Preempted samples coming back: their cache is refilled with prompt and tokens so far.
    resumed: Vec<(Live, Vec<u32>)>,
    /// New jobs: a cache (a prefix-cache hit's positions, or empty) and the prompt tokens after it.
    jobs: Vec<(Job, SeqCache, usize)>,
    /// Something waits for KV blocks (not for a batch slot).
    blocked: bool,
}

impl Admitted {
    fn is_empty(&self) -> bool {
        self.resumed.is_empty() && self.jobs.is_empty()
    }
}

/// The decode loop's state between steps.
struct Engine<'a> {
    model: &'a Model,
    tok: &'a Tokenizer,
    cfg: EngineConfig,
    pool: &'a Arc<KvPool>,
    stats: &'a Stats,
    live: Vec<Live>,
    /// Preempted samples, oldest admission first: they come back before new jobs.
    parked: VecDeque<Live>,
    waiting: VecDeque<Job>,
    prefix: PrefixCache,
    gpu: Option<GpuState>,
    tickets: u64,
}

/// Runs the continuous batch until the queue is closed and drained; caches draw from `pool`.
pub fn run(
    model: &Model,
    tok: &Tokenizer,
    jobs: Receiver<Job>,
    cfg: EngineConfig,
    pool: &Arc<KvPool>,
    stats: &Stats,
) {
    let gpu = match serve_gpu_state(model, cfg.max_batch, pool.block_size()) {
        Ok(g) => g,
        Err(e) => {
            // Without its workspace the loop still runs on the per-op path.
            eprintln!("fcgpu serve: the batched decode step is off: {e:#}");
            None
        }
    };
    pool.set_limit(pool.blocks_for(cfg.max_batch_tokens).max(1));
    stats.kv_blocks_limit.store(pool.blocks_for(cfg.max_batch_tokens), Ordering::Relaxed);
    let mut e = Engine {
        model,
        tok,
        cfg,
        pool,
        stats,
        live: Vec::new(),
        parked: VecDeque::new(),
        waiting: VecDeque::new(),
        prefix: PrefixCache::new(pool.blocks_for(cfg.prefix_cache_tokens)),
        gpu,
        tickets: 0,
    };
    let mut closed = false;
    loop {
        // Nothing running: block for the next job (or learn that the queue is closed).
        if e.live.is_empty() && e.parked.is_empty() && e.waiting.is_empty() {
            if closed {
                return;
            }
            match jobs.recv() {
                Ok(j) => e.waiting.push_back(j),
                Err(_) => return,
            }
        }
        // Take what waits in the channel only while it could fit, so the channel stays the
        // bounded queue that answers 429 (or 503 while requests wait for blocks).
        while !closed && e.samples() + e.waiting.iter().map(|j| j.n).sum::<usize>() < cfg.max_batch {
            match jobs.try_recv() {
                Ok(j) => e.waiting.push_back(j),
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => closed = true,
            }
        }
        e.drop_cancelled();
        let step = e.prepare_running().and_then(|()| {
            let admitted = e.admit()?;
            e.stats.waiting_for_blocks.store(admitted.blocked, Ordering::Relaxed);
            e.stats.block_waits.fetch_add(admitted.blocked as u64, Ordering::Relaxed);
            e.stats.set_running(e.live.len(), pool, &e.prefix);
            if e.live.is_empty() && admitted.is_empty() {
                return Ok(());
            }
            e.step(admitted)
        });
        e.stats.set_running(e.live.len(), pool, &e.prefix);
        if let Err(err) = step {
            let msg = format!("{err:#}");
            for s in e.live.drain(..).chain(e.parked.drain(..)) {
                let _ = s.job.events.send(Event::Failed(msg.clone()));
            }
            e.stats.set_running(0, pool, &e.prefix);
        }
    }
}

/// The batched decode step's workspace on a GPU device (the host samples: requests differ in
/// their sampling parameters); `None` on the cpu or for a model without one.
fn serve_gpu_state(model: &Model, cap: usize, block_size: usize) -> Result<Option<GpuState>> {
    let cfg = crate::rollout::SamplingConfig { host_sampler: true, ..Default::default() };
    GpuState::new(model, &cfg, cap, block_size)
}

impl Engine<'_> {
    /// Samples running or preempted.
    fn samples(&self) -> usize {
        self.live.len() + self.parked.len()
    }

    /// Samples whose client went away leave at once, freeing their blocks.
    fn drop_cancelled(&mut self) {
        let before = self.samples();
        self.live.retain(|s| !s.job.events.is_closed());
        self.parked.retain(|s| !s.job.events.is_closed());
        self.stats.cancelled.fetch_add((before - self.samples()) as u64, Ordering::Relaxed);
    }

    /// Blocks for every running sample's next positions, oldest first. When they run out the
    /// prefix cache gives its blocks up first, then the latest admitted sample (recomputed later).
    fn prepare_running(&mut self) -> Result<()> {
        self.live.sort_by_key(|s| s.ticket);
        let mut i = 0;
        while i < self.live.len() {
            let s = &mut self.live[i];
            match s.cache.prepare(1 + s.pending.len()) {
                Ok(()) => i += 1,
                Err(err) if err.is::<OutOfBlocks>() => {
                    if self.prefix.evict_lru() {
                        continue;
                    }
                    if self.live.len() == 1 {
                        return Err(
                            err.context("one sample alone needs more KV blocks than --max-batch-tokens")
                        );
                    }
                    let mut v = self.live.pop().expect("a running sample");
                    v.cache = SeqCache::new(self.pool);
                    v.pending.clear();
                    self.stats.preemptions.fetch_add(1, Ordering::Relaxed);
                    let at = self.parked.partition_point(|p| p.ticket < v.ticket);
                    self.parked.insert(at, v);
                }
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }

    /// Until `blocks` are free, drops prefix-cache entries; false when they still are not.
    fn make_room(&mut self, blocks: usize) -> bool {
        while self.pool.free_blocks() < blocks {
            if !self.prefix.evict_lru() {
                return false;
            }
        }
        true
    }

    /// Preempted samples, then waiting jobs, while batch slots and KV blocks remain (always
    /// one when nothing runs). Jobs whose client is gone are dropped here.
    fn admit(&mut self) -> Result<Admitted> {
        let mut a = Admitted::default();
        let (bs, max_batch) = (self.pool.block_size(), self.cfg.max_batch);
        let mut prefill = 0;
        while let Some(s) = self.parked.front() {
            let feed: Vec<u32> = s.job.prompt.iter().chain(&s.ids).copied().collect();
            let running = self.live.len() + a.resumed.len();
            let slots = running < max_batch && prefill + feed.len() <= crate::rollout::MAX_PREFILL_TOKENS;
            if running > 0 && !(slots && self.make_room(self.pool.blocks_for(feed.len()) + 1)) {
                a.blocked |= slots;
                break;
            }
            let mut s = self.parked.pop_front().expect("a parked sample");
            s.cache.prepare(feed.len())?;
            prefill += feed.len();
            a.resumed.push((s, feed));
        }
        while self.parked.is_empty() {
            let Some(j) = self.waiting.front() else { break };
            if j.events.is_closed() {
                self.stats.cancelled.fetch_add(j.n as u64, Ordering::Relaxed);
                self.waiting.pop_front();
                continue;
            }
            let running =
                self.live.len() + a.resumed.len() + a.jobs.iter().map(|(j, _, _)| j.n).sum::<usize>();
            if running > 0
                && (running + j.n > max_batch
                    || prefill + j.prompt.len() > crate::rollout::MAX_PREFILL_TOKENS)
            {
                break;
            }
            let (cache, from) = match self.prefix.lookup(&j.prompt, bs) {
                Some(c) => {
                    let n = c.len();
                    (c, n)
                }
                None => (SeqCache::new(self.pool), 0),
            };
            // The prompt's remaining blocks (one more if it copies a shared partial block) and
            // a block for each sample's first tokens.
            let need = self.pool.blocks_for(j.prompt.len()) - from / bs + 1 + j.n;
            if !self.make_room(need) && running > 0 {
                a.blocked = true;
                break;
            }
            let j = self.waiting.pop_front().expect("a waiting job");
            let mut cache = cache;
            if let Err(err) = cache.prepare(j.prompt.len() - from) {
                let _ = j.events.send(Event::Failed(format!("{err:#}")));
                continue;
            }
            prefill += j.prompt.len() - from;
            if from > 0 {
                self.stats.prefix_cache_hits.fetch_add(1, Ordering::Relaxed);
                self.stats.prefix_cache_tokens.fetch_add(from as u64, Ordering::Relaxed);
            }
            self.stats.prompt_tokens_computed.fetch_add((j.prompt.len() - from) as u64, Ordering::Relaxed);
            a.jobs.push((j, cache, from));
        }
        Ok(a)
    }

    /// One forward pass: the next token of every running sample, the recompute of resumed ones
    /// and the prefill of admitted jobs; then a token for each of them.
    fn step(&mut self, mut admitted: Admitted) -> Result<()> {
        let vocab = self.model.config.vocab_size;
        // Each sample's last token, then any forced tokens (the logits are those of the last fed).
        let feeds: Vec<Vec<u32>> = self
            .live
            .iter_mut()
            .map(|s| std::iter::once(s.last).chain(s.pending.drain(..)).collect())
            .collect();
        let pure_decode = admitted.is_empty() && feeds.iter().all(|f| f.len() == 1);
        let rows = self.live.len() + admitted.resumed.len() + admitted.jobs.len();
        let logits = {
            let mut steps: Vec<Step> = Vec::with_capacity(rows);
            for (s, t) in self.live.iter_mut().zip(&feeds) {
                steps.push(Step { cache: &mut s.cache, tokens: t });
            }
            for (s, feed) in admitted.resumed.iter_mut() {
                steps.push(Step { cache: &mut s.cache, tokens: feed });
            }
            for (j, c, from) in admitted.jobs.iter_mut() {
                steps.push(Step { cache: c, tokens: &j.prompt[*from..] });
            }
            let out = crate::rollout::forward_step(self.model, self.gpu.as_mut(), &mut steps, pure_decode);
            let out = match out {
                Ok(o) => o,
                Err(err) => {
                    let msg = format!("{err:#}");
                    for (j, _, _) in &admitted.jobs {
                        let _ = j.events.send(Event::Failed(msg.clone()));
                    }
                    for (s, _) in &admitted.resumed {
                        let _ = s.job.events.send(Event::Failed(msg.clone()));
                    }
                    return Err(err);
                }
            };
            out.on_host(self.gpu.as_ref().and_then(|g| g.ws.as_ref()), rows)?
        };
        self.live.extend(admitted.resumed.drain(..).map(|(s, _)| s));
        for (i, s) in self.live.iter_mut().enumerate() {
            s.row = i;
        }
        let base = self.live.len();
        for (k, (j, c, _)) in admitted.jobs.into_iter().enumerate() {
            self.prefix.insert(&j.prompt, &c);
            let shared = Arc::new(JobShared {
                prompt: j.prompt,
                max_tokens: j.max_tokens,
                params: j.params,
                stop: j.stop,
                then: j.then,
                events: j.events,
            });
            for sample in 0..j.n {
                self.live.push(Live {
                    job: shared.clone(),
                    sample,
                    cache: c.fork(),
                    rng: sample_rng(j.seed, 0, sample),
                    last: 0,
                    row: base + k,
                    ids: Vec::new(),
                    sent: 0,
                    pending: Vec::new(),
                    forced: false,
                    ticket: self.tickets,
                });
                self.tickets += 1;
            }
        }
        let (eos, ctx) = (&self.model.config.eos_token_ids, self.model.config.max_position_embeddings);
        // Draws in parallel (each sample's own stream; a softmax over the vocabulary each), the
        // text and the events in order.
        let draws: Vec<u32> = self
            .live
            .par_iter_mut()
            .map(|s| {
                sampler::sample(&logits[s.row * vocab..(s.row + 1) * vocab], &s.job.params, &mut s.rng).token
            })
            .collect();
        let mut still = Vec::with_capacity(self.live.len());
        for (mut s, token) in self.live.drain(..).zip(draws) {
            s.ids.push(token);
            s.last = token;
            let mut finish = eos.contains(&token).then_some(Finish::Stop);
            let mut text = self.tok.decode(&s.ids, true)?;
            if let (Some((trigger, forced)), false, None) = (&s.job.then, s.forced, finish) {
                if text.contains(trigger.as_str()) {
                    s.forced = true;
                    s.pending = forced.clone();
                    s.ids.extend_from_slice(forced);
                    text = self.tok.decode(&s.ids, true)?;
                }
            }
            let (end, hit) = sendable(&text, &s.job.stop, finish.is_some());
            if hit {
                finish = Some(Finish::Stop);
            }
            if finish.is_none()
                && (s.ids.len() >= s.job.max_tokens || s.job.prompt.len() + s.ids.len() >= ctx)
            {
                finish = Some(Finish::Length);
            }
            // At the end everything not cut by a stop string goes out.
            let end = if finish.is_some() && !hit { text.len() } else { end };
            if end > s.sent {
                let _ =
                    s.job.events.send(Event::Text { sample: s.sample, text: text[s.sent..end].to_string() });
                s.sent = end;
            }
            match finish {
                Some(finish) => {
                    self.stats.finished.fetch_add(1, Ordering::Relaxed);
                    let _ = s.job.events.send(Event::Done { sample: s.sample, finish, tokens: s.ids.len() });
                }
                None => still.push(s),
            }
        }
        self.live = still;
        Ok(())
    }
}

/// How much of `text` can be sent now, and whether a stop string ended it. Text that could be
/// the start of a stop string is held back, and so is an incomplete UTF-8 character (decoded as
/// U+FFFD at the end).
fn sendable(text: &str, stop: &[String], ended: bool) -> (usize, bool) {
    if let Some(i) = stop.iter().filter_map(|s| text.find(s.as_str())).min() {
        return (i, true);
    }
    if ended {
        return (text.len(), false);
    }
    let mut end = text.len();
    if text.ends_with('\u{FFFD}') {
        end -= '\u{FFFD}'.len_utf8();
    }
    for s in stop {
        for (k, _) in s.char_indices().skip(1) {
            if text[..end].ends_with(&s[..k]) {
                end = end.min(text.len() - k);
            }
        }
    }
    let mut end = end.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (end, false)
}

#[cfg(test)]
mod tests {
    use super::sendable;

    #[test]
    fn holds_back_a_possible_stop_string_start() {
        let stop = vec!["END".to_string()];
        assert_eq!(sendable("abcE", &stop, false), (3, false));
        assert_eq!(sendable("abcEN", &stop, false), (3, false));
        assert_eq!(sendable("abcENDx", &stop, false), (3, true));
        assert_eq!(sendable("abcx", &stop, false), (4, false));
        assert_eq!(sendable("ab\u{FFFD}", &[], false), (2, false));
        assert_eq!(sendable("ab\u{FFFD}", &[], true), (5, false));
    }
}
