//! Causal grouped-query attention over packed variable-length sequences.
//!
//! Tokens of all sequences are packed along one axis (`q`: `[tokens, q_heads, head_dim]`,
//! `k`, `v`: `[tokens, kv_heads, head_dim]`); `seqs` gives each sequence's (start, len).
//! Memory-efficient: query blocks see one block × keys score tile at a time, and backward
//! recomputes probabilities from the saved log-sum-exp instead of keeping them.

pub mod cpu;
mod on_gpu;

use anyhow::{ensure, Result};

use super::device::on_gpu;
use super::grad_fn;
use crate::autograd::GradFn;
use crate::tensor::Tensor;

/// Shapes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, seqs: &[(usize, usize)]) -> Result<Tensor> {
    ensure!(
        q.dims() == 3 && k.dims() == 3 && v.dims() == 3,
        "attention: q, k, v must be [tokens, heads, head_dim]"
    );
    ensure!(k.shape() == v.shape(), "attention: k {:?} vs v {:?}", k.shape(), v.shape());
    let n = q.dim(0);
    let dims = Dims { q_heads: q.dim(1), kv_heads: k.dim(1), head_dim: q.dim(2) };
    ensure!(k.dim(0) == n && k.dim(2) == dims.head_dim, "attention: q {:?} vs k {:?}", q.shape(), k.shape());
    ensure!(
        dims.kv_heads > 0 && dims.q_heads % dims.kv_heads == 0,
        "attention: {} query heads not a multiple of {} kv heads",
        dims.q_heads,
        dims.kv_heads
    );
    for &(s, l) in seqs {
        ensure!(s + l <= n, "attention: sequence {}..{} beyond {} tokens", s, s + l, n);
    }
    if let Some(dev) = on_gpu("attention", &[q, k, v])? {
        return on_gpu::attention(&dev, q, k, v, dims, seqs);
    }
    let (out, lse) = cpu::forward(q.f32s()?, k.f32s()?, v.f32s()?, dims, seqs);
    let back = AttentionBack {
        q: q.clone(),
        k: k.clone(),
        v: v.clone(),
        seqs: seqs.to_vec(),
        dims,
        out: out.clone(),
        lse,
    };
    Ok(Tensor::from_op(out, q.shape(), grad_fn(back)))
}

struct AttentionBack {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seqs: Vec<(usize, usize)>,
    dims: Dims,
    out: Vec<f32>,
    lse: Vec<f32>,
}

impl GradFn for AttentionBack {
    fn name(&self) -> &'static str {
        "attention"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.q.clone(), self.k.clone(), self.v.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let saved = cpu::Saved { out: &self.out, lse: &self.lse };
        let (dq, dk, dv) = cpu::backward(
            self.q.f32s()?,
            self.k.f32s()?,
            self.v.f32s()?,
            saved,
            g.f32s()?,
            self.dims,
            &self.seqs,
        );
        Ok(vec![
            Some(Tensor::from_vec(dq, self.q.shape())?),
            Some(Tensor::from_vec(dk, self.k.shape())?),
            Some(Tensor::from_vec(dv, self.v.shape())?),
        ])
    }
}
