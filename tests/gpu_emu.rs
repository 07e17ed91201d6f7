//! Every kernel on the emu device against a CPU reference, at awkward sizes.
//! Tolerances: f32 kernels ~1e-5 relative; bf16 storage ~1e-2 relative (8-bit mantissa).

use fcgpu::backend::{GpuDevice, GpuKind};
use fcgpu::DType;

mod common;
use common::*;

fn dev() -> GpuDevice {
    GpuDevice::emu()
}

#[test]
fn emu_is_emu() {
    assert_eq!(dev().kind(), GpuKind::Emu);
    let names = fcgpu::backend::emu::kernel_names();
    assert!(names.contains(&"swiglu_fwd_bf16"), "{names:?}");
}

#[test]
fn swiglu_fwd_bwd() {
    use fcgpu::backend::ops::swiglu::{swiglu_bwd, swiglu_fwd};
    let d = dev();
    for &n in &[1usize, 255, 257, 1000] {
        let g = randn(n, 1, 2.0);
        let u = randn(n, 2, 1.0);
        let dout = randn(n, 3, 1.0);
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let want: Vec<f64> = (0..n).map(|i| g[i] as f64 * sig(g[i] as f64) * u[i] as f64).collect();
        let want_dg: Vec<f64> = (0..n)
            .map(|i| {
                let (x, s) = (g[i] as f64, sig(g[i] as f64));
                dout[i] as f64 * u[i] as f64 * s * (1.0 + x * (1.0 - s))
            })
            .collect();
        let want_du: Vec<f64> = (0..n).map(|i| dout[i] as f64 * g[i] as f64 * sig(g[i] as f64)).collect();
        for (dt, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
            let (gb, ub, db) = (up(&d, &g, dt), up(&d, &u, dt), up(&d, &dout, dt));
            let out = d.zeros(n * dt.size()).unwrap();
            swiglu_fwd(&d, dt, &gb, &ub, &out, n).unwrap();
            assert_close(&down(&out, dt), &want, tol, &format!("swiglu fwd {dt:?} n={n}"));
            let (dg, du) = (d.zeros(n * dt.size()).unwrap(), d.zeros(n * dt.size()).unwrap());
            swiglu_bwd(&d, dt, &gb, &ub, &db, &dg, &du, n).unwrap();
            assert_close(&down(&dg, dt), &want_dg, tol, &format!("swiglu dgate {dt:?} n={n}"));
            assert_close(&down(&du, dt), &want_du, tol, &format!("swiglu dup {dt:?} n={n}"));
        }
    }
}
