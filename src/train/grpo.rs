//! GRPO with entropy-enhanced advantages (SPEC §3): rollouts from the KV-cache engine, BFCL
//! rewards, group advantages with the CoT-entropy bonus, the clipped policy loss with k3 KL,
//! AdamW; checkpoints, exact resume, metrics and held-out accuracy before and after.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::autograd::no_grad;
use crate::data::{synth, Sample};
use crate::fc::decode::AnswerFormat;
use crate::fc::prompt::{render_prompt, PromptStyle};
use crate::fc::reward::{reward, RewardKind};
use crate::model::tokenizer::Tokenizer;
use crate::model::{Batch, Model};
use crate::ops;
use crate::rl::advantage::{group_advantages, token_advantages, AdvScale, EntropyBonus};
use crate::rl::policy_loss::{policy_loss_on, LossAgg, PolicyLossCfg, PolicyLossInput};
use crate::rollout::{self, chat_eos_ids, Completion, SamplingConfig};
use crate::train::checkpoint::{self, TrainerState};
use crate::train::heldout::{self, HeldOut};
use crate::train::metrics::MetricsWriter;
use crate::tensor::Device;
use crate::train::optim::{apply_step, AdamW, AdamWConfig, StepGrads};
use crate::train::schedule::Schedule;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Granularity {
    Response,
    Token,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AggKind {
    TokenMean,
    SeqMean,
    Srml,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Scale {
    Group,
    Batch,
    None,
}

/// How prompts are rendered: `compact` is the embedded task's short ChatML prompt; the others
/// are `fc::prompt` styles (BFCL's text, with the reasoning instruction, or Qwen's JSON mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Style {
    Compact,
    Bfcl,
    Reasoning,
    QwenFc,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GrpoConfig {
    /// Policy to start from (HF layout). None: the embedded default after an SRML warm-up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<PathBuf>,
    /// Training prompts: fcgpu / xLAM JSONL, or a BFCL question file. None: the embedded task.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_data: Option<PathBuf>,
    pub run_dir: PathBuf,
    pub steps: u64,
    /// Prompts per step; each gets `group_size` samples.
    pub prompts_per_step: usize,
    pub group_size: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub max_new_tokens: usize,
    pub lr: f32,
    pub warmup_steps: u64,
    pub min_lr_ratio: f32,
    pub weight_decay: f32,
    pub max_grad_norm: f32,
    pub seed: u64,
    pub reward: RewardKind,
    pub adv_scale: Scale,
    pub entropy_lambda: f32,
    pub entropy_alpha: f32,
    pub entropy_granularity: Granularity,
    pub eps_low: f32,
    pub eps_high: f32,
    pub beta: f32,
    pub loss_agg: AggKind,
    /// SRML weight of think tokens in `--loss-agg srml`.
    pub srml_alpha: f32,
    pub ppo_epochs: usize,
    /// Sequences per forward/backward pass in the update (gradients accumulate).
    pub micro_batch: usize,
    pub style: Style,
    pub save_every: u64,
    /// Held-out prompts scored (greedy) before and after training; 0 skips.
    pub eval_samples: usize,
    /// SRML warm-up steps when the embedded default has no SFT checkpoint yet.
    pub warmup_sft_steps: u64,
    pub task_train: usize,
    pub task_eval: usize,
    /// Tiny model size when building the embedded default: tiny, small (2x compute) or micro.
    pub preset: String,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        GrpoConfig {
            model: None,
            data: None,
            eval_data: None,
            run_dir: PathBuf::from("runs/train"),
            steps: 30,
            prompts_per_step: 4,
            group_size: 8,
            temperature: 0.8,
            top_p: 1.0,
            max_new_tokens: 256,
            lr: 5e-4,
            warmup_steps: 2,
            min_lr_ratio: 0.1,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            seed: 0,
            reward: RewardKind::Binary,
            adv_scale: Scale::Group,
            entropy_lambda: 0.4,
            entropy_alpha: 2.0,
            entropy_granularity: Granularity::Response,
            eps_low: 0.2,
            eps_high: 0.28,
            beta: 0.001,
            loss_agg: AggKind::Srml,
            srml_alpha: 0.5,
            ppo_epochs: 1,
            micro_batch: 16,
            style: Style::Compact,
            save_every: 20,
            eval_samples: 100,
            warmup_sft_steps: 400,
            task_train: 4000,
            task_eval: 200,
            preset: "tiny".into(),
        }
    }
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct GrpoMetrics {
    pub step: u64,
    pub reward_mean: f32,
    pub reward_std: f32,
    /// Fraction of completions BFCL accepts (format aside).
    pub accuracy: f32,
    pub format_ok: f32,
    /// Mean entropy over think-segment tokens.
    pub cot_entropy: f32,
    pub kl: f32,
    pub clip_frac: f32,
    pub zero_var_groups: f32,
    pub loss: f32,
    pub lr: f32,
    pub grad_norm: f32,
    pub completion_tokens: usize,
    /// Completions whose reward computation panicked (caught; reward 0). Should stay 0.
    #[serde(default)]
    pub reward_panics: usize,
    pub tokens_per_s: f32,
    pub seconds_rollout: f32,
    pub seconds_reference: f32,
    pub seconds_update: f32,
    pub seconds: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_accuracy: Option<f32>,
}

/// A rollout ready for the update: packed ids, where the completion starts, and per-token data.
struct Rollout {
    ids: Vec<u32>,
    prompt_len: usize,
    old_logp: Vec<f32>,
    entropy: Vec<f32>,
    /// Completion tokens before this index are the think segment (`<think>` … `</think>`).
    think_len: usize,
}

pub struct GrpoTrainer {
    pub cfg: GrpoConfig,
    pub model: Model,
    reference: Option<Model>,
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
}

impl GrpoTrainer {
    pub fn new(cfg: GrpoConfig, resume: bool) -> Result<GrpoTrainer> {
        Self::new_on(cfg, resume, Device::Cpu)
    }

    /// [`GrpoTrainer::new`] with the policy (and reference) on `device`: rollouts decode there,
    /// the update runs there, the optimizer keeps f32 master weights there.
    pub fn new_on(cfg: GrpoConfig, resume: bool, device: Device) -> Result<GrpoTrainer> {
        std::fs::create_dir_all(&cfg.run_dir).with_context(|| format!("cannot create {}", cfg.run_dir.display()))?;
        ensure!(cfg.group_size >= 1 && cfg.prompts_per_step >= 1, "group size and prompts per step must be at least 1");
        let (train, eval, start) = materialize(&cfg, device)?;
        ensure!(!train.is_empty(), "no training prompts");
        let tok = Tokenizer::load(&start)?;
        let schedule = Schedule { lr: cfg.lr, warmup_steps: cfg.warmup_steps, total_steps: cfg.steps, min_ratio: cfg.min_lr_ratio };
        let adam = AdamWConfig { lr: cfg.lr, weight_decay: cfg.weight_decay, ..Default::default() };
        // The reference policy is the starting point, also when resuming.
        let reference = if cfg.beta != 0.0 { Some(Model::load(&start)?.to_device(device)?) } else { None };
        let (model, opt, step, epoch, cursor) = match checkpoint::latest(&cfg.run_dir).filter(|_| resume) {
            Some((_, dir)) => {
                let (model, opt, st) = checkpoint::load(&dir)?;
                eprintln!("resuming from {} (step {})", dir.display(), st.step);
                (model, opt, st.step, st.epoch, st.cursor)
            }
            None => (Model::load(&start)?, AdamW::default(), 0, 0, 0),
        };
        let mut t = GrpoTrainer { cfg, model, reference, tok, opt, adam, schedule, step, epoch, cursor, order: vec![], train, eval };
        if device.is_gpu() {
            t.opt.attach(&t.model, device)?;
            t.model = t.model.to_device(device)?;
        }
        t.model.requires_grad();
        t.order = t.epoch_order(t.epoch);
        Ok(t)
    }

    fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.cfg.seed ^ 0x6772_706f ^ epoch.wrapping_mul(0x9E37_79B9));
        let mut idx: Vec<usize> = (0..self.train.len()).collect();
        idx.shuffle(&mut rng);
        idx
    }

    fn next_prompts(&mut self) -> Vec<usize> {
        (0..self.cfg.prompts_per_step)
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
        TrainerState { step: self.step, epoch: self.epoch, cursor: self.cursor, seed: self.cfg.seed, schedule: self.schedule, alpha_logit: 0.0, adam_step: self.opt.step }
    }

    pub fn prompt_ids(&self, s: &Sample) -> Result<Vec<u32>> {
        let text = match self.cfg.style {
            Style::Compact => synth::render_prompt(&s.messages, &s.functions),
            Style::Bfcl => render_prompt(s, PromptStyle::Bfcl),
            Style::Reasoning => render_prompt(s, PromptStyle::Reasoning),
            Style::QwenFc => render_prompt(s, PromptStyle::QwenFc),
        };
        self.tok.encode(&text, false)
    }

    fn answer_format(&self) -> AnswerFormat {
        if self.cfg.style == Style::QwenFc { AnswerFormat::Json } else { AnswerFormat::Python }
    }

    fn sampling(&self, n: usize, temperature: f32, seed: u64) -> SamplingConfig {
        SamplingConfig {
            n,
            max_new_tokens: self.cfg.max_new_tokens,
            temperature,
            top_p: if temperature == 0.0 { 1.0 } else { self.cfg.top_p },
            seed,
            stop_ids: chat_eos_ids(&self.model, Some(&self.tok)),
            ..Default::default()
        }
    }

    /// Where the think segment of `ids` ends (just past the token that completes `</think>`),
    /// or 0 when there is none: the completion is then all result (SPEC §1).
    fn think_len(&self, ids: &[u32]) -> usize {
        if let Some(end) = self.tok.token_id("</think>") {
            return ids.iter().position(|&t| t == end).map_or(0, |i| i + 1);
        }
        (1..=ids.len()).find(|&k| self.tok.decode(&ids[..k], false).is_ok_and(|t| t.contains("</think>"))).unwrap_or(0)
    }

    /// One GRPO step: rollouts, rewards, advantages, μ policy-gradient updates.
    pub fn step(&mut self) -> Result<GrpoMetrics> {
        let t0 = Instant::now();
        let next = self.step + 1;
        let lr = self.schedule.lr_at(next);
        let (epoch0, cursor0, order0) = (self.epoch, self.cursor, self.order.clone());
        let picks = self.next_prompts();
        let result = self.step_on(&picks, next, lr, t0);
        if result.is_err() {
            (self.epoch, self.cursor, self.order) = (epoch0, cursor0, order0);
        }
        result
    }

    fn step_on(&mut self, picks: &[usize], next: u64, lr: f32, t0: Instant) -> Result<GrpoMetrics> {
        let g = self.cfg.group_size;
        let prompts: Vec<Vec<u32>> = picks.iter().map(|&i| self.prompt_ids(&self.train[i])).collect::<Result<_>>()?;
        let seed = self.cfg.seed.wrapping_mul(1_000_003).wrapping_add(next);
        let completions = ranged("rollout", || {
            no_grad(|| rollout::generate(&self.model, &prompts, &self.sampling(g, self.cfg.temperature, seed), Some(&self.tok)))
        })?;
        let t_roll = t0.elapsed().as_secs_f32();
        let mut m = GrpoMetrics { step: next, lr, ..Default::default() };
        let (rewards, rollouts) = self.score(picks, &prompts, &completions, &mut m)?;
        let h_tok: Vec<Vec<f32>> = rollouts.iter().map(|r| r.entropy[..r.think_len].to_vec()).collect();
        let h_seq: Vec<f32> = h_tok.iter().map(|h| if h.is_empty() { 0.0 } else { h.iter().sum::<f32>() / h.len() as f32 }).collect();
        let think_tokens: usize = h_tok.iter().map(|h| h.len()).sum();
        m.cot_entropy = h_tok.iter().flatten().sum::<f32>() / think_tokens.max(1) as f32;
        let scale = match self.cfg.adv_scale {
            Scale::Group => AdvScale::Group,
            Scale::Batch => AdvScale::Batch,
            Scale::None => AdvScale::None,
        };
        let bonus = EntropyBonus { lambda: self.cfg.entropy_lambda, alpha: self.cfg.entropy_alpha };
        let per_response = self.cfg.entropy_granularity == Granularity::Response;
        let adv = group_advantages(&rewards, g, scale, per_response.then_some(h_seq.as_slice()), bonus)?;
        m.zero_var_groups = adv.zero_var.iter().filter(|&&z| z).count() as f32 / adv.zero_var.len() as f32;
        let t1 = Instant::now();
        let ref_lp = match &self.reference {
            Some(r) => Some(ranged("reference pass", || self.logps(r, &rollouts))?),
            None => None,
        };
        let t_ref = t1.elapsed().as_secs_f32();
        let t2 = Instant::now();
        let (mut loss, mut kl, mut clip, mut norm) = (0.0, 0.0, 0.0, 0.0);
        for epoch in 0..self.cfg.ppo_epochs.max(1) {
            let (l, k, c, grads) = ranged("update", || self.policy_gradient(&rollouts, &adv.raw, &adv.adv, ref_lp.as_deref(), epoch > 0))?;
            ensure!(l.is_finite(), "step {next}: loss is {l}; stopping before the update, weights unchanged");
            norm = ranged("optimizer step", || apply_step(&mut self.model, &mut self.opt, &self.adam, lr, grads, self.cfg.max_grad_norm))
                .with_context(|| format!("step {next}"))?;
            (loss, kl, clip) = (l, k, c);
        }
        self.step = next;
        let secs = t0.elapsed().as_secs_f32();
        m.loss = loss;
        m.kl = kl;
        m.clip_frac = clip;
        m.grad_norm = norm;
        m.completion_tokens = rollouts.iter().map(|r| r.ids.len() - r.prompt_len).sum();
        m.tokens_per_s = m.completion_tokens as f32 / secs.max(1e-9);
        (m.seconds_rollout, m.seconds_reference, m.seconds_update, m.seconds) = (t_roll, t_ref, t2.elapsed().as_secs_f32(), secs);
        Ok(m)
    }

    /// Rewards of every completion (ordered prompt-major) and the rollouts for the update.
    fn score(&self, picks: &[usize], prompts: &[Vec<u32>], completions: &[Completion], m: &mut GrpoMetrics) -> Result<(Vec<f32>, Vec<Rollout>)> {
        let mut rewards = Vec::with_capacity(completions.len());
        let mut rollouts = Vec::with_capacity(completions.len());
        let (mut valid, mut fmt) = (0usize, 0usize);
        for c in completions {
            let sample = &self.train[picks[c.prompt_index]];
            let text = c.text(&self.tok)?;
            let r = reward(sample, &text, self.cfg.reward, self.answer_format());
            valid += r.valid as usize;
            fmt += r.format_ok as usize;
            m.reward_panics += r.panicked as usize;
            rewards.push(r.reward as f32);
            let p = &prompts[c.prompt_index];
            let mut ids = p.clone();
            ids.extend_from_slice(&c.new_ids);
            rollouts.push(Rollout { ids, prompt_len: p.len(), old_logp: c.logprobs.clone(), entropy: c.entropy.clone(), think_len: self.think_len(&c.new_ids) });
        }
        let n = rewards.len() as f32;
        m.reward_mean = rewards.iter().sum::<f32>() / n;
        m.reward_std = (rewards.iter().map(|r| (r - m.reward_mean).powi(2)).sum::<f32>() / n).sqrt();
        m.accuracy = valid as f32 / n;
        m.format_ok = fmt as f32 / n;
        Ok((rewards, rollouts))
    }

    /// Log-probs of every completion token under `model` (no graph), one vector per rollout.
    fn logps(&self, model: &Model, rollouts: &[Rollout]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(rollouts.len());
        for chunk in rollouts.chunks(self.cfg.micro_batch.max(1)) {
            let batch = Batch::from_sequences(&chunk.iter().map(|r| r.ids.as_slice()).collect::<Vec<_>>());
            let lp = no_grad(|| model.token_logprobs(&batch, self.cfg.temperature.max(1e-6)))?;
            let v = lp.host_f32()?;
            for (r, &(s, _)) in chunk.iter().zip(&batch.seqs) {
                out.push(v[s + r.prompt_len - 1..s + r.ids.len() - 1].to_vec());
            }
        }
        Ok(out)
    }

    /// Loss, KL, clip fraction and the gradients of the policy loss. The loss is one op over
    /// the whole batch (its weights need every sequence): it runs on the log-probs first, and
    /// its gradient then flows back through the model micro-batch by micro-batch.
    /// On the first epoch π_θ = π_old in value, so the sampler's log-probs stand in for a
    /// forward pass (`fresh` = false); later epochs recompute them.
    fn policy_gradient(&self, rollouts: &[Rollout], raw_adv: &[f32], adv: &[f32], ref_lp: Option<&[Vec<f32>]>, fresh: bool) -> Result<(f32, f32, f32, StepGrads)> {
        let n = rollouts.len();
        let t = rollouts.iter().map(|r| r.ids.len() - r.prompt_len).max().unwrap_or(0).max(1);
        let cur = if fresh { self.logps(&self.model, rollouts)? } else { rollouts.iter().map(|r| r.old_logp.clone()).collect() };
        let mut x = vec![0.0f32; n * t];
        let (mut old, mut refm, mut mask, mut seg) = (vec![0.0f32; n * t], vec![0.0f32; n * t], vec![0.0f32; n * t], vec![0i32; n * t]);
        let mut h_tok = vec![0.0f32; n * t];
        for (i, r) in rollouts.iter().enumerate() {
            for j in 0..r.ids.len() - r.prompt_len {
                let k = i * t + j;
                x[k] = cur[i][j];
                old[k] = r.old_logp[j];
                refm[k] = ref_lp.map_or(0.0, |rl| rl[i][j]);
                mask[k] = 1.0;
                seg[k] = if j < r.think_len { 1 } else { 2 };
                h_tok[k] = if j < r.think_len { r.entropy[j] } else { 0.0 };
            }
        }
        let tok_adv;
        let (adv_slice, per_token) = if self.cfg.entropy_granularity == Granularity::Token {
            let think_mask: Vec<f32> = seg.iter().zip(&mask).map(|(&s, &m)| if s == 1 { m } else { 0.0 }).collect();
            let bonus = EntropyBonus { lambda: self.cfg.entropy_lambda, alpha: self.cfg.entropy_alpha };
            // A'_{i,t} = A_i + min(λH_{i,t}, |A_i|/α) on think tokens, A_i on result tokens.
            let with_bonus = token_advantages(raw_adv, &h_tok, Some(&think_mask), t, bonus);
            tok_adv = (0..n * t).map(|k| if think_mask[k] > 0.0 { with_bonus[k] } else { raw_adv[k / t] * mask[k] }).collect::<Vec<f32>>();
            (tok_adv.as_slice(), true)
        } else {
            (adv, false)
        };
        let agg = match self.cfg.loss_agg {
            AggKind::TokenMean => LossAgg::TokenMean,
            AggKind::SeqMean => LossAgg::SeqMean,
            AggKind::Srml => LossAgg::Srml { alpha: self.cfg.srml_alpha },
        };
        let cfg = PolicyLossCfg { eps_low: self.cfg.eps_low, eps_high: self.cfg.eps_high, beta: self.cfg.beta, agg };
        let input = PolicyLossInput {
            logp: &x, old_logp: &old, ref_logp: ref_lp.map(|_| refm.as_slice()), adv: adv_slice, adv_per_token: per_token,
            mask: &mask, seg: Some(&seg), n_seq: n, t,
        };
        let (stats, dx) = policy_loss_on(self.model.device(), &input, &cfg, 1.0)?;
        // Backward per micro-batch: the loss is linear in each token's log-prob gradient.
        let params = self.model.named_params();
        let mut acc = StepGrads::on(self.model.device());
        for (c, chunk) in rollouts.chunks(self.cfg.micro_batch.max(1)).enumerate() {
            let first = c * self.cfg.micro_batch.max(1);
            let batch = Batch::from_sequences(&chunk.iter().map(|r| r.ids.as_slice()).collect::<Vec<_>>());
            let lp = self.model.token_logprobs(&batch, self.cfg.temperature.max(1e-6))?;
            let rows = batch.ids.len();
            let mut w = vec![0.0f32; 2 * rows];
            for (k, (r, &(s, _))) in chunk.iter().zip(&batch.seqs).enumerate() {
                let i = first + k;
                for j in 0..r.ids.len() - r.prompt_len {
                    w[s + r.prompt_len - 1 + j] = dx[i * t + j];
                }
            }
            // Σ w·logp has exactly the policy loss's gradient with respect to these log-probs.
            let grads = ops::weighted_sum(&lp, &w)?.backward()?;
            acc.add(&params, &grads)?;
        }
        Ok((stats.loss, stats.kl, stats.clip_frac, acc))
    }

    /// Greedy held-out accuracy over the first `limit` eval samples, overall and per category.
    pub fn evaluate(&self, limit: usize) -> Result<HeldOut> {
        let samples = &self.eval[..limit.min(self.eval.len())];
        let mut h = heldout::evaluate(&self.model, &self.tok, samples, &|s| self.prompt_ids(s), self.answer_format(), self.cfg.max_new_tokens)?;
        h.step = self.step;
        Ok(h)
    }

    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        checkpoint::save(&self.cfg.run_dir, &self.model, &self.opt, &self.state())
    }
}

/// Training and eval prompts, and the starting policy. For the embedded default, this builds
/// the task and tiny model and runs the SRML warm-up (`<run_dir>/sft`) unless it already ran.
pub fn materialize(cfg: &GrpoConfig, device: Device) -> Result<(Vec<Sample>, Vec<Sample>, PathBuf)> {
    let sft_cfg = crate::train::sft::SftConfig {
        model: cfg.model.clone(),
        data: cfg.data.clone(),
        eval_data: cfg.eval_data.clone(),
        run_dir: cfg.run_dir.join("sft"),
        steps: cfg.warmup_sft_steps,
        seed: cfg.seed,
        task_train: cfg.task_train,
        task_eval: cfg.task_eval,
        eval_samples: 0,
        save_every: 0,
        preset: cfg.preset.clone(),
        ..Default::default()
    };
    let (train, eval, base) = crate::train::sft::materialize(&sft_cfg)?;
    let start = match &cfg.model {
        Some(m) => m.clone(),
        None => {
            let done = checkpoint::dir_for(&sft_cfg.run_dir, sft_cfg.steps);
            if !done.join("trainer_state.json").exists() {
                if sft_cfg.steps == 0 {
                    return Ok((train, eval, base));
                }
                eprintln!("SRML warm-up: {} SFT steps on the embedded task (once; kept in {})", sft_cfg.steps, sft_cfg.run_dir.display());
                crate::train::sft::run_on(sft_cfg.clone(), true, device)?;
            }
            done
        }
    };
    Ok((train, eval, start))
}

/// The whole run: config.toml, metrics.jsonl, curves.svg, checkpoints, eval before and after.
pub fn run(cfg: GrpoConfig, resume: bool) -> Result<(Option<f32>, Option<f32>)> {
    run_on(cfg, resume, Device::Cpu)
}

/// [`run`] with the model on `device` (the SRML warm-up of the embedded default too).
pub fn run_on(cfg: GrpoConfig, resume: bool, device: Device) -> Result<(Option<f32>, Option<f32>)> {
    let mut t = GrpoTrainer::new_on(cfg.clone(), resume, device)?;
    let run_dir = cfg.run_dir.clone();
    std::fs::write(run_dir.join("config.toml"), toml::to_string_pretty(&cfg)?).with_context(|| format!("cannot write {}/config.toml", run_dir.display()))?;
    let metrics_path = run_dir.join("metrics.jsonl");
    let mut metrics = MetricsWriter::open(&metrics_path, t.step)?;
    let mut before = None;
    if cfg.eval_samples > 0 && t.step == 0 {
        let h = t.evaluate(cfg.eval_samples)?;
        eprintln!("held-out accuracy before GRPO: {:.1}% ({})", 100.0 * h.accuracy, h.summary());
        h.write(&run_dir, "before")?;
        metrics.write(&GrpoMetrics { step: 0, eval_accuracy: Some(h.accuracy), ..Default::default() })?;
        before = Some(h.accuracy);
    } else if let Ok(lines) = crate::jsonl::read::<GrpoMetrics>(&metrics_path) {
        before = lines.iter().find(|l| l.step == 0).and_then(|l| l.eval_accuracy);
    }
    let pb = if std::io::stderr().is_terminal() { indicatif::ProgressBar::new(cfg.steps) } else { indicatif::ProgressBar::hidden() };
    pb.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}").unwrap());
    pb.set_position(t.step);
    let mut after = None;
    while t.step < cfg.steps {
        let mut m = t.step()?;
        if m.step == cfg.steps && cfg.eval_samples > 0 {
            let h = t.evaluate(cfg.eval_samples)?;
            pb.suspend(|| eprintln!("held-out accuracy after GRPO: {:.1}% ({})", 100.0 * h.accuracy, h.summary()));
            h.write(&run_dir, "after")?;
            m.eval_accuracy = Some(h.accuracy);
            after = Some(h.accuracy);
        }
        metrics.write(&m)?;
        pb.set_position(m.step);
        pb.set_message(format!("reward {:.3} acc {:.3} H {:.3} kl {:.4} {:.0} tok/s", m.reward_mean, m.accuracy, m.cot_entropy, m.kl, m.tokens_per_s));
        if !pb.is_hidden() || m.step % 5 == 0 || m.step == cfg.steps {
            let _ = crate::train::plot::curves(&metrics_path, &run_dir.join("curves.svg"));
        }
        if (cfg.save_every > 0 && m.step % cfg.save_every == 0) || m.step == cfg.steps {
            t.save_checkpoint()?;
        }
    }
    pb.finish_and_clear();
    if let (Some(b), Some(a)) = (before, after) {
        eprintln!("held-out accuracy: {:.1}% before GRPO → {:.1}% after ({:+.1} points)", 100.0 * b, 100.0 * a, 100.0 * (a - b));
    }
    Ok((before, after))
}

/// Runs `f` inside an NVTX range, so an Nsight Systems timeline shows the training phases.
fn ranged<T>(name: &str, f: impl FnOnce() -> T) -> T {
    let _r = crate::backend::nvtx_range(name);
    f()
}

pub fn load_config(path: Option<&Path>) -> Result<GrpoConfig> {
    match path {
        None => Ok(GrpoConfig::default()),
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
            toml::from_str(&text).with_context(|| format!("{}: invalid train config", p.display()))
        }
    }
}

/// Rejects settings that cannot work, with the option's name.
pub fn validate(cfg: &GrpoConfig) -> Result<()> {
    if !(cfg.temperature > 0.0) {
        bail!("--temperature must be positive for GRPO rollouts, got {}", cfg.temperature);
    }
    if !(0.0..=1.0).contains(&cfg.srml_alpha) {
        bail!("--srml-alpha must be in [0, 1], got {}", cfg.srml_alpha);
    }
    if cfg.entropy_alpha <= 0.0 {
        bail!("--entropy-alpha must be positive, got {}", cfg.entropy_alpha);
    }
    Ok(())
}
