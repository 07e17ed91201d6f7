//! Causal grouped-query attention over packed variable-length sequences.
//!
//! Tokens of all sequences are packed along one axis (`q`: `[tokens, q_heads, head_dim]`,
//! `k`, `v`: `[tokens, kv_heads, head_dim]`); `seqs` gives each sequence's (start, len).
//! Memory-efficient: query blocks see one block × keys score tile at a time, and backward
//! recomputes probabilities from the saved log-sum-exp instead of keeping them.

pub mod cpu;

use anyhow::{ensure, Context, Result};

use super::device::{backward_device, buf, cast, on_gpu, zeros};
use super::grad_fn;
use crate::autograd::GradFn;
use crate::backend::storage::GpuStorage;
use crate::backend::{GpuBuffer, GpuDevice};
use crate::kernels::attention::{
    flash_attn_bwd_f32, flash_attn_bwd_scaled, flash_attn_fwd_f32, flash_attn_fwd_scaled, padded_head_dim,
    seq_table, FlashDims,
};
use crate::kernels::elementwise::copy_2d;
use crate::tensor::{DType, Tensor};

/// Shapes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, seqs: &[(usize, usize)]) -> Result<Tensor> {
    attention_shared(q, k, v, seqs, &[])
}

/// [`attention`] over sequences that may share a prefix: with `prefix[i] = Some(p)`, every query
/// of sequence `i` also sees every key of sequence `p` (placed before its own keys, which it sees
/// causally), and the gradient of those keys sums over `p`'s own queries and those of every
/// sequence naming it. So `p` = a prompt and `i` = one of its completions computes exactly what
/// the concatenation `p ++ i` would, for `i`'s rows, without repeating `p` once per completion.
/// `prefix` is empty (no sharing) or one entry per sequence; a prefix is an earlier sequence
/// that has none itself, and the sequences naming one prefix are consecutive.
pub fn attention_shared(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seqs: &[(usize, usize)],
    prefix: &[Option<usize>],
) -> Result<Tensor> {
    ensure!(
        q.dims() == 3 && k.dims() == 3 && v.dims() == 3,
        "attention: q, k, v must be [tokens, heads, head_dim]"
    );
    ensure!(k.shape() == v.shape(), "attention: k {:?} vs v {:?}", k.shape(), v.shape());
    let n = q.dim(0);
    let dims = Dims { q_heads: q.dim(1), kv_heads: k.dim(1), head_dim: q.dim(2) };
    ensure!(k.dim(0) == n && k.dim(2) == dims.head_dim, "attention: q {:?} vs k {:?}", q.shape(), k.shape());
    ensure!(
        dims.kv_heads > 0 && dims.q_heads.is_multiple_of(dims.kv_heads),
        "attention: {} query heads not a multiple of {} kv heads",
        dims.q_heads,
        dims.kv_heads
    );
    for &(s, l) in seqs {
        ensure!(s + l <= n, "attention: sequence {}..{} beyond {} tokens", s, s + l, n);
    }
    check_prefix(seqs.len(), prefix)?;
    let prefix = if prefix.iter().any(Option::is_some) { prefix.to_vec() } else { Vec::new() };
    let back = |saved| grad_fn(AttentionBack { q: q.clone(), k: k.clone(), v: v.clone(), saved });
    if let Some(dev) = on_gpu("attention", &[q, k, v])? {
        let (y, saved) = if q.dtype() == DType::F32 {
            forward_gpu_f32(&dev, q, k, v, dims, seqs, &prefix)?
        } else {
            forward_gpu(&dev, q, k, v, dims, seqs, &prefix)?
        };
        return Ok(y.with_grad_fn(back(saved)));
    }
    let (out, lse) = cpu::forward_shared(q.f32s()?, k.f32s()?, v.f32s()?, dims, seqs, &prefix);
    let saved = Saved::Cpu { seqs: seqs.to_vec(), prefix, dims, out: out.clone(), lse };
    Ok(Tensor::from_op(out, q.shape(), back(saved)))
}

/// Checks the shape of a prefix relation over `n` sequences (see [`attention_shared`]).
pub fn check_prefix(n: usize, prefix: &[Option<usize>]) -> Result<()> {
    if prefix.is_empty() {
        return Ok(());
    }
    ensure!(prefix.len() == n, "attention: {} prefix entries for {n} sequences", prefix.len());
    for (i, &p) in prefix.iter().enumerate() {
        let Some(p) = p else { continue };
        ensure!(
            p < i,
            "attention: sequence {i} names sequence {p} as its prefix; a prefix must come earlier"
        );
        ensure!(prefix[p].is_none(), "attention: sequence {i}'s prefix {p} has a prefix itself");
        if i > 0 && prefix[i - 1] != Some(p) {
            ensure!(
                !prefix[..i].contains(&Some(p)),
                "attention: the sequences sharing prefix {p} are not consecutive (sequence {i})"
            );
        }
    }
    Ok(())
}

/// What the backward recomputes the probabilities from, on the device the forward ran on.
enum Saved {
    Cpu { seqs: Vec<(usize, usize)>, prefix: Vec<Option<usize>>, dims: Dims, out: Vec<f32>, lse: Vec<f32> },
    Gpu(Box<FlashSaved>),
    GpuF32(Box<F32Saved>),
}

struct AttentionBack {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    saved: Saved,
}

impl GradFn for AttentionBack {
    fn name(&self) -> &'static str {
        "attention"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.q.clone(), self.k.clone(), self.v.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (seqs, prefix, dims, out, lse) = match &self.saved {
            Saved::Cpu { seqs, prefix, dims, out, lse } => (seqs, prefix, dims, out, lse),
            Saved::Gpu(f) => return self.backward_gpu(g, f),
            Saved::GpuF32(f) => return self.backward_gpu_f32(g, f),
        };
        let saved = cpu::Saved { out, lse };
        let (q, k, v) = (self.q.f32s()?, self.k.f32s()?, self.v.f32s()?);
        let (dq, dk, dv) = cpu::backward_shared(q, k, v, saved, g.f32s()?, *dims, seqs, prefix);
        Ok(vec![
            Some(Tensor::from_vec(dq, self.q.shape())?),
            Some(Tensor::from_vec(dk, self.k.shape())?),
            Some(Tensor::from_vec(dv, self.v.shape())?),
        ])
    }
}

// On a device: FlashAttention-2 forward/backward kernels on bf16 q/k/v over the packed
// sequences (`cu_seqlens`). A head dim the kernels are not built for is zero-padded to the next
// one (8 → 16, 48 → 64, ...) around the calls, keeping the real dim's softmax scale.

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

/// Saved for the device backward: padded inputs and output, log-sum-exp, sequence offsets.
struct FlashSaved {
    qp: Tensor,
    kp: Tensor,
    vp: Tensor,
    o: Tensor,
    lse: GpuStorage,
    fd: FlashDims,
    scale: f32,
    cu: GpuBuffer,
    hd: usize,
}

fn forward_gpu(
    dev: &GpuDevice,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dims: Dims,
    seqs: &[(usize, usize)],
    prefix: &[Option<usize>],
) -> Result<(Tensor, Saved)> {
    let n = q.dim(0);
    let hd = dims.head_dim;
    let hp = padded_head_dim(hd)
        .with_context(|| format!("attention on a GPU supports head_dim up to 128, not {hd}"))?;
    let (cu, max_len) = seq_table(seqs, prefix).context("attention on a GPU")?;
    let fd = FlashDims {
        tokens: n,
        n_seq: seqs.len(),
        max_len,
        q_heads: dims.q_heads,
        kv_heads: dims.kv_heads,
        head_dim: hp,
        shared: !prefix.is_empty(),
    };
    let (scale, cu) = (1.0 / (hd as f32).sqrt(), dev.upload_i32(&cu)?);
    let (qp, kp, vp) = (padded(dev, q, hp)?, padded(dev, k, hp)?, padded(dev, v, hp)?);
    // Zeroed: rows outside every sequence stay 0, as on the cpu.
    let o = Tensor::from_gpu(zeros(dev, BF, n * dims.q_heads * hp)?, &[n, dims.q_heads, hp])?;
    let lse = zeros(dev, DType::F32, n * dims.q_heads)?;
    flash_attn_fwd_scaled(dev, &fd, buf(&qp), buf(&kp), buf(&vp), &cu, buf(&o), &lse.buf, scale)?;
    // Unpadded, the output and the saved o are one buffer.
    let y = if hp == hd {
        o.clone()
    } else {
        Tensor::from_gpu(repad(dev, buf(&o), n * dims.q_heads, hp, hd)?, q.shape())?
    };
    Ok((y, Saved::Gpu(Box::new(FlashSaved { qp, kp, vp, o, lse, fd, scale, cu, hd }))))
}

impl AttentionBack {
    fn backward_gpu(&self, g: &Tensor, f: &FlashSaved) -> Result<Vec<Option<Tensor>>> {
        let dev = backward_device("attention", g, &self.q)?;
        let (fd, hd, hp) = (f.fd, f.hd, f.fd.head_dim);
        ensure!(g.shape() == self.q.shape(), "attention backward: gradient {:?}", g.shape());
        let gp = padded(&dev, g, hp)?;
        let (nq, nk) = (fd.tokens * fd.q_heads, fd.tokens * fd.kv_heads);
        let dq = zeros(&dev, BF, nq * hp)?;
        let (dk, dv) = (zeros(&dev, BF, nk * hp)?, zeros(&dev, BF, nk * hp)?);
        let (qp, kp, vp, o) = (buf(&f.qp), buf(&f.kp), buf(&f.vp), buf(&f.o));
        let grads = (&dq.buf, &dk.buf, &dv.buf);
        flash_attn_bwd_scaled(
            &dev,
            &fd,
            qp,
            kp,
            vp,
            &f.cu,
            o,
            &f.lse.buf,
            buf(&gp),
            grads.0,
            grads.1,
            grads.2,
            f.scale,
        )?;
        let unpad = |s: GpuStorage, rows: usize, like: &Tensor| -> Result<Option<Tensor>> {
            let s = if hp == hd { s } else { repad(&dev, &s.buf, rows, hp, hd)? };
            Ok(Some(Tensor::from_gpu(s, like.shape())?))
        };
        Ok(vec![unpad(dq, nq, &self.q)?, unpad(dk, nk, &self.k)?, unpad(dv, nk, &self.v)?])
    }
}

// The f32 path (`--dtype f32`): q in f32 selects f32 kernels that compute in f32 throughout
// (k and v are cast to f32 if they are not), for agreement with the cpu op to f32 rounding.

/// Saved for the f32 backward: the f32 inputs, output and log-sum-exp, sequence offsets.
struct F32Saved {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: GpuStorage,
    fd: FlashDims,
    scale: f32,
    cu: GpuBuffer,
}

fn forward_gpu_f32(
    dev: &GpuDevice,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dims: Dims,
    seqs: &[(usize, usize)],
    prefix: &[Option<usize>],
) -> Result<(Tensor, Saved)> {
    let n = q.dim(0);
    let (cu, max_len) = seq_table(seqs, prefix).context("attention on a GPU")?;
    let fd = FlashDims {
        tokens: n,
        n_seq: seqs.len(),
        max_len,
        q_heads: dims.q_heads,
        kv_heads: dims.kv_heads,
        head_dim: dims.head_dim,
        shared: !prefix.is_empty(),
    };
    let (scale, cu) = (1.0 / (dims.head_dim as f32).sqrt(), dev.upload_i32(&cu)?);
    let (q, k, v) = (cast(q, DType::F32)?, cast(k, DType::F32)?, cast(v, DType::F32)?);
    // Zeroed: rows outside every sequence stay 0, as on the cpu.
    let o = Tensor::from_gpu(zeros(dev, DType::F32, n * dims.q_heads * dims.head_dim)?, q.shape())?;
    let lse = zeros(dev, DType::F32, n * dims.q_heads)?;
    flash_attn_fwd_f32(dev, &fd, buf(&q), buf(&k), buf(&v), &cu, buf(&o), &lse.buf, scale)?;
    Ok((o.clone(), Saved::GpuF32(Box::new(F32Saved { q, k, v, o, lse, fd, scale, cu }))))
}

impl AttentionBack {
    fn backward_gpu_f32(&self, g: &Tensor, f: &F32Saved) -> Result<Vec<Option<Tensor>>> {
        let dev = backward_device("attention", g, &self.q)?;
        ensure!(g.shape() == self.q.shape(), "attention backward: gradient {:?}", g.shape());
        let g = cast(g, DType::F32)?;
        let fd = f.fd;
        let (nq, nk) = (fd.tokens * fd.q_heads * fd.head_dim, fd.tokens * fd.kv_heads * fd.head_dim);
        // Zeroed: rows outside every sequence get no gradient, as on the cpu.
        let (dq, dk, dv) =
            (zeros(&dev, DType::F32, nq)?, zeros(&dev, DType::F32, nk)?, zeros(&dev, DType::F32, nk)?);
        flash_attn_bwd_f32(
            &dev,
            &fd,
            buf(&f.q),
            buf(&f.k),
            buf(&f.v),
            &f.cu,
            buf(&f.o),
            &f.lse.buf,
            buf(&g),
            (&dq.buf, &dk.buf, &dv.buf),
            f.scale,
        )?;
        // Gradients in the dtype of the inputs they belong to.
        let out = |s: GpuStorage, like: &Tensor| -> Result<Option<Tensor>> {
            Ok(Some(cast(&Tensor::from_gpu(s, like.shape())?, like.dtype())?))
        };
        Ok(vec![out(dq, &self.q)?, out(dk, &self.k)?, out(dv, &self.v)?])
    }
}
