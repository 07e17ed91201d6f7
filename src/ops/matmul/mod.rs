//! `linear` (x·Wᵀ + b, the layout of Hugging Face weights) and batched `matmul`.

pub mod cpu;
mod lora;
pub mod skinny;

pub use lora::lora_linear;

use anyhow::{ensure, Result};

use self::cpu::{gemm, Mat};
use super::device::{alloc, buf, cast, kernel_dtype, on_gpu, zeros};
use super::grad_fn;
use crate::autograd::GradFn;
use crate::backend::storage::GpuStorage;
use crate::backend::{Gemm, GpuDevice};
use crate::kernels::matmul::{linear_bwd, linear_fwd, LinearDims};
use crate::tensor::{DType, Tensor};

/// `y = x·Wᵀ + b` for x `[.., in]`, W `[out, in]`, b `[out]`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    ensure!(w.dims() == 2, "linear: weight must be 2-D, got {:?}", w.shape());
    let (out_f, in_f) = (w.dim(0), w.dim(1));
    ensure!(
        x.dims() >= 1 && *x.shape().last().unwrap() == in_f,
        "linear: input {:?} vs weight {:?}",
        x.shape(),
        w.shape()
    );
    if let Some(b) = b {
        ensure!(b.shape() == [out_f], "linear: bias {:?} for {} outputs", b.shape(), out_f);
    }
    let dev = match b {
        Some(b) => on_gpu("linear", &[x, w, b])?,
        None => on_gpu("linear", &[x, w])?,
    };
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = out_f;
    let back = grad_fn(LinearBack { x: x.clone(), w: w.clone(), b: b.cloned() });
    if let Some(dev) = dev {
        return Ok(Tensor::from_gpu_op(linear_gpu(&dev, x, w, b)?, &shape, back));
    }
    let rows = x.numel() / in_f;
    let mut y = vec![0.0f32; rows * out_f];
    if rows <= skinny::MAX_ROWS {
        skinny::linear(x.f32s()?, rows, in_f, w.f32s()?, out_f, &mut y);
        if let Some(b) = b {
            for r in y.chunks_exact_mut(out_f) {
                r.iter_mut().zip(b.f32s()?).for_each(|(v, bv)| *v += bv);
            }
        }
        return Ok(Tensor::from_op(y, &shape, back));
    }
    if let Some(b) = b {
        let bv = b.f32s()?;
        for r in y.chunks_exact_mut(out_f) {
            r.copy_from_slice(bv);
        }
    }
    gemm(Mat::new(x.f32s()?, rows, in_f), Mat::new(w.f32s()?, out_f, in_f).t(), &mut y, b.is_some());
    Ok(Tensor::from_op(y, &shape, back))
}

/// The device GEMM (cuBLAS / the emu's CPU gemm) in the weight's dtype with f32 accumulation
/// (x and b are cast to it), bias through `kernels/elementwise.cu`.
fn linear_gpu(dev: &GpuDevice, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<GpuStorage> {
    let (dt, d) = (kernel_dtype(w), linear_dims(x, w));
    let (xc, wc, bc) = (cast(x, dt)?, cast(w, dt)?, b.map(|b| cast(b, dt)).transpose()?);
    let y = alloc(dev, dt, d.rows * d.out_f)?;
    linear_fwd(dev, dt, d, buf(&xc), buf(&wc), bc.as_ref().map(buf), &y.buf)?;
    Ok(y)
}

fn linear_dims(x: &Tensor, w: &Tensor) -> LinearDims {
    LinearDims { rows: x.numel() / w.dim(1), in_f: w.dim(1), out_f: w.dim(0) }
}

pub(super) struct LinearBack {
    pub(super) x: Tensor,
    pub(super) w: Tensor,
    pub(super) b: Option<Tensor>,
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
        match on_gpu("linear backward", &[g, &self.x, &self.w])? {
            None => self.backward_cpu(g),
            Some(dev) => self.backward_gpu(&dev, g),
        }
    }
}

impl LinearBack {
    fn backward_cpu(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (out_f, in_f) = (self.w.dim(0), self.w.dim(1));
        let rows = self.x.numel() / in_f;
        let gv = g.f32s()?;
        let dx = self
            .x
            .tracks_grad()
            .then(|| -> Result<Tensor> {
                let mut dx = vec![0.0; rows * in_f];
                gemm(Mat::new(gv, rows, out_f), Mat::new(self.w.f32s()?, out_f, in_f), &mut dx, false);
                Tensor::from_vec(dx, self.x.shape())
            })
            .transpose()?;
        let dw = self
            .w
            .tracks_grad()
            .then(|| -> Result<Tensor> {
                let mut dw = vec![0.0; out_f * in_f];
                gemm(Mat::new(gv, rows, out_f).t(), Mat::new(self.x.f32s()?, rows, in_f), &mut dw, false);
                Tensor::from_vec(dw, self.w.shape())
            })
            .transpose()?;
        let mut out = vec![dx, dw];
        if let Some(b) = &self.b {
            // Summed in f64: a bias gradient can be a near-cancelling sum over many rows (the
            // key bias barely moves attention, softmax being shift-invariant), and AdamW
            // divides by its own scale, so an f32 running sum's error became a weight change.
            let db = b
                .tracks_grad()
                .then(|| {
                    let mut db = vec![0.0f64; out_f];
                    for r in gv.chunks_exact(out_f) {
                        for (d, &x) in db.iter_mut().zip(r) {
                            *d += x as f64;
                        }
                    }
                    Tensor::from_vec(db.into_iter().map(|x| x as f32).collect(), &[out_f])
                })
                .transpose()?;
            out.push(db);
        }
        Ok(out)
    }

    /// On a device: in the weight's dtype like the forward; db in f32.
    fn backward_gpu(&self, dev: &GpuDevice, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (dt, d) = (kernel_dtype(&self.w), linear_dims(&self.x, &self.w));
        let (g, x, w) = (cast(g, dt)?, cast(&self.x, dt)?, cast(&self.w, dt)?);
        let dx = self.x.tracks_grad().then(|| alloc(dev, dt, d.rows * d.in_f)).transpose()?;
        // dw and db accumulate (beta = 1), so they start at zero; db is f32.
        let dw = self.w.tracks_grad().then(|| zeros(dev, dt, d.out_f * d.in_f)).transpose()?;
        let db = self
            .b
            .as_ref()
            .filter(|b| b.tracks_grad())
            .map(|_| zeros(dev, DType::F32, d.out_f))
            .transpose()?;
        linear_bwd(
            dev,
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

/// Batched `a·b` for a `[.., m, k]` and b `[.., k, n]` with equal leading dimensions.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    ensure!(a.dims() >= 2 && a.dims() == b.dims(), "matmul: shapes {:?} and {:?}", a.shape(), b.shape());
    let d = a.dims();
    ensure!(
        a.shape()[..d - 2] == b.shape()[..d - 2],
        "matmul: batch dimensions differ: {:?} vs {:?}",
        a.shape(),
        b.shape()
    );
    let (m, k, n) = (a.dim(d - 2), a.dim(d - 1), b.dim(d - 1));
    ensure!(b.dim(d - 2) == k, "matmul: inner dimensions differ: {:?} vs {:?}", a.shape(), b.shape());
    let mut shape = a.shape().to_vec();
    shape[d - 1] = n;
    let back = grad_fn(MatmulBack { a: a.clone(), b: b.clone() });
    if let Some(dev) = on_gpu("matmul", &[a, b])? {
        let dt = kernel_dtype(a);
        let batch = a.numel() / (m * k).max(1);
        let y = bmm_gpu(&dev, dt, (&cast(a, dt)?, false), (&cast(b, dt)?, false), (m, k, n), batch)?;
        return Ok(Tensor::from_gpu_op(y, &shape, back));
    }
    let y = bmm(a.f32s()?, false, b.f32s()?, false, m, k, n);
    Ok(Tensor::from_op(y, &shape, back))
}

/// Batched product of `[batch, m, k]` (or its transpose) by `[batch, k, n]` (or transpose).
fn bmm(a: &[f32], ta: bool, b: &[f32], tb: bool, m: usize, k: usize, n: usize) -> Vec<f32> {
    let batch = if m * k == 0 { 0 } else { a.len() / (m * k) };
    let mut y = vec![0.0; batch * m * n];
    for (i, yc) in y.chunks_exact_mut(m * n).enumerate() {
        let am = if ta {
            Mat::new(&a[i * m * k..(i + 1) * m * k], k, m).t()
        } else {
            Mat::new(&a[i * m * k..(i + 1) * m * k], m, k)
        };
        let bm = if tb {
            Mat::new(&b[i * k * n..(i + 1) * k * n], n, k).t()
        } else {
            Mat::new(&b[i * k * n..(i + 1) * k * n], k, n)
        };
        gemm(am, bm, yc, false);
    }
    y
}

struct MatmulBack {
    a: Tensor,
    b: Tensor,
}

impl GradFn for MatmulBack {
    fn name(&self) -> &'static str {
        "matmul"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.a.clone(), self.b.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let d = self.a.dims();
        let (m, k, n) = (self.a.dim(d - 2), self.a.dim(d - 1), self.b.dim(d - 1));
        // da = g·bᵀ  ([m,n]·[n,k]),  db = aᵀ·g  ([k,m]·[m,n])
        let Some(dev) = on_gpu("matmul backward", &[g, &self.a, &self.b])? else {
            let gv = g.f32s()?;
            let da = Tensor::from_vec(bmm(gv, false, self.b.f32s()?, true, m, n, k), self.a.shape())?;
            let db = Tensor::from_vec(bmm(self.a.f32s()?, true, gv, false, k, m, n), self.b.shape())?;
            return Ok(vec![Some(da), Some(db)]);
        };
        let dt = kernel_dtype(&self.a);
        let batch = self.a.numel() / (m * k).max(1);
        let (g, a, b) = (cast(g, dt)?, cast(&self.a, dt)?, cast(&self.b, dt)?);
        let da = bmm_gpu(&dev, dt, (&g, false), (&b, true), (m, n, k), batch)?;
        let db = bmm_gpu(&dev, dt, (&a, true), (&g, false), (k, m, n), batch)?;
        Ok(vec![Some(Tensor::from_gpu(da, self.a.shape())?), Some(Tensor::from_gpu(db, self.b.shape())?)])
    }
}

/// On a device: batched `[batch, m, k]·[batch, k, n]` (operands optionally transposed) into `c`.
fn bmm_gpu(
    dev: &GpuDevice,
    dt: DType,
    (a, ta): (&Tensor, bool),
    (b, tb): (&Tensor, bool),
    (m, k, n): (usize, usize, usize),
    batch: usize,
) -> Result<GpuStorage> {
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
