//! Rotary position embedding, Hugging Face "rotate half" layout: the first and second halves of
//! each head are the two coordinates of each rotated pair.

pub mod cpu;

use anyhow::{ensure, Result};

use std::cell::RefCell;
use std::sync::Arc;

use super::device::{alloc, backward_device, buf, cast, kernel_dtype, on_gpu};
use super::grad_fn;
use crate::autograd::GradFn;
use crate::backend::{GpuBuffer, GpuDevice};
use crate::kernels::rope::rope as rope_kernel;
use crate::tensor::{DType, Tensor};

/// Inverse frequencies of one head (`head_dim / 2` of them), with any scaling applied.
#[derive(Clone, Debug)]
pub struct RopeTable {
    pub inv_freq: Vec<f32>,
    /// Multiplies cos and sin (1 except for scalings that change attention temperature).
    pub attention_scaling: f32,
}

/// Llama 3 frequency scaling (`rope_type: "llama3"`).
#[derive(Clone, Debug, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: f32,
}

impl RopeTable {
    /// Frequencies computed in f32 the way transformers computes them, so positions match it
    /// bit for bit rather than only approximately.
    pub fn new(head_dim: usize, theta: f64, llama3: Option<&Llama3Scaling>) -> RopeTable {
        let half = head_dim / 2;
        let mut inv_freq: Vec<f32> = (0..half)
            .map(|i| {
                let expo = (2 * i) as f32 / head_dim as f32;
                1.0 / (theta as f32).powf(expo)
            })
            .collect();
        if let Some(s) = llama3 {
            let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
            let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
            for f in inv_freq.iter_mut() {
                let wavelen = 2.0 * std::f32::consts::PI / *f;
                let scaled = if wavelen > low_wavelen { *f / s.factor } else { *f };
                let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                    / (s.high_freq_factor - s.low_freq_factor);
                let medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
                *f = if medium { (1.0 - smooth) * scaled / s.factor + smooth * scaled } else { scaled };
            }
        }
        RopeTable { inv_freq, attention_scaling: 1.0 }
    }

    /// (cos, sin) of every pair at `pos`.
    pub fn cos_sin(&self, pos: u32) -> (Vec<f32>, Vec<f32>) {
        let p = pos as f32;
        self.inv_freq
            .iter()
            .map(|&f| {
                let a = p * f;
                (a.cos() * self.attention_scaling, a.sin() * self.attention_scaling)
            })
            .unzip()
    }
}

/// Rotates `x` `[tokens, heads, head_dim]` by each token's position.
pub fn rope(x: &Tensor, positions: &[u32], table: &RopeTable) -> Result<Tensor> {
    ensure!(
        x.dims() == 3 && x.dim(0) == positions.len(),
        "rope: input {:?} for {} positions",
        x.shape(),
        positions.len()
    );
    ensure!(
        x.dim(2) == 2 * table.inv_freq.len(),
        "rope: head_dim {} but table for {}",
        x.dim(2),
        2 * table.inv_freq.len()
    );
    let back = |saved| grad_fn(RopeBack { x: x.clone(), saved });
    let Some(dev) = on_gpu("rope", &[x])? else {
        let y = cpu::apply(x.f32s()?, x.dim(1), x.dim(2), positions, table, false);
        return Ok(Tensor::from_op(
            y,
            x.shape(),
            back(Saved::Cpu { positions: positions.to_vec(), table: table.clone() }),
        ));
    };
    let dt = kernel_dtype(x);
    let xc = cast(x, dt)?;
    let t = device_tables(&dev, positions, table)?;
    let y = alloc(&dev, dt, x.numel())?;
    rope_kernel(&dev, dt, buf(&xc), &t.0, &t.1, &y.buf, x.dim(0), x.dim(1), x.dim(2), false)?;
    Ok(Tensor::from_gpu_op(y, x.shape(), back(Saved::Gpu { tables: t, dt })))
}

/// The rotation, as the device the forward ran on holds it.
enum Saved {
    Cpu { positions: Vec<u32>, table: RopeTable },
    Gpu { tables: Tables, dt: DType },
}

struct RopeBack {
    x: Tensor,
    saved: Saved,
}

impl GradFn for RopeBack {
    fn name(&self) -> &'static str {
        "rope"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.x.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        // A rotation's transpose is the rotation by the opposite angle.
        let (tokens, heads, hd) = (self.x.dim(0), self.x.dim(1), self.x.dim(2));
        let d = match &self.saved {
            Saved::Cpu { positions, table } => {
                Tensor::from_vec(cpu::apply(g.f32s()?, heads, hd, positions, table, true), self.x.shape())?
            }
            &Saved::Gpu { ref tables, dt } => {
                let dev = backward_device("rope", g, &self.x)?;
                let g = cast(g, dt)?;
                let d = alloc(&dev, dt, self.x.numel())?;
                rope_kernel(&dev, dt, buf(&g), &tables.0, &tables.1, &d.buf, tokens, heads, hd, true)?;
                Tensor::from_gpu(d, self.x.shape())?
            }
        };
        Ok(vec![Some(d)])
    }
}

// On a device the per-token cos/sin are computed on the host exactly as the CPU op does
// (`RopeTable::cos_sin`), uploaded, reused by the following calls at the same positions, and
// kept for the backward.

/// `[tokens, head_dim/2]` cos and sin tables (f32) on a device.
type Tables = Arc<(GpuBuffer, GpuBuffer)>;

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

/// Drops this thread's cached tables (the memory plan starts each measurement from none, so
/// that its figure does not depend on what ran before it).
pub fn clear_device_tables() {
    LAST.with(|l| *l.borrow_mut() = None);
}

/// cos/sin of every position, computed on the host exactly as the CPU op does.
fn device_tables(dev: &GpuDevice, positions: &[u32], table: &RopeTable) -> Result<Tables> {
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
