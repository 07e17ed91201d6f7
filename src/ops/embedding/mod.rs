//! Token embedding lookup; backward scatter-adds into the table.

pub mod cpu;
mod on_gpu;

use anyhow::{ensure, Result};

use super::device::on_gpu;
use super::grad_fn;
use crate::autograd::GradFn;
use crate::tensor::Tensor;

/// Rows of `table` `[vocab, dim]` for `ids` → `[ids.len(), dim]`.
pub fn embedding(table: &Tensor, ids: &[u32]) -> Result<Tensor> {
    ensure!(table.dims() == 2, "embedding: table must be 2-D, got {:?}", table.shape());
    let (vocab, dim) = (table.dim(0), table.dim(1));
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        anyhow::bail!("token id {bad} is outside the vocabulary of {vocab}");
    }
    if let Some(dev) = on_gpu("embedding", &[table])? {
        return on_gpu::embedding(&dev, table, ids);
    }
    let y = cpu::forward(table.f32s()?, dim, ids);
    Ok(Tensor::from_op(
        y,
        &[ids.len(), dim],
        grad_fn(EmbeddingBack { table: table.clone(), ids: ids.to_vec() }),
    ))
}

struct EmbeddingBack {
    table: Tensor,
    ids: Vec<u32>,
}

impl GradFn for EmbeddingBack {
    fn name(&self) -> &'static str {
        "embedding"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.table.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (vocab, dim) = (self.table.dim(0), self.table.dim(1));
        let d = cpu::backward(g.f32s()?, dim, &self.ids, vocab);
        Ok(vec![Some(Tensor::from_vec(d, self.table.shape())?)])
    }
}
