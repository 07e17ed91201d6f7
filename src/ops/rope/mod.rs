//! Rotary position embedding, Hugging Face "rotate half" layout: the first and second halves of
//! each head are the two coordinates of each rotated pair.

pub mod cpu;
pub(crate) mod on_gpu;

use anyhow::{ensure, Result};

use super::device::on_gpu;
use super::grad_fn;
use crate::autograd::GradFn;
use crate::tensor::Tensor;

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
    if let Some(dev) = on_gpu("rope", &[x])? {
        return on_gpu::rope(&dev, x, positions, table);
    }
    let y = cpu::apply(x.f32s()?, x.dim(1), x.dim(2), positions, table, false);
    Ok(Tensor::from_op(
        y,
        x.shape(),
        grad_fn(RopeBack { x: x.clone(), positions: positions.to_vec(), table: table.clone() }),
    ))
}

struct RopeBack {
    x: Tensor,
    positions: Vec<u32>,
    table: RopeTable,
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
        let d = cpu::apply(g.f32s()?, self.x.dim(1), self.x.dim(2), &self.positions, &self.table, true);
        Ok(vec![Some(Tensor::from_vec(d, self.x.shape())?)])
    }
}
