//! Data-parallel SFT on emulated ranks (threads with `dist::collective::ThreadGroup`): the same
//! global batch on 1, 2 and 4 ranks gives the same parameters and metrics.

use std::time::Duration;

use fcgpu::dist::collective::ThreadGroup;
use fcgpu::train::probe::{copy_batch, probe_model, probe_trainer};
use fcgpu::train::tiny::TinySize;

const STEPS: u64 = 20;
const ACCUM: usize = 4;
const SEED: u64 = 3;

/// Each rank's final parameters (flattened, by name order) and the loss of every step.
fn run(ranks: usize) -> Vec<(Vec<f32>, Vec<f32>)> {
    let group = ThreadGroup::new(ranks, Duration::from_secs(120));
    std::thread::scope(|sc| {
        let hs: Vec<_> = group
            .into_iter()
            .map(|g| {
                sc.spawn(move || {
                    let mut t = probe_trainer(probe_model(TinySize::TINY, SEED).unwrap(), 3e-3, STEPS);
                    t.cfg.grad_accum = ACCUM;
                    if ranks > 1 {
                        t.set_collective(Box::new(g)).unwrap();
                    }
                    let mut losses = Vec::new();
                    for s in 0..STEPS {
                        // The global batch: every rank is given all of it and takes its share.
                        let micro: Vec<_> = (0..ACCUM as u64)
                            .map(|k| copy_batch(SEED, s * ACCUM as u64 + k, 2, 24))
                            .collect();
                        losses.push(t.step_on(&micro).unwrap().loss);
                    }
                    let params: Vec<f32> =
                        t.model.trainable_params().iter().flat_map(|(_, p)| p.to_vec()).collect();
                    (params, losses)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn two_and_four_ranks_train_like_one() {
    let one = run(1).pop().unwrap();
    for ranks in [2, 4] {
        let out = run(ranks);
        for (r, (params, losses)) in out.iter().enumerate() {
            assert_eq!(params, &out[0].0, "{ranks} ranks: rank {r} holds other parameters than rank 0");
            let dl = losses.iter().zip(&one.1).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            let dp = params.iter().zip(&one.0).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            eprintln!(
                "{ranks} ranks, rank {r}: after {STEPS} steps max |Δ param| {dp:.1e}, max |Δ loss| {dl:.1e}"
            );
            assert!(dp <= 1e-6, "{ranks} ranks: parameters differ from one rank's by {dp}");
            assert!(dl <= 1e-5, "{ranks} ranks: losses differ from one rank's by {dl}");
        }
    }
}

#[test]
fn ranks_that_do_not_divide_the_accumulation_are_refused() {
    let mut group = ThreadGroup::new(3, Duration::from_secs(1));
    let mut t = probe_trainer(probe_model(TinySize::TINY, SEED).unwrap(), 3e-3, STEPS);
    t.cfg.grad_accum = ACCUM;
    let e = t.set_collective(Box::new(group.remove(0))).unwrap_err();
    assert!(format!("{e:#}").contains("3 ranks do not divide grad_accum 4"), "{e:#}");
}
