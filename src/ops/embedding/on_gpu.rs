//! Embedding on GPU tensors: gather rows in the table's dtype; backward scatter-adds into an f32
//! table gradient (atomics).

use anyhow::Result;

use crate::autograd::GradFn;
use crate::backend::{GpuBuffer, GpuDevice};
use crate::kernels::embedding::{embedding_bwd, embedding_fwd};
use crate::ops::device::{alloc, backward_device, buf, cast, kernel_dtype, upload_ids, zeros};
use crate::ops::grad_fn;
use crate::tensor::{DType, Tensor};

/// Rows of `table` for `ids` (checked against the vocabulary by the caller).
pub(super) fn embedding(dev: &GpuDevice, table: &Tensor, ids: &[u32]) -> Result<Tensor> {
    let dt = kernel_dtype(table);
    let (vocab, dim) = (table.dim(0), table.dim(1));
    let t = cast(table, dt)?;
    let ids_buf = upload_ids(dev, ids)?;
    let y = alloc(dev, dt, ids.len() * dim)?;
    embedding_fwd(dev, dt, &ids_buf, buf(&t), &y.buf, ids.len(), vocab, dim)?;
    Ok(Tensor::from_gpu_op(
        y,
        &[ids.len(), dim],
        grad_fn(EmbeddingBack { table: table.clone(), ids: ids_buf, tokens: ids.len(), dt }),
    ))
}

struct EmbeddingBack {
    table: Tensor,
    ids: GpuBuffer,
    tokens: usize,
    dt: DType,
}

impl GradFn for EmbeddingBack {
    fn name(&self) -> &'static str {
        "embedding"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.table.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let dev = backward_device("embedding", g, &self.table)?;
        let (vocab, dim) = (self.table.dim(0), self.table.dim(1));
        let g = cast(g, self.dt)?;
        let d = zeros(&dev, DType::F32, vocab * dim)?;
        embedding_bwd(&dev, self.dt, &self.ids, buf(&g), &d.buf, self.tokens, vocab, dim)?;
        Ok(vec![Some(Tensor::from_gpu(d, self.table.shape())?)])
    }
}
