//! Blockwise attention on the CPU: per (sequence, head), query blocks of `BQ` rows; scores and
//! products go through gemm with strides straight into the packed layout.

use rayon::prelude::*;

use super::Dims;
use crate::ops::fastmath;
use crate::ops::matmul::cpu::gemm_strided;
use crate::ops::SendPtr;

const BQ: usize = 64;

pub struct Saved<'a> {
    pub out: &'a [f32],
    /// Log-sum-exp of the scaled scores, `[tokens, q_heads]`.
    pub lse: &'a [f32],
}

/// Softmax of the first `valid(r)` entries of each row of `s` (`rows × cols`), in place; the
/// rest become 0. Returns each row's log-sum-exp (shared by training attention and decode).
pub fn masked_softmax_rows(
    s: &mut [f32],
    rows: usize,
    cols: usize,
    valid: impl Fn(usize) -> usize,
) -> Vec<f32> {
    let mut lse = vec![0.0f32; rows];
    for r in 0..rows {
        let row = &mut s[r * cols..(r + 1) * cols];
        let valid = valid(r).min(cols);
        let m = fastmath::max(&row[..valid]);
        fastmath::exp_shifted_inplace(&mut row[..valid], m);
        let l = fastmath::vectorized(|| fastmath::sum(&row[..valid]));
        let inv = 1.0 / l;
        row[..valid].iter_mut().for_each(|x| *x *= inv);
        row[valid..].fill(0.0);
        lse[r] = m + l.ln();
    }
    lse
}

pub fn forward(q: &[f32], k: &[f32], v: &[f32], d: Dims, seqs: &[(usize, usize)]) -> (Vec<f32>, Vec<f32>) {
    let n = q.len() / (d.q_heads * d.head_dim);
    let mut out = vec![0.0f32; q.len()];
    let mut lse = vec![0.0f32; n * d.q_heads];
    let (outp, lsep) = (SendPtr(out.as_mut_ptr()), SendPtr(lse.as_mut_ptr()));
    // (first row, rows, head, sequence start) per query block.
    let mut tasks = Vec::new();
    for &(s, l) in seqs {
        for h in 0..d.q_heads {
            for b0 in (0..l).step_by(BQ) {
                tasks.push((s + b0, (l - b0).min(BQ), h, s));
            }
        }
    }
    let scale = 1.0 / (d.head_dim as f32).sqrt();
    let (qs, ks) = (d.q_heads * d.head_dim, d.kv_heads * d.head_dim);
    tasks.par_iter().for_each(|&(i0, rows, h, s)| {
        let kvh = h / (d.q_heads / d.kv_heads);
        let cols = i0 + rows - s; // keys s..i0+rows
        let mut sc = vec![0.0f32; rows * cols];
        // SAFETY: every task writes the rows i0..i0+rows of head h only.
        unsafe {
            gemm_strided(
                rows,
                cols,
                d.head_dim,
                sc.as_mut_ptr(),
                cols,
                false,
                q.as_ptr().add(i0 * qs + h * d.head_dim),
                qs as isize,
                1,
                k.as_ptr().add(s * ks + kvh * d.head_dim),
                1,
                ks as isize,
                scale,
            );
            let l = masked_softmax_rows(&mut sc, rows, cols, |r| r + i0 - s + 1);
            gemm_strided(
                rows,
                d.head_dim,
                cols,
                { outp }.0.add(i0 * qs + h * d.head_dim),
                qs,
                false,
                sc.as_ptr(),
                cols as isize,
                1,
                v.as_ptr().add(s * ks + kvh * d.head_dim),
                ks as isize,
                1,
                1.0,
            );
            for (r, x) in l.iter().enumerate() {
                *{ lsep }.0.add((i0 + r) * d.q_heads + h) = *x;
            }
        }
    });
    (out, lse)
}

/// FlashAttention-2 style backward: recompute P from lse, then dV, dP, dS, dQ, dK per block.
/// One task per (sequence, kv head) owns that head's dK/dV, so no two tasks write the same row.
pub fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    saved: Saved,
    dout: &[f32],
    d: Dims,
    seqs: &[(usize, usize)],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut dq = vec![0.0f32; q.len()];
    let mut dk = vec![0.0f32; k.len()];
    let mut dv = vec![0.0f32; v.len()];
    let (dqp, dkp, dvp) = (SendPtr(dq.as_mut_ptr()), SendPtr(dk.as_mut_ptr()), SendPtr(dv.as_mut_ptr()));
    let group = d.q_heads / d.kv_heads;
    let scale = 1.0 / (d.head_dim as f32).sqrt();
    let (qs, ks, hd) = (d.q_heads * d.head_dim, d.kv_heads * d.head_dim, d.head_dim);
    let tasks: Vec<(usize, usize, usize)> =
        seqs.iter().flat_map(|&(s, l)| (0..d.kv_heads).map(move |g| (s, l, g))).collect();
    tasks.par_iter().for_each(|&(s, l, kvh)| unsafe {
        let (dkh, dvh) = ({ dkp }.0.add(s * ks + kvh * hd), { dvp }.0.add(s * ks + kvh * hd));
        let kh = k.as_ptr().add(s * ks + kvh * hd);
        let vh = v.as_ptr().add(s * ks + kvh * hd);
        for h in kvh * group..(kvh + 1) * group {
            for b0 in (0..l).step_by(BQ) {
                let (i0, rows) = (s + b0, (l - b0).min(BQ));
                let cols = b0 + rows;
                let qh = q.as_ptr().add(i0 * qs + h * hd);
                let doh = dout.as_ptr().add(i0 * qs + h * hd);
                // P from the saved log-sum-exp.
                let mut p = vec![0.0f32; rows * cols];
                gemm_strided(
                    rows,
                    cols,
                    hd,
                    p.as_mut_ptr(),
                    cols,
                    false,
                    qh,
                    qs as isize,
                    1,
                    kh,
                    1,
                    ks as isize,
                    scale,
                );
                for r in 0..rows {
                    let lse = saved.lse[(i0 + r) * d.q_heads + h];
                    let valid = b0 + r + 1;
                    let row = &mut p[r * cols..(r + 1) * cols];
                    fastmath::exp_shifted_inplace(&mut row[..valid], lse);
                    row[valid..].fill(0.0);
                }
                // dV += Pᵀ·dO
                gemm_strided(
                    cols,
                    hd,
                    rows,
                    dvh,
                    ks,
                    true,
                    p.as_ptr(),
                    1,
                    cols as isize,
                    doh,
                    qs as isize,
                    1,
                    1.0,
                );
                // dP = dO·Vᵀ, then dS = P ⊙ (dP − rowsum(dO ⊙ O))
                let mut ds = vec![0.0f32; rows * cols];
                gemm_strided(
                    rows,
                    cols,
                    hd,
                    ds.as_mut_ptr(),
                    cols,
                    false,
                    doh,
                    qs as isize,
                    1,
                    vh,
                    1,
                    ks as isize,
                    1.0,
                );
                for r in 0..rows {
                    let o = &saved.out[(i0 + r) * qs + h * hd..][..hd];
                    let g = &dout[(i0 + r) * qs + h * hd..][..hd];
                    let di: f32 = o.iter().zip(g).map(|(a, b)| a * b).sum();
                    for c in 0..cols {
                        let idx = r * cols + c;
                        ds[idx] = p[idx] * (ds[idx] - di);
                    }
                }
                // dQ = scale·dS·K,  dK += scale·dSᵀ·Q
                gemm_strided(
                    rows,
                    hd,
                    cols,
                    { dqp }.0.add(i0 * qs + h * hd),
                    qs,
                    false,
                    ds.as_ptr(),
                    cols as isize,
                    1,
                    kh,
                    ks as isize,
                    1,
                    scale,
                );
                gemm_strided(
                    cols,
                    hd,
                    rows,
                    dkh,
                    ks,
                    true,
                    ds.as_ptr(),
                    1,
                    cols as isize,
                    qh,
                    qs as isize,
                    1,
                    scale,
                );
            }
        }
    });
    (dq, dk, dv)
}
