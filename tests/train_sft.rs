//! SFT end to end on a micro model: exact resume, NaN guard, learnable α, config round trip.

use fcgpu::train::run_config::RunConfig;
use std::path::Path;

use fcgpu::model::weights;
use fcgpu::train::checkpoint::Start;
use fcgpu::train::metrics::{self, SftMetrics};
use fcgpu::train::sft::{self, SftConfig, Trainer};
use fcgpu::train::srml::{AlphaMode, LossKind};
use fcgpu::Device;

fn cfg(dir: &Path, steps: u64) -> SftConfig {
    SftConfig {
        run: RunConfig {
            run_dir: dir.to_path_buf(),
            steps,
            lr: 5e-3,
            warmup_steps: 2,
            save_every: 0,
            preset: "micro".into(),
            task_train: 40,
            task_eval: 6,
            vocab_size: 400,
            eval_samples: 6,
            ..RunConfig::sft()
        },
        batch_size: 3,
        grad_accum: 2,
        bucket_window: 6,
        ..Default::default()
    }
}

fn strip_timing(ms: Vec<SftMetrics>) -> Vec<SftMetrics> {
    ms.into_iter().map(|m| SftMetrics { tokens_per_s: 0.0, seconds: 0.0, ..m }).collect()
}

#[test]
fn resume_continues_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    // Learnable α: its parameter and moments must survive the resume too.
    let mut c = cfg(&a, 6);
    c.alpha_mode = AlphaMode::Learnable;
    let straight = sft::run(c.clone(), Start::FRESH, Device::Cpu).unwrap();
    assert_eq!(straight.steps_run, 6);

    // Same config (and so the same 6-step schedule) in another run directory.
    let mut c3b = c.clone();
    c3b.run.run_dir = b.clone();
    // First half: run steps 1-3 with the 6-step schedule by stopping after 3.
    {
        let mut t = Trainer::new(c3b.clone(), Start::FRESH, Device::Cpu).unwrap();
        let mut w = metrics::MetricsWriter::open(&b.join("metrics.jsonl"), 0).unwrap();
        for _ in 0..3 {
            let m = t.step().unwrap();
            w.write(&m).unwrap();
        }
        t.save_checkpoint().unwrap();
        // A step past the checkpoint that the resumed run must overwrite.
        let m = t.step().unwrap();
        w.write(&m).unwrap();
    }
    let resumed = sft::run(c3b, Start::RESUME, Device::Cpu).unwrap();
    assert_eq!(resumed.steps_run, 3);

    let ma = strip_timing(metrics::read(&a.join("metrics.jsonl")).unwrap());
    let mb = strip_timing(metrics::read(&b.join("metrics.jsonl")).unwrap());
    assert_eq!(ma.len(), 6);
    assert_eq!(ma, mb);
    assert!(ma.iter().any(|m| (m.alpha - 0.7).abs() > 1e-6), "learnable α never moved");
    let wa = weights::load_all(&a.join("checkpoint-6/model.safetensors")).unwrap();
    let wb = weights::load_all(&b.join("checkpoint-6/model.safetensors")).unwrap();
    assert_eq!(wa.len(), wb.len());
    for (n, t) in &wa {
        assert_eq!(t.to_vec(), wb[n].to_vec(), "{n} differs after resume");
    }
    let oa = weights::load_all(&a.join("checkpoint-6/optimizer.safetensors")).unwrap();
    assert!(oa.contains_key("m.srml.alpha_logit") && oa.keys().any(|k| k.starts_with("v.model.")));
    // Checkpoint is a loadable HF model directory with its tokenizer.
    for f in ["config.json", "tokenizer.json", "generation_config.json", "trainer_state.json"] {
        assert!(a.join("checkpoint-6").join(f).exists(), "{f} missing");
    }
    assert!(a.join("config.toml").exists() && a.join("eval.json").exists());
    let resolved: SftConfig =
        toml::from_str(&std::fs::read_to_string(a.join("config.toml")).unwrap()).unwrap();
    // The file holds the config with the style and think rule resolved (the embedded task:
    // compact prompts, targets with reasoning).
    let c = SftConfig { style: Some(fcgpu::fc::prompt::PromptStyle::Compact), think: Some(true), ..c };
    assert_eq!(resolved, c);
    assert_eq!(
        fcgpu::train::prompt::recorded(&a.join("checkpoint-6")).unwrap(),
        Some(fcgpu::train::prompt::TrainFormat { style: c.style.unwrap(), think: true })
    );
}

#[test]
fn loss_falls_on_micro_model() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cfg(tmp.path(), 12);
    c.run.lr = 1e-2;
    c.loss = LossKind::Plain;
    let s = sft::run(c, Start::FRESH, Device::Cpu).unwrap();
    assert!(s.last_loss < s.first_loss - 0.5, "loss {} -> {}", s.first_loss, s.last_loss);
}

#[test]
fn non_finite_loss_stops_before_update() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(cfg(tmp.path(), 4), Start::FRESH, Device::Cpu).unwrap();
    t.step().unwrap();
    let before: Vec<(String, Vec<f32>)> =
        t.model.named_params().iter().map(|(n, p)| (n.clone(), p.to_vec())).collect();
    let adam_step = t.opt.step;
    // Poison one norm weight: every logit becomes NaN.
    let mut first = true;
    t.model.visit_mut(&mut |n, p| {
        if first && n == "model.norm.weight" {
            let mut v = p.to_vec();
            v[0] = f32::NAN;
            p.replace_data(v).unwrap();
            first = false;
        }
    });
    let poisoned: Vec<(String, Vec<f32>)> =
        t.model.named_params().iter().map(|(n, p)| (n.clone(), p.to_vec())).collect();
    let err = t.step().unwrap_err().to_string();
    assert!(err.contains("loss is NaN") && err.contains("weights unchanged"), "{err}");
    assert_eq!(t.step, 1);
    assert_eq!(t.opt.step, adam_step);
    let after: Vec<(String, Vec<f32>)> =
        t.model.named_params().iter().map(|(n, p)| (n.clone(), p.to_vec())).collect();
    for ((n, a), (_, b)) in poisoned.iter().zip(&after) {
        assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "{n} was updated");
    }
    assert_eq!(before.len(), after.len());
}
