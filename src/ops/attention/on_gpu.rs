//! Attention on GPU tensors: FlashAttention-2 forward/backward kernels on bf16 q/k/v over the
//! packed sequences (`cu_seqlens`). A head dim the kernels are not built for is zero-padded to the
//! next one (8 → 16, 48 → 64, ...) around the calls, keeping the real dim's softmax scale.

use anyhow::{ensure, Context, Result};

use super::Dims;
use crate::autograd::GradFn;
use crate::backend::storage::GpuStorage;
use crate::backend::{GpuBuffer, GpuDevice};
use crate::kernels::attention::{
    cu_seqlens, flash_attn_bwd_scaled, flash_attn_fwd_scaled, padded_head_dim, FlashDims,
};
use crate::kernels::elementwise::copy_2d;
use crate::ops::device::{backward_device, buf, cast, zeros};
use crate::ops::grad_fn;
use crate::tensor::{DType, Tensor};

const BF: DType = DType::BF16;

/// `rows` rows of `from` bf16 values copied into rows of `to` (the rest of a wider row is zero).
fn repad(dev: &GpuDevice, x: &GpuBuffer, rows: usize, from: usize, to: usize) -> Result<GpuStorage> {
    let y = zeros(dev, BF, rows * to)?;
    copy_2d(dev, BF, x, 0, from, &y.buf, 0, to, rows, from.min(to))?;
    Ok(y)
}

/// A bf16 copy of `t` (`[tokens, heads, hd]`) with rows padded to `hp` (no copy when equal).
fn padded(dev: &GpuDevice, t: &Tensor, hp: usize) -> Result<Tensor> {
    let t = cast(t, BF)?;
    let (rows, hd) = (t.dim(0) * t.dim(1), t.dim(2));
    if hd == hp {
        return Ok(t);
    }
    Tensor::from_gpu(repad(dev, buf(&t), rows, hd, hp)?, &[t.dim(0), t.dim(1), hp])
}

/// Saved for the backward: padded inputs and output, log-sum-exp, sequence offsets.
struct Flash {
    fd: FlashDims,
    scale: f32,
    cu: GpuBuffer,
}

pub(super) fn attention(
    dev: &GpuDevice,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dims: Dims,
    seqs: &[(usize, usize)],
) -> Result<Tensor> {
    let n = q.dim(0);
    let hd = dims.head_dim;
    let hp = padded_head_dim(hd)
        .with_context(|| format!("attention on a GPU supports head_dim up to 128, not {hd}"))?;
    let (cu, max_len) = cu_seqlens(seqs).context("attention on a GPU")?;
    let fd = FlashDims {
        tokens: n,
        n_seq: seqs.len(),
        max_len,
        q_heads: dims.q_heads,
        kv_heads: dims.kv_heads,
        head_dim: hp,
    };
    let f = Flash { fd, scale: 1.0 / (hd as f32).sqrt(), cu: dev.upload_i32(&cu)? };
    let (qp, kp, vp) = (padded(dev, q, hp)?, padded(dev, k, hp)?, padded(dev, v, hp)?);
    // Zeroed: rows outside every sequence stay 0, as on the cpu.
    let o = Tensor::from_gpu(zeros(dev, BF, n * dims.q_heads * hp)?, &[n, dims.q_heads, hp])?;
    let lse = zeros(dev, DType::F32, n * dims.q_heads)?;
    flash_attn_fwd_scaled(dev, &f.fd, buf(&qp), buf(&kp), buf(&vp), &f.cu, buf(&o), &lse.buf, f.scale)?;
    // Unpadded, the output and the saved o are one buffer.
    let y = if hp == hd {
        o.clone()
    } else {
        Tensor::from_gpu(repad(dev, buf(&o), n * dims.q_heads, hp, hd)?, q.shape())?
    };
    let back = AttentionBack { q: q.clone(), k: k.clone(), v: v.clone(), qp, kp, vp, o, lse, f, hd };
    Ok(y.with_grad_fn(grad_fn(back)))
}

struct AttentionBack {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    qp: Tensor,
    kp: Tensor,
    vp: Tensor,
    o: Tensor,
    lse: GpuStorage,
    f: Flash,
    hd: usize,
}

impl GradFn for AttentionBack {
    fn name(&self) -> &'static str {
        "attention"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.q.clone(), self.k.clone(), self.v.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let dev = backward_device("attention", g, &self.q)?;
        let (fd, hd, hp) = (self.f.fd, self.hd, self.f.fd.head_dim);
        ensure!(g.shape() == self.q.shape(), "attention backward: gradient {:?}", g.shape());
        let gp = padded(&dev, g, hp)?;
        let (nq, nk) = (fd.tokens * fd.q_heads, fd.tokens * fd.kv_heads);
        let dq = zeros(&dev, BF, nq * hp)?;
        let (dk, dv) = (zeros(&dev, BF, nk * hp)?, zeros(&dev, BF, nk * hp)?);
        flash_attn_bwd_scaled(
            &dev,
            &fd,
            buf(&self.qp),
            buf(&self.kp),
            buf(&self.vp),
            &self.f.cu,
            buf(&self.o),
            &self.lse.buf,
            buf(&gp),
            &dq.buf,
            &dk.buf,
            &dv.buf,
            self.f.scale,
        )?;
        let unpad = |s: GpuStorage, rows: usize, like: &Tensor| -> Result<Option<Tensor>> {
            let s = if hp == hd { s } else { repad(&dev, &s.buf, rows, hp, hd)? };
            Ok(Some(Tensor::from_gpu(s, like.shape())?))
        };
        Ok(vec![unpad(dq, nq, &self.q)?, unpad(dk, nk, &self.k)?, unpad(dv, nk, &self.v)?])
    }
}
