use rayon::prelude::*;

use super::RopeTable;

/// Rotates every head of every token; `inverse` rotates by −angle (the backward pass).
pub fn apply(
    x: &[f32],
    heads: usize,
    head_dim: usize,
    positions: &[u32],
    table: &RopeTable,
    inverse: bool,
) -> Vec<f32> {
    let half = head_dim / 2;
    let row = heads * head_dim;
    let mut y = vec![0.0; x.len()];
    y.par_chunks_mut(row).zip(x.par_chunks(row)).zip(positions.par_iter()).for_each(|((yr, xr), &pos)| {
        let (cos, mut sin) = table.cos_sin(pos);
        if inverse {
            sin.iter_mut().for_each(|s| *s = -*s);
        }
        for (yh, xh) in yr.chunks_exact_mut(head_dim).zip(xr.chunks_exact(head_dim)) {
            for i in 0..half {
                let (a, b) = (xh[i], xh[i + half]);
                yh[i] = a * cos[i] - b * sin[i];
                yh[i + half] = b * cos[i] + a * sin[i];
            }
        }
    });
    y
}
