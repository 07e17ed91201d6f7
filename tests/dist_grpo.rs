//! Data-parallel GRPO on emulated ranks (threads with `dist::collective::ThreadGroup`): each rank
//! rolls out its own groups of the step's prompts; the same steps on 1, 2 and 4 ranks give the
//! same metrics and parameters.

use std::path::Path;
use std::time::Duration;

use fcgpu::dist::collective::ThreadGroup;
use fcgpu::train::checkpoint::Start;
use fcgpu::train::grpo::{GrpoConfig, GrpoTrainer};
use fcgpu::train::run_config::RunConfig;
use fcgpu::Device;

const STEPS: usize = 3;

fn config(run_dir: &Path) -> GrpoConfig {
    GrpoConfig {
        run: RunConfig {
            run_dir: run_dir.to_path_buf(),
            steps: STEPS as u64,
            task_train: 60,
            task_eval: 8,
            eval_samples: 0,
            seed: 5,
            ..RunConfig::grpo()
        },
        prompts_per_step: 4,
        group_size: 4,
        max_new_tokens: 160,
        temperature: 1.2,
        // One group per micro-batch, so every rank count backpropagates the same chunks.
        micro_batch: 4,
        beta: 0.01,
        dynamic_sampling: false,
        ..Default::default()
    }
}

/// One rank's (reward mean, loss, gradient norm) per step, and its final parameters.
type RankRun = (Vec<(f32, f32, f32)>, Vec<f32>);

fn run(ranks: usize, root: &Path) -> Vec<RankRun> {
    let group = ThreadGroup::new(ranks, Duration::from_secs(300));
    std::thread::scope(|sc| {
        let hs: Vec<_> = group
            .into_iter()
            .enumerate()
            .map(|(r, g)| {
                let dir = root.join(format!("{ranks}-ranks/rank{r}"));
                sc.spawn(move || {
                    let mut t = GrpoTrainer::new(config(&dir), Start::FRESH, Device::Cpu).unwrap();
                    if ranks > 1 {
                        t.set_collective(Box::new(g)).unwrap();
                    }
                    let steps: Vec<(f32, f32, f32)> = (0..STEPS)
                        .map(|_| {
                            let m = t.step().unwrap();
                            (m.reward_mean, m.loss, m.grad_norm)
                        })
                        .collect();
                    let params = t.model.trainable_params().iter().flat_map(|(_, p)| p.to_vec()).collect();
                    (steps, params)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn two_and_four_ranks_train_like_one() {
    let dir = tempfile::tempdir().unwrap();
    let one = run(1, dir.path()).pop().unwrap();
    // Groups with mixed rewards: real advantages and gradients, not only the KL term's.
    assert!(one.0.iter().any(|s| s.2 > 1e-2), "a step with a policy gradient: {:?}", one.0);
    for ranks in [2, 4] {
        for (r, (steps, params)) in run(ranks, dir.path()).into_iter().enumerate() {
            let dp = params.iter().zip(&one.1).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            eprintln!("{ranks} ranks, rank {r}: steps {steps:?} vs {:?}; max |Δ param| {dp:.1e}", one.0);
            for ((a, b), s) in steps.iter().zip(&one.0).zip(1..) {
                assert_eq!(a.0, b.0, "{ranks} ranks, rank {r}, step {s}: reward mean");
                assert!((a.1 - b.1).abs() <= 1e-6 * (1.0 + b.1.abs()), "step {s}: loss {} vs {}", a.1, b.1);
                assert!(
                    (a.2 - b.2).abs() <= 1e-5 * b.2.abs().max(1e-6),
                    "step {s}: grad norm {} vs {}",
                    a.2,
                    b.2
                );
            }
            assert!(dp <= 1e-6, "{ranks} ranks, rank {r}: parameters differ from one rank's by {dp}");
        }
    }
}

#[test]
fn ranks_that_split_a_group_or_resample_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut group = ThreadGroup::new(3, Duration::from_secs(1));
    let mut t = GrpoTrainer::new(config(&dir.path().join("a")), Start::FRESH, Device::Cpu).unwrap();
    let e = t.set_collective(Box::new(group.remove(0))).unwrap_err();
    assert!(format!("{e:#}").contains("3 ranks do not divide prompts_per_step 4"), "{e:#}");
    let mut cfg = config(&dir.path().join("b"));
    cfg.dynamic_sampling = true;
    let mut t = GrpoTrainer::new(cfg, Start::FRESH, Device::Cpu).unwrap();
    let e = t.set_collective(Box::new(ThreadGroup::new(2, Duration::from_secs(1)).remove(0))).unwrap_err();
    assert!(format!("{e:#}").contains("dynamic sampling"), "{e:#}");
}
