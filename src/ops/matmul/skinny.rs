//! `y = x·wᵀ` for a few rows of `x` (the decode step: one row per live sequence), on the cpu.
//!
//! A general GEMM packs the weight into panels before it multiplies. With a handful of rows
//! that packing reads and writes the whole weight once more than the product itself, so a
//! decode step paid for the model's weights about twice. Here each task takes a slice of
//! output features and streams their weight rows once, every row of `x` (a few KB, in cache)
//! multiplied against them in registers: MT rows × NT features of 8-lane accumulators.

use rayon::prelude::*;

use crate::ops::SendPtr;

/// At most this many rows take the skinny path (above, GEMM's packing pays for itself).
pub const MAX_ROWS: usize = 16;

/// Output features per parallel task: large enough that a task amortises its dispatch,
/// small enough that a 576-wide projection still splits over the threads.
const FEATURES_PER_TASK: usize = 48;

/// `y[r, f] = Σ_k x[r, k] · w[f, k]` for `rows` rows, `in_f` inputs and `out_f` features;
/// `y` is row-major `rows × out_f` and is overwritten.
pub fn linear(x: &[f32], rows: usize, in_f: usize, w: &[f32], out_f: usize, y: &mut [f32]) {
    assert!(x.len() >= rows * in_f && w.len() >= out_f * in_f, "skinny linear: short input");
    assert_eq!(y.len(), rows * out_f, "skinny linear: output size");
    let tasks = out_f.div_ceil(FEATURES_PER_TASK);
    let yp = SendPtr(y.as_mut_ptr());
    let run = |t: usize| {
        let (f0, f1) = (t * FEATURES_PER_TASK, ((t + 1) * FEATURES_PER_TASK).min(out_f));
        // SAFETY: tasks write disjoint column ranges [f0, f1) of y, whose size was checked.
        unsafe { features(x, rows, in_f, w, f0, f1, { yp }.0, out_f) }
    };
    let work = rows * in_f * out_f;
    if tasks > 1 && work >= 1 << 15 && rayon::current_thread_index().is_none() {
        (0..tasks).into_par_iter().for_each(run);
    } else {
        (0..tasks).for_each(run);
    }
}

/// Columns `f0..f1` of every row of y.
#[allow(clippy::too_many_arguments)]
unsafe fn features(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[f32],
    f0: usize,
    f1: usize,
    y: *mut f32,
    ldy: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        return x86::features(x, rows, k, w, f0, f1, y, ldy);
    }
    for r in 0..rows {
        let xr = &x[r * k..(r + 1) * k];
        for f in f0..f1 {
            *y.add(r * ldy + f) = dot(xr, &w[f * k..(f + 1) * k]);
        }
    }
}

/// Portable dot product in 8 independent lanes.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(p, q)| p * q).sum();
    for (p, q) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += p[i] * q[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Row tile × feature tile: 4 × 3 = 12 accumulators, plus 3 weight and 1 input register,
    /// within AVX2's 16.
    const MT: usize = 4;
    const NT: usize = 3;

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn features(
        x: &[f32],
        rows: usize,
        k: usize,
        w: &[f32],
        f0: usize,
        f1: usize,
        y: *mut f32,
        ldy: usize,
    ) {
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut f = f0;
        while f < f1 {
            let nt = (f1 - f).min(NT);
            let mut r = 0;
            while r < rows {
                let mt = (rows - r).min(MT);
                let (xt, wt, yt) = (xp.add(r * k), wp.add(f * k), y.add(r * ldy + f));
                // Full tiles get the unrolled kernel; edges a smaller instance of it.
                match (mt, nt) {
                    (4, 3) => tile::<4, 3>(xt, wt, k, yt, ldy),
                    (4, 2) => tile::<4, 2>(xt, wt, k, yt, ldy),
                    (4, 1) => tile::<4, 1>(xt, wt, k, yt, ldy),
                    (3, 3) => tile::<3, 3>(xt, wt, k, yt, ldy),
                    (3, 2) => tile::<3, 2>(xt, wt, k, yt, ldy),
                    (3, 1) => tile::<3, 1>(xt, wt, k, yt, ldy),
                    (2, 3) => tile::<2, 3>(xt, wt, k, yt, ldy),
                    (2, 2) => tile::<2, 2>(xt, wt, k, yt, ldy),
                    (2, 1) => tile::<2, 1>(xt, wt, k, yt, ldy),
                    (1, 3) => tile::<1, 3>(xt, wt, k, yt, ldy),
                    (1, 2) => tile::<1, 2>(xt, wt, k, yt, ldy),
                    _ => tile::<1, 1>(xt, wt, k, yt, ldy),
                }
                r += mt;
            }
            f += nt;
        }
    }

    /// `y[i, j] = x[i, :] · w[j, :]` for i < M, j < N (rows of length k).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn tile<const M: usize, const N: usize>(
        x: *const f32,
        w: *const f32,
        k: usize,
        y: *mut f32,
        ldy: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); N]; M];
        let k8 = k - k % 8;
        let mut p = 0;
        while p < k8 {
            let mut wv = [_mm256_setzero_ps(); N];
            for (j, v) in wv.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(w.add(j * k + p));
                // The next feature tile's rows, ahead of their first use: rows of a few KB
                // are too short for the hardware prefetcher to ramp up on its own.
                _mm_prefetch::<_MM_HINT_T0>(w.add((N + j) * k + p + 64) as *const i8);
            }
            for (i, a) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(x.add(i * k + p));
                for j in 0..N {
                    a[j] = _mm256_fmadd_ps(xv, wv[j], a[j]);
                }
            }
            p += 8;
        }
        for (i, a) in acc.iter().enumerate() {
            for (j, v) in a.iter().enumerate() {
                let mut s = hsum(*v);
                for q in k8..k {
                    s += *x.add(i * k + q) * *w.add(j * k + q);
                }
                *y.add(i * ldy + j) = s;
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0b01));
        _mm_cvtss_f32(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::matmul::cpu::{gemm, Mat};

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    /// Every tile shape and both k tails, against the general GEMM.
    #[test]
    fn matches_gemm_on_every_edge() {
        for &(rows, k, n) in
            &[(1, 8, 1), (3, 13, 5), (4, 64, 3), (5, 72, 7), (16, 576, 100), (7, 9, 49), (16, 1, 4)]
        {
            let (x, w) = (data(rows * k, 7), data(n * k, 11));
            let mut want = vec![0.0; rows * n];
            gemm(Mat::new(&x, rows, k), Mat::new(&w, n, k).t(), &mut want, false);
            let mut got = vec![f32::NAN; rows * n];
            linear(&x, rows, k, &w, n, &mut got);
            for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                assert!((g - e).abs() <= 1e-5 * (1.0 + e.abs()), "{rows}x{k}x{n} [{i}]: {g} vs {e}");
            }
        }
    }

    /// The portable path agrees with the vectorized one.
    #[test]
    fn portable_dot_matches() {
        let (a, b) = (data(77, 3), data(77, 5));
        let want: f64 = a.iter().zip(&b).map(|(p, q)| *p as f64 * *q as f64).sum();
        assert!((dot(&a, &b) as f64 - want).abs() < 1e-4);
    }
}
