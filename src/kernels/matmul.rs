//! `linear` on a GPU device: `y = x·Wᵀ + b` (Hugging Face weight layout `[out, in]`) through the
//! device GEMM (cuBLAS on cuda, the gemm crate on emu) and `kernels/elementwise.cu` for the bias;
//! and its backward.

use anyhow::{ensure, Result};

use crate::backend::{Gemm, GpuBuffer, GpuDevice};
use crate::dtype::DType;
use crate::kernels::elementwise::{bias_add, col_sum};

/// Shapes of one linear layer call.
#[derive(Clone, Copy, Debug)]
pub struct LinearDims {
    pub rows: usize,
    pub in_f: usize,
    pub out_f: usize,
}

/// `y [rows, out] = x [rows, in] · wᵀ` (`w`: `[out, in]`) `+ b`, all of `dtype`.
pub fn linear_fwd(
    dev: &GpuDevice,
    dtype: DType,
    d: LinearDims,
    x: &GpuBuffer,
    w: &GpuBuffer,
    b: Option<&GpuBuffer>,
    y: &GpuBuffer,
) -> Result<()> {
    let es = dtype.size();
    ensure!(
        x.bytes() >= d.rows * d.in_f * es
            && w.bytes() >= d.out_f * d.in_f * es
            && y.bytes() >= d.rows * d.out_f * es,
        "linear_fwd: buffers too small"
    );
    if d.rows == 0 || d.out_f == 0 {
        return Ok(());
    }
    if d.in_f == 0 {
        y.zero()?;
    } else {
        dev.gemm(&Gemm::simple(dtype, d.rows, d.out_f, d.in_f, x.ptr(), w.ptr(), true, y.ptr()))?;
    }
    if let Some(b) = b {
        bias_add(dev, dtype, y, b, y, d.rows, d.out_f)?;
    }
    Ok(())
}

/// Backward of [`linear_fwd`] for upstream `dy` `[rows, out]`: `dx = dy·w` (written),
/// `dw += dyᵀ·x` (`dtype`, accumulated), `db += Σ_rows dy` (f32, accumulated). Each optional.
#[allow(clippy::too_many_arguments)]
pub fn linear_bwd(
    dev: &GpuDevice,
    dtype: DType,
    d: LinearDims,
    x: &GpuBuffer,
    w: &GpuBuffer,
    dy: &GpuBuffer,
    dx: Option<&GpuBuffer>,
    dw: Option<&GpuBuffer>,
    db: Option<&GpuBuffer>,
) -> Result<()> {
    let es = dtype.size();
    ensure!(dy.bytes() >= d.rows * d.out_f * es, "linear_bwd: dy too small");
    if d.rows == 0 {
        return Ok(());
    }
    if let Some(dx) = dx {
        ensure!(dx.bytes() >= d.rows * d.in_f * es, "linear_bwd: dx too small");
        dev.gemm(&Gemm::simple(dtype, d.rows, d.in_f, d.out_f, dy.ptr(), w.ptr(), false, dx.ptr()))?;
    }
    if let Some(dw) = dw {
        ensure!(dw.bytes() >= d.out_f * d.in_f * es, "linear_bwd: dw too small");
        // dw [out, in] += dyᵀ [out, rows] · x [rows, in]
        let mut g = Gemm::simple(dtype, d.out_f, d.in_f, d.rows, dy.ptr(), x.ptr(), false, dw.ptr());
        g.trans_a = true;
        g.lda = d.out_f;
        g.beta = 1.0;
        dev.gemm(&g)?;
    }
    if let Some(db) = db {
        col_sum(dev, dtype, dy, db, d.rows, d.out_f, true)?;
    }
    Ok(())
}
