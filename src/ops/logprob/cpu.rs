//! CPU kernel: logits of a chunk of rows at a time (one gemm), then per-row statistics.

use rayon::prelude::*;

use crate::ops::fastmath;
use crate::ops::matmul::cpu::{gemm, Mat};

/// Fewest rows per logits chunk (~40 MB of logits at V = 152k): fewer would starve the gemm.
pub const CHUNK: usize = 64;
/// Logits per chunk when the vocabulary is small: 16 MB. Bigger chunks mean fewer passes
/// over W and, in backward, fewer read-modify-writes of the whole `dW`.
const CHUNK_LOGITS: usize = 1 << 22;

/// Rows per chunk for a vocabulary of `vocab`.
pub fn chunk_rows(vocab: usize) -> usize {
    CHUNK.max(CHUNK_LOGITS / vocab.max(1))
}

#[derive(Clone, Copy, Debug, Default)]
pub struct RowStats {
    pub logp: f32,
    pub entropy: f32,
    /// log Z = `shift + ln_s`, kept in two parts: `shift` = max z/T, and `ln_s` = ln Σ e^(z/T − shift),
    /// which is small. Backward rebuilds log p_k as (z_k/T − shift) − ln_s: for a confident
    /// row the top token's log p is then exact to f32 resolution near 0, where z/T − log Z in
    /// one step loses it to the rounding of log Z (~1e-6 at |log Z| ~ 20), and 1 − p_y, the
    /// gradient of a well-predicted target, would carry that error.
    pub shift: f32,
    pub ln_s: f32,
}

impl RowStats {
    /// log Z of softmax(z / T), in one number (less exact than its two parts).
    pub fn log_z(&self) -> f32 {
        self.shift + self.ln_s
    }
}

/// One row of raw logits `z`: log p(y), entropy and log Z of softmax(z / T) (SPEC §7's
/// formulas, two passes over a row already in cache: max, then sums). Exponentials in f32
/// lanes, summed per block of 256 and the block sums in f64, so 150k-term rows stay exact.
pub fn row_stats(z: &[f32], y: usize, inv_t: f32) -> RowStats {
    let (m, s, t) = fastmath::vectorized(|| {
        let m = fastmath::max(z) * inv_t;
        let (mut s, mut t) = (0.0f64, 0.0f64);
        for block in z.chunks(256) {
            let (mut sb, mut tb) = ([0.0f32; 8], [0.0f32; 8]);
            let mut lanes = block.chunks_exact(8);
            for c in &mut lanes {
                for i in 0..8 {
                    let zt = c[i] * inv_t - m;
                    let e = fastmath::exp(zt);
                    sb[i] += e;
                    tb[i] += e * zt;
                }
            }
            for &x in lanes.remainder() {
                let zt = x * inv_t - m;
                let e = fastmath::exp(zt);
                sb[0] += e;
                tb[0] += e * zt;
            }
            s += fastmath::sum(&sb) as f64;
            t += fastmath::sum(&tb) as f64;
        }
        (m, s, t)
    });
    let log_z = m as f64 + s.ln();
    // H = log Z − E[z] with E[z] taken relative to m for precision.
    let entropy = s.ln() - t / s;
    RowStats {
        logp: (z[y] as f64 * inv_t as f64 - log_z) as f32,
        entropy: entropy as f32,
        shift: m,
        ln_s: s.ln() as f32,
    }
}

fn chunk_logits(h: &[f32], w: &[f32], hidden: usize, vocab: usize, rows: usize, buf: &mut Vec<f32>) {
    buf.resize(rows * vocab, 0.0);
    gemm(Mat::new(h, rows, hidden), Mat::new(w, vocab, hidden).t(), buf, false);
}

/// Row statistics; with `keep`, also the logits when they fit in one chunk (backward then
/// reuses them instead of recomputing the LM-head product).
pub fn forward(
    h: &[f32],
    w: &[f32],
    targets: &[u32],
    temperature: f32,
    keep: bool,
) -> (Vec<RowStats>, Option<Vec<f32>>) {
    let (vocab, hidden) = dims(h, w, targets.len());
    let inv_t = 1.0 / temperature;
    let mut out = Vec::with_capacity(targets.len());
    let mut buf = Vec::new();
    let chunk = chunk_rows(vocab);
    for (c, tg) in targets.chunks(chunk).enumerate() {
        let rows = tg.len();
        chunk_logits(&h[c * chunk * hidden..][..rows * hidden], w, hidden, vocab, rows, &mut buf);
        let stats: Vec<RowStats> =
            buf.par_chunks(vocab).zip(tg.par_iter()).map(|(z, &y)| row_stats(z, y as usize, inv_t)).collect();
        out.extend(stats);
    }
    let kept = (keep && targets.len() <= chunk).then_some(buf);
    (out, kept)
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
    h: &[f32],
    w: &[f32],
    targets: &[u32],
    temperature: f32,
    stats: &[RowStats],
    g_lp: &[f32],
    g_h: &[f32],
    want_dw: bool,
    logits: Option<Vec<f32>>,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let (vocab, hidden) = dims(h, w, targets.len());
    let inv_t = 1.0 / temperature;
    let mut dh = vec![0.0f32; h.len()];
    let mut dw = want_dw.then(|| vec![0.0f32; w.len()]);
    let chunk = chunk_rows(vocab);
    let reuse = logits.as_ref().is_some_and(|l| targets.len() <= chunk && l.len() == targets.len() * vocab);
    let mut buf = if reuse { logits.unwrap() } else { Vec::new() };
    for (c, tg) in targets.chunks(chunk).enumerate() {
        let (r0, rows) = (c * chunk, tg.len());
        let hc = &h[r0 * hidden..(r0 + rows) * hidden];
        if !reuse {
            chunk_logits(hc, w, hidden, vocab, rows, &mut buf);
        }
        buf.par_chunks_mut(vocab).enumerate().for_each(|(r, z)| {
            let (st, gl, gh) = (stats[r0 + r], g_lp[r0 + r], g_h[r0 + r]);
            fastmath::vectorized(|| {
                for x in z.iter_mut() {
                    // The same f32 shift as forward's exponentials, then the small ln s.
                    let logp = (*x * inv_t - st.shift) - st.ln_s;
                    let p = fastmath::exp(logp);
                    *x = (-gl * p - gh * p * (logp + st.entropy)) * inv_t;
                }
            });
            z[tg[r] as usize] += gl * inv_t;
        });
        gemm(
            Mat::new(&buf, rows, vocab),
            Mat::new(w, vocab, hidden),
            &mut dh[r0 * hidden..(r0 + rows) * hidden],
            false,
        );
        if let Some(dw) = dw.as_mut() {
            gemm(Mat::new(&buf, rows, vocab).t(), Mat::new(hc, rows, hidden), dw, true);
        }
    }
    (dh, dw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confident_target_keeps_its_small_gradient() {
        // One row, hidden 1, so the logits are W itself and dW = dz. p(y = 0) = 1 − 2e^−14:
        // d logp / dz_0 = 1 − p_0 ≈ 1.66e-6, far below the rounding of log Z ≈ 30 in f32
        // (1.9e-6), which the two-part log Z avoids.
        let (h, w) = ([1.0f32], [30.0f32, 16.0, 16.0]);
        let (stats, _) = forward(&h, &w, &[0], 1.0, false);
        let (_, dw) = backward(&h, &w, &[0], 1.0, &stats, &[1.0], &[0.0], true, None);
        let dw = dw.unwrap();
        let q = (-14.0f64).exp();
        let want = 2.0 * q / (1.0 + 2.0 * q);
        assert!(((dw[0] as f64) - want).abs() < 0.1 * want, "d/dz_0 = {} (want {want})", dw[0]);
        assert!(((dw[1] as f64) + q).abs() < 1e-3 * q, "d/dz_1 = {} (want {})", dw[1], -q);
    }
}
