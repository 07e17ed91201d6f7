//! The embedded default: what `fcgpu sft` and `fcgpu train` use when no model or data is
//! given. It builds the synthetic task (`data::synth`), a byte-level BPE tokenizer trained on
//! it and the tiny Qwen2 model (`train::tiny`) in the run directory, and for `train` the SRML
//! warm-up that gives GRPO its starting policy. The trainers receive prepared [`Inputs`] and
//! know nothing of how they were made.

use std::path::PathBuf;

use anyhow::Result;

use crate::data::{synth, Sample};
use crate::fc::prompt::PromptStyle;
use crate::tensor::Device;
use crate::train::base;
use crate::train::checkpoint::{self, Start};
use crate::train::run_config::RunConfig;
use crate::train::sft::{self, SftConfig};
use crate::train::tiny::{self, TinySize};

/// What a trainer starts from: training and held-out samples and the model directory.
pub struct Inputs {
    pub train: Vec<Sample>,
    pub eval: Vec<Sample>,
    pub model: PathBuf,
    /// The file `train` was read from (its examples in order: [`data_lines`] maps them to lines).
    pub train_file: PathBuf,
}

/// The line number of every example of the JSONL file `path`, in order (its non-blank lines,
/// as `data::load_jsonl` reads them); empty when the file cannot be read.
pub fn data_lines(path: &std::path::Path) -> Vec<usize> {
    let Ok(text) = crate::jsonl::read_text(path) else { return vec![] };
    text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()).map(|(i, _)| i + 1).collect()
}

/// Training and eval samples, and the model directory; builds the embedded default (task,
/// tokenizer, tiny model) in the run directory when they are not given and not there yet.
pub fn inputs(run_cfg: &RunConfig, eval_fraction: f32) -> Result<Inputs> {
    let run = &run_cfg.run_dir;
    let task_dir = run.join("task");
    let (train_p, eval_p) = (task_dir.join("train.jsonl"), task_dir.join("eval.jsonl"));
    // Given data is read and checked first: a bad file fails before any task or model is built.
    let given = match &run_cfg.data {
        None => None,
        Some(d) => {
            let mut all: Vec<Sample> = crate::data::load_jsonl(d)?;
            anyhow::ensure!(
                !all.is_empty(),
                "{}: no examples (the file is empty or only blank lines)",
                d.display()
            );
            Some(match &run_cfg.eval_data {
                Some(e) => (all, crate::data::load_jsonl(e)?),
                None => {
                    let n_eval =
                        ((all.len() as f32 * eval_fraction) as usize).min(all.len().saturating_sub(1));
                    let eval = all.split_off(all.len() - n_eval);
                    (all, eval)
                }
            })
        }
    };
    check_base(run_cfg)?;
    let need_task = run_cfg.data.is_none() || run_cfg.model.is_none();
    if need_task && !(train_p.exists() && eval_p.exists()) {
        // Checked before anything is generated: the task is built in memory.
        anyhow::ensure!(
            (1..=MAX_TASK_SAMPLES).contains(&run_cfg.task_train),
            "task_train (--task-train) must be 1..={MAX_TASK_SAMPLES}, got {}",
            run_cfg.task_train
        );
        anyhow::ensure!(
            run_cfg.task_eval <= MAX_TASK_SAMPLES,
            "task_eval must be at most {MAX_TASK_SAMPLES}, got {}",
            run_cfg.task_eval
        );
        let (tr, ev) = synth::generate(run_cfg.seed, run_cfg.task_train, run_cfg.task_eval);
        synth::write_jsonl(&eval_p, &ev)?;
        synth::write_jsonl(&train_p, &tr)?;
    }
    let (train, eval) = match given {
        None => (crate::data::load_jsonl(&train_p)?, crate::data::load_jsonl(&eval_p)?),
        Some(te) => te,
    };
    let model_dir = match &run_cfg.model {
        Some(m) => m.clone(),
        None if run_cfg.base == base::SHIPPED => {
            let dir = run.join("base-model");
            base::write(&dir)?;
            dir
        }
        None => {
            let dir = run.join("base-model");
            if !dir.join("model.safetensors").exists() {
                let task: Vec<Sample> = crate::data::load_jsonl(&train_p)?;
                let compact = crate::train::prompt::Prompter { template: None, style: PromptStyle::Compact };
                let texts: Vec<String> = task
                    .iter()
                    .map(|s| {
                        Ok(format!(
                            "{}{}{}",
                            compact.text(s)?,
                            crate::fc::prompt::render_target(s),
                            tiny::IM_END
                        ))
                    })
                    .collect::<Result<_>>()?;
                let tok = tiny::train_tokenizer(&texts, run_cfg.vocab_size)?;
                let mut m = tiny::build(
                    &dir,
                    &tok,
                    TinySize::by_name(&run_cfg.preset)?,
                    run_cfg.seed,
                    run_cfg.copy_heads,
                )?;
                if run_cfg.copy_warmup_steps > 0 {
                    m = crate::train::probe::copy_pretrain(m, &tok, run_cfg.copy_warmup_steps, run_cfg.seed)?;
                    m.save(&dir, None)?;
                }
                eprintln!(
                    "built the {} model ({} parameters, vocab {}) in {}",
                    run_cfg.preset,
                    m.named_params().iter().map(|(_, t)| t.numel()).sum::<usize>(),
                    tok.vocab_size(),
                    dir.display()
                );
            }
            dir
        }
    };
    let train_file = run_cfg.data.clone().unwrap_or(train_p);
    Ok(Inputs { train, eval, model: model_dir, train_file })
}

/// The `base` option names a known start, and the options that shape a fresh model are not
/// set when the shipped checkpoint is used instead (they would be silently ignored).
fn check_base(run: &RunConfig) -> Result<()> {
    base::check(&run.base)?;
    if run.model.is_some() || run.base == base::SCRATCH {
        return Ok(());
    }
    let fresh = RunConfig::sft();
    let set: Vec<&str> = [
        ("preset", run.preset != fresh.preset),
        ("vocab_size", run.vocab_size != fresh.vocab_size),
        ("copy_heads", run.copy_heads != fresh.copy_heads),
        ("copy_warmup_steps", run.copy_warmup_steps != fresh.copy_warmup_steps),
    ]
    .into_iter()
    .filter_map(|(k, differs)| differs.then_some(k))
    .collect();
    anyhow::ensure!(
        set.is_empty(),
        "{} shape a fresh tiny model, but base = `{}` starts from the shipped checkpoint; \
         set base = `{}` (--base {}) to build one",
        set.join(", "),
        run.base,
        base::SCRATCH,
        base::SCRATCH
    );
    Ok(())
}

/// Most samples of the embedded task per split (about 1 KB each in memory).
pub const MAX_TASK_SAMPLES: usize = 1_000_000;

/// GRPO's inputs. Given a model, that model; for the embedded default, the tiny model after
/// `warmup_steps` SRML SFT steps on the task (run once in `<run_dir>/sft`, with `sft`'s
/// optimizer defaults and the run's seed and task options; `force` goes to its resume check).
pub fn policy(run: &RunConfig, warmup_steps: u64, device: Device, force: bool) -> Result<Inputs> {
    let warmup = SftConfig {
        run: RunConfig {
            model: run.model.clone(),
            data: run.data.clone(),
            eval_data: run.eval_data.clone(),
            run_dir: run.run_dir.join("sft"),
            steps: warmup_steps,
            seed: run.seed,
            task_train: run.task_train,
            task_eval: run.task_eval,
            vocab_size: run.vocab_size,
            copy_warmup_steps: run.copy_warmup_steps,
            copy_heads: run.copy_heads,
            base: run.base.clone(),
            eval_samples: 0,
            save_every: 0,
            preset: run.preset.clone(),
            ..RunConfig::sft()
        },
        ..Default::default()
    };
    let base = inputs(&warmup.run, warmup.eval_fraction)?;
    if run.model.is_some() || warmup_steps == 0 {
        return Ok(base);
    }
    let done = checkpoint::dir_for(&warmup.run.run_dir, warmup_steps);
    if !done.join("trainer_state.json").exists() {
        eprintln!(
            "SRML warm-up: {warmup_steps} SFT steps on the embedded task (once; kept in {})",
            warmup.run.run_dir.display()
        );
        sft::run(warmup, Start { resume: true, force }, device)?;
    }
    Ok(Inputs { model: done, ..base })
}
