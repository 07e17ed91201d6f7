//! Incremental forward over a KV cache on a GPU device (the rollout engine's decoder there).
//!
//! The projections, norms, RoPE and MLP of every new token of every step run as one batch of
//! device ops (bf16, no graph). Keys and values go into each sequence's device cache (one copy
//! per step and layer). Attention: the new tokens of steps that start from an empty cache
//! (prefills) go through flash attention together, as packed sequences; a single new token after
//! a cache goes through the decode-attention kernel against its cache. A step of several tokens
//! after a cache runs one token at a time. The logits come back to the host for the sampler.

use anyhow::{ensure, Context, Result};

use super::decode::Step;
use super::Model;
use crate::autograd::no_grad;
use crate::backend::GpuDevice;
use crate::kernels::attention::{decode_attn_at, CacheLayout};
use crate::ops::device::{buf, cast, copy_bytes, zeros};
use crate::ops::{self};
use crate::tensor::{DType, Tensor};

const BF: DType = DType::BF16;

impl Model {
    /// [`Model::forward_cached`] / [`Model::forward_cached_all`] on a GPU device: logits
    /// `[steps, vocab]` of each step's last token (`last_only`) or of every new token.
    pub(crate) fn forward_cached_gpu(&self, steps: &mut [Step], last_only: bool) -> Result<Vec<f32>> {
        if steps.iter().any(|s| s.tokens.len() > 1 && !s.cache.is_empty()) {
            return self.forward_split_gpu(steps, last_only);
        }
        no_grad(|| self.forward_batch_gpu(steps, last_only))
    }

    /// Steps one at a time; one that continues a cache with several tokens, token by token.
    fn forward_split_gpu(&self, steps: &mut [Step], last_only: bool) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        for s in steps.iter_mut() {
            if s.tokens.len() > 1 && !s.cache.is_empty() {
                let mut last = Vec::new();
                for t in s.tokens.chunks(1) {
                    last = self.forward_cached_gpu(&mut [Step { cache: &mut *s.cache, tokens: t }], true)?;
                    if !last_only {
                        out.extend_from_slice(&last);
                    }
                }
                if last_only {
                    out.extend(last);
                }
            } else {
                out.extend(
                    self.forward_cached_gpu(
                        &mut [Step { cache: &mut *s.cache, tokens: s.tokens }],
                        last_only,
                    )?,
                );
            }
        }
        Ok(out)
    }

    fn forward_batch_gpu(&self, steps: &mut [Step], last_only: bool) -> Result<Vec<f32>> {
        let c = &self.config;
        let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let shape = self.kv_shape();
        let dev: GpuDevice =
            self.embed.gpu_storage().context("the model is not on a GPU device")?.device().clone();
        let (mut ids, mut positions, mut starts, mut past) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (i, s) in steps.iter_mut().enumerate() {
            ensure!(!s.tokens.is_empty(), "decode step {i} has no tokens");
            ensure!(
                s.cache.own.shape == shape,
                "decode step {i}: cache shape {:?} does not fit the model {:?}",
                s.cache.own.shape,
                shape
            );
            if let Some(&bad) = s.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
                anyhow::bail!("token id {bad} is outside the vocabulary of {}", c.vocab_size);
            }
            s.cache.gpu_prepare(s.tokens.len())?;
            starts.push(ids.len());
            let p0 = s.cache.len();
            past.push(p0);
            ids.extend_from_slice(s.tokens);
            positions.extend(p0 as u32..(p0 + s.tokens.len()) as u32);
        }
        let n = ids.len();
        let seqs: Vec<(usize, usize)> =
            steps.iter().zip(&starts).map(|(s, &r0)| (r0, s.tokens.len())).collect();
        // Keys visible to each decode token (its own included, written before attention runs).
        let lens = dev.upload_i32(&past.iter().map(|&p| p as i32 + 1).collect::<Vec<_>>())?;
        let prefill = steps.iter().any(|s| s.tokens.len() > 1);
        let eps = c.rms_norm_eps;
        let mut x = ops::embedding(&self.embed, &ids)?;
        for (li, l) in self.layers.iter().enumerate() {
            let h = ops::rms_norm(&x, &l.input_norm, eps)?;
            let mut q = l.q_proj.forward(&h)?.reshape(&[n, nh, hd])?;
            let mut k = l.k_proj.forward(&h)?.reshape(&[n, nkv, hd])?;
            let v = cast(&l.v_proj.forward(&h)?.reshape(&[n, nkv, hd])?, BF)?;
            if let (Some(qn), Some(kn)) = (&l.q_norm, &l.k_norm) {
                q = ops::rms_norm(&q, qn, eps)?;
                k = ops::rms_norm(&k, kn, eps)?;
            }
            let q = cast(&ops::rope(&q, &positions, &self.rope)?, BF)?;
            let k = cast(&ops::rope(&k, &positions, &self.rope)?, BF)?;
            let row = shape.row() * BF.size();
            for (s, &r0) in steps.iter_mut().zip(&starts) {
                let at = s.cache.own.gpu_offset(li, s.cache.own.len());
                let g = s.cache.own.gpu_buffers()?;
                copy_bytes(&g.k, at, buf(&k), r0 * row, s.tokens.len() * row)?;
                copy_bytes(&g.v, at, buf(&v), r0 * row, s.tokens.len() * row)?;
            }
            // Flash attention for the prefills (several tokens, empty cache: causal attention among
            // them); decode attention against the cache for every single new token (its rows of
            // the flash output, if any, are overwritten).
            let a = if prefill {
                cast(&ops::attention(&q, &k, &v, &seqs)?, BF)?
            } else {
                Tensor::from_gpu(zeros(&dev, BF, n * nh * hd)?, &[n, nh, hd])?
            };
            for (e, s) in steps.iter_mut().enumerate() {
                if s.tokens.len() > 1 {
                    continue;
                }
                let own = &mut s.cache.own;
                let cap = own.capacity();
                let at = own.gpu_offset(li, 0);
                let g = own.gpu_buffers()?;
                let qrow = (starts[e] * nh * hd * BF.size()) as u64;
                // SAFETY: q and a hold n × nh × hd bf16 (this step's row is inside), the cache
                // holds `cap` positions of this layer from `at`, lens has one i32 per step.
                // `a` is a fresh tensor nothing else reads yet.
                unsafe {
                    decode_attn_at(
                        &dev,
                        buf(&q).ptr() + qrow,
                        g.k.ptr() + at as u64,
                        g.v.ptr() + at as u64,
                        lens.ptr() + 4 * e as u64,
                        buf(&a).ptr() + qrow,
                        1,
                        nh,
                        nkv,
                        hd,
                        cap,
                        CacheLayout::token_major(cap, nkv, hd),
                    )?;
                }
            }
            let o = l.o_proj.forward(&a.reshape(&[n, nh * hd])?)?;
            x = ops::add(&x, &o)?;
            let h = ops::rms_norm(&x, &l.post_norm, eps)?;
            let m = ops::swiglu(&l.gate_proj.forward(&h)?, &l.up_proj.forward(&h)?)?;
            x = ops::add(&x, &l.down_proj.forward(&m)?)?;
        }
        for s in steps.iter_mut() {
            s.cache.own.commit(s.tokens.len());
        }
        if last_only {
            // Gather each step's last row (an embedding lookup into the hidden states).
            let last: Vec<u32> =
                steps.iter().zip(&starts).map(|(s, &r0)| (r0 + s.tokens.len() - 1) as u32).collect();
            x = ops::embedding(&x, &last)?;
        }
        let h = ops::rms_norm(&x, &self.norm, eps)?;
        let logits = ops::linear(&h, self.lm_head_weight(), None)?;
        Ok(logits.host_f32()?.into_owned())
    }
}
