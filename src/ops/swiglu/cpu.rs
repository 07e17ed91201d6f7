use rayon::prelude::*;

const CHUNK: usize = 4096;

use crate::ops::fastmath::{self, vectorized};

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + fastmath::exp(-x))
}

pub fn forward(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let mut y = vec![0.0; gate.len()];
    y.par_chunks_mut(CHUNK).zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK))).for_each(|(y, (g, u))| {
        vectorized(|| {
            for i in 0..y.len() {
                y[i] = g[i] * sigmoid(g[i]) * u[i];
            }
        })
    });
    y
}

/// d/dg silu(g)·u = u·s·(1 + g·(1 − s)), d/du = silu(g).
pub fn backward(gate: &[f32], up: &[f32], grad: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut dg = vec![0.0; gate.len()];
    let mut du = vec![0.0; gate.len()];
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)).zip(grad.par_chunks(CHUNK)))
        .for_each(|((dg, du), ((g, u), gr))| {
            vectorized(|| {
                for i in 0..dg.len() {
                    let s = sigmoid(g[i]);
                    dg[i] = gr[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                    du[i] = gr[i] * g[i] * s;
                }
            })
        });
    (dg, du)
}
