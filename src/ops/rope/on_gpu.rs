//! RoPE on GPU tensors: per-token cos/sin computed on the host exactly as the CPU op does
//! (`RopeTable::cos_sin`), uploaded, reused by the following calls at the same positions, and
//! kept for the backward.

use std::cell::RefCell;
use std::sync::Arc;

use anyhow::Result;

use super::RopeTable;
use crate::autograd::GradFn;
use crate::backend::{GpuBuffer, GpuDevice};
use crate::kernels::rope::rope as rope_kernel;
use crate::ops::device::{alloc, backward_device, buf, cast, kernel_dtype};
use crate::ops::grad_fn;
use crate::tensor::{DType, Tensor};

/// `[tokens, head_dim/2]` cos and sin tables (f32) on a device.
pub(crate) type Tables = Arc<(GpuBuffer, GpuBuffer)>;

/// The tables of the last call on this thread: a forward rotates q and k of every layer at the
/// same positions, so all but the first call of a forward reuse them (no host trig, no upload).
struct Last {
    dev: GpuDevice,
    positions: Vec<u32>,
    inv_freq: Vec<f32>,
    scaling: f32,
    tables: Tables,
}

thread_local! {
    static LAST: RefCell<Option<Last>> = const { RefCell::new(None) };
}

/// cos/sin of every position, computed on the host exactly as the CPU op does.
pub(crate) fn tables(dev: &GpuDevice, positions: &[u32], table: &RopeTable) -> Result<Tables> {
    let hit = LAST.with(|l| {
        l.borrow()
            .as_ref()
            .filter(|c| {
                c.dev.same(dev)
                    && c.positions == positions
                    && c.inv_freq == table.inv_freq
                    && c.scaling == table.attention_scaling
            })
            .map(|c| c.tables.clone())
    });
    if let Some(t) = hit {
        return Ok(t);
    }
    let half = table.inv_freq.len();
    let (mut cos, mut sin) =
        (Vec::with_capacity(positions.len() * half), Vec::with_capacity(positions.len() * half));
    for &p in positions {
        let (c, s) = table.cos_sin(p);
        cos.extend(c);
        sin.extend(s);
    }
    let tables: Tables = Arc::new((dev.upload_f32(&cos)?, dev.upload_f32(&sin)?));
    let last = Last {
        dev: dev.clone(),
        positions: positions.to_vec(),
        inv_freq: table.inv_freq.clone(),
        scaling: table.attention_scaling,
        tables: tables.clone(),
    };
    LAST.with(|l| *l.borrow_mut() = Some(last));
    Ok(tables)
}

pub(super) fn rope(dev: &GpuDevice, x: &Tensor, positions: &[u32], table: &RopeTable) -> Result<Tensor> {
    let dt = kernel_dtype(x);
    let xc = cast(x, dt)?;
    let t = tables(dev, positions, table)?;
    let y = alloc(dev, dt, x.numel())?;
    rope_kernel(dev, dt, buf(&xc), &t.0, &t.1, &y.buf, x.dim(0), x.dim(1), x.dim(2), false)?;
    Ok(Tensor::from_gpu_op(y, x.shape(), grad_fn(RopeBack { x: x.clone(), tables: t, dt })))
}

struct RopeBack {
    x: Tensor,
    tables: Tables,
    dt: DType,
}

impl GradFn for RopeBack {
    fn name(&self) -> &'static str {
        "rope"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.x.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let dev = backward_device("rope", g, &self.x)?;
        let g = cast(g, self.dt)?;
        let d = alloc(&dev, self.dt, self.x.numel())?;
        // The transpose of a rotation is the rotation by the opposite angle.
        rope_kernel(
            &dev,
            self.dt,
            buf(&g),
            &self.tables.0,
            &self.tables.1,
            &d.buf,
            self.x.dim(0),
            self.x.dim(1),
            self.x.dim(2),
            true,
        )?;
        Ok(vec![Some(Tensor::from_gpu(d, self.x.shape())?)])
    }
}
