//! Supervised fine-tuning with SRML (or plain CE): data preparation, length bucketing,
//! gradient accumulation, AdamW with clipping, warm-up + cosine, checkpoints, exact resume,
//! metrics, and a held-out teacher-forced accuracy of the result segment.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::autograd::no_grad;
use crate::data::Sample;
use crate::dist::collective::Collective;
use crate::fc::prompt::PromptStyle;
use crate::model::tokenizer::Tokenizer;
use crate::model::{Batch, Model};
use crate::ops;
use crate::runfs::{self, RunLock};
use crate::tensor::{Device, Tensor};
use crate::train::checkpoint::{self, Start, TrainerState};
use crate::train::heldout;
use crate::train::metrics::{MetricsWriter, SftMetrics};
use crate::train::optim::{apply_gradients, apply_step, AdamW, AdamWConfig, StepGrads};
use crate::train::prompt::{self, Prompter, TrainFormat};
use crate::train::run_config::{self, RunConfig};
use crate::train::schedule::Schedule;
use crate::train::srml::{self, AlphaMode, LossConfig, LossKind};
use crate::train::tiny;

const ALPHA_PARAM: &str = "srml.alpha_logit";
/// Answer length limit of the held-out generation (the embedded task's answers are shorter).
const HELDOUT_MAX_NEW_TOKENS: usize = 256;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SftConfig {
    /// Model, data, run directory, optimizer, schedule, seed, checkpoints (`[run]`).
    pub run: RunConfig,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub loss: LossKind,
    pub alpha_mode: AlphaMode,
    pub alpha: f32,
    pub pooled: bool,
    /// Longer examples are dropped.
    pub max_len: usize,
    /// Examples per bucket: shuffled, then sorted by length within each window.
    pub bucket_window: usize,
    /// Share of `data` held out when no `eval_data` is given.
    pub eval_fraction: f32,
    /// Prompt style. Unset: the one recorded in the model directory, else `compact`. The
    /// config.toml of a run holds the resolved value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub style: Option<PromptStyle>,
    /// Targets open with `<think>reasoning</think>`. Unset: from the model directory's record
    /// (same style), else the style (`reasoning`: yes; `bfcl`, `qwen-fc`: no; `compact`: whether
    /// the data has reasoning).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub think: Option<bool>,
}

impl Default for SftConfig {
    fn default() -> Self {
        SftConfig {
            run: RunConfig::sft(),
            batch_size: 8,
            grad_accum: 1,
            loss: LossKind::Srml,
            alpha_mode: AlphaMode::Fixed,
            alpha: 0.7,
            pooled: false,
            max_len: 768,
            bucket_window: 64,
            eval_fraction: 0.05,
            style: None,
            think: None,
        }
    }
}

/// A tokenized example: prompt then completion (end-of-turn included).
#[derive(Clone, Debug)]
pub struct Example {
    pub ids: Vec<u32>,
    pub prompt_len: usize,
    /// Completion tokens of the think segment (SRML's boundary; 0: all result).
    pub think_len: usize,
}

/// Tokenized examples of `samples` (prompts from `prompter`, targets in `fmt`), and how many
/// were dropped for being longer than `max_len` tokens.
pub fn prepare(
    tok: &Tokenizer,
    prompter: &Prompter,
    fmt: TrainFormat,
    samples: &[Sample],
    max_len: usize,
) -> Result<(Vec<Example>, usize)> {
    let mut out = Vec::with_capacity(samples.len());
    let mut dropped = 0;
    for s in samples {
        let prompt = prompter.ids(tok, s)?;
        let (think, answer) = prompt::target_parts(s, fmt)?;
        let (completion, think_len) = encode_completion(tok, &think, &format!("{answer}{}", tiny::IM_END))
            .with_context(|| format!("target of sample {}", s.id))?;
        let prompt_len = prompt.len();
        let mut ids = prompt;
        ids.extend(completion);
        if ids.len() > max_len {
            dropped += 1;
            continue;
        }
        out.push(Example { ids, prompt_len, think_len });
    }
    Ok((out, dropped))
}

/// The ids of the completion `think` + `rest`, and how many of them are the think segment: the
/// tokens that start inside `think` (by the tokenizer's offsets), so the token that completes
/// `</think>` is in it even when BPE merges it with what follows. Checked by decoding: the
/// segment's text holds `</think>`, and without its last token it does not.
pub fn encode_completion(tok: &Tokenizer, think: &str, rest: &str) -> Result<(Vec<u32>, usize)> {
    let text = format!("{think}{rest}");
    let enc =
        tok.inner().encode(text.as_str(), false).map_err(|e| anyhow::anyhow!("tokenizing failed: {e}"))?;
    let ids = enc.get_ids().to_vec();
    if think.is_empty() {
        return Ok((ids, 0));
    }
    let n = enc.get_offsets().iter().position(|o| o.0 >= think.len()).unwrap_or(ids.len());
    let closes = |k: usize| tok.decode(&ids[..k], false).is_ok_and(|t| t.contains(tiny::THINK_END));
    if n > 0 && closes(n) && !closes(n - 1) {
        return Ok((ids, n));
    }
    // Offsets that do not map back to the text: the shortest prefix that holds the marker.
    let n = (1..=ids.len())
        .find(|&k| closes(k))
        .with_context(|| format!("its tokens do not decode to a text holding {}", tiny::THINK_END))?;
    Ok((ids, n))
}

/// One micro-batch: packed sequences, and each one's prompt and think-segment lengths.
#[derive(Clone, Debug)]
pub struct Micro {
    pub batch: Batch,
    pub prompt_lens: Vec<usize>,
    pub think_lens: Vec<usize>,
}

/// Micro-batches of epoch `epoch`: a seeded shuffle, sorted by length within windows, cut into
/// batches, then the batches shuffled (so packed batches are even and order stays random).
pub fn epoch_batches(
    lengths: &[usize],
    batch_size: usize,
    window: usize,
    seed: u64,
    epoch: u64,
) -> Vec<Vec<usize>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ epoch.wrapping_add(1));
    let mut idx: Vec<usize> = (0..lengths.len()).collect();
    idx.shuffle(&mut rng);
    let mut batches = Vec::new();
    for w in idx.chunks_mut(window.max(batch_size).max(1)) {
        w.sort_by_key(|&i| lengths[i]);
        batches.extend(w.chunks(batch_size.max(1)).map(|c| c.to_vec()));
    }
    batches.shuffle(&mut rng);
    batches
}

pub struct Trainer {
    pub cfg: SftConfig,
    pub model: Model,
    pub opt: AdamW,
    pub adam: AdamWConfig,
    pub schedule: Schedule,
    pub alpha_logit: f32,
    pub step: u64,
    pub epoch: u64,
    pub cursor: usize,
    pub train: Vec<Example>,
    pub eval: Vec<Example>,
    /// The held-out samples themselves, for greedy generation.
    pub eval_samples: Vec<Sample>,
    pub tok: Tokenizer,
    /// The run's prompt style and think rule (recorded in every checkpoint).
    pub format: TrainFormat,
    prompter: Prompter,
    batches: Vec<Vec<usize>>,
    /// For [`Trainer::step_on`]: the token that closes the think segment of the batches given.
    think_end: Option<u32>,
    loss_cfg: LossConfig,
    /// Held while the trainer lives: one trainer per run directory.
    /// None for a trainer built around a model with no run directory (tests, probes).
    _lock: Option<RunLock>,
    /// Data parallelism: this rank's collectives (`None`: one rank).
    dist: Option<Box<dyn Collective>>,
}

impl Trainer {
    /// Sets up a run in `cfg.run.run_dir`: model (built or loaded) and optimizer on `device` (on a
    /// GPU: bf16 weights, f32 master weights and moments), data, and with `start.resume` the
    /// newest loadable checkpoint, its config checked against this one. The run directory is
    /// locked and its stale temporaries removed.
    pub fn new(mut cfg: SftConfig, start: Start, device: Device) -> Result<Trainer> {
        validate(&cfg)?;
        let run = cfg.run.run_dir.clone();
        runfs::ensure_not_cwd(&run, "--run-dir")?;
        let lock = RunLock::acquire(&run)?;
        for d in [run.clone(), run.join("task")] {
            runfs::clean_stale_temps_noisy(&d);
        }
        checkpoint::prepare_run_dir(&run, start)?;
        let resume = start.resume && !checkpoint::all(&run).is_empty();
        if resume {
            checkpoint::check_resume_config(&run, &cfg, start.force)?;
        }
        let crate::train::embedded::Inputs { train: train_s, eval: eval_s, model: model_dir, .. } =
            crate::train::embedded::inputs(&cfg.run, cfg.eval_fraction)?;
        let tok = Tokenizer::load(&model_dir)?;
        let context =
            crate::model::ModelConfig::from_file(&model_dir.join("config.json"))?.max_position_embeddings;
        anyhow::ensure!(
            cfg.max_len <= context,
            "`max_len` (--max-len) is {} but the model's context is {context} tokens (max_position_embeddings); use at most {context}",
            cfg.max_len
        );
        let format = prompt::resolve(cfg.style, cfg.think, &model_dir, &train_s, true)?;
        (cfg.style, cfg.think) = (Some(format.style), Some(format.think));
        if resume {
            // Again with style and think resolved (the first check skips them while unset).
            checkpoint::check_resume_config(&run, &cfg, start.force)?;
        }
        if cfg.loss == LossKind::Srml && !format.think {
            eprintln!("note: --loss srml with think = false has no think segment: it is the mean CE of the answer tokens");
        }
        let prompter = Prompter::new(Some(&model_dir), format.style)?;
        let (train, dropped) = prepare(&tok, &prompter, format, &train_s, cfg.max_len)?;
        if dropped > 0 {
            eprintln!("dropped {dropped} training examples longer than {} tokens", cfg.max_len);
        }
        anyhow::ensure!(
            !train.is_empty(),
            "no training examples (all {} are longer than max_len, {} tokens)",
            train_s.len(),
            cfg.max_len
        );
        let (eval, _) = prepare(&tok, &prompter, format, &eval_s, cfg.max_len)?;
        // On cuda, the memory plan of a step of the longest examples, before any weight loads.
        if let Device::Cuda(_) = device {
            let longest = train.iter().chain(&eval).map(|e| e.ids.len()).max().unwrap_or(1);
            let planned = SftConfig { max_len: longest, ..cfg.clone() };
            crate::plan::cli::check_fits_sft(&planned, &model_dir, device)?;
        }
        let schedule = Schedule {
            lr: cfg.run.lr,
            warmup_steps: cfg.run.warmup_steps,
            total_steps: cfg.run.steps,
            min_ratio: cfg.run.min_lr_ratio,
        };
        let adam = AdamWConfig { lr: cfg.run.lr, weight_decay: cfg.run.weight_decay, ..Default::default() };
        let loss_cfg = LossConfig { kind: cfg.loss, alpha_mode: cfg.alpha_mode, pooled: cfg.pooled };
        let resumed = if resume { checkpoint::load_latest_good(&run)? } else { None };
        let mut t = match resumed {
            Some((dir, model, opt, st)) => {
                checkpoint::check_resume_step(&dir, st.step, cfg.run.steps)?;
                checkpoint::check_resume_checkpoint(&dir, &st, &cfg.run, &cfg, start.force)?;
                eprintln!("resuming from {} (step {})", dir.display(), st.step);
                Trainer {
                    cfg: cfg.clone(),
                    model,
                    opt,
                    adam,
                    schedule,
                    alpha_logit: st.alpha_logit,
                    step: st.step,
                    epoch: st.epoch,
                    cursor: st.cursor,
                    train,
                    eval,
                    eval_samples: eval_s.clone(),
                    tok: tok.clone(),
                    format,
                    prompter: prompter.clone(),
                    batches: vec![],
                    think_end: None,
                    loss_cfg,
                    _lock: Some(lock),
                    dist: None,
                }
            }
            None => {
                let model = Model::load_for_training(&model_dir, cfg.run.lora.as_ref(), cfg.run.seed)?;
                Trainer {
                    cfg: cfg.clone(),
                    model,
                    opt: AdamW::default(),
                    adam,
                    schedule,
                    alpha_logit: srml::logit(cfg.alpha.clamp(1e-4, 1.0 - 1e-4)),
                    step: 0,
                    epoch: 0,
                    cursor: 0,
                    train,
                    eval,
                    eval_samples: eval_s.clone(),
                    tok: tok.clone(),
                    format,
                    prompter: prompter.clone(),
                    batches: vec![],
                    think_end: None,
                    loss_cfg,
                    _lock: Some(lock),
                    dist: None,
                }
            }
        };
        if device.is_gpu() {
            t.opt.attach(&t.model, device)?;
            t.model = t.model.to_device(device)?;
        }
        t.model.requires_grad();
        t.model.checkpoint_layers = crate::plan::checkpoint_layers(&cfg.run, device);
        t.batches = t.epoch_order(t.epoch);
        Ok(t)
    }

    /// A trainer on `model` with no data of its own, for callers that bring their batches to
    /// [`Trainer::step_on`] (the trajectory-parity tests, probes). `think_end` is the token id
    /// that closes the think segment of those batches (a tokenizer whose `</think>` is one
    /// token; [`Trainer::step_micro`] takes explicit think lengths instead). Optimizer,
    /// schedule and α come from `cfg` as in `new`.
    pub fn from_model(cfg: SftConfig, mut model: Model, tok: Tokenizer, think_end: u32) -> Trainer {
        let schedule = Schedule {
            lr: cfg.run.lr,
            warmup_steps: cfg.run.warmup_steps,
            total_steps: cfg.run.steps,
            min_ratio: cfg.run.min_lr_ratio,
        };
        let adam = AdamWConfig { lr: cfg.run.lr, weight_decay: cfg.run.weight_decay, ..Default::default() };
        let loss_cfg = LossConfig { kind: cfg.loss, alpha_mode: cfg.alpha_mode, pooled: cfg.pooled };
        let alpha_logit = srml::logit(cfg.alpha.clamp(1e-4, 1.0 - 1e-4));
        model.requires_grad();
        model.checkpoint_layers = crate::plan::checkpoint_layers(&cfg.run, model.device());
        let format = TrainFormat::or_defaults(cfg.style, cfg.think);
        Trainer {
            cfg,
            model,
            opt: AdamW::default(),
            adam,
            schedule,
            alpha_logit,
            step: 0,
            epoch: 0,
            cursor: 0,
            train: vec![],
            eval: vec![],
            eval_samples: vec![],
            tok,
            format,
            prompter: Prompter { template: None, style: format.style },
            batches: vec![],
            think_end: Some(think_end),
            loss_cfg,
            _lock: None,
            dist: None,
        }
    }

    /// Makes this trainer one rank of a data-parallel run: every rank is given the same
    /// micro-batches and takes every `size`-th one from its rank on, the gradients and metrics
    /// are summed over the ranks, and each rank applies the same update, so the run is the
    /// update of one rank over the whole batch (up to the order of the sums). `grad_accum` must
    /// be a multiple of the ranks (a micro-batch is never split).
    pub fn set_collective(&mut self, c: Box<dyn Collective>) -> Result<()> {
        let (ga, n) = (self.cfg.grad_accum.max(1), c.size());
        anyhow::ensure!(
            ga % n == 0,
            "{n} ranks do not divide grad_accum {ga}: each rank takes whole micro-batches (use a multiple of {n})"
        );
        anyhow::ensure!(
            self.model.device().is_cpu(),
            "data parallelism on a GPU device needs the NCCL backend, which is not built yet (issue 31)"
        );
        self.dist = Some(c);
        Ok(())
    }

    fn epoch_order(&self, epoch: u64) -> Vec<Vec<usize>> {
        let lengths: Vec<usize> = self.train.iter().map(|e| e.ids.len()).collect();
        epoch_batches(&lengths, self.cfg.batch_size, self.cfg.bucket_window, self.cfg.run.seed, epoch)
    }

    fn next_batch(&mut self) -> Vec<usize> {
        if self.cursor >= self.batches.len() {
            self.epoch += 1;
            self.cursor = 0;
            self.batches = self.epoch_order(self.epoch);
        }
        self.cursor += 1;
        self.batches[self.cursor - 1].clone()
    }

    pub fn alpha(&self) -> f32 {
        match self.cfg.alpha_mode {
            AlphaMode::Learnable => srml::sigmoid(self.alpha_logit),
            _ => self.cfg.alpha,
        }
    }

    pub fn state(&self) -> TrainerState {
        TrainerState {
            step: self.step,
            epoch: self.epoch,
            cursor: self.cursor,
            seed: self.cfg.run.seed,
            schedule: self.schedule,
            alpha_logit: self.alpha_logit,
            adam_step: self.opt.step,
        }
    }

    /// One optimizer step over `grad_accum` micro-batches. A non-finite loss or gradient stops
    /// with an error before any parameter changes (and the data cursor is not moved).
    pub fn step(&mut self) -> Result<SftMetrics> {
        let (epoch0, cursor0, batches0) = (self.epoch, self.cursor, self.batches.clone());
        let micro: Vec<Micro> = (0..self.cfg.grad_accum.max(1))
            .map(|_| {
                let idx = self.next_batch();
                self.micro(&idx.iter().map(|&i| &self.train[i]).collect::<Vec<_>>())
            })
            .collect();
        let out = self.step_micro(&micro);
        if out.is_err() {
            (self.epoch, self.cursor, self.batches) = (epoch0, cursor0, batches0);
        }
        out
    }

    /// The micro-batch of these examples.
    fn micro(&self, ex: &[&Example]) -> Micro {
        let seqs: Vec<&[u32]> = ex.iter().map(|e| e.ids.as_slice()).collect();
        Micro {
            batch: Batch::from_sequences(&seqs),
            prompt_lens: ex.iter().map(|e| e.prompt_len).collect(),
            think_lens: ex.iter().map(|e| e.think_len).collect(),
        }
    }

    /// [`Trainer::step_micro`] on micro-batches given as a packed batch and the prompt length
    /// of every sequence; the think segment of each ends at the `think_end` token given to
    /// [`Trainer::from_model`] (none for a trainer from [`Trainer::new`]: all result).
    pub fn step_on(&mut self, micro: &[(Batch, Vec<usize>)]) -> Result<SftMetrics> {
        let micro: Vec<Micro> = micro
            .iter()
            .map(|(batch, pls)| Micro {
                think_lens: match self.think_end {
                    Some(t) => srml::think_lens_by_token(batch, pls, t),
                    None => vec![0; pls.len()],
                },
                batch: batch.clone(),
                prompt_lens: pls.clone(),
            })
            .collect();
        self.step_micro(&micro)
    }

    /// One optimizer step on the given micro-batches: the gradients are averaged over them,
    /// clipped, and applied with the scheduled learning rate; SRML's learnable α takes its own
    /// AdamW step. This is the whole update of `fcgpu sft`; `step` only picks the data.
    pub fn step_micro(&mut self, micro: &[Micro]) -> Result<SftMetrics> {
        let t0 = Instant::now();
        let next = self.step + 1;
        let lr = self.schedule.lr_at(next);
        let params = self.model.trainable_params();
        let on_gpu = self.model.device().is_gpu();
        // On a GPU the sums stay on the device (StepGrads); the cpu keeps its flat vectors.
        let mut dev_acc = StepGrads::on(self.model.device());
        // f64 sums: exact for a few micro-batches, so the order they are added in (one rank's,
        // or several ranks' all-reduced) does not change the update.
        let mut acc: Vec<Vec<f64>> =
            if on_gpu { vec![] } else { params.iter().map(|(_, t)| vec![0.0; t.numel()]).collect() };
        anyhow::ensure!(!micro.is_empty(), "step {next}: no micro-batch");
        // Every micro-batch counts for the whole step (all ranks'): each rank scales by 1/ga.
        let ga = micro.len();
        let (rank, ranks) = self.dist.as_ref().map_or((0, 1), |d| (d.rank(), d.size()));
        anyhow::ensure!(ga % ranks == 0, "step {next}: {ga} micro-batches for {ranks} ranks");
        let (mut loss_sum, mut lt_sum, mut lr_sum, mut a_sum, mut da_sum, mut tokens) =
            (0.0f32, 0.0f32, 0.0f32, 0.0f32, 0.0f32, 0usize);
        // Device work of the forward/backward passes ("update") and of the step ("optimizer").
        let dev = self.model.device().gpu().ok();
        let c0 = dev.as_ref().map(|d| d.counts());
        for Micro { batch, prompt_lens, think_lens } in micro.iter().skip(rank).step_by(ranks) {
            tokens += batch.ids.len();
            let spans = srml::spans(batch, prompt_lens, think_lens)?;
            let lp = self.model.token_logprobs(batch, 1.0)?;
            let out = srml::loss(&lp, &spans, &self.loss_cfg, self.alpha())?;
            let lv = out.loss.to_scalar()?;
            if !lv.is_finite() {
                bail!("step {next}: loss is {lv} (think {}, result {}); stopping before the update, weights unchanged", out.l_think, out.l_result);
            }
            let grads = ops::scale(&out.loss, 1.0 / ga as f32)?.backward()?;
            if on_gpu {
                dev_acc.add(&params, &grads)?;
            }
            for ((_, p), a) in params.iter().zip(acc.iter_mut()) {
                if let Some(g) = grads.get(p) {
                    for (x, &y) in a.iter_mut().zip(g.f32s()?.iter()) {
                        *x += f64::from(y);
                    }
                }
            }
            loss_sum += lv;
            lt_sum += out.l_think;
            lr_sum += out.l_result;
            a_sum += out.alpha;
            da_sum += out.dl_dalpha;
        }
        let c1 = dev.as_ref().map(|d| d.counts());
        if let (Some(c0), Some(c1)) = (c0, c1) {
            crate::backend::counters::add_phase("update", c1 - c0);
        }
        if let Some(d) = self.dist.as_mut() {
            all_reduce_grads(d.as_mut(), &mut acc)?;
            let mut m = [loss_sum, lt_sum, lr_sum, a_sum, da_sum, tokens as f32];
            d.all_reduce_sum(&mut m)?;
            [loss_sum, lt_sum, lr_sum, a_sum, da_sum] = [m[0], m[1], m[2], m[3], m[4]];
            tokens = m[5] as usize;
        }
        let gaf = ga as f32;
        let norm = if on_gpu {
            dev_acc.norm()?
        } else {
            acc.iter().flat_map(|a| a.iter()).map(|&x| (x as f32 as f64).powi(2)).sum::<f64>().sqrt() as f32
        };
        if !norm.is_finite() {
            bail!("step {next}: gradient norm is {norm}; stopping before the update, weights unchanged");
        }
        if let Some(d) = dev.as_ref() {
            crate::backend::counters::phase(Some(d), "optimizer", || {
                apply_step(
                    &mut self.model,
                    &mut self.opt,
                    &self.adam,
                    lr,
                    dev_acc,
                    self.cfg.run.max_grad_norm,
                )
            })?;
        } else {
            let by_name: std::collections::HashMap<String, Vec<f32>> = params
                .iter()
                .map(|(n, _)| n.clone())
                .zip(acc.into_iter().map(|a| a.into_iter().map(|x| x as f32).collect()))
                .collect();
            apply_gradients(
                &mut self.model,
                &mut self.opt,
                &self.adam,
                lr,
                by_name,
                self.cfg.run.max_grad_norm,
            )?;
        }
        if self.cfg.loss == LossKind::Srml && self.cfg.alpha_mode == AlphaMode::Learnable {
            let a = srml::sigmoid(self.alpha_logit);
            let g = da_sum / gaf * a * (1.0 - a);
            let mut t = Tensor::from_vec(vec![self.alpha_logit], &[1])?;
            let no_decay = AdamWConfig { weight_decay: 0.0, ..self.adam.clone() };
            self.opt.update(&no_decay, lr, ALPHA_PARAM, &mut t, &[g])?;
            self.alpha_logit = t.to_vec()[0];
        }
        self.step = next;
        let secs = t0.elapsed().as_secs_f32();
        Ok(SftMetrics {
            step: next,
            loss: loss_sum / gaf,
            l_think: lt_sum / gaf,
            l_result: lr_sum / gaf,
            alpha: a_sum / gaf,
            lr,
            grad_norm: norm,
            tokens,
            tokens_per_s: tokens as f32 / secs.max(1e-9),
            seconds: secs,
        })
    }

    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let config = toml::to_string_pretty(&self.cfg)?;
        checkpoint::save(&self.cfg.run.run_dir, &self.model, &self.opt, &self.state(), &self.format, &config)
    }

    /// Held-out accuracy over the first `limit` eval samples: greedy answers, well formed and
    /// accepted by the BFCL checker.
    pub fn heldout(&self, limit: usize) -> Result<heldout::HeldOut> {
        let samples = &self.eval_samples[..limit.min(self.eval_samples.len())];
        let prompt = |s: &Sample| self.prompter.ids(&self.tok, s);
        let mut h = heldout::evaluate(
            &self.model,
            &self.tok,
            samples,
            &prompt,
            self.format.answer_format(),
            self.format.rule(),
            HELDOUT_MAX_NEW_TOKENS,
        )?;
        h.step = self.step;
        Ok(h)
    }

    /// Teacher-forced accuracy on the result segment of held-out examples: (token accuracy,
    /// fraction of examples whose whole result segment is predicted right, tokens scored).
    pub fn eval_result_accuracy(&self, limit: usize) -> Result<(f32, f32, usize)> {
        let ex: Vec<&Example> = self.eval.iter().take(limit).collect();
        let (mut right, mut total, mut exact) = (0usize, 0usize, 0usize);
        no_grad(|| -> Result<()> {
            for chunk in ex.chunks(self.cfg.batch_size.max(1)) {
                let Micro { batch, prompt_lens, think_lens } = self.micro(chunk);
                let spans = srml::spans(&batch, &prompt_lens, &think_lens)?;
                let h = self.model.hidden_states(&batch)?;
                let logits = ops::linear(&h, self.model.lm_head_weight(), None)?;
                let v = logits.dim(1);
                let lv = logits.host_f32()?;
                let next = batch.next_tokens();
                for s in &spans {
                    let mut all = true;
                    for r in s.result.clone() {
                        let row = &lv[r * v..(r + 1) * v];
                        let am = row
                            .iter()
                            .enumerate()
                            .fold((0, f32::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
                            .0;
                        let ok = am as u32 == next[r];
                        right += ok as usize;
                        all &= ok;
                        total += 1;
                    }
                    exact += all as usize;
                }
            }
            Ok(())
        })?;
        Ok((right as f32 / total.max(1) as f32, exact as f32 / ex.len().max(1) as f32, total))
    }
}

/// Summary of a run.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub first_loss: f32,
    pub last_loss: f32,
    pub steps_run: u64,
    pub result_token_accuracy: Option<f32>,
    pub result_exact: Option<f32>,
    /// Held-out accuracy (greedy; format and BFCL verdict), as in `eval-sft.json`.
    pub heldout_accuracy: Option<f32>,
    pub seconds: f32,
}

/// The whole run on `device`: config.toml, metrics.jsonl, checkpoints, final eval (see
/// [`Trainer::new`]).
pub fn run(cfg: SftConfig, start_mode: Start, device: Device) -> Result<RunSummary> {
    crate::train::metrics::check_counters(cfg.run.counters.as_deref(), device)?;
    let start = Instant::now();
    let mut t = Trainer::new(cfg, start_mode, device)?;
    // The config with style and think resolved.
    let cfg = t.cfg.clone();
    let run = cfg.run.run_dir.clone();
    runfs::write_atomic(&run.join("config.toml"), toml::to_string_pretty(&cfg)?.as_bytes())?;
    let mut metrics = MetricsWriter::open(&run.join("metrics.jsonl"), t.step)?.logging(cfg.run.log, &run)?;
    let pb = crate::train::step_bar(cfg.run.steps);
    pb.set_position(t.step);
    let (mut first, mut last, mut ran) = (f32::NAN, f32::NAN, 0);
    crate::backend::counters::take_phases(); // setup is not a training phase
    while t.step < cfg.run.steps {
        let m = t.step()?;
        if let Some(p) = &cfg.run.counters {
            crate::train::metrics::append_counters(p, m.step)?;
        }
        metrics.write(&m)?;
        if first.is_nan() {
            first = m.loss;
        }
        last = m.loss;
        ran += 1;
        pb.set_position(m.step);
        pb.set_message(format!(
            "loss {:.4} think {:.3} result {:.3} α {:.3} lr {:.2e} {:.0} tok/s",
            m.loss, m.l_think, m.l_result, m.alpha, m.lr, m.tokens_per_s
        ));
        if (cfg.run.save_every > 0 && m.step % cfg.run.save_every == 0) || m.step == cfg.run.steps {
            t.save_checkpoint()?;
        }
    }
    pb.finish_and_clear();
    let (mut acc, mut exact, mut accuracy) = (None, None, None);
    if cfg.run.eval_samples > 0 && !t.eval.is_empty() {
        let (a, e, n) = t.eval_result_accuracy(cfg.run.eval_samples)?;
        eprintln!(
            "held-out result segment (teacher-forced): token accuracy {:.4} over {n} tokens, exact {:.4}",
            a, e
        );
        let json = serde_json::to_string_pretty(
            &serde_json::json!({"step": t.step, "result_token_accuracy": a, "result_exact": e, "tokens": n}),
        )? + "\n";
        runfs::write_atomic(&run.join("eval.json"), json.as_bytes())?;
        (acc, exact) = (Some(a), Some(e));
        let h = t.heldout(cfg.run.eval_samples)?;
        eprintln!(
            "heldout_accuracy (greedy; format and BFCL verdict): {:.1}% ({})",
            100.0 * h.accuracy,
            h.summary()
        );
        h.write(&run, "sft")?;
        let scores = [
            ("heldout_accuracy", h.accuracy),
            ("heldout_calls_accuracy", h.calls_accuracy),
            ("result_token_accuracy", a),
            ("result_exact", e),
        ];
        metrics.eval(t.step, &scores)?;
        accuracy = Some(h.accuracy);
    }
    Ok(RunSummary {
        first_loss: first,
        last_loss: last,
        steps_run: ran,
        result_token_accuracy: acc,
        result_exact: exact,
        heldout_accuracy: accuracy,
        seconds: start.elapsed().as_secs_f32(),
    })
}

/// Most examples per micro-batch (`batch_size`) and micro-batches per step (`grad_accum`).
pub const MAX_BATCH: usize = 1 << 16;

/// Rejects settings that cannot work, flag and config file alike: every numeric option is
/// range-checked (finite, sign, bounds), the error naming the field. `max_len` is bounded
/// again by the model's context once the model is known ([`Trainer::new`]).
pub fn validate(cfg: &SftConfig) -> Result<()> {
    use run_config::check::{count, in_range};
    cfg.run.validate()?;
    count("batch_size", cfg.batch_size, 1, MAX_BATCH)?;
    count("grad_accum", cfg.grad_accum, 1, MAX_BATCH)?;
    in_range("alpha", cfg.alpha, 0.0, true, 1.0)?;
    // A prompt token and a target token at the least.
    count("max_len", cfg.max_len, 2, usize::MAX)?;
    count("bucket_window", cfg.bucket_window, 1, usize::MAX)?;
    // Some data must be left to train on.
    in_range("eval_fraction", cfg.eval_fraction, 0.0, true, 0.9)?;
    Ok(())
}

/// `fcgpu sft`'s config: its defaults with the TOML file at `path` laid over them.
pub fn load_config(path: Option<&Path>) -> Result<SftConfig> {
    run_config::load(path, SftConfig::default(), "sft")
}

/// Sums every rank's gradients (flat per parameter) in one collective.
fn all_reduce_grads(d: &mut dyn Collective, acc: &mut [Vec<f64>]) -> Result<()> {
    let mut flat: Vec<f64> = acc.iter().flat_map(|a| a.iter().copied()).collect();
    d.all_reduce_sum_f64(&mut flat)?;
    let mut at = 0;
    for a in acc.iter_mut() {
        let n = a.len();
        a.copy_from_slice(&flat[at..at + n]);
        at += n;
    }
    Ok(())
}
