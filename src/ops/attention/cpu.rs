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
    forward_shared(q, k, v, d, seqs, &[])
}

/// The key rows `(start, len)` that precede sequence `i`'s own keys (its shared prefix: the
/// whole of sequence `prefix[i]`), or `(0, 0)`. `prefix` is empty or one entry per sequence.
fn prefix_keys(seqs: &[(usize, usize)], prefix: &[Option<usize>], i: usize) -> (usize, usize) {
    prefix.get(i).copied().flatten().map_or((0, 0), |p| seqs[p])
}

/// [`forward`] where sequence `i` also attends to every key of sequence `prefix[i]` (validated
/// by the op: an earlier sequence without a prefix of its own), placed before its own keys.
pub fn forward_shared(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d: Dims,
    seqs: &[(usize, usize)],
    prefix: &[Option<usize>],
) -> (Vec<f32>, Vec<f32>) {
    let n = q.len() / (d.q_heads * d.head_dim);
    let mut out = vec![0.0f32; q.len()];
    let mut lse = vec![0.0f32; n * d.q_heads];
    let (outp, lsep) = (SendPtr(out.as_mut_ptr()), SendPtr(lse.as_mut_ptr()));
    // (first row, rows, head, sequence start, prefix keys) per query block.
    let mut tasks = Vec::new();
    for (i, &(s, l)) in seqs.iter().enumerate() {
        let pk = prefix_keys(seqs, prefix, i);
        for h in 0..d.q_heads {
            for b0 in (0..l).step_by(BQ) {
                tasks.push((s + b0, (l - b0).min(BQ), h, s, pk));
            }
        }
    }
    let scale = 1.0 / (d.head_dim as f32).sqrt();
    let (qs, ks) = (d.q_heads * d.head_dim, d.kv_heads * d.head_dim);
    tasks.par_iter().for_each(|&(i0, rows, h, s, (ps, pl))| {
        let kvh = h / (d.q_heads / d.kv_heads);
        let own = i0 + rows - s; // own keys s..i0+rows, after the pl prefix keys
        let cols = pl + own;
        let mut sc = vec![0.0f32; rows * cols];
        // Column blocks of the score rows: (first column, keys, first key row).
        let parts = [(0, pl, ps), (pl, own, s)];
        // SAFETY: every task writes the rows i0..i0+rows of head h only.
        unsafe {
            for &(c0, nk, kr) in &parts {
                gemm_strided(
                    rows,
                    nk,
                    d.head_dim,
                    sc.as_mut_ptr().add(c0),
                    cols,
                    false,
                    q.as_ptr().add(i0 * qs + h * d.head_dim),
                    qs as isize,
                    1,
                    k.as_ptr().add(kr * ks + kvh * d.head_dim),
                    1,
                    ks as isize,
                    scale,
                );
            }
            let l = masked_softmax_rows(&mut sc, rows, cols, |r| pl + r + i0 - s + 1);
            for (j, &(c0, nk, kr)) in parts.iter().enumerate() {
                gemm_strided(
                    rows,
                    d.head_dim,
                    nk,
                    { outp }.0.add(i0 * qs + h * d.head_dim),
                    qs,
                    j > 0 && pl > 0,
                    sc.as_ptr().add(c0),
                    cols as isize,
                    1,
                    v.as_ptr().add(kr * ks + kvh * d.head_dim),
                    ks as isize,
                    1,
                    1.0,
                );
            }
            for (r, x) in l.iter().enumerate() {
                *{ lsep }.0.add((i0 + r) * d.q_heads + h) = *x;
            }
        }
    });
    (out, lse)
}

/// FlashAttention-2 style backward: recompute P from lse, then dV, dP, dS, dQ, dK per block.
pub fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    saved: Saved,
    dout: &[f32],
    d: Dims,
    seqs: &[(usize, usize)],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    backward_shared(q, k, v, saved, dout, d, seqs, &[])
}

/// Backward of [`forward_shared`]. One task per (sequence, kv head) owns that head's dQ rows and
/// dK/dV rows of the sequence, so no two tasks write the same row; what a sequence's queries give
/// its prefix's dK/dV goes to the task's own buffers, added to the prefix's rows afterwards in
/// sequence order (deterministic).
#[allow(clippy::too_many_arguments)]
pub fn backward_shared(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    saved: Saved,
    dout: &[f32],
    d: Dims,
    seqs: &[(usize, usize)],
    prefix: &[Option<usize>],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut dq = vec![0.0f32; q.len()];
    let mut dk = vec![0.0f32; k.len()];
    let mut dv = vec![0.0f32; v.len()];
    let (dqp, dkp, dvp) = (SendPtr(dq.as_mut_ptr()), SendPtr(dk.as_mut_ptr()), SendPtr(dv.as_mut_ptr()));
    let (ks, hd) = (d.kv_heads * d.head_dim, d.head_dim);
    let tasks: Vec<(usize, usize)> =
        (0..seqs.len()).flat_map(|i| (0..d.kv_heads).map(move |g| (i, g))).collect();
    let parts: Vec<(Vec<f32>, Vec<f32>)> = tasks
        .par_iter()
        .map(|&(i, kvh)| {
            let (s, l) = seqs[i];
            let (ps, pl) = prefix_keys(seqs, prefix, i);
            let (mut pdk, mut pdv) = (vec![0.0f32; pl * hd], vec![0.0f32; pl * hd]);
            // SAFETY: this task alone writes dQ rows s..s+l (heads of kvh) and dK/dV rows
            // s..s+l of kvh; the prefix's gradient goes to pdk/pdv.
            unsafe {
                let own = KeyPart {
                    k: k.as_ptr().add(s * ks + kvh * hd),
                    v: v.as_ptr().add(s * ks + kvh * hd),
                    dk: { dkp }.0.add(s * ks + kvh * hd),
                    dv: { dvp }.0.add(s * ks + kvh * hd),
                    ld: ks,
                    dld: ks,
                };
                let pre = KeyPart {
                    k: k.as_ptr().add(ps * ks + kvh * hd),
                    v: v.as_ptr().add(ps * ks + kvh * hd),
                    dk: pdk.as_mut_ptr(),
                    dv: pdv.as_mut_ptr(),
                    ld: ks,
                    dld: hd,
                };
                let seq = SeqBlock { s, l, kvh, pl };
                seq_backward(q, dout, &saved, d, seq, (&pre, &own), dqp);
            }
            (pdk, pdv)
        })
        .collect();
    // Each sequence's share of its prefix's dK/dV, in sequence order.
    for (&(i, kvh), (pdk, pdv)) in tasks.iter().zip(&parts) {
        let (ps, pl) = prefix_keys(seqs, prefix, i);
        for r in 0..pl {
            let at = (ps + r) * ks + kvh * hd;
            dk[at..at + hd].iter_mut().zip(&pdk[r * hd..(r + 1) * hd]).for_each(|(a, b)| *a += b);
            dv[at..at + hd].iter_mut().zip(&pdv[r * hd..(r + 1) * hd]).for_each(|(a, b)| *a += b);
        }
    }
    (dq, dk, dv)
}

/// Keys of one kv head (row stride `ld` in `k`/`v`) and where their gradients accumulate (row
/// stride `dld`).
struct KeyPart {
    k: *const f32,
    v: *const f32,
    ld: usize,
    dk: *mut f32,
    dv: *mut f32,
    dld: usize,
}

/// One sequence (start `s`, `l` rows) and kv head, with `pl` prefix keys before its own.
#[derive(Clone, Copy)]
struct SeqBlock {
    s: usize,
    l: usize,
    kvh: usize,
    pl: usize,
}

/// The backward of one sequence's queries on one kv head's group of query heads, against its
/// prefix keys (`parts.0`, all visible) and its own keys (`parts.1`, causal).
///
/// # Safety
/// The pointers of `parts` cover the rows they name; no other thread writes those gradient rows
/// or the dQ rows of this sequence and head group.
unsafe fn seq_backward(
    q: &[f32],
    dout: &[f32],
    saved: &Saved,
    d: Dims,
    sb: SeqBlock,
    parts: (&KeyPart, &KeyPart),
    dqp: SendPtr,
) {
    let SeqBlock { s, l, kvh, pl } = sb;
    let group = d.q_heads / d.kv_heads;
    let scale = 1.0 / (d.head_dim as f32).sqrt();
    let (qs, hd) = (d.q_heads * d.head_dim, d.head_dim);
    for h in kvh * group..(kvh + 1) * group {
        for b0 in (0..l).step_by(BQ) {
            let (i0, rows) = (s + b0, (l - b0).min(BQ));
            let own = b0 + rows;
            let cols = pl + own;
            // Column blocks of the score rows: (first column, keys, the keys).
            let blocks = [(0, pl, parts.0), (pl, own, parts.1)];
            let qh = q.as_ptr().add(i0 * qs + h * hd);
            let doh = dout.as_ptr().add(i0 * qs + h * hd);
            // P from the saved log-sum-exp.
            let mut p = vec![0.0f32; rows * cols];
            for &(c0, nk, kp) in &blocks {
                let pp = p.as_mut_ptr().add(c0);
                gemm_strided(
                    rows,
                    nk,
                    hd,
                    pp,
                    cols,
                    false,
                    qh,
                    qs as isize,
                    1,
                    kp.k,
                    1,
                    kp.ld as isize,
                    scale,
                );
            }
            for r in 0..rows {
                let lse = saved.lse[(i0 + r) * d.q_heads + h];
                let valid = pl + b0 + r + 1;
                let row = &mut p[r * cols..(r + 1) * cols];
                fastmath::exp_shifted_inplace(&mut row[..valid], lse);
                row[valid..].fill(0.0);
            }
            // dV += Pᵀ·dO
            for &(c0, nk, kp) in &blocks {
                let pp = p.as_ptr().add(c0);
                gemm_strided(
                    nk,
                    hd,
                    rows,
                    kp.dv,
                    kp.dld,
                    true,
                    pp,
                    1,
                    cols as isize,
                    doh,
                    qs as isize,
                    1,
                    1.0,
                );
            }
            // dP = dO·Vᵀ, then dS = P ⊙ (dP − rowsum(dO ⊙ O))
            let mut ds = vec![0.0f32; rows * cols];
            for &(c0, nk, kp) in &blocks {
                let dp = ds.as_mut_ptr().add(c0);
                gemm_strided(
                    rows,
                    nk,
                    hd,
                    dp,
                    cols,
                    false,
                    doh,
                    qs as isize,
                    1,
                    kp.v,
                    1,
                    kp.ld as isize,
                    1.0,
                );
            }
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
            let dqh = { dqp }.0.add(i0 * qs + h * hd);
            for (j, &(c0, nk, kp)) in blocks.iter().enumerate() {
                let dsp = ds.as_ptr().add(c0);
                let acc = j > 0 && pl > 0;
                gemm_strided(
                    rows,
                    hd,
                    nk,
                    dqh,
                    qs,
                    acc,
                    dsp,
                    cols as isize,
                    1,
                    kp.k,
                    kp.ld as isize,
                    1,
                    scale,
                );
                gemm_strided(
                    nk,
                    hd,
                    rows,
                    kp.dk,
                    kp.dld,
                    true,
                    dsp,
                    1,
                    cols as isize,
                    qh,
                    qs as isize,
                    1,
                    scale,
                );
            }
        }
    }
}
