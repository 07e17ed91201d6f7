//! Token embedding lookup; backward scatter-adds into the table.

pub mod cpu;

use anyhow::{ensure, Result};

use super::device::{alloc, backward_device, buf, cast, kernel_dtype, on_gpu, upload_ids, zeros};
use super::grad_fn;
use crate::autograd::GradFn;
use crate::backend::GpuBuffer;
use crate::kernels::embedding::{embedding_bwd, embedding_fwd};
use crate::tensor::{DType, Tensor};

/// Rows of `table` `[vocab, dim]` for `ids` → `[ids.len(), dim]`.
pub fn embedding(table: &Tensor, ids: &[u32]) -> Result<Tensor> {
    ensure!(table.dims() == 2, "embedding: table must be 2-D, got {:?}", table.shape());
    let (vocab, dim) = (table.dim(0), table.dim(1));
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        anyhow::bail!("token id {bad} is outside the vocabulary of {vocab}");
    }
    let back = |saved| grad_fn(EmbeddingBack { table: table.clone(), saved });
    let Some(dev) = on_gpu("embedding", &[table])? else {
        let y = cpu::forward(table.f32s()?, dim, ids);
        return Ok(Tensor::from_op(y, &[ids.len(), dim], back(Saved::Cpu { ids: ids.to_vec() })));
    };
    // On a device: rows gathered in the table's dtype; the ids stay uploaded for the backward.
    let dt = kernel_dtype(table);
    let t = cast(table, dt)?;
    let ids_buf = upload_ids(&dev, ids)?;
    let y = alloc(&dev, dt, ids.len() * dim)?;
    embedding_fwd(&dev, dt, &ids_buf, buf(&t), &y.buf, ids.len(), vocab, dim)?;
    Ok(Tensor::from_gpu_op(y, &[ids.len(), dim], back(Saved::Gpu { ids: ids_buf, tokens: ids.len(), dt })))
}

/// The ids, on the device the forward ran on.
enum Saved {
    Cpu { ids: Vec<u32> },
    Gpu { ids: GpuBuffer, tokens: usize, dt: DType },
}

struct EmbeddingBack {
    table: Tensor,
    saved: Saved,
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
        let d = match &self.saved {
            Saved::Cpu { ids } => {
                Tensor::from_vec(cpu::backward(g.f32s()?, dim, ids, vocab), self.table.shape())?
            }
            &Saved::Gpu { ref ids, tokens, dt } => {
                // Scatter-added with atomics into an f32 table gradient.
                let dev = backward_device("embedding", g, &self.table)?;
                let g = cast(g, dt)?;
                let d = zeros(&dev, DType::F32, vocab * dim)?;
                embedding_bwd(&dev, dt, ids, buf(&g), &d.buf, tokens, vocab, dim)?;
                Tensor::from_gpu(d, self.table.shape())?
            }
        };
        Ok(vec![Some(d)])
    }
}
