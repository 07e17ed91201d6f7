//! GRPO: the policy-loss op against PyTorch, and the trainer's step, resume and NaN guard.

use fcgpu::train::run_config::RunConfig;
use std::path::Path;

use fcgpu::model::weights::load_all;
use fcgpu::rl::policy_loss::{
    policy_loss, policy_loss_with, ImportanceLevel, LossAgg, PolicyLossCfg, PolicyLossInput, RatioCfg,
    RolloutCorrection,
};
use fcgpu::train::checkpoint::Start;
use fcgpu::train::grpo::{self, GrpoConfig, GrpoMetrics};
use fcgpu::Device;

#[test]
fn policy_loss_matches_pytorch_autograd() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rl/policy_loss.safetensors");
    let r = load_all(&path).unwrap();
    let mut cases = 0;
    while let Some(cfg) = r.get(&format!("case{cases}.cfg")) {
        let k = |n: &str| r[&format!("case{cases}.{n}")].to_vec();
        let c = cfg.to_vec();
        let (logp, old, refl, adv, mask, grad) =
            (k("logp"), k("old"), k("ref"), k("adv"), k("mask"), k("grad"));
        let seg: Vec<i32> = k("seg").iter().map(|&x| x as i32).collect();
        let shape = r[&format!("case{cases}.logp")].shape().to_vec();
        let agg = match c[0] as i32 {
            0 => LossAgg::TokenMean,
            1 => LossAgg::SeqMean,
            _ => LossAgg::Srml,
        };
        let pcfg = PolicyLossCfg { eps_low: 0.2, eps_high: 0.28, beta: c[1], agg, srml_alpha: c[3] };
        let input = PolicyLossInput {
            logp: &logp,
            old_logp: &old,
            ref_logp: Some(&refl),
            adv: &adv,
            adv_per_token: c[2] == 1.0,
            mask: &mask,
            seg: Some(&seg),
            n_seq: shape[0],
            t: shape[1],
        };
        let (stats, dx) = policy_loss(&input, &pcfg, 1.0).unwrap();
        let expect = k("loss")[0];
        assert!(
            (stats.loss - expect).abs() < 1e-5 * (1.0 + expect.abs()),
            "case {cases}: loss {} vs {expect}",
            stats.loss
        );
        for (i, (a, b)) in dx.iter().zip(&grad).enumerate() {
            assert!((a - b).abs() < 1e-5, "case {cases}: d loss/d logp[{i}] {a} vs {b}");
        }
        cases += 1;
    }
    assert_eq!(cases, 12, "expected every fixture case");
}

/// Every rollout correction at both importance levels (token, GSPO's sequence) against torch
/// autograd: loss, d loss / d logp and the clip / masked / capped fractions
/// (tools/make_rl_reference.py, tests/fixtures/README.md).
#[test]
fn corrected_policy_loss_matches_pytorch_autograd() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rl/policy_loss_correction.safetensors");
    let r = load_all(&path).unwrap();
    let corrections = [
        RolloutCorrection::None,
        RolloutCorrection::TokenTis,
        RolloutCorrection::TokenMis,
        RolloutCorrection::SeqTis,
        RolloutCorrection::SeqMis,
    ];
    let mut cases = 0;
    let mut seen = Vec::new();
    while let Some(cfg) = r.get(&format!("case{cases}.cfg")) {
        let k = |n: &str| r[&format!("case{cases}.{n}")].to_vec();
        let c = cfg.to_vec();
        let seg: Vec<i32> = k("seg").iter().map(|&x| x as i32).collect();
        let shape = r[&format!("case{cases}.logp")].shape().to_vec();
        let agg = [LossAgg::TokenMean, LossAgg::SeqMean, LossAgg::Srml][c[0] as usize];
        let pcfg = PolicyLossCfg { eps_low: c[7], eps_high: c[8], beta: c[1], agg, srml_alpha: c[3] };
        let level = [ImportanceLevel::Token, ImportanceLevel::Sequence][c[4] as usize];
        let rc = RatioCfg { level, correction: corrections[c[5] as usize], cap: c[6] };
        seen.push((level, rc.correction));
        let (logp, old, roll, refl, adv, mask) =
            (k("logp"), k("old"), k("rollout"), k("ref"), k("adv"), k("mask"));
        let input = PolicyLossInput {
            logp: &logp,
            old_logp: &old,
            ref_logp: Some(&refl),
            adv: &adv,
            adv_per_token: c[2] == 1.0,
            mask: &mask,
            seg: Some(&seg),
            n_seq: shape[0],
            t: shape[1],
        };
        let (stats, dx) = policy_loss_with(&input, Some(&roll), &pcfg, &rc, 1.0).unwrap();
        let what = format!("case {cases} ({rc:?}, {agg:?})");
        let expect = k("loss")[0];
        assert!(
            (stats.loss - expect).abs() < 1e-5 * (1.0 + expect.abs()),
            "{what}: loss {} vs {expect}",
            stats.loss
        );
        for (i, (a, b)) in dx.iter().zip(&k("grad")).enumerate() {
            assert!((a - b).abs() < 1e-5, "{what}: d loss/d logp[{i}] {a} vs {b}");
        }
        let got = [stats.clip_frac, stats.rollout_masked_frac, stats.rollout_capped_frac];
        for (name, (a, b)) in ["clip", "masked", "capped"].iter().zip(got.iter().zip(&k("stats"))) {
            assert!((a - b).abs() < 1e-6, "{what}: {name} fraction {a} vs {b}");
        }
        cases += 1;
    }
    assert_eq!(cases, 30, "expected every fixture case");
    for level in [ImportanceLevel::Token, ImportanceLevel::Sequence] {
        for corr in corrections {
            assert!(seen.contains(&(level, corr)), "no case for {level:?} {corr:?}");
        }
    }
}

fn micro(run_dir: &Path) -> GrpoConfig {
    GrpoConfig {
        run: RunConfig {
            run_dir: run_dir.to_path_buf(),
            steps: 2,
            task_train: 60,
            task_eval: 8,
            eval_samples: 4,
            weight_decay: 0.1,
            save_every: 1,
            preset: "micro".into(),
            base: "scratch".into(),
            ..RunConfig::grpo()
        },
        prompts_per_step: 2,
        group_size: 3,
        max_new_tokens: 12,
        warmup_sft_steps: 0,
        beta: 0.01,
        micro_batch: 4,
        // The resume test checks that nothing is re-drawn; dynamic sampling has its own test.
        dynamic_sampling: false,
        ..Default::default()
    }
}

fn strip_timing(mut m: GrpoMetrics) -> GrpoMetrics {
    (m.tokens_per_s, m.seconds_rollout, m.seconds_reference, m.seconds_update, m.seconds) =
        (0.0, 0.0, 0.0, 0.0, 0.0);
    m
}

/// Runs `cfg` for its steps straight, and again stopped after step 1 and resumed; the metrics
/// (timings aside) and the final weights must be equal. Returns the straight run's metrics.
fn check_resume_exact(cfg: impl Fn(&Path) -> GrpoConfig) -> Vec<GrpoMetrics> {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    grpo::run(cfg(&straight), Start::FRESH, Device::Cpu).unwrap();
    let split = dir.path().join("split");
    // The same task and base model, so only the interruption differs.
    std::fs::create_dir_all(&split).unwrap();
    let copy = |sub: &str| {
        let (from, to) = (straight.join(sub), split.join(sub));
        std::fs::create_dir_all(&to).unwrap();
        for e in std::fs::read_dir(&from).unwrap() {
            let e = e.unwrap();
            if e.path().is_file() {
                std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
            }
        }
    };
    copy("sft/task");
    copy("sft/base-model");
    // A run stopped after step 1 (its last step also scored the held-out set), then resumed.
    let mut first = cfg(&split);
    first.run.steps = 1;
    grpo::run(first, Start::FRESH, Device::Cpu).unwrap();
    grpo::run(cfg(&split), Start::RESUME, Device::Cpu).unwrap();
    let read = |p: &Path| -> Vec<GrpoMetrics> {
        fcgpu::jsonl::read(&p.join("metrics.jsonl")).unwrap().into_iter().map(strip_timing).collect()
    };
    let mut resumed = read(&split);
    (resumed[1].heldout_accuracy, resumed[1].heldout_calls_accuracy) = (None, None);
    assert_eq!(read(&straight), resumed, "metrics after resume differ from an uninterrupted run");
    let a = fcgpu::model::Model::load(&straight.join("checkpoint-2")).unwrap();
    let b = fcgpu::model::Model::load(&split.join("checkpoint-2")).unwrap();
    for ((n, x), (_, y)) in a.named_params().iter().zip(&b.named_params()) {
        assert_eq!(x.to_vec(), y.to_vec(), "{n} differs after resume");
    }
    assert!(straight.join("curves.svg").exists());
    read(&straight)
}

#[test]
fn resume_continues_exactly() {
    let lines = check_resume_exact(micro);
    assert!(
        lines.first().unwrap().heldout_accuracy.is_some() && lines.last().unwrap().heldout_accuracy.is_some(),
        "eval before and after recorded"
    );
    let steps: Vec<&GrpoMetrics> = lines.iter().filter(|m| m.step > 0).collect();
    assert!(steps.iter().all(|m| m.completion_tokens > 0 && m.kl.is_finite()));
    assert!(
        steps.iter().all(|m| m.resampled_groups == 0 && m.zero_var_groups == m.zero_var_groups_first_draw),
        "no re-draws without dynamic sampling"
    );
}

#[test]
fn resume_continues_exactly_with_dynamic_sampling() {
    let cfg = |d: &Path| GrpoConfig { dynamic_sampling: true, max_resample: 2, ..micro(d) };
    let lines = check_resume_exact(cfg);
    for m in lines.iter().filter(|m| m.step > 0) {
        assert!(
            m.zero_var_groups <= m.zero_var_groups_first_draw,
            "step {}: re-draws only replace zero-variance groups",
            m.step
        );
        assert!(
            m.resample_rounds <= 2 && m.resampled_groups <= 2 * 2,
            "step {}: at most max_resample rounds of at most prompts_per_step",
            m.step
        );
        assert_eq!(
            m.resample_rounds > 0,
            m.zero_var_groups_first_draw > 0.0,
            "step {}: re-draws exactly when the first draw has zero-variance groups",
            m.step
        );
        if m.resample_rounds < 2 {
            assert_eq!(
                m.zero_var_groups, 0.0,
                "step {}: stopped early only when no zero-variance group was left",
                m.step
            );
        }
    }
}

#[test]
fn non_finite_loss_stops_without_touching_weights() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = micro(dir.path());
    (cfg.run.steps, cfg.run.eval_samples) = (1, 0);
    let mut t = grpo::GrpoTrainer::new(cfg, Start::FRESH, Device::Cpu).unwrap();
    t.model.visit_mut(&mut |n, p| {
        if n == "model.norm.weight" {
            let mut v = p.to_vec();
            v[0] = f32::NAN;
            p.replace_data(v).unwrap();
        }
    });
    let before: Vec<Vec<f32>> = t.model.named_params().iter().map(|(_, p)| p.to_vec()).collect();
    let err = format!("{:#}", t.step().unwrap_err());
    assert!(
        err.contains("NaN") || err.contains("nan") || err.contains("not finite") || err.contains("inf"),
        "{err}"
    );
    let after: Vec<Vec<f32>> = t.model.named_params().iter().map(|(_, p)| p.to_vec()).collect();
    let same =
        before.iter().zip(&after).all(|(a, b)| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()));
    assert!(same, "weights changed after a failed step");
    assert_eq!(t.step, 0);
}
