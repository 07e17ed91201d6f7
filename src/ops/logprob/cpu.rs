//! CPU kernel: logits of `CHUNK` rows at a time (one gemm), then per-row statistics.

use rayon::prelude::*;

use crate::ops::matmul::cpu::{gemm, Mat};

/// Rows per logits chunk: bounds the transient `CHUNK × V` buffer (~40 MB at V = 152k).
pub const CHUNK: usize = 64;

#[derive(Clone, Copy, Debug, Default)]
pub struct RowStats {
    pub logp: f32,
    pub entropy: f32,
    pub log_z: f32,
}

/// One row of raw logits `z`: log p(y), entropy and log Z of softmax(z / T), accumulated in f64.
/// Two passes over a row already in cache (max, then sums), as SPEC §7's formulas.
pub fn row_stats(z: &[f32], y: usize, inv_t: f32) -> RowStats {
    let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max) * inv_t;
    // f32 exponentials (each exact to an ulp), summed in f64 lanes so 150k-term rows stay exact.
    let (mut s, mut t) = ([0.0f64; 4], [0.0f64; 4]);
    for c in z.chunks(4) {
        for (i, &x) in c.iter().enumerate() {
            let zt = x * inv_t;
            let e = (zt - m).exp();
            s[i] += e as f64;
            t[i] += (e * (zt - m)) as f64;
        }
    }
    let (s, t): (f64, f64) = (s.iter().sum(), t.iter().sum());
    let log_z = m as f64 + s.ln();
    // H = log Z − E[z] with E[z] taken relative to m for precision.
    let entropy = s.ln() - t / s;
    RowStats { logp: (z[y] as f64 * inv_t as f64 - log_z) as f32, entropy: entropy as f32, log_z: log_z as f32 }
}

fn chunk_logits(h: &[f32], w: &[f32], hidden: usize, vocab: usize, rows: usize, buf: &mut Vec<f32>) {
    buf.resize(rows * vocab, 0.0);
    gemm(Mat::new(h, rows, hidden), Mat::new(w, vocab, hidden).t(), buf, false);
}

pub fn forward(h: &[f32], w: &[f32], targets: &[u32], temperature: f32) -> Vec<RowStats> {
    let (vocab, hidden) = dims(h, w, targets.len());
    let inv_t = 1.0 / temperature;
    let mut out = Vec::with_capacity(targets.len());
    let mut buf = Vec::new();
    for (c, tg) in targets.chunks(CHUNK).enumerate() {
        let rows = tg.len();
        chunk_logits(&h[c * CHUNK * hidden..][..rows * hidden], w, hidden, vocab, rows, &mut buf);
        let stats: Vec<RowStats> = buf.par_chunks(vocab).zip(tg.par_iter()).map(|(z, &y)| row_stats(z, y as usize, inv_t)).collect();
        out.extend(stats);
    }
    out
}

fn dims(h: &[f32], w: &[f32], n: usize) -> (usize, usize) {
    let hidden = if n == 0 { 0 } else { h.len() / n };
    let vocab = if hidden == 0 { 0 } else { w.len() / hidden };
    (vocab, hidden)
}

/// Gradients of `Σ g_lp·logp + g_h·H` with respect to h (and W when `want_dw`).
/// Per logit: `dz_k = [g_lp·(1[k=y] − p_k) − g_h·p_k·(log p_k + H)] / T`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    h: &[f32], w: &[f32], targets: &[u32], temperature: f32, stats: &[RowStats],
    g_lp: &[f32], g_h: &[f32], want_dw: bool,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let (vocab, hidden) = dims(h, w, targets.len());
    let inv_t = 1.0 / temperature;
    let mut dh = vec![0.0f32; h.len()];
    let mut dw = want_dw.then(|| vec![0.0f32; w.len()]);
    let mut buf = Vec::new();
    for (c, tg) in targets.chunks(CHUNK).enumerate() {
        let (r0, rows) = (c * CHUNK, tg.len());
        let hc = &h[r0 * hidden..(r0 + rows) * hidden];
        chunk_logits(hc, w, hidden, vocab, rows, &mut buf);
        buf.par_chunks_mut(vocab).enumerate().for_each(|(r, z)| {
            let (st, gl, gh) = (stats[r0 + r], g_lp[r0 + r], g_h[r0 + r]);
            for x in z.iter_mut() {
                let logp = *x * inv_t - st.log_z;
                let p = logp.exp();
                *x = (-gl * p - gh * p * (logp + st.entropy)) * inv_t;
            }
            z[tg[r] as usize] += gl * inv_t;
        });
        gemm(Mat::new(&buf, rows, vocab), Mat::new(w, vocab, hidden), &mut dh[r0 * hidden..(r0 + rows) * hidden], false);
        if let Some(dw) = dw.as_mut() {
            gemm(Mat::new(&buf, rows, vocab).t(), Mat::new(hc, rows, hidden), dw, true);
        }
    }
    (dh, dw)
}
