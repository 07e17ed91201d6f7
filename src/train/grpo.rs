//! GRPO with entropy-enhanced advantages (SPEC §3): rollouts from the KV-cache engine, BFCL
//! rewards, group advantages with the CoT-entropy bonus, the clipped policy loss with k3 KL,
//! AdamW; checkpoints, exact resume, metrics and held-out accuracy before and after.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::autograd::no_grad;
use crate::data::Sample;
use crate::dist::collective::Collective;
use crate::fc::decode::AnswerFormat;
use crate::fc::prompt::PromptStyle;
use crate::fc::reward::{reward_with, RewardKind};
use crate::model::tokenizer::Tokenizer;
use crate::model::Model;
use crate::ops;
use crate::rl::advantage::{group_advantages, token_advantages, AdvScale, EntropyBonus};
use crate::rl::policy_loss::{
    policy_loss_on_with, ImportanceLevel, LossAgg, PolicyLossCfg, PolicyLossInput, RatioCfg,
    RolloutCorrection,
};
use crate::rollout::{self, chat_eos_ids, SamplingConfig};
use crate::runfs::{self, RunLock};
use crate::tensor::Device;
use crate::train::checkpoint::{self, Start, TrainerState};
use crate::train::heldout::{self, HeldOut};
use crate::train::metrics::MetricsWriter;
use crate::train::optim::{apply_step, AdamW, AdamWConfig, StepGrads};
use crate::train::prompt::{self, Prompter, TrainFormat};
use crate::train::run_config::{self, RunConfig};
use crate::train::schedule::Schedule;
use crate::train::shared_prompt::{shared_chunks, SharedChunk};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Granularity {
    Response,
    Token,
}

/// `--entropy-segment`: the completion tokens whose sampling entropy feeds the FunRL bonus.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum EntropySegment {
    /// The think segment when the run's format has one, else the whole completion.
    Auto,
    /// The think segment only (SPEC §3.3); a plain answer then has no bonus.
    Think,
    /// Every completion token.
    Completion,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GrpoConfig {
    /// Model, data, run directory, optimizer, schedule, seed, checkpoints (`[run]`).
    pub run: RunConfig,
    /// Prompts per step; each gets `group_size` samples.
    pub prompts_per_step: usize,
    pub group_size: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub max_new_tokens: usize,
    pub reward: RewardKind,
    pub adv_scale: AdvScale,
    pub entropy_lambda: f32,
    pub entropy_alpha: f32,
    pub entropy_granularity: Granularity,
    /// Which tokens' entropy the bonus reads. `auto` (default): the think segment of a format
    /// with reasoning, the whole answer of a plain-answer format, where the think segment is
    /// empty and λ would otherwise change nothing.
    pub entropy_segment: EntropySegment,
    pub eps_low: f32,
    pub eps_high: f32,
    pub beta: f32,
    pub loss_agg: LossAgg,
    /// SRML weight of think tokens in `--loss-agg srml`.
    pub srml_alpha: f32,
    /// `token` (GRPO) or `sequence` (GSPO: the length-normalised sequence ratio and clip).
    pub importance_level: ImportanceLevel,
    /// Correction for the gap between the sampler's log-probs (π_rollout) and the training
    /// forward's (π_old): none, token-tis, token-mis, seq-tis, seq-mis (docs/training.md).
    pub rollout_correction: RolloutCorrection,
    /// C of the correction: TIS caps π_old/π_rollout at C, MIS drops what exceeds it.
    pub rollout_correction_cap: f32,
    /// Measure that gap every step (one extra no-grad forward of the batch): the `mismatch_*`
    /// metrics. Implied by a rollout correction, which needs π_old from the training forward.
    pub log_mismatch: bool,
    pub ppo_epochs: usize,
    /// Sequences per forward/backward pass in the update (gradients accumulate).
    pub micro_batch: usize,
    /// Prompt style. Unset: the one recorded in the starting model's directory, else
    /// `compact`. The config.toml of a run holds the resolved value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub style: Option<PromptStyle>,
    /// The format rule of the reward and the held-out accuracy requires one non-empty
    /// `<think>` block first. Unset: from the starting model's record (same style), else the
    /// style (`reasoning`: yes; `bfcl`, `qwen-fc`: no; `compact`: whether the data has
    /// reasoning).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub think: Option<bool>,
    /// SRML SFT steps on the embedded task before GRPO (run once, in `<run_dir>/sft`), from the
    /// `base` model. 0 (the default) starts GRPO from the base itself: the shipped `fc-tiny`
    /// already had its SFT; a `scratch` base needs some (about 800 steps).
    pub warmup_sft_steps: u64,
    /// DAPO dynamic sampling: a group whose G rewards are all equal (no gradient) is replaced
    /// by the group of a new prompt, for up to `max_resample` extra rollout rounds per step.
    pub dynamic_sampling: bool,
    /// Most extra rollout rounds per step with `dynamic_sampling`.
    pub max_resample: usize,
    /// Positions per block of the rollouts' paged KV cache.
    pub kv_block_size: usize,
    /// Most positions the rollouts' KV cache holds at once (0: no cap); past it the latest
    /// admitted sample is preempted and recomputed (docs/performance.md).
    pub max_batch_tokens: usize,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        GrpoConfig {
            run: RunConfig::grpo(),
            prompts_per_step: 4,
            group_size: 8,
            temperature: 0.8,
            top_p: 1.0,
            max_new_tokens: 256,
            reward: RewardKind::Binary,
            adv_scale: AdvScale::Group,
            entropy_lambda: 0.4,
            entropy_alpha: 2.0,
            entropy_granularity: Granularity::Response,
            entropy_segment: EntropySegment::Auto,
            eps_low: 0.2,
            eps_high: 0.28,
            beta: 0.001,
            loss_agg: LossAgg::Srml,
            srml_alpha: 0.5,
            importance_level: ImportanceLevel::Token,
            rollout_correction: RolloutCorrection::None,
            rollout_correction_cap: 2.0,
            log_mismatch: false,
            ppo_epochs: 1,
            micro_batch: 16,
            style: None,
            think: None,
            warmup_sft_steps: 0,
            dynamic_sampling: true,
            max_resample: 4,
            kv_block_size: crate::model::kv_cache::DEFAULT_BLOCK,
            max_batch_tokens: 0,
        }
    }
}

/// One line of `metrics.jsonl` (every field is defined in docs/metrics.md). Renamed fields keep
/// their old names as serde aliases, so metrics files of older runs still load on `--resume`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct GrpoMetrics {
    pub step: u64,
    /// Mean and std of the training reward over the step's first draw of rollouts.
    pub reward_mean: f32,
    pub reward_std: f32,
    /// Fraction of the first draw's completions whose answer BFCL's AST checker accepts
    /// (format ignored).
    #[serde(alias = "accuracy")]
    pub rollout_call_valid: f32,
    /// Fraction of the first draw's completions with a well-formed think block and answer.
    #[serde(alias = "format_ok")]
    pub rollout_format_ok: f32,
    /// Mean entropy over the entropy segment's tokens (`entropy_segment`).
    pub cot_entropy: f32,
    pub kl: f32,
    pub clip_frac: f32,
    /// Fraction of the groups trained on whose rewards are all equal.
    pub zero_var_groups: f32,
    /// The same fraction in the step's first draw (before dynamic sampling re-drew any).
    pub zero_var_groups_first_draw: f32,
    /// Groups re-drawn from new prompts by dynamic sampling, over all its rounds.
    pub resampled_groups: usize,
    /// Extra rollout rounds dynamic sampling used (at most `max_resample`).
    pub resample_rounds: usize,
    pub loss: f32,
    pub lr: f32,
    pub grad_norm: f32,
    /// Completion tokens generated this step, re-drawn groups included.
    pub completion_tokens: usize,
    /// Completions whose reward computation panicked (caught; reward 0). Should stay 0.
    #[serde(default)]
    pub reward_panics: usize,
    pub tokens_per_s: f32,
    pub seconds_rollout: f32,
    pub seconds_reference: f32,
    pub seconds_update: f32,
    pub seconds: f32,
    /// Held-out accuracy (greedy; format and BFCL verdict), on the step-0 line and the last.
    #[serde(alias = "eval_accuracy", skip_serializing_if = "Option::is_none")]
    pub heldout_accuracy: Option<f32>,
    /// The same, pooled over the samples that expect a call (every category but irrelevance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heldout_calls_accuracy: Option<f32>,
    /// Rollout-policy mismatch (`log_mismatch` or a correction): over the batch's completion
    /// tokens, mean and max |log π_old − log π_rollout|, the k3 estimate of KL(π_rollout ‖ π_old)
    /// and the fraction of tokens with π_old/π_rollout > 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mismatch_mean_abs: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mismatch_max_abs: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mismatch_kl: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mismatch_ratio_above_2: Option<f32>,
    /// With a rollout correction: fraction of completion tokens MIS dropped, and whose TIS
    /// weight was capped (last PPO epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_masked_frac: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_capped_frac: Option<f32>,
    /// When the entropy bonus reads think segments: the fraction of the batch's completions
    /// with no `<think>…</think>` block, which get no bonus.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_think_frac: Option<f32>,
    /// Per-rollout values of the step for `--log tensorboard` histograms (reward, advantage,
    /// completion length); not in metrics.jsonl.
    #[serde(skip)]
    pub histograms: Vec<(&'static str, Vec<f32>)>,
}

/// One prompt's G rollouts, their rewards, and how many the checker and format rule accept.
struct Group {
    rewards: Vec<f32>,
    rollouts: Vec<Rollout>,
    call_valid: usize,
    format_ok: usize,
    /// Completions whose reward computation panicked (caught; reward 0).
    panics: usize,
}

impl Group {
    /// All rewards equal: the group advantage is zero, so neither GRPO nor the entropy bonus
    /// gives it a gradient (the same test as `Advantages::zero_var`).
    fn zero_var(&self) -> bool {
        self.rewards.iter().all(|&r| r == self.rewards[0])
    }
}

/// What dynamic sampling did in one step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resampling {
    /// Extra rollout rounds run.
    pub rounds: usize,
    /// Groups re-drawn, over all rounds.
    pub redrawn: usize,
}

/// Dynamic sampling (DAPO) over a first draw of groups: each round re-draws every group that
/// `zero_var` flags, all of them together (`redraw(count, round)` returns `count` groups of new
/// prompts), and puts the new groups in their slots; it stops when no group is flagged or after
/// `max_rounds` rounds. Groups still flagged then stay in the batch: the batch keeps
/// `prompts_per_step` groups, so the loss normalisation and the KL term do not depend on how
/// many groups the filter caught.
pub fn fill_batch<G>(
    first: Vec<G>,
    max_rounds: usize,
    zero_var: impl Fn(&G) -> bool,
    mut redraw: impl FnMut(usize, usize) -> Result<Vec<G>>,
) -> Result<(Vec<G>, Resampling)> {
    let mut batch = first;
    let mut done = Resampling::default();
    for round in 1..=max_rounds {
        let slots: Vec<usize> = (0..batch.len()).filter(|&i| zero_var(&batch[i])).collect();
        if slots.is_empty() {
            break;
        }
        let fresh = redraw(slots.len(), round)?;
        ensure!(
            fresh.len() == slots.len(),
            "dynamic sampling round {round}: {} groups re-drawn for {} slots",
            fresh.len(),
            slots.len()
        );
        for (i, g) in slots.iter().zip(fresh) {
            batch[*i] = g;
        }
        done = Resampling { rounds: round, redrawn: done.redrawn + slots.len() };
    }
    Ok((batch, done))
}

/// A rollout ready for the update: packed ids, where the completion starts, and per-token data
/// (one value per completion token: π_old's log-prob and entropy at the sampling temperature).
#[derive(Clone, Debug)]
pub struct Rollout {
    pub ids: Vec<u32>,
    pub prompt_len: usize,
    pub old_logp: Vec<f32>,
    pub entropy: Vec<f32>,
    /// Completion tokens before this index are the think segment (`<think>` … `</think>`).
    pub think_len: usize,
    /// The completion token that completes `<think>` (0 when the think segment opens the
    /// completion): the FunRL entropy span is `think_start..think_len`.
    pub think_start: usize,
}

/// What one rollout batch's update did: the CoT entropy and zero-variance share that went into
/// the advantages, and per PPO epoch (loss, KL, clip fraction, pre-clip gradient norm).
#[derive(Clone, Debug, Default)]
pub struct UpdateStats {
    pub cot_entropy: f32,
    pub zero_var_groups: f32,
    pub epochs: Vec<(f32, f32, f32, f32)>,
    /// The advantage of each rollout, entropy bonus included (response granularity).
    pub advantages: Vec<f32>,
    /// Per completion token, log π_old − log π_rollout, when π_old came from a training forward.
    pub mismatch: Option<Vec<f32>>,
    /// MIS-dropped and TIS-capped fractions of the last epoch (with a correction).
    pub corrected: Option<(f32, f32)>,
    /// Fraction of rollouts whose entropy span is empty, when the bonus reads think segments.
    pub no_think_frac: Option<f32>,
    pub seconds_reference: f32,
    pub seconds_update: f32,
}

pub struct GrpoTrainer {
    pub cfg: GrpoConfig,
    pub model: Model,
    pub reference: Option<Model>,
    pub tok: Tokenizer,
    pub opt: AdamW,
    adam: AdamWConfig,
    schedule: Schedule,
    pub step: u64,
    epoch: u64,
    cursor: usize,
    order: Vec<usize>,
    pub train: Vec<Sample>,
    pub eval: Vec<Sample>,
    /// The run's prompt style and format rule (recorded in every checkpoint).
    pub format: TrainFormat,
    prompter: Prompter,
    /// Replaces the reward of a completion (sample, text) when set: a seam for tests that need
    /// rewards they control (for example all-equal for some prompts).
    pub(crate) reward_override: Option<fn(&Sample, &str) -> f32>,
    /// Held while the trainer lives: one trainer per run directory.
    /// None for a trainer built around a model with no run directory (tests, probes).
    _lock: Option<RunLock>,
    /// Data parallelism: this rank's collectives (`None`: one rank). Behind a lock because the
    /// update's helpers take `&self`.
    dist: Option<std::sync::Mutex<Box<dyn Collective>>>,
}

impl GrpoTrainer {
    /// Makes this trainer one rank of a data-parallel run (see [`GrpoTrainer::update`]): each
    /// rank updates from its own whole groups; advantages and the policy loss are computed over
    /// every rank's batch, and the gradients summed, so the update is one rank's over the whole
    /// batch. CPU only for now (GPU gradients need the NCCL backend).
    pub fn set_collective(&mut self, c: Box<dyn Collective>) -> Result<()> {
        ensure!(
            self.model.device().is_cpu(),
            "data parallelism on a GPU device needs the NCCL backend, which is not built yet (issue 31)"
        );
        ensure!(
            self.cfg.prompts_per_step % c.size() == 0,
            "{} ranks do not divide prompts_per_step {}: a group never straddles two ranks",
            c.size(),
            self.cfg.prompts_per_step
        );
        ensure!(
            self.cfg.rollout_correction == RolloutCorrection::None && !self.cfg.log_mismatch,
            "rollout corrections and --log-mismatch are not supported with several ranks yet"
        );
        ensure!(
            !self.cfg.dynamic_sampling,
            "dynamic sampling is not supported with several ranks yet (--dynamic-sampling false)"
        );
        self.dist = Some(std::sync::Mutex::new(c));
        Ok(())
    }

    /// Runs `f` on this rank's collectives (`None` with one rank).
    fn with_dist<T>(&self, f: impl FnOnce(Option<&mut dyn Collective>) -> T) -> T {
        match &self.dist {
            Some(d) => f(Some(&mut **d.lock().unwrap_or_else(|e| e.into_inner()))),
            None => f(None),
        }
    }

    /// This rank and the number of ranks.
    fn ranks(&self) -> (usize, usize) {
        self.with_dist(|d| d.map_or((0, 1), |d| (d.rank(), d.size())))
    }

    /// Every rank's `x` in rank order (ranks must pass as many values); `x` itself with one rank.
    fn gather(&self, x: &[f32]) -> Result<Vec<f32>> {
        self.with_dist(|d| {
            let Some(d) = d else { return Ok(x.to_vec()) };
            let mut out = vec![0.0; x.len() * d.size()];
            d.all_gather(x, &mut out)?;
            Ok(out)
        })
    }

    /// Sums of `x` over the ranks.
    fn sum_ranks(&self, x: &mut [f32]) -> Result<()> {
        self.with_dist(|d| d.map_or(Ok(()), |d| d.all_reduce_sum(x)))
    }

    /// Sets up a run in `cfg.run.run_dir` with the policy (and reference) on `device`: rollouts
    /// decode there, the update runs there, the optimizer keeps f32 master weights there. The
    /// run directory is locked and its stale temporaries removed; with `start.resume` the newest
    /// loadable checkpoint is restored and its config checked against this one.
    pub fn new(mut cfg: GrpoConfig, start_mode: Start, device: Device) -> Result<GrpoTrainer> {
        validate(&cfg)?;
        runfs::ensure_not_cwd(&cfg.run.run_dir, "--run-dir")?;
        let lock = RunLock::acquire(&cfg.run.run_dir)?;
        // The warm-up's directory too: its own run only starts (and cleans) when it is not done.
        for d in [cfg.run.run_dir.clone(), cfg.run.run_dir.join("sft"), cfg.run.run_dir.join("sft/task")] {
            runfs::clean_stale_temps_noisy(&d);
        }
        checkpoint::prepare_run_dir(&cfg.run.run_dir, start_mode)?;
        let resume = start_mode.resume && !checkpoint::all(&cfg.run.run_dir).is_empty();
        if resume {
            checkpoint::check_resume_config(&cfg.run.run_dir, &cfg, start_mode.force)?;
        }
        let crate::train::embedded::Inputs { train, eval, model: start, train_file } =
            crate::train::embedded::policy(&cfg.run, cfg.warmup_sft_steps, device, start_mode.force)?;
        ensure!(!train.is_empty(), "no training prompts");
        let tok = Tokenizer::load(&start)?;
        let context =
            crate::model::ModelConfig::from_file(&start.join("config.json"))?.max_position_embeddings;
        check_context(&cfg, context)?;
        let format = prompt::resolve(cfg.style, cfg.think, &start, &train, false)?;
        (cfg.style, cfg.think) = (Some(format.style), Some(format.think));
        if resume {
            // Again with style and think resolved (the first check skips them while unset).
            checkpoint::check_resume_config(&cfg.run.run_dir, &cfg, start_mode.force)?;
        }
        let prompter = Prompter::new(Some(&start), format.style)?;
        let room = context - cfg.max_new_tokens;
        let train = fitting_prompts(train, &train_file, &prompter, &tok, room, cfg.max_new_tokens)?;
        // On cuda, the memory plan of a step with the longest prompt, before any weight loads.
        if let crate::tensor::Device::Cuda(_) = device {
            let longest = train
                .iter()
                .map(|s| prompter.ids(&tok, s).map(|v| v.len()))
                .try_fold(1, |m, n| n.map(|n| m.max(n)))?;
            crate::plan::cli::check_fits_grpo(&cfg, &start, device, longest)?;
        }
        let schedule = Schedule {
            lr: cfg.run.lr,
            warmup_steps: cfg.run.warmup_steps,
            total_steps: cfg.run.steps,
            min_ratio: cfg.run.min_lr_ratio,
        };
        let adam = AdamWConfig { lr: cfg.run.lr, weight_decay: cfg.run.weight_decay, ..Default::default() };
        // The reference policy is the starting point, also when resuming.
        // With LoRA it is the policy with its adapters off: no second copy.
        let reference = if cfg.beta != 0.0 && cfg.run.lora.is_none() {
            Some(Model::load(&start)?.to_device(device)?)
        } else {
            None
        };
        let resumed = if resume { checkpoint::load_latest_good(&cfg.run.run_dir)? } else { None };
        let (model, opt, step, epoch, cursor) = match resumed {
            Some((dir, model, opt, st)) => {
                checkpoint::check_resume_step(&dir, st.step, cfg.run.steps)?;
                checkpoint::check_resume_checkpoint(&dir, &st, &cfg.run, &cfg, start_mode.force)?;
                eprintln!("resuming from {} (step {})", dir.display(), st.step);
                (model, opt, st.step, st.epoch, st.cursor)
            }
            None => {
                let m = Model::load_for_training(&start, cfg.run.lora.as_ref(), cfg.run.seed)?;
                (m, AdamW::default(), 0, 0, 0)
            }
        };
        let mut t = GrpoTrainer {
            cfg,
            model,
            reference,
            tok,
            opt,
            adam,
            schedule,
            step,
            epoch,
            cursor,
            order: vec![],
            train,
            eval,
            format,
            prompter,
            reward_override: None,
            _lock: Some(lock),
            dist: None,
        };
        if device.is_gpu() {
            t.opt.attach(&t.model, device)?;
            t.model = t.model.to_device(device)?;
        }
        t.model.requires_grad();
        t.model.checkpoint_layers = crate::plan::checkpoint_layers(&t.cfg.run, device);
        t.order = t.epoch_order(t.epoch);
        Ok(t)
    }

    /// A trainer on `model` with no prompts of its own, for callers that bring rollouts to
    /// [`GrpoTrainer::update`] (the trajectory-parity tests). The reference policy is a copy of
    /// `model` when `cfg.beta` is not 0; optimizer and schedule come from `cfg` as in `new`.
    pub fn with_model(cfg: GrpoConfig, mut model: Model, tok: Tokenizer) -> GrpoTrainer {
        let schedule = Schedule {
            lr: cfg.run.lr,
            warmup_steps: cfg.run.warmup_steps,
            total_steps: cfg.run.steps,
            min_ratio: cfg.run.min_lr_ratio,
        };
        let adam = AdamWConfig { lr: cfg.run.lr, weight_decay: cfg.run.weight_decay, ..Default::default() };
        let reference = (cfg.beta != 0.0 && model.lora().is_none()).then(|| model.clone());
        model.requires_grad();
        model.checkpoint_layers = crate::plan::checkpoint_layers(&cfg.run, model.device());
        let format = TrainFormat::or_defaults(cfg.style, cfg.think);
        GrpoTrainer {
            cfg,
            model,
            reference,
            tok,
            opt: AdamW::default(),
            adam,
            schedule,
            step: 0,
            epoch: 0,
            cursor: 0,
            order: vec![],
            train: vec![],
            eval: vec![],
            format,
            prompter: Prompter { template: None, style: format.style },
            reward_override: None,
            _lock: None,
            dist: None,
        }
    }

    /// Learning rate of optimizer step `step` (1-based) under the run's schedule.
    pub fn lr_at(&self, step: u64) -> f32 {
        self.schedule.lr_at(step)
    }

    fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut rng =
            ChaCha8Rng::seed_from_u64(self.cfg.run.seed ^ 0x6772_706f ^ epoch.wrapping_mul(0x9E37_79B9));
        let mut idx: Vec<usize> = (0..self.train.len()).collect();
        idx.shuffle(&mut rng);
        idx
    }

    /// The next `n` prompts of the data stream (a new shuffled epoch when one runs out).
    fn next_prompts(&mut self, n: usize) -> Vec<usize> {
        (0..n)
            .map(|_| {
                if self.cursor >= self.order.len() {
                    self.epoch += 1;
                    self.cursor = 0;
                    self.order = self.epoch_order(self.epoch);
                }
                self.cursor += 1;
                self.order[self.cursor - 1]
            })
            .collect()
    }

    pub fn state(&self) -> TrainerState {
        TrainerState {
            step: self.step,
            epoch: self.epoch,
            cursor: self.cursor,
            seed: self.cfg.run.seed,
            schedule: self.schedule,
            alpha_logit: 0.0,
            adam_step: self.opt.step,
        }
    }

    pub fn prompt_ids(&self, s: &Sample) -> Result<Vec<u32>> {
        self.prompter.ids(&self.tok, s)
    }

    /// The training reward of `completion` for `sample`: the run's reward kind, answer syntax
    /// and format rule (a think block first only when the run trains reasoning).
    pub fn reward_of(&self, sample: &Sample, completion: &str) -> crate::fc::reward::RewardDetails {
        reward_with(sample, completion, self.cfg.reward, self.answer_format(), self.format.rule())
    }

    fn answer_format(&self) -> AnswerFormat {
        self.format.answer_format()
    }

    fn sampling(&self, n: usize, temperature: f32, seed: u64) -> SamplingConfig {
        SamplingConfig {
            n,
            max_new_tokens: self.cfg.max_new_tokens,
            temperature,
            top_p: if temperature == 0.0 { 1.0 } else { self.cfg.top_p },
            seed,
            stop_ids: chat_eos_ids(&self.model, Some(&self.tok)),
            kv_block_size: self.cfg.kv_block_size,
            max_batch_tokens: self.cfg.max_batch_tokens,
            ..Default::default()
        }
    }

    /// The completion tokens of `r` whose entropy feeds the bonus (`entropy_segment`).
    fn entropy_span(&self, r: &Rollout) -> std::ops::Range<usize> {
        let n = r.ids.len() - r.prompt_len;
        let whole = match self.cfg.entropy_segment {
            EntropySegment::Think => false,
            EntropySegment::Completion => true,
            EntropySegment::Auto => !self.format.think,
        };
        if whole {
            0..n
        } else {
            r.think_start.min(r.think_len)..r.think_len
        }
    }

    /// Whether the bonus reads think segments (so a completion without one gets none).
    fn entropy_reads_think(&self) -> bool {
        match self.cfg.entropy_segment {
            EntropySegment::Think => true,
            EntropySegment::Completion => false,
            EntropySegment::Auto => self.format.think,
        }
    }

    /// The token that completes `<think>` in a completion whose think segment ends at
    /// `think_len`; 0 when there is no segment. A `</think>` with no `<think>` before it starts
    /// at `think_len` (an empty span: a malformed block gets no bonus).
    fn think_start(&self, ids: &[u32], think_len: usize) -> usize {
        if think_len == 0 {
            return 0;
        }
        let head = &ids[..think_len];
        if let Some(open) = self.tok.token_id("<think>") {
            return head.iter().position(|&t| t == open).unwrap_or(think_len);
        }
        match first_prefix_containing(head.len(), "<think>", |k| self.tok.decode(&head[..k], false).ok()) {
            Some(k) => k - 1,
            None => think_len,
        }
    }

    /// Where the think segment of `ids` ends (just past the token that completes `</think>`),
    /// or 0 when there is none: the completion is then all result (SPEC §1).
    fn think_len(&self, ids: &[u32]) -> usize {
        if let Some(end) = self.tok.token_id("</think>") {
            return ids.iter().position(|&t| t == end).map_or(0, |i| i + 1);
        }
        first_prefix_containing(ids.len(), "</think>", |k| self.tok.decode(&ids[..k], false).ok())
            .unwrap_or(0)
    }

    /// One GRPO step: rollouts (re-drawn by dynamic sampling), rewards, advantages, μ
    /// policy-gradient updates. On an error the data stream is put back where it was.
    pub fn step(&mut self) -> Result<GrpoMetrics> {
        let t0 = Instant::now();
        let next = self.step + 1;
        let lr = self.schedule.lr_at(next);
        let (epoch0, cursor0, order0) = (self.epoch, self.cursor, self.order.clone());
        let result = self.step_on(next, lr, t0);
        if result.is_err() {
            (self.epoch, self.cursor, self.order) = (epoch0, cursor0, order0);
        }
        result
    }

    /// Rollout seed of a step's draw: round 0 is the first draw, rounds 1… dynamic sampling's
    /// re-draws. A function of (seed, step, round) only, so a resumed run samples the same.
    fn rollout_seed(&self, step: u64, round: usize) -> u64 {
        let base = self.cfg.run.seed.wrapping_mul(1_000_003).wrapping_add(step);
        base.wrapping_add((round as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    /// Rolls out G completions for each of the next `n` prompts and scores them, one group per
    /// prompt in stream order.
    fn draw_groups(&mut self, n: usize, seed: u64) -> Result<Vec<Group>> {
        // Every rank moves through the prompt stream alike and rolls out its own share of the
        // groups, numbered as in the whole batch (the sampler's streams follow the numbers).
        let all = self.next_prompts(n);
        let (rank, ranks) = self.ranks();
        let (n, first) = (n / ranks, rank * (n / ranks));
        let picks = all[first..first + n].to_vec();
        let g = self.cfg.group_size;
        let prompts: Vec<Vec<u32>> =
            picks.iter().map(|&i| self.prompt_ids(&self.train[i])).collect::<Result<_>>()?;
        let dev = self.model.device().gpu().ok();
        let completions = ranged(dev.as_ref(), "rollout", || {
            no_grad(|| {
                rollout::generate_indexed(
                    &self.model,
                    &prompts,
                    first,
                    &self.sampling(g, self.cfg.temperature, seed),
                    Some(&self.tok),
                )
            })
        })?;
        let mut groups: Vec<Group> = (0..n)
            .map(|_| Group { rewards: vec![], rollouts: vec![], call_valid: 0, format_ok: 0, panics: 0 })
            .collect();
        for c in &completions {
            // The group's place among this rank's (the sampler numbered it in the whole batch).
            let k = c.prompt_index - first;
            let grp = &mut groups[k];
            let text = c.text(&self.tok)?;
            let r = self.reward_of(&self.train[picks[k]], &text);
            grp.call_valid += r.valid as usize;
            grp.format_ok += r.format_ok as usize;
            grp.panics += r.panicked as usize;
            grp.rewards
                .push(self.reward_override.map_or(r.reward as f32, |f| f(&self.train[picks[k]], &text)));
            let p = &prompts[k];
            let mut ids = p.clone();
            ids.extend_from_slice(&c.new_ids);
            let think_len = self.think_len(&c.new_ids);
            grp.rollouts.push(Rollout {
                ids,
                prompt_len: p.len(),
                old_logp: c.logprobs.clone(),
                entropy: c.entropy.clone(),
                think_len,
                think_start: self.think_start(&c.new_ids, think_len),
            });
        }
        ensure!(
            groups.iter().all(|grp| grp.rewards.len() == g),
            "rollout returned a group without {g} completions"
        );
        Ok(groups)
    }

    /// The step's batch: the first draw, then dynamic sampling's re-draws when enabled. Rollout
    /// statistics in `m` describe the first draw, so they compare between runs with and without
    /// dynamic sampling; `completion_tokens` counts every draw.
    fn draw_batch(&mut self, next: u64, m: &mut GrpoMetrics) -> Result<Vec<Group>> {
        let first = self.draw_groups(self.cfg.prompts_per_step, self.rollout_seed(next, 0))?;
        let mine: Vec<f32> = first.iter().flat_map(|grp| grp.rewards.iter().copied()).collect();
        // The step's statistics over every rank's groups (in rank order: one rank's batch).
        let rewards = self.gather(&mine)?;
        let n = rewards.len() as f32;
        m.reward_mean = rewards.iter().sum::<f32>() / n;
        m.reward_std = (rewards.iter().map(|r| (r - m.reward_mean).powi(2)).sum::<f32>() / n).sqrt();
        let mut counts = [
            first.iter().map(|grp| grp.call_valid).sum::<usize>() as f32,
            first.iter().map(|grp| grp.format_ok).sum::<usize>() as f32,
            first.iter().filter(|grp| grp.zero_var()).count() as f32,
            first.len() as f32,
            tokens_of(&first) as f32,
            first.iter().map(|grp| grp.panics).sum::<usize>() as f32,
        ];
        self.sum_ranks(&mut counts)?;
        m.rollout_call_valid = counts[0] / n;
        m.rollout_format_ok = counts[1] / n;
        m.zero_var_groups_first_draw = counts[2] / counts[3];
        let mut tokens = counts[4] as usize;
        m.reward_panics = counts[5] as usize;
        let rounds = if self.cfg.dynamic_sampling { self.cfg.max_resample } else { 0 };
        let (batch, done) = fill_batch(first, rounds, Group::zero_var, |count, round| {
            let fresh = self.draw_groups(count, self.rollout_seed(next, round))?;
            tokens += tokens_of(&fresh);
            Ok(fresh)
        })?;
        (m.resample_rounds, m.resampled_groups, m.completion_tokens) = (done.rounds, done.redrawn, tokens);
        Ok(batch)
    }

    fn step_on(&mut self, next: u64, lr: f32, t0: Instant) -> Result<GrpoMetrics> {
        let mut m = GrpoMetrics { step: next, lr, ..Default::default() };
        let groups = self.draw_batch(next, &mut m)?;
        let t_roll = t0.elapsed().as_secs_f32();
        let rewards: Vec<f32> = groups.iter().flat_map(|grp| grp.rewards.iter().copied()).collect();
        let rollouts: Vec<Rollout> = groups.into_iter().flat_map(|grp| grp.rollouts).collect();
        let lengths = rollouts.iter().map(|r| (r.ids.len() - r.prompt_len) as f32).collect();
        let u = self.update(&rollouts, &rewards, lr).with_context(|| format!("step {next}"))?;
        m.histograms =
            vec![("reward", rewards), ("advantage", u.advantages.clone()), ("completion_length", lengths)];
        if let Some(d) = &u.mismatch {
            let s = mismatch_stats(d);
            (m.mismatch_mean_abs, m.mismatch_max_abs, m.mismatch_kl, m.mismatch_ratio_above_2) =
                (Some(s[0]), Some(s[1]), Some(s[2]), Some(s[3]));
            m.histograms.push(("mismatch_logp", d.clone()));
            m.histograms.push(("rollout_ratio", d.iter().map(|x| x.exp()).collect()));
        }
        m.no_think_frac = u.no_think_frac;
        if let Some((masked, capped)) = u.corrected {
            (m.rollout_masked_frac, m.rollout_capped_frac) = (Some(masked), Some(capped));
        }
        m.cot_entropy = u.cot_entropy;
        m.zero_var_groups = u.zero_var_groups;
        let &(loss, kl, clip, norm) = u.epochs.last().context("no PPO epoch ran")?;
        let (t_ref, t_upd) = (u.seconds_reference, u.seconds_update);
        self.step = next;
        let secs = t0.elapsed().as_secs_f32();
        m.loss = loss;
        m.kl = kl;
        m.clip_frac = clip;
        m.grad_norm = norm;
        m.tokens_per_s = m.completion_tokens as f32 / secs.max(1e-9);
        (m.seconds_rollout, m.seconds_reference, m.seconds_update, m.seconds) = (t_roll, t_ref, t_upd, secs);
        Ok(m)
    }

    /// The update of one rollout batch (completions ordered prompt-major, `group_size` per
    /// prompt, with their rewards): advantages with the entropy bonus, the reference pass, and
    /// `ppo_epochs` optimizer steps at learning rate `lr`. Everything `fcgpu train` does in a
    /// step after sampling and scoring.
    pub fn update(&mut self, rollouts: &[Rollout], rewards: &[f32], lr: f32) -> Result<UpdateStats> {
        ensure!(rollouts.len() == rewards.len(), "{} rollouts for {} rewards", rollouts.len(), rewards.len());
        for r in rollouts {
            let n = r.ids.len().saturating_sub(r.prompt_len);
            ensure!(r.prompt_len >= 1, "a rollout needs a prompt token");
            ensure!(
                r.old_logp.len() == n && r.entropy.len() == n && r.think_len <= n,
                "rollout data for {n} completion tokens: {} log-probs, {} entropies, think length {}",
                r.old_logp.len(),
                r.entropy.len(),
                r.think_len
            );
        }
        let g = self.cfg.group_size;
        ensure!(rollouts.len() % g == 0, "{} rollouts are not whole groups of {g}", rollouts.len());
        let mut st = UpdateStats::default();
        let h_tok: Vec<&[f32]> = rollouts.iter().map(|r| &r.entropy[self.entropy_span(r)]).collect();
        let h_seq: Vec<f32> = h_tok
            .iter()
            .map(|h| if h.is_empty() { 0.0 } else { h.iter().sum::<f32>() / h.len() as f32 })
            .collect();
        // Over every rank's rollouts (with one rank: these): the sums of think entropies and
        // tokens, the answers with no think span, and the rollouts.
        let mut sums = [
            h_tok.iter().flat_map(|h| h.iter()).sum::<f32>(),
            h_tok.iter().map(|h| h.len()).sum::<usize>() as f32,
            h_tok.iter().filter(|h| h.is_empty()).count() as f32,
            h_tok.len() as f32,
        ];
        if self.dist.is_some() {
            // Summed in rank order: one rank's sum, grouped by rank (equal up to rounding).
            self.sum_ranks(&mut sums)?;
        }
        if self.entropy_reads_think() {
            st.no_think_frac = Some(sums[2] / sums[3].max(1.0));
        }
        st.cot_entropy = sums[0] / sums[1].max(1.0);
        let scale = self.cfg.adv_scale;
        let bonus = EntropyBonus { lambda: self.cfg.entropy_lambda, alpha: self.cfg.entropy_alpha };
        let per_response = self.cfg.entropy_granularity == Granularity::Response;
        // Advantages over the whole batch (every rank's groups, in rank order), then this rank's.
        let (all_rewards, all_h) = (self.gather(rewards)?, self.gather(&h_seq)?);
        let mut adv =
            group_advantages(&all_rewards, g, scale, per_response.then_some(all_h.as_slice()), bonus)?;
        st.zero_var_groups = adv.zero_var.iter().filter(|&&z| z).count() as f32 / adv.zero_var.len() as f32;
        st.advantages.clone_from(&adv.adv);
        let (rank, _) = self.ranks();
        let mine = rank * rollouts.len()..(rank + 1) * rollouts.len();
        (adv.raw, adv.adv) = (adv.raw[mine.clone()].to_vec(), adv.adv[mine].to_vec());
        let t1 = Instant::now();
        let dev = self.model.device().gpu().ok();
        let ref_lp = match &self.reference {
            Some(r) => Some(ranged(dev.as_ref(), "reference pass", || self.logps(r, rollouts))?),
            // LoRA: the reference is the base, the policy with its adapters switched off.
            None if self.cfg.beta != 0.0 && self.model.lora().is_some() => {
                Some(ranged(dev.as_ref(), "reference pass", || {
                    self.model.without_adapters(|| self.logps(&self.model, rollouts))
                })?)
            }
            None => None,
        };
        // π_old: the sampler's log-probs, unless the rollout correction or the mismatch log
        // needs the training forward's (then the sampler's are π_rollout).
        let corrected = self.cfg.rollout_correction != RolloutCorrection::None;
        let trained_old = if corrected || self.cfg.log_mismatch {
            let lp = ranged(dev.as_ref(), "old log-probs", || self.logps(&self.model, rollouts))?;
            let d = rollouts.iter().zip(&lp).flat_map(|(r, o)| o.iter().zip(&r.old_logp).map(|(a, b)| a - b));
            st.mismatch = Some(d.collect());
            Some(lp)
        } else {
            None
        };
        let old: Vec<&[f32]> = match &trained_old {
            Some(lp) => lp.iter().map(|v| v.as_slice()).collect(),
            None => rollouts.iter().map(|r| r.old_logp.as_slice()).collect(),
        };
        st.seconds_reference = t1.elapsed().as_secs_f32();
        let t2 = Instant::now();
        for epoch in 0..self.cfg.ppo_epochs.max(1) {
            let (l, k, c, fracs, grads) = ranged(dev.as_ref(), "update", || {
                self.policy_gradient(rollouts, &old, &adv.raw, &adv.adv, ref_lp.as_deref(), epoch > 0)
            })?;
            st.corrected = corrected.then_some(fracs);
            ensure!(l.is_finite(), "loss is {l}; stopping before the update, weights unchanged");
            let norm = ranged(dev.as_ref(), "optimizer", || {
                apply_step(&mut self.model, &mut self.opt, &self.adam, lr, grads, self.cfg.run.max_grad_norm)
            })?;
            st.epochs.push((l, k, c, norm));
        }
        st.seconds_update = t2.elapsed().as_secs_f32();
        Ok(st)
    }

    /// Rollouts of the given sequences (each prompt then completion; the first `think_lens[i]`
    /// completion tokens are the think segment) with the current policy's log-probs and
    /// entropies at the sampling temperature: π_old as a teacher-forced pass, where `train`
    /// takes them from the sampler.
    pub fn rollouts_from_policy(
        &self,
        seqs: &[Vec<u32>],
        prompt_lens: &[usize],
        think_lens: &[usize],
    ) -> Result<Vec<Rollout>> {
        ensure!(
            seqs.len() == prompt_lens.len() && seqs.len() == think_lens.len(),
            "{} sequences, {} prompt lengths, {} think lengths",
            seqs.len(),
            prompt_lens.len(),
            think_lens.len()
        );
        let mut out = Vec::with_capacity(seqs.len());
        for (ids, &pl) in seqs.iter().zip(prompt_lens) {
            ensure!(pl >= 1 && pl < ids.len(), "prompt of {pl} tokens in a sequence of {}", ids.len());
        }
        let items: Vec<(&[u32], usize)> =
            seqs.iter().map(|s| s.as_slice()).zip(prompt_lens.iter().copied()).collect();
        for c in shared_chunks(&items, self.cfg.micro_batch)? {
            let lp =
                no_grad(|| self.model.token_logprobs_at(&c.batch, &c.rows, self.cfg.temperature.max(1e-6)))?;
            let lp = lp.host_f32()?;
            let (row0, row1) = lp.split_at(c.rows.len());
            for (i, r) in c.members {
                out.push(Rollout {
                    ids: seqs[i].clone(),
                    prompt_len: prompt_lens[i],
                    old_logp: row0[r.clone()].to_vec(),
                    entropy: row1[r].to_vec(),
                    think_len: think_lens[i],
                    think_start: 0,
                });
            }
        }
        Ok(out)
    }

    /// [`shared_chunks`] of rollouts by `micro_batch` completions.
    fn rollout_chunks(&self, rollouts: &[Rollout]) -> Result<Vec<SharedChunk>> {
        let items: Vec<(&[u32], usize)> = rollouts.iter().map(|r| (r.ids.as_slice(), r.prompt_len)).collect();
        shared_chunks(&items, self.cfg.micro_batch)
    }

    /// Log-probs of every completion token under `model` (no graph), one vector per rollout.
    fn logps(&self, model: &Model, rollouts: &[Rollout]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(rollouts.len());
        for c in self.rollout_chunks(rollouts)? {
            if c.rows.is_empty() {
                // Only empty completions: nothing to score.
                out.extend(c.members.iter().map(|_| Vec::new()));
                continue;
            }
            let lp = no_grad(|| model.token_logprobs_at(&c.batch, &c.rows, self.cfg.temperature.max(1e-6)))?;
            let v = lp.host_f32()?;
            out.extend(c.members.into_iter().map(|(_, r)| v[r].to_vec()));
        }
        Ok(out)
    }

    /// Loss, KL, clip fraction and the gradients of the policy loss. The loss is one op over
    /// the whole batch (its weights need every sequence): it runs on the log-probs first, and
    /// its gradient then flows back through the model micro-batch by micro-batch.
    /// On the first epoch π_θ = π_old in value, so the sampler's log-probs stand in for a
    /// forward pass (`fresh` = false); later epochs recompute them.
    #[allow(clippy::type_complexity)]
    fn policy_gradient(
        &self,
        rollouts: &[Rollout],
        old_lp: &[&[f32]],
        raw_adv: &[f32],
        adv: &[f32],
        ref_lp: Option<&[Vec<f32>]>,
        fresh: bool,
    ) -> Result<(f32, f32, f32, (f32, f32), StepGrads)> {
        let n = rollouts.len();
        let t = rollouts.iter().map(|r| r.ids.len() - r.prompt_len).max().unwrap_or(0).max(1);
        // Several ranks: the longest completion of any rank sets the width of the loss's arrays.
        let t = self.gather(&[t as f32])?.into_iter().fold(0.0f32, f32::max) as usize;
        let cur = if fresh {
            self.logps(&self.model, rollouts)?
        } else {
            old_lp.iter().map(|v| v.to_vec()).collect()
        };
        let mut x = vec![0.0f32; n * t];
        let mut roll = vec![0.0f32; n * t];
        let (mut old, mut refm, mut mask, mut seg) =
            (vec![0.0f32; n * t], vec![0.0f32; n * t], vec![0.0f32; n * t], vec![0i32; n * t]);
        let (mut h_tok, mut h_mask) = (vec![0.0f32; n * t], vec![0.0f32; n * t]);
        for (i, r) in rollouts.iter().enumerate() {
            for j in self.entropy_span(r) {
                (h_tok[i * t + j], h_mask[i * t + j]) = (r.entropy[j], 1.0);
            }
            for j in 0..r.ids.len() - r.prompt_len {
                let k = i * t + j;
                x[k] = cur[i][j];
                old[k] = old_lp[i][j];
                roll[k] = r.old_logp[j];
                refm[k] = ref_lp.map_or(0.0, |rl| rl[i][j]);
                mask[k] = 1.0;
                seg[k] = if j < r.think_len { 1 } else { 2 };
            }
        }
        // Several ranks: the loss is one op over every rank's sequences (its weights need all of
        // them), so each rank computes it on the gathered arrays and keeps its own rows of dx.
        let (rank, ranks) = self.ranks();
        let (x, old, roll, refm, mask, h_tok, h_mask, raw_adv, adv) = if ranks > 1 {
            let segf: Vec<f32> = seg.iter().map(|&v| v as f32).collect();
            let segf = self.gather(&segf)?;
            seg = segf.iter().map(|&v| v as i32).collect();
            (
                self.gather(&x)?,
                self.gather(&old)?,
                self.gather(&roll)?,
                self.gather(&refm)?,
                self.gather(&mask)?,
                self.gather(&h_tok)?,
                self.gather(&h_mask)?,
                self.gather(raw_adv)?,
                self.gather(adv)?,
            )
        } else {
            (x, old, roll, refm, mask, h_tok, h_mask, raw_adv.to_vec(), adv.to_vec())
        };
        let (raw_adv, adv) = (raw_adv.as_slice(), adv.as_slice());
        let n_all = n * ranks;
        let tok_adv;
        let (adv_slice, per_token) = if self.cfg.entropy_granularity == Granularity::Token {
            let bonus = EntropyBonus { lambda: self.cfg.entropy_lambda, alpha: self.cfg.entropy_alpha };
            // A'_{i,t} = A_i + min(λH_{i,t}, |A_i|/α) on the entropy segment, A_i elsewhere.
            let with_bonus = token_advantages(raw_adv, &h_tok, Some(&h_mask), t, bonus);
            tok_adv = (0..n_all * t)
                .map(|k| if h_mask[k] > 0.0 { with_bonus[k] } else { raw_adv[k / t] * mask[k] })
                .collect::<Vec<f32>>();
            (tok_adv.as_slice(), true)
        } else {
            (adv, false)
        };
        let cfg = PolicyLossCfg {
            eps_low: self.cfg.eps_low,
            eps_high: self.cfg.eps_high,
            beta: self.cfg.beta,
            agg: self.cfg.loss_agg,
            srml_alpha: self.cfg.srml_alpha,
        };
        let input = PolicyLossInput {
            logp: &x,
            old_logp: &old,
            ref_logp: ref_lp.map(|_| refm.as_slice()),
            adv: adv_slice,
            adv_per_token: per_token,
            mask: &mask,
            seg: Some(&seg),
            n_seq: n_all,
            t,
        };
        let rc = RatioCfg {
            level: self.cfg.importance_level,
            correction: self.cfg.rollout_correction,
            cap: self.cfg.rollout_correction_cap,
        };
        let (stats, dx) = policy_loss_on_with(self.model.device(), &input, Some(&roll), &cfg, &rc, 1.0)?;
        // Backward per micro-batch: the loss is linear in each token's log-prob gradient.
        let params = self.model.trainable_params();
        let mut acc = StepGrads::on(self.model.device());
        let row0 = rank * n;
        for c in self.rollout_chunks(rollouts)?.into_iter().filter(|c| !c.rows.is_empty()) {
            let lp = self.model.token_logprobs_at(&c.batch, &c.rows, self.cfg.temperature.max(1e-6))?;
            let mut w = vec![0.0f32; 2 * c.rows.len()];
            for (i, r) in c.members {
                let n = r.len();
                let i = row0 + i;
                w[r].copy_from_slice(&dx[i * t..i * t + n]);
            }
            // Σ w·logp has exactly the policy loss's gradient with respect to these log-probs.
            let grads = ops::weighted_sum(&lp, &w)?.backward()?;
            acc.add(&params, &grads)?;
        }
        self.with_dist(|d| d.map_or(Ok(()), |d| acc.all_reduce(d, &params)))?;
        let fracs = (stats.rollout_masked_frac, stats.rollout_capped_frac);
        Ok((stats.loss, stats.kl, stats.clip_frac, fracs, acc))
    }

    /// Greedy held-out accuracy over the first `limit` eval samples, overall and per category.
    pub fn evaluate(&self, limit: usize) -> Result<HeldOut> {
        let samples = &self.eval[..limit.min(self.eval.len())];
        let mut h = heldout::evaluate(
            &self.model,
            &self.tok,
            samples,
            &|s| self.prompt_ids(s),
            self.answer_format(),
            self.format.rule(),
            self.cfg.max_new_tokens,
        )?;
        h.step = self.step;
        Ok(h)
    }

    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let config = toml::to_string_pretty(&self.cfg)?;
        checkpoint::save(&self.cfg.run.run_dir, &self.model, &self.opt, &self.state(), &self.format, &config)
    }
}

/// The whole run on `device` (the SRML warm-up of the embedded default too): config.toml,
/// metrics.jsonl, curves.svg, checkpoints, eval before and after (see [`GrpoTrainer::new`]).
pub fn run(cfg: GrpoConfig, start: Start, device: Device) -> Result<(Option<f32>, Option<f32>)> {
    crate::train::metrics::check_counters(cfg.run.counters.as_deref(), device)?;
    let mut t = GrpoTrainer::new(cfg, start, device)?;
    // The config with style and think resolved.
    let cfg = t.cfg.clone();
    let run_dir = cfg.run.run_dir.clone();
    runfs::write_atomic(&run_dir.join("config.toml"), toml::to_string_pretty(&cfg)?.as_bytes())?;
    let metrics_path = run_dir.join("metrics.jsonl");
    let mut metrics = MetricsWriter::open(&metrics_path, t.step)?.logging(cfg.run.log, &run_dir)?;
    let mut before = None;
    if cfg.run.eval_samples > 0 && t.step == 0 {
        let h = t.evaluate(cfg.run.eval_samples)?;
        eprintln!(
            "heldout_accuracy before GRPO (greedy; format and BFCL verdict): {:.1}% ({})",
            100.0 * h.accuracy,
            h.summary()
        );
        h.write(&run_dir, "before")?;
        metrics.write(&GrpoMetrics {
            step: 0,
            heldout_accuracy: Some(h.accuracy),
            heldout_calls_accuracy: Some(h.calls_accuracy),
            ..Default::default()
        })?;
        before = Some(h.accuracy);
    } else if let Ok(lines) = crate::jsonl::read::<GrpoMetrics>(&metrics_path) {
        before = lines.iter().find(|l| l.step == 0).and_then(|l| l.heldout_accuracy);
    }
    let pb = crate::train::step_bar(cfg.run.steps);
    pb.set_position(t.step);
    let mut after = None;
    crate::backend::counters::take_phases(); // the held-out eval is not a training phase
    while t.step < cfg.run.steps {
        let mut m = t.step()?;
        if let Some(p) = &cfg.run.counters {
            crate::train::metrics::append_counters(p, m.step)?;
        }
        if m.step == cfg.run.steps && cfg.run.eval_samples > 0 {
            let h = t.evaluate(cfg.run.eval_samples)?;
            pb.suspend(|| {
                eprintln!(
                    "heldout_accuracy after GRPO (greedy; format and BFCL verdict): {:.1}% ({})",
                    100.0 * h.accuracy,
                    h.summary()
                )
            });
            h.write(&run_dir, "after")?;
            m.heldout_accuracy = Some(h.accuracy);
            m.heldout_calls_accuracy = Some(h.calls_accuracy);
            after = Some(h.accuracy);
        }
        metrics.write(&m)?;
        metrics.histograms(m.step, &m.histograms)?;
        pb.set_position(m.step);
        pb.set_message(format!(
            "reward {:.3} call_valid {:.3} zero_var {:.2} H {:.3} kl {:.4} {:.0} tok/s",
            m.reward_mean, m.rollout_call_valid, m.zero_var_groups, m.cot_entropy, m.kl, m.tokens_per_s
        ));
        if !pb.is_hidden() || m.step % 5 == 0 || m.step == cfg.run.steps {
            let _ = crate::train::plot::curves(&metrics_path, &run_dir.join("curves.svg"));
        }
        if (cfg.run.save_every > 0 && m.step % cfg.run.save_every == 0) || m.step == cfg.run.steps {
            t.save_checkpoint()?;
        }
    }
    pb.finish_and_clear();
    if let (Some(b), Some(a)) = (before, after) {
        eprintln!(
            "heldout_accuracy: {:.1}% before GRPO → {:.1}% after ({:+.1} points)",
            100.0 * b,
            100.0 * a,
            100.0 * (a - b)
        );
    }
    Ok((before, after))
}

/// Most prompts named one by one when some are too long.
const SHOWN: usize = 5;

/// The training prompts that fit in `room` tokens (the context less `max_new_tokens`): longer
/// ones are dropped at load, with one line naming the data file, how many and the lines of the first
/// few (a prompt the rollout cannot fit would otherwise fail the step that draws it). None
/// fitting is an error.
fn fitting_prompts(
    train: Vec<Sample>,
    file: &Path,
    prompter: &Prompter,
    tok: &Tokenizer,
    room: usize,
    max_new_tokens: usize,
) -> Result<Vec<Sample>> {
    let mut kept = Vec::with_capacity(train.len());
    let mut long = Vec::new();
    for (i, s) in train.into_iter().enumerate() {
        let n = prompter.ids(tok, &s)?.len();
        if n > room {
            long.push((i, n));
        } else {
            kept.push(s);
        }
    }
    if long.is_empty() {
        return Ok(kept);
    }
    let lines = crate::train::embedded::data_lines(file);
    let shown: Vec<String> = long
        .iter()
        .take(SHOWN)
        .map(|&(i, n)| match lines.get(i) {
            Some(l) => format!("line {l} ({n} tokens)"),
            None => format!("example {} ({n} tokens)", i + 1),
        })
        .collect();
    let what = format!(
        "{}: {} training prompts are longer than the {room} tokens the context leaves beside max_new_tokens {max_new_tokens}: {}{}",
        file.display(),
        long.len(),
        shown.join(", "),
        if long.len() > SHOWN { ", ..." } else { "" }
    );
    ensure!(!kept.is_empty(), "{what}; no prompt is left to train on");
    eprintln!("warning: {what}; dropped them");
    Ok(kept)
}

/// The fewest leading tokens `k` of an `n`-token completion whose decode contains `marker`
/// (a multi-token `<think>` or `</think>`), given the decode of the first `k` tokens. A prefix
/// that contains the marker stays containing it as `k` grows, so a binary search finds it with
/// O(log n) decodes (a scan of every prefix was quadratic in the completion's length). Most
/// completions of a plain-answer run have no marker: one decode says so.
fn first_prefix_containing(
    n: usize,
    marker: &str,
    mut decode: impl FnMut(usize) -> Option<String>,
) -> Option<usize> {
    let mut closes = |k: usize| decode(k).is_some_and(|t| t.contains(marker));
    if n == 0 || !closes(n) {
        return None;
    }
    let (mut lo, mut hi) = (0, n); // closes(hi), and !closes(lo) for lo = 0 (empty text)
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if closes(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Some(hi)
}

/// Mean |d|, max |d|, mean k3 KL(π_rollout ‖ π_old) and the fraction of d > ln 2 over per-token
/// d = log π_old − log π_rollout (tokens sampled from π_rollout; k3 = e^d − d − 1 ≥ 0).
fn mismatch_stats(d: &[f32]) -> [f32; 4] {
    let n = d.len().max(1) as f64;
    let mean_abs = d.iter().map(|x| x.abs() as f64).sum::<f64>() / n;
    let max_abs = d.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let kl = d.iter().map(|&x| (x as f64).exp() - x as f64 - 1.0).sum::<f64>() / n;
    let above = d.iter().filter(|&&x| x > std::f32::consts::LN_2).count() as f64 / n;
    [mean_abs as f32, max_abs, kl as f32, above as f32]
}

/// Completion tokens of the rollouts in `groups`.
fn tokens_of(groups: &[Group]) -> usize {
    groups.iter().flat_map(|grp| &grp.rollouts).map(|r| r.ids.len() - r.prompt_len).sum()
}

/// Runs `f` inside an NVTX range, so an Nsight Systems timeline shows the training phases, and
/// as a counted phase of the device's work (`--counters`).
fn ranged<T>(dev: Option<&crate::backend::GpuDevice>, name: &'static str, f: impl FnOnce() -> T) -> T {
    let _r = crate::backend::nvtx_range(name);
    crate::backend::counters::phase(dev, name, f)
}

/// `fcgpu train`'s config: its defaults with the TOML file at `path` laid over them.
pub fn load_config(path: Option<&Path>) -> Result<GrpoConfig> {
    run_config::load(path, GrpoConfig::default(), "train")
}

/// Most samples per prompt (`group_size`) and prompts per step: every rollout of a step is
/// kept in memory until the update.
pub const MAX_GROUP: usize = 4096;
/// Most optimizer steps per rollout batch (`ppo_epochs`).
pub const MAX_PPO_EPOCHS: usize = 1000;

/// Rejects settings that cannot work, flag and config file alike: every numeric option is
/// range-checked (finite, sign, bounds), the error naming the field. `max_new_tokens` is
/// bounded again by the model's context once the model is known ([`GrpoTrainer::new`]).
pub fn validate(cfg: &GrpoConfig) -> Result<()> {
    use run_config::check::{count, in_range};
    cfg.run.validate()?;
    count("prompts_per_step", cfg.prompts_per_step, 1, MAX_GROUP)?;
    // One sample per prompt has no group to compare with: every advantage would be 0.
    count("group_size", cfg.group_size, 2, MAX_GROUP)?;
    in_range("temperature", cfg.temperature, 0.0, false, MAX_TEMPERATURE)?;
    in_range("top_p", cfg.top_p, 0.0, false, 1.0)?;
    count("max_new_tokens", cfg.max_new_tokens, 1, usize::MAX)?;
    in_range("entropy_lambda", cfg.entropy_lambda, 0.0, true, f32::MAX)?;
    in_range("entropy_alpha", cfg.entropy_alpha, 0.0, false, f32::MAX)?;
    // The ratio is clipped to [1 - eps_low, 1 + eps_high]: a lower end at or below 0 is no clip.
    in_range("eps_low", cfg.eps_low, 0.0, true, MAX_EPS_LOW)?;
    in_range("eps_high", cfg.eps_high, 0.0, true, MAX_EPS_HIGH)?;
    in_range("beta", cfg.beta, 0.0, true, f32::MAX)?;
    in_range("srml_alpha", cfg.srml_alpha, 0.0, true, 1.0)?;
    in_range("rollout_correction_cap", cfg.rollout_correction_cap, 1.0, true, f32::MAX)?;
    count("ppo_epochs", cfg.ppo_epochs, 1, MAX_PPO_EPOCHS)?;
    count("micro_batch", cfg.micro_batch, 1, MAX_GROUP * MAX_GROUP)?;
    count("kv_block_size", cfg.kv_block_size, 1, 65536)?;
    if cfg.dynamic_sampling && cfg.max_resample == 0 {
        bail!("`max_resample` (--max-resample) must be at least 1 with --dynamic-sampling (0 would re-draw nothing)");
    }
    count("max_resample", cfg.max_resample, 0, MAX_GROUP)?;
    Ok(())
}

/// Highest sampling temperature accepted (far past where sampling is uniform noise).
pub const MAX_TEMPERATURE: f32 = 100.0;
/// Highest `eps_low`: the clip's lower end `1 - eps_low` must stay above 0.
pub const MAX_EPS_LOW: f32 = 0.99;
/// Highest `eps_high` (DAPO uses 0.28; 10 lets the ratio grow elevenfold).
pub const MAX_EPS_HIGH: f32 = 10.0;

/// `max_new_tokens` must leave room for a prompt in the model's context.
pub fn check_context(cfg: &GrpoConfig, context: usize) -> Result<()> {
    ensure!(
        cfg.max_new_tokens < context,
        "`max_new_tokens` (--max-new-tokens) is {} but the model's context is {context} tokens (max_position_embeddings), prompt included; use at most {}",
        cfg.max_new_tokens,
        context.saturating_sub(1)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A data stream of prompts 0, 1, 2, …: prompt p's group is all-equal (zero variance) when
    /// p is a multiple of 3 or p < `hard`, mixed otherwise.
    fn stream(hard: usize) -> (impl Fn(&(usize, bool)) -> bool, impl FnMut(usize) -> Vec<(usize, bool)>) {
        let mut next = 0usize;
        let draw = move |n: usize| {
            let out = (next..next + n).map(|p| (p, p % 3 == 0 || p < hard)).collect();
            next += n;
            out
        };
        (|g: &(usize, bool)| g.1, draw)
    }

    fn fraction(batch: &[(usize, bool)]) -> f32 {
        batch.iter().filter(|g| g.1).count() as f32 / batch.len() as f32
    }

    #[test]
    fn dynamic_sampling_replaces_zero_variance_groups_with_new_prompts() {
        let (zv, mut draw) = stream(0);
        let first = draw(6); // prompts 0..6: 0 and 3 are zero-variance
        assert_eq!(fraction(&first), 2.0 / 6.0);
        let (off, none) = fill_batch(first.clone(), 0, &zv, |n, _| Ok(draw(n))).unwrap();
        assert_eq!(
            (off.clone(), none),
            (first.clone(), Resampling::default()),
            "max_rounds 0 changes nothing"
        );
        let (zv, mut draw) = stream(0);
        let first = draw(6);
        let mut rounds_seen = vec![];
        let (on, done) = fill_batch(first, 4, &zv, |n, round| {
            rounds_seen.push((round, n));
            Ok(draw(n))
        })
        .unwrap();
        // Round 1 re-draws prompts 6, 7 for slots 0 and 3; 6 is zero-variance, so round 2 draws 8.
        assert_eq!(rounds_seen, vec![(1, 2), (2, 1)]);
        assert_eq!(done, Resampling { rounds: 2, redrawn: 3 });
        assert_eq!(on.iter().map(|g| g.0).collect::<Vec<_>>(), vec![8, 1, 2, 7, 4, 5]);
        assert_eq!(fraction(&on), 0.0);
        assert!(fraction(&on) < fraction(&off));
    }

    #[test]
    fn groups_still_zero_variance_after_the_last_round_stay_in_the_batch() {
        // Every prompt below 100 is zero-variance: two rounds cannot find a mixed group.
        let (zv, mut draw) = stream(100);
        let first = draw(4);
        let (batch, done) = fill_batch(first, 2, &zv, |n, _| Ok(draw(n))).unwrap();
        assert_eq!(done, Resampling { rounds: 2, redrawn: 8 });
        assert_eq!(batch.len(), 4, "the batch keeps prompts_per_step groups");
        assert_eq!(
            batch.iter().map(|g| g.0).collect::<Vec<_>>(),
            vec![8, 9, 10, 11],
            "the last round's groups fill the slots"
        );
    }

    #[test]
    fn a_short_redraw_is_an_error() {
        let err =
            fill_batch(vec![(0usize, true)], 1, |g: &(usize, bool)| g.1, |_, _| Ok(vec![])).unwrap_err();
        assert!(format!("{err}").contains("0 groups re-drawn for 1 slots"), "{err}");
    }

    /// A reward that is 0 for every completion of about half the prompts (by a hash of the id)
    /// and the parity of the completion's bytes for the others: those groups are mostly mixed.
    fn half_constant_reward(s: &Sample, text: &str) -> f32 {
        let h = s.id.bytes().fold(2166136261u32, |h, b| (h ^ b as u32).wrapping_mul(16777619));
        if h % 2 == 0 {
            0.0
        } else {
            (text.bytes().map(u32::from).sum::<u32>() % 2) as f32
        }
    }

    fn tiny_run(dir: &std::path::Path, dynamic_sampling: bool) -> Vec<GrpoMetrics> {
        let cfg = GrpoConfig {
            run: RunConfig {
                run_dir: dir.to_path_buf(),
                steps: 3,
                task_train: 60,
                task_eval: 4,
                eval_samples: 0,
                preset: "micro".into(),
                base: "scratch".into(),
                ..RunConfig::grpo()
            },
            prompts_per_step: 4,
            group_size: 3,
            max_new_tokens: 12,
            warmup_sft_steps: 0,
            beta: 0.0,
            micro_batch: 12,
            dynamic_sampling,
            max_resample: 4,
            kv_block_size: crate::model::kv_cache::DEFAULT_BLOCK,
            max_batch_tokens: 0,
            ..Default::default()
        };
        let mut t = GrpoTrainer::new(cfg, Start::FRESH, Device::Cpu).unwrap();
        t.reward_override = Some(half_constant_reward);
        (0..3).map(|_| t.step().unwrap()).collect()
    }

    #[test]
    fn dynamic_sampling_lowers_the_zero_variance_fraction_of_a_tiny_run() {
        let dir = tempfile::tempdir().unwrap();
        let off = tiny_run(dir.path(), false);
        let on = tiny_run(dir.path(), true);
        let total = |ms: &[GrpoMetrics], f: fn(&GrpoMetrics) -> f32| ms.iter().map(f).sum::<f32>();
        assert_eq!(
            on[0].zero_var_groups_first_draw, off[0].zero_var_groups_first_draw,
            "the same first draw at step 1"
        );
        assert!(
            total(&off, |m| m.zero_var_groups) > 0.0
                && off
                    .iter()
                    .all(|m| m.resampled_groups == 0 && m.zero_var_groups == m.zero_var_groups_first_draw)
        );
        assert!(on.iter().map(|m| m.resampled_groups).sum::<usize>() > 0, "{on:?}");
        assert!(on.iter().all(|m| m.zero_var_groups <= m.zero_var_groups_first_draw));
        assert!(
            total(&on, |m| m.zero_var_groups) < total(&off, |m| m.zero_var_groups),
            "zero-variance fraction trained on: on {:?} vs off {:?}",
            on.iter().map(|m| m.zero_var_groups).collect::<Vec<_>>(),
            off.iter().map(|m| m.zero_var_groups).collect::<Vec<_>>()
        );
        assert!(
            on[0].completion_tokens >= off[0].completion_tokens,
            "step 1: the same first draw plus the re-draws' tokens"
        );
    }

    /// A 4,096-token completion with a multi-token `</think>` at tokens 1,234..1,236: the
    /// think length is found with a logarithmic number of decodes, and it agrees with the
    /// first-prefix scan on every marker position of a short completion.
    #[test]
    fn think_len_takes_logarithmically_many_decodes() {
        let text = |toks: &[&str], k: usize| Some(toks[..k].concat());
        let mut toks = vec!["a"; 4096];
        toks[1234..1237].copy_from_slice(&["</th", "in", "k>"]);
        let mut calls = 0;
        let n = super::first_prefix_containing(toks.len(), "</think>", |k| {
            calls += 1;
            text(&toks, k)
        });
        assert_eq!(n, Some(1237));
        assert!(calls <= 14, "{calls} decodes for 4,096 tokens");
        for at in 0..10 {
            let mut t = vec!["x"; 12];
            t[at..at + 3].copy_from_slice(&["</", "think", ">"]);
            let scan = (1..=t.len()).find(|&k| t[..k].concat().contains("</think>")).unwrap_or(0);
            let found = super::first_prefix_containing(t.len(), "</think>", |k| text(&t, k)).unwrap_or(0);
            assert_eq!(found, scan, "marker at {at}");
        }
        assert_eq!(super::first_prefix_containing(5, "</think>", |k| text(&["a"; 5], k)), None);
    }

    #[test]
    fn metrics_of_older_runs_still_load() {
        let old = r#"{"step":3,"reward_mean":0.5,"reward_std":0.1,"accuracy":0.25,"format_ok":0.75,"cot_entropy":1.0,"kl":0.0,
            "clip_frac":0.0,"zero_var_groups":1.0,"loss":0.0,"lr":0.001,"grad_norm":0.0,"completion_tokens":10,"tokens_per_s":1.0,
            "seconds_rollout":0.1,"seconds_reference":0.1,"seconds_update":0.1,"seconds":0.3,"eval_accuracy":0.125}"#;
        let m: GrpoMetrics = serde_json::from_str(&old.replace('\n', "")).unwrap();
        assert_eq!(
            (m.rollout_call_valid, m.rollout_format_ok, m.heldout_accuracy),
            (0.25, 0.75, Some(0.125))
        );
        assert_eq!((m.resampled_groups, m.resample_rounds), (0, 0));
        // A config file of the flat layout, from before dynamic sampling existed.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("old.toml");
        std::fs::write(&p, "steps = 3\nbeta = 0.5\n").unwrap();
        let cfg = load_config(Some(&p)).unwrap();
        assert_eq!((cfg.run.steps, cfg.beta), (3, 0.5), "old config files load");
        assert_eq!(cfg.max_resample, GrpoConfig::default().max_resample);
    }
}
