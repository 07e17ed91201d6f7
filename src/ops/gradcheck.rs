//! Finite-difference gradient checks, used by every op's test.

use anyhow::{ensure, Result};

use crate::tensor::Tensor;

/// Deterministic pseudo-random values in [-1, 1) (tests need no RNG crate state).
pub fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

pub fn rand_tensor(shape: &[usize], seed: u64) -> Tensor {
    Tensor::from_vec(rand_vec(shape.iter().product(), seed), shape).unwrap().requires_grad()
}

/// Checks the gradients of `f` at `inputs` against central differences of the scalar
/// `Σ f(x)ᵢ·wᵢ` (fixed random w). Fails when `|analytic − numeric| > tol·(1 + |numeric|)` for
/// any checked coordinate; checks up to `max_coords` coordinates per input.
pub fn check(
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    eps: f32,
    tol: f32,
    max_coords: usize,
) -> Result<()> {
    let out = f(inputs)?;
    let w = rand_vec(out.numel(), 99);
    let loss = |xs: &[Tensor]| -> Result<f64> {
        let y = crate::autograd::no_grad(|| f(xs))?;
        Ok(y.to_vec().iter().zip(&w).map(|(&a, &b)| a as f64 * b as f64).sum())
    };
    let grads = crate::ops::weighted_sum(&out, &w)?.backward()?;
    for (i, x) in inputs.iter().enumerate() {
        if !x.tracks_grad() {
            continue;
        }
        let analytic = grads.get(x).map(|g| g.to_vec()).unwrap_or_else(|| vec![0.0; x.numel()]);
        let n = x.numel();
        let step = (n / max_coords.max(1)).max(1);
        for j in (0..n).step_by(step) {
            let mut plus = inputs.to_vec();
            let mut minus = inputs.to_vec();
            let mut v = x.to_vec();
            v[j] += eps;
            plus[i] = Tensor::from_vec(v.clone(), x.shape())?;
            v[j] -= 2.0 * eps;
            minus[i] = Tensor::from_vec(v, x.shape())?;
            let numeric = (loss(&plus)? - loss(&minus)?) / (2.0 * eps as f64);
            let a = analytic[j] as f64;
            ensure!(
                (a - numeric).abs() <= tol as f64 * (1.0 + numeric.abs()),
                "input {i} coordinate {j}: analytic {a} vs numeric {numeric}"
            );
        }
    }
    Ok(())
}
