//! Finite-difference gradient checks, used by every op's test on the cpu and on the emu device.

use anyhow::{ensure, Result};

use crate::device::Device;
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

/// `inputs` copied to `device`; trainable leaves stay trainable.
pub fn to_device(inputs: &[Tensor], device: Device) -> Result<Vec<Tensor>> {
    inputs.iter().map(|t| t.to_device(device)).collect()
}

/// Checks the gradients of `f` at `inputs` against central differences of the scalar
/// `Σ f(x)ᵢ·wᵢ` (fixed random w), on the device the inputs are on. Fails when `|analytic − numeric| > tol·(1 + |numeric|)` for
/// any checked coordinate; checks up to `max_coords` coordinates per input.
pub fn check(
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    eps: f32,
    tol: f32,
    max_coords: usize,
) -> Result<()> {
    let out = f(inputs)?;
    if let Some(x) = inputs.first() {
        ensure!(
            out.device() == x.device(),
            "the op's output is on {}, its input on {}",
            out.device(),
            x.device()
        );
    }
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
            plus[i] = Tensor::from_vec(v.clone(), x.shape())?.to_device(x.device())?;
            v[j] -= 2.0 * eps;
            minus[i] = Tensor::from_vec(v, x.shape())?.to_device(x.device())?;
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

/// Checks the output and gradients of `f` on `device` against the cpu's (which [`check`] holds
/// to finite differences), for ops whose device kernels compute in bf16, where differences of
/// bf16 outputs are too coarse: fails when `|device − cpu| > tol·(1 + |cpu|)` anywhere.
pub fn check_device(
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    device: Device,
    tol: f32,
) -> Result<()> {
    let on_dev = to_device(inputs, device)?;
    let (yc, yd) = (f(inputs)?, f(&on_dev)?);
    ensure!(yd.device() == device, "the op's output is on {}, not {device}", yd.device());
    close("output", &yd.to_vec(), &yc.to_vec(), tol)?;
    let w = rand_vec(yc.numel(), 98);
    let gc = crate::ops::weighted_sum(&yc, &w)?.backward()?;
    let gd = crate::ops::weighted_sum(&yd, &w)?.backward()?;
    for (i, (xc, xd)) in inputs.iter().zip(&on_dev).enumerate().filter(|(_, (x, _))| x.tracks_grad()) {
        let (c, d) = (gc.get(xc).map(|g| g.to_vec()), gd.get(xd));
        ensure!(d.is_none_or(|g| g.device() == device), "input {i}: gradient not on {device}");
        let zero = vec![0.0; xc.numel()];
        close(
            &format!("input {i} gradient"),
            &d.map(|g| g.to_vec()).unwrap_or(zero.clone()),
            &c.unwrap_or(zero),
            tol,
        )?;
    }
    Ok(())
}

fn close(what: &str, got: &[f32], want: &[f32], tol: f32) -> Result<()> {
    ensure!(got.len() == want.len(), "{what}: {} values, want {}", got.len(), want.len());
    for (j, (&g, &w)) in got.iter().zip(want).enumerate() {
        ensure!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}[{j}]: {g} on the device vs {w} on the cpu");
    }
    Ok(())
}
