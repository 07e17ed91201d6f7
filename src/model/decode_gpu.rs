//! Attention over KV caches on a GPU device (the rollout engine's decoder there), the strategy
//! the one transformer block (`block.rs`) calls for every layer.
//!
//! Keys and values go into each sequence's device cache (in the model's activation dtype, bf16
//! or f32; one copy per step and layer).
//! The new tokens of steps that start from an empty cache (prefills) go through flash attention
//! together, as packed sequences; a single new token after a cache goes through the
//! decode-attention kernel against its cache. A step of several tokens after a cache runs one
//! token at a time ([`Model::forward_split_gpu`]).

use anyhow::{Context, Result};

use super::block::Attention;
use super::decode::Step;
use super::Model;
use crate::backend::{GpuBuffer, GpuDevice};
use crate::kernels::attention::{decode_attn_row, CacheRows};
use crate::ops::device::{buf, cast, copy_bytes, zeros};
use crate::ops::{self};
use crate::tensor::{DType, Tensor};

/// Attention against the device caches of `steps` (room made by `SeqCache::gpu_prepare`).
pub(crate) struct GpuCache<'s, 'a> {
    dev: GpuDevice,
    steps: &'s mut [Step<'a>],
    starts: &'s [usize],
    /// Each step's new tokens as a packed sequence (flash attention for the prefills).
    seqs: Vec<(usize, usize)>,
    /// Keys visible to each decode token (its own included, written before attention runs).
    lens: GpuBuffer,
    /// Element dtype of the caches, and of q/k/v and the output here.
    dt: DType,
    prefill: bool,
}

impl<'s, 'a> GpuCache<'s, 'a> {
    pub(crate) fn new(
        model: &Model,
        steps: &'s mut [Step<'a>],
        starts: &'s [usize],
    ) -> Result<GpuCache<'s, 'a>> {
        let dev = model.embed.gpu_storage().context("the model is not on a GPU device")?.device().clone();
        let seqs = steps.iter().zip(starts).map(|(s, &r0)| (r0, s.tokens.len())).collect();
        let lens: Vec<i32> = steps.iter().map(|s| s.cache.len() as i32 + 1).collect();
        let lens = dev.upload_i32(&lens)?;
        let prefill = steps.iter().any(|s| s.tokens.len() > 1);
        Ok(GpuCache { dev, steps, starts, seqs, lens, dt: model.kv_shape().dtype, prefill })
    }
}

impl Attention for GpuCache<'_, '_> {
    fn attend(&mut self, li: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (n, nh, nkv, hd) = (q.dim(0), q.dim(1), k.dim(1), q.dim(2));
        let dt = self.dt;
        let (q, k, v) = (cast(q, dt)?, cast(k, dt)?, cast(v, dt)?);
        let row = nkv * hd * dt.size();
        for (s, &r0) in self.steps.iter_mut().zip(self.starts) {
            let at = s.cache.own.gpu_offset(li, s.cache.own.len());
            let g = s.cache.own.gpu_buffers()?;
            copy_bytes(&g.k, at, buf(&k), r0 * row, s.tokens.len() * row)?;
            copy_bytes(&g.v, at, buf(&v), r0 * row, s.tokens.len() * row)?;
        }
        // Flash attention for the prefills (several tokens, empty cache: causal attention among
        // them); decode attention against the cache for every single new token (its rows of the
        // flash output, if any, are overwritten).
        let a = if self.prefill {
            cast(&ops::attention(&q, &k, &v, &self.seqs)?, dt)?
        } else {
            Tensor::from_gpu(zeros(&self.dev, dt, n * nh * hd)?, &[n, nh, hd])?
        };
        for (e, s) in self.steps.iter_mut().enumerate() {
            if s.tokens.len() > 1 {
                continue;
            }
            let own = &mut s.cache.own;
            let (max_len, at) = (own.capacity(), own.gpu_offset(li, 0));
            let g = own.gpu_buffers()?;
            let cache = CacheRows { k: &g.k, v: &g.v, at, max_len, lens: &self.lens, entry: e, dtype: dt };
            decode_attn_row(&self.dev, buf(&q), buf(&a), self.starts[e], &cache, (nh, nkv, hd))?;
        }
        Ok(a)
    }
}

impl Model {
    /// Steps one at a time; one that continues a cache with several tokens, token by token.
    pub(crate) fn forward_split_gpu(&self, steps: &mut [Step], last_only: bool) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        for s in steps.iter_mut() {
            if s.tokens.len() > 1 && !s.cache.is_empty() {
                let mut last = Vec::new();
                for t in s.tokens.chunks(1) {
                    last = self.cached_logits(&mut [Step { cache: &mut *s.cache, tokens: t }], true)?;
                    if !last_only {
                        out.extend_from_slice(&last);
                    }
                }
                if last_only {
                    out.extend(last);
                }
            } else {
                out.extend(
                    self.cached_logits(&mut [Step { cache: &mut *s.cache, tokens: s.tokens }], last_only)?,
                );
            }
        }
        Ok(out)
    }
}
