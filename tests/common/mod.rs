//! Helpers shared by the GPU tests (emu and cuda); `suite` is the kernel test suite both run.
#![allow(dead_code)]

pub mod suite;

use fcgpu::backend::{GpuBuffer, GpuDevice};
use fcgpu::DType;
use rand::{Rng, SeedableRng};

/// Deterministic normal-ish values (sum of uniforms) times `scale`.
pub fn randn(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| (0..4).map(|_| r.random::<f32>() - 0.5).sum::<f32>() * 1.7 * scale).collect()
}

/// Round through the storage dtype (what the kernel actually sees).
pub fn quant(v: &[f32], dt: DType) -> Vec<f32> {
    match dt {
        DType::F32 => v.to_vec(),
        DType::BF16 => v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect(),
        DType::F16 => v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect(),
    }
}

pub fn up(d: &GpuDevice, v: &[f32], dt: DType) -> GpuBuffer {
    d.upload_as(v, dt).unwrap()
}

pub fn down(b: &GpuBuffer, dt: DType) -> Vec<f32> {
    b.download_as_f32(dt).unwrap()
}

/// |got - want| <= tol * (|want| + scale) elementwise, scale = max|want| * 0.1 + 1e-6:
/// relative for large entries, absolute (relative to the row's magnitude) near zero.
pub fn assert_close<W: Copy + Into<f64>>(got: &[f32], want: &[W], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().map(|&w| w.into().abs()).fold(0.0, f64::max) * 0.1 + 1e-6;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let w: f64 = w.into();
        let g = g as f64;
        assert!(g.is_finite() == w.is_finite(), "{what}[{i}]: got {g}, want {w}");
        if w.is_finite() {
            assert!(
                (g - w).abs() <= tol * (w.abs() + scale) + 1e-7,
                "{what}[{i}]: got {g}, want {w} (tol {tol})"
            );
        }
    }
}

/// `#[test]` functions that run `common::suite::<name>` on the device `$dev` (an `Option`).
#[macro_export]
macro_rules! suite_tests {
    // `needs_gpu`: #[ignore] unless built with FCGPU_TEST_CUDA=1 (cfg set by build.rs).
    (needs_gpu $dev:expr; $($name:ident),* $(,)?) => {
        $(
            #[test]
            #[cfg_attr(not(fcgpu_test_cuda), ignore = "needs a GPU: FCGPU_TEST_CUDA=1 cargo test")]
            fn $name() {
                if let Some(d) = $dev {
                    common::suite::$name(&d);
                }
            }
        )*
    };
    ($dev:expr; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                if let Some(d) = $dev {
                    common::suite::$name(&d);
                }
            }
        )*
    };
}
