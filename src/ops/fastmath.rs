//! A branch-free `exp` that the compiler vectorizes, and a dispatcher that compiles a hot loop
//! for AVX2 when the CPU has it. libm's `expf` is a scalar call per element: in softmax-heavy
//! loops (attention, the fused log-prob, SiLU) it cost more than the arithmetic around it.
//!
//! No FMA is used, so results are bit-identical whichever path runs: equal seeds give equal
//! runs on every x86-64 machine.

/// e^x to about 2 ulp for x in [-87.3, 88.3]; 0 below, +inf above (the callers take it of
/// max-shifted scores or of −x in a sigmoid, where that edge is harmless), NaN for NaN.
/// Range reduction x = n·ln2 + r with |r| ≤ ln2/2, then a polynomial for e^r (Cephes' expf
/// coefficients) scaled by 2^n built from its exponent bits.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n·LN2_HI is exact for |n| < 2^9.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2^23: adding and subtracting it rounds to the nearest integer without a branch.
    const ROUND: f32 = 12_582_912.0;
    const P: [f32; 6] =
        [1.987_569_2e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5.000_000_1e-1];
    let xc = x.clamp(-87.3, 88.3);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = P[0];
    for c in &P[1..] {
        p = p * r + c;
    }
    let er = 1.0 + r + r * r * p;
    // t's low mantissa bits hold n + 2^22: integer ops only, no float→int conversion.
    let n_int = t.to_bits().wrapping_sub(ROUND.to_bits());
    let scale = f32::from_bits(n_int.wrapping_add(127) << 23);
    let y = er * scale;
    // Selects, not branches: the loop stays vectorizable.
    let y = if x < -87.3 { 0.0 } else { y };
    let y = if x > 88.3 { f32::INFINITY } else { y };
    if x.is_nan() {
        x
    } else {
        y
    }
}

/// Runs `f`, compiled with AVX2 enabled when the CPU supports it (std caches the check).
/// `f` is inlined into the AVX2 function, so its loops vectorize 8 lanes wide.
#[inline(always)]
pub fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// `x[i] = e^(x[i] − shift)` for every element.
pub fn exp_shifted_inplace(x: &mut [f32], shift: f32) {
    vectorized(|| x.iter_mut().for_each(|v| *v = exp(*v - shift)))
}

/// Sum in 8 independent lanes (vectorizes, unlike a sequential float sum).
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// Largest element (−inf for an empty slice), in 8 lanes.
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            acc[i] = acc[i].max(c[i]);
        }
    }
    chunks.remainder().iter().chain(&acc).copied().fold(f32::NEG_INFINITY, f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm_to_a_few_ulp() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 3.0 * f32::EPSILON as f64, "worst relative error {worst:e}");
    }

    #[test]
    fn exp_edges() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-1000.0), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(88.2).is_finite() && exp(-87.2) > 0.0);
    }

    #[test]
    fn lane_sums_and_max() {
        let v: Vec<f32> = (0..1003).map(|i| ((i * 37) % 101) as f32 - 50.0).collect();
        assert_eq!(max(&v), 50.0);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        assert!((sum(&v) - v.iter().sum::<f32>()).abs() < 1e-3);
        let mut e = vec![0.5f32, -2.0, 3.0];
        exp_shifted_inplace(&mut e, 1.0);
        for (a, b) in e.iter().zip([-0.5f32, -3.0, 2.0]) {
            assert!((a - b.exp()).abs() < 1e-6 * b.exp());
        }
    }
}
