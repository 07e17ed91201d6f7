//! The transformer block, written once for every way the model runs: packed training and
//! scoring forwards, and incremental decoding over a KV cache on the cpu or a GPU device. What
//! differs between them is only how attention finds its keys, an [`Attention`] strategy; the
//! architecture specifics (Qwen2 biases, Qwen3 q/k norms, Llama 3 RoPE scaling) live here and in
//! the config.

use anyhow::Result;

use super::Model;
use crate::ops;
use crate::tensor::Tensor;

/// How a layer's attention sees its keys: `attend` gets the rotated q `[n, q_heads, head_dim]`,
/// k and v `[n, kv_heads, head_dim]` of the new tokens of layer `layer`, and returns
/// `[n, q_heads, head_dim]`.
pub(crate) trait Attention {
    fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor>;
}

/// Packed sequences, causal within each (start, len), after the keys of their prefix sequence if
/// they name one: training and scoring.
pub(crate) struct Packed<'a> {
    pub seqs: &'a [(usize, usize)],
    pub prefix: &'a [Option<usize>],
}

impl Attention for Packed<'_> {
    fn attend(&mut self, _layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        ops::attention::attention_shared(q, k, v, self.seqs, self.prefix)
    }
}

impl Model {
    /// Hidden states `[ids.len(), hidden]` after the embedding and every layer (before the
    /// final norm), token i at `positions[i]`.
    pub(crate) fn layers_forward(
        &self,
        ids: &[u32],
        positions: &[u32],
        attn: &mut dyn Attention,
    ) -> Result<Tensor> {
        let mut x = ops::embedding(&self.embed, ids)?;
        for li in 0..self.layers.len() {
            x = self.block(li, &x, positions, attn)?;
        }
        Ok(x)
    }

    /// Layer `li` on hidden states `x` `[n, hidden]`.
    pub(super) fn block(
        &self,
        li: usize,
        x: &Tensor,
        positions: &[u32],
        attn: &mut dyn Attention,
    ) -> Result<Tensor> {
        let (c, l) = (&self.config, &self.layers[li]);
        let (n, eps) = (x.dim(0), c.rms_norm_eps);
        let h = ops::rms_norm(x, &l.input_norm, eps)?;
        let mut q = l.q_proj.forward(&h)?.reshape(&[n, c.num_heads, c.head_dim])?;
        let mut k = l.k_proj.forward(&h)?.reshape(&[n, c.num_kv_heads, c.head_dim])?;
        let v = l.v_proj.forward(&h)?.reshape(&[n, c.num_kv_heads, c.head_dim])?;
        // Qwen3: RMSNorm over each head of q and k before RoPE.
        if let (Some(qn), Some(kn)) = (&l.q_norm, &l.k_norm) {
            q = ops::rms_norm(&q, qn, eps)?;
            k = ops::rms_norm(&k, kn, eps)?;
        }
        let q = ops::rope(&q, positions, &self.rope)?;
        let k = ops::rope(&k, positions, &self.rope)?;
        let a = attn.attend(li, &q, &k, &v)?.reshape(&[n, c.num_heads * c.head_dim])?;
        let x = ops::add(x, &l.o_proj.forward(&a)?)?;
        let h = ops::rms_norm(&x, &l.post_norm, eps)?;
        let m = ops::swiglu(&l.gate_proj.forward(&h)?, &l.up_proj.forward(&h)?)?;
        ops::add(&x, &l.down_proj.forward(&m)?)
    }
}
