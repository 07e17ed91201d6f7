//! The decode loop of `fcgpu serve`: one thread owns the model and runs a continuous batch.
//!
//! Requests wait in a bounded channel (the queue). Between two decode steps the loop admits
//! waiting requests while their samples fit in `max_batch` slots; an admitted prompt is
//! prefilled in the same forward pass as the others' next token (as `rollout::generate` does),
//! and its `n` samples share the blocks of that prompt in the paged KV cache. Every sample streams its text back through the
//! request's channel; a request whose receiver is gone (client disconnected) leaves the batch at
//! the next step, freeing its slots. The loop ends once every sender of the queue is dropped
//! and the batch is empty, so dropping the [`EngineHandle`] drains in-flight work.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Arc;

use anyhow::Result;
use rand_chacha::ChaCha8Rng;
use tokio::sync::mpsc::UnboundedSender;

use crate::model::decode::Step;
use crate::model::kv_cache::{KvPool, SeqCache};
use crate::model::tokenizer::Tokenizer;
use crate::model::Model;
use crate::rollout::{sample_rng, sampler, SamplerParams};

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
    /// Blocks of the paged KV cache in use (held by running samples) and allocated in all.
    pub kv_blocks_in_use: AtomicUsize,
    pub kv_blocks_allocated: AtomicUsize,
}

impl Stats {
    fn set_running(&self, live: usize, pool: &KvPool) {
        self.running.store(live, Ordering::Relaxed);
        let kv = pool.stats();
        self.kv_blocks_in_use.store(kv.in_use, Ordering::Relaxed);
        self.kv_blocks_allocated.store(kv.allocated, Ordering::Relaxed);
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
}

/// The parts of a job its samples share.
struct JobShared {
    prompt_len: usize,
    max_tokens: usize,
    params: SamplerParams,
    stop: Vec<String>,
    then: Option<(String, Vec<u32>)>,
    events: UnboundedSender<Event>,
}

/// Runs the continuous batch until the queue is closed and drained; caches draw from `pool`.
pub fn run(
    model: &Model,
    tok: &Tokenizer,
    jobs: Receiver<Job>,
    max_batch: usize,
    pool: &Arc<KvPool>,
    stats: &Stats,
) {
    let mut live: Vec<Live> = Vec::new();
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let mut closed = false;
    loop {
        // Nothing running: block for the next job (or learn that the queue is closed).
        if live.is_empty() && waiting.is_empty() {
            if closed {
                return;
            }
            match jobs.recv() {
                Ok(j) => waiting.push_back(j),
                Err(_) => return,
            }
        }
        // Take what waits in the channel only while it could fit, so the channel stays the
        // bounded queue that answers 429.
        while !closed && live.len() + waiting.iter().map(|j| j.n).sum::<usize>() < max_batch {
            match jobs.try_recv() {
                Ok(j) => waiting.push_back(j),
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => closed = true,
            }
        }
        let admitted = admit(&mut waiting, live.len(), max_batch, stats);
        let before = live.len();
        live.retain(|s| !s.job.events.is_closed());
        stats.cancelled.fetch_add((before - live.len()) as u64, Ordering::Relaxed);
        stats.set_running(live.len(), pool);
        if live.is_empty() && admitted.is_empty() {
            continue;
        }
        let result = step(model, tok, &mut live, admitted, pool, stats);
        stats.set_running(live.len(), pool);
        if let Err(e) = result {
            let msg = format!("{e:#}");
            for s in live.drain(..) {
                let _ = s.job.events.send(Event::Failed(msg.clone()));
            }
            stats.set_running(0, pool);
        }
    }
}

/// Waiting jobs that fit next to `running` samples (always one when nothing runs, even if its
/// `n` exceeds the batch). Jobs whose client is gone are dropped here.
fn admit(waiting: &mut VecDeque<Job>, running: usize, max_batch: usize, stats: &Stats) -> Vec<Job> {
    let mut out: Vec<Job> = Vec::new();
    let mut slots = running;
    let mut prefill = 0;
    while let Some(j) = waiting.front() {
        if j.events.is_closed() {
            stats.cancelled.fetch_add(j.n as u64, Ordering::Relaxed);
            waiting.pop_front();
            continue;
        }
        let first = slots == 0;
        if !first
            && (slots + j.n > max_batch || prefill + j.prompt.len() > crate::rollout::MAX_PREFILL_TOKENS)
        {
            break;
        }
        slots += j.n;
        prefill += j.prompt.len();
        out.push(waiting.pop_front().unwrap());
    }
    out
}

/// One forward pass: the next token of every live sample and the prefill of admitted jobs.
fn step(
    model: &Model,
    tok: &Tokenizer,
    live: &mut Vec<Live>,
    admitted: Vec<Job>,
    pool: &Arc<KvPool>,
    stats: &Stats,
) -> Result<()> {
    let vocab = model.config.vocab_size;
    let mut prefills: Vec<SeqCache> = admitted.iter().map(|_| SeqCache::new(pool)).collect();
    // Each sample's last token, then any forced tokens (the logits are those of the last fed).
    let feeds: Vec<Vec<u32>> =
        live.iter_mut().map(|s| std::iter::once(s.last).chain(s.pending.drain(..)).collect()).collect();
    let logits = {
        let mut steps: Vec<Step> = Vec::with_capacity(live.len() + admitted.len());
        for (s, t) in live.iter_mut().zip(&feeds) {
            steps.push(Step { cache: &mut s.cache, tokens: t });
        }
        for (c, j) in prefills.iter_mut().zip(&admitted) {
            steps.push(Step { cache: c, tokens: &j.prompt });
        }
        model.forward_cached(&mut steps)?
    };
    for (i, s) in live.iter_mut().enumerate() {
        s.row = i;
    }
    let base = live.len();
    for (k, (c, j)) in prefills.into_iter().zip(admitted).enumerate() {
        let shared = Arc::new(JobShared {
            prompt_len: j.prompt.len(),
            max_tokens: j.max_tokens,
            params: j.params,
            stop: j.stop,
            then: j.then,
            events: j.events,
        });
        for sample in 0..j.n {
            live.push(Live {
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
            });
        }
    }
    let eos = &model.config.eos_token_ids;
    let ctx = model.config.max_position_embeddings;
    let mut still = Vec::with_capacity(live.len());
    for mut s in live.drain(..) {
        let d = sampler::sample(&logits[s.row * vocab..(s.row + 1) * vocab], &s.job.params, &mut s.rng);
        s.ids.push(d.token);
        s.last = d.token;
        let mut finish = eos.contains(&d.token).then_some(Finish::Stop);
        let mut text = tok.decode(&s.ids, true)?;
        if let (Some((trigger, forced)), false, None) = (&s.job.then, s.forced, finish) {
            if text.contains(trigger.as_str()) {
                s.forced = true;
                s.pending = forced.clone();
                s.ids.extend_from_slice(forced);
                text = tok.decode(&s.ids, true)?;
            }
        }
        let (end, hit) = sendable(&text, &s.job.stop, finish.is_some());
        if hit {
            finish = Some(Finish::Stop);
        }
        if finish.is_none() && (s.ids.len() >= s.job.max_tokens || s.job.prompt_len + s.ids.len() >= ctx) {
            finish = Some(Finish::Length);
        }
        // At the end everything not cut by a stop string goes out.
        let end = if finish.is_some() && !hit { text.len() } else { end };
        if end > s.sent {
            let _ = s.job.events.send(Event::Text { sample: s.sample, text: text[s.sent..end].to_string() });
            s.sent = end;
        }
        match finish {
            Some(finish) => {
                stats.finished.fetch_add(1, Ordering::Relaxed);
                let _ = s.job.events.send(Event::Done { sample: s.sample, finish, tokens: s.ids.len() });
            }
            None => still.push(s),
        }
    }
    *live = still;
    Ok(())
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
