//! `linear` and `matmul` on GPU tensors: the device GEMM (cuBLAS / the emu's CPU gemm) in the
//! weight's dtype with f32 accumulation, bias through `kernels/elementwise.cu`.

use anyhow::Result;

use crate::autograd::GradFn;
use crate::backend::{Gemm, GpuDevice};
use crate::kernels::matmul::{linear_bwd, linear_fwd, LinearDims};
use crate::ops::device::{alloc, backward_device, buf, cast, kernel_dtype, zeros};
use crate::ops::grad_fn;
use crate::tensor::{DType, Tensor};

/// `y = x·Wᵀ + b`; the weight's dtype sets the compute dtype (x and b are cast to it).
pub(super) fn linear(dev: &GpuDevice, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dt = kernel_dtype(w);
    let d = LinearDims { rows: x.numel() / w.dim(1), in_f: w.dim(1), out_f: w.dim(0) };
    let (xc, wc, bc) = (cast(x, dt)?, cast(w, dt)?, b.map(|b| cast(b, dt)).transpose()?);
    let y = alloc(dev, dt, d.rows * d.out_f)?;
    linear_fwd(dev, dt, d, buf(&xc), buf(&wc), bc.as_ref().map(buf), &y.buf)?;
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = d.out_f;
    let back = LinearBack { x: x.clone(), w: w.clone(), b: b.cloned(), dt, d };
    Ok(Tensor::from_gpu_op(y, &shape, grad_fn(back)))
}

struct LinearBack {
    x: Tensor,
    w: Tensor,
    b: Option<Tensor>,
    dt: DType,
    d: LinearDims,
}

impl GradFn for LinearBack {
    fn name(&self) -> &'static str {
        "linear"
    }
    fn inputs(&self) -> Vec<Tensor> {
        let mut v = vec![self.x.clone(), self.w.clone()];
        v.extend(self.b.clone());
        v
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (d, dt) = (self.d, self.dt);
        let dev = backward_device("linear", g, &self.w)?;
        let (g, x, w) = (cast(g, dt)?, cast(&self.x, dt)?, cast(&self.w, dt)?);
        let dx = self.x.tracks_grad().then(|| alloc(&dev, dt, d.rows * d.in_f)).transpose()?;
        // dw and db accumulate (beta = 1), so they start at zero; db is f32.
        let dw = self.w.tracks_grad().then(|| zeros(&dev, dt, d.out_f * d.in_f)).transpose()?;
        let db = self
            .b
            .as_ref()
            .filter(|b| b.tracks_grad())
            .map(|_| zeros(&dev, DType::F32, d.out_f))
            .transpose()?;
        linear_bwd(
            &dev,
            dt,
            d,
            buf(&x),
            buf(&w),
            buf(&g),
            dx.as_ref().map(|s| &s.buf),
            dw.as_ref().map(|s| &s.buf),
            db.as_ref().map(|s| &s.buf),
        )?;
        let mut out = vec![
            dx.map(|s| Tensor::from_gpu(s, self.x.shape())).transpose()?,
            dw.map(|s| Tensor::from_gpu(s, self.w.shape())).transpose()?,
        ];
        if let Some(b) = &self.b {
            out.push(db.map(|s| Tensor::from_gpu(s, b.shape())).transpose()?);
        }
        Ok(out)
    }
}

/// Batched `[batch, m, k]·[batch, k, n]` (operands optionally transposed) into `c`.
#[allow(clippy::too_many_arguments)]
fn bmm(
    dev: &GpuDevice,
    dt: DType,
    a: &Tensor,
    ta: bool,
    b: &Tensor,
    tb: bool,
    (m, k, n): (usize, usize, usize),
    batch: usize,
) -> Result<crate::backend::storage::GpuStorage> {
    let c = alloc(dev, dt, batch * m * n)?;
    if batch * m * n == 0 {
        return Ok(c);
    }
    if k == 0 {
        c.buf.zero()?;
        return Ok(c);
    }
    let g = Gemm {
        dtype: dt,
        m,
        n,
        k,
        a: buf(a).ptr(),
        lda: if ta { m } else { k },
        trans_a: ta,
        b: buf(b).ptr(),
        ldb: if tb { k } else { n },
        trans_b: tb,
        c: c.buf.ptr(),
        ldc: n,
        alpha: 1.0,
        beta: 0.0,
        batch,
        stride_a: m * k,
        stride_b: k * n,
        stride_c: m * n,
    };
    dev.gemm(&g)?;
    Ok(c)
}

/// Batched `a·b` (shapes checked by the caller).
pub(super) fn matmul(dev: &GpuDevice, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dt = kernel_dtype(a);
    let dims = a.dims();
    let (m, k, n) = (a.dim(dims - 2), a.dim(dims - 1), b.dim(dims - 1));
    let batch = a.numel() / (m * k).max(1);
    let (ac, bc) = (cast(a, dt)?, cast(b, dt)?);
    let y = bmm(dev, dt, &ac, false, &bc, false, (m, k, n), batch)?;
    let mut shape = a.shape().to_vec();
    shape[dims - 1] = n;
    Ok(Tensor::from_gpu_op(y, &shape, grad_fn(MatmulBack { a: a.clone(), b: b.clone(), dt })))
}

struct MatmulBack {
    a: Tensor,
    b: Tensor,
    dt: DType,
}

impl GradFn for MatmulBack {
    fn name(&self) -> &'static str {
        "matmul"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.a.clone(), self.b.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let dims = self.a.dims();
        let (m, k, n) = (self.a.dim(dims - 2), self.a.dim(dims - 1), self.b.dim(dims - 1));
        let batch = self.a.numel() / (m * k).max(1);
        let dev = backward_device("matmul", g, &self.a)?;
        let (g, a, b) = (cast(g, self.dt)?, cast(&self.a, self.dt)?, cast(&self.b, self.dt)?);
        // da = g·bᵀ ([m,n]·[n,k]),  db = aᵀ·g ([k,m]·[m,n])
        let da = bmm(&dev, self.dt, &g, false, &b, true, (m, n, k), batch)?;
        let db = bmm(&dev, self.dt, &a, true, &g, false, (k, m, n), batch)?;
        Ok(vec![Some(Tensor::from_gpu(da, self.a.shape())?), Some(Tensor::from_gpu(db, self.b.shape())?)])
    }
}
