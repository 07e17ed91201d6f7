//! Key/value cache for incremental decoding: f32 on the CPU, bf16 on a GPU device.
//!
//! A [`KvBlock`] holds the keys and values of a run of consecutive positions for every layer.
//! On the CPU they are laid out `[layer][kv_head][capacity][head_dim]` so that one head's keys
//! are a contiguous `len × head_dim` matrix (one strided gemm per head in decode attention). On a
//! GPU ([`GpuKv`]) they are `[layer][capacity][kv_head][head_dim]`: one step's new keys of a layer
//! are one contiguous copy, and the decode-attention kernel reads them token-major. Blocks grow by
//! multiples of [`GROW`] positions, at least doubling (or to an exact size reserved up front),
//! never one realloc per token.
//!
//! A [`SeqCache`] is one sequence's cache: an optional shared, frozen prefix (the prompt, whose
//! prefill the G samples of that prompt share through an `Arc`) followed by its own block. On a
//! GPU the decoder copies the prefix into the sample's own block at its first step (the decode
//! kernel reads one contiguous cache per sequence), so the prefix is shared for the prefill only.

use std::sync::Arc;

use anyhow::{ensure, Result};

use crate::backend::GpuBuffer;
use crate::ops::device::copy_bytes;
use crate::tensor::{DType, Device};

/// Positions added at a time when a block outgrows its capacity.
pub const GROW: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvShape {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Where the keys and values live (the model's device).
    pub device: Device,
    /// Element dtype of the device buffers (the model's activation dtype there: bf16, or f32
    /// with `--dtype f32`); cpu caches are f32 whatever this says.
    pub dtype: DType,
}

impl KvShape {
    /// Elements of one position of one layer (every kv head).
    pub fn row(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// Keys and values of a block on a GPU device: bf16 `[layer][capacity][kv_head][head_dim]`.
#[derive(Debug)]
pub struct GpuKv {
    pub k: GpuBuffer,
    pub v: GpuBuffer,
}

#[derive(Debug)]
pub struct KvBlock {
    pub shape: KvShape,
    cap: usize,
    len: usize,
    k: Vec<f32>,
    v: Vec<f32>,
    /// The device buffers (GPU blocks; allocated by the decoder at the first write).
    gpu: Option<GpuKv>,
}

impl KvBlock {
    pub fn new(shape: KvShape, capacity: usize) -> KvBlock {
        let n =
            if shape.device.is_cpu() { shape.layers * shape.kv_heads * capacity * shape.head_dim } else { 0 };
        KvBlock { shape, cap: capacity, len: 0, k: vec![0.0; n], v: vec![0.0; n], gpu: None }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Makes room for `extra` more positions (exactly, when reserving before a known run).
    pub fn reserve(&mut self, extra: usize) {
        let need = self.len + extra;
        if need <= self.cap {
            return;
        }
        self.regrow(need);
    }

    /// Room for `extra` more positions: grows to a multiple of `GROW` positions, at least
    /// doubling, so a sequence of n tokens copies O(n) positions in all.
    fn ensure(&mut self, extra: usize) {
        let need = self.len + extra;
        if need > self.cap {
            self.regrow((need.div_ceil(GROW) * GROW).max(2 * self.cap));
        }
    }

    fn regrow(&mut self, cap: usize) {
        let s = self.shape;
        let hd = s.head_dim;
        let n = s.layers * s.kv_heads * cap * hd;
        let (mut k, mut v) = (vec![0.0; n], vec![0.0; n]);
        for lh in 0..s.layers * s.kv_heads {
            let (src, dst) = (lh * self.cap * hd, lh * cap * hd);
            k[dst..dst + self.len * hd].copy_from_slice(&self.k[src..src + self.len * hd]);
            v[dst..dst + self.len * hd].copy_from_slice(&self.v[src..src + self.len * hd]);
        }
        self.k = k;
        self.v = v;
        self.cap = cap;
    }

    /// Offset of (layer, kv head, position 0) in `k`/`v`.
    fn base(&self, layer: usize, kvh: usize) -> usize {
        (layer * self.shape.kv_heads + kvh) * self.cap * self.shape.head_dim
    }

    /// Keys of one layer and head: `len × head_dim`, row-major (rows beyond `len` are unused).
    pub fn keys(&self, layer: usize, kvh: usize) -> &[f32] {
        let b = self.base(layer, kvh);
        &self.k[b..b + self.cap * self.shape.head_dim]
    }

    pub fn values(&self, layer: usize, kvh: usize) -> &[f32] {
        let b = self.base(layer, kvh);
        &self.v[b..b + self.cap * self.shape.head_dim]
    }

    /// Writes `n` new positions of one layer after the current length (`k`, `v`: rows of
    /// `kv_heads × head_dim`, `row_stride` apart). The length moves with [`KvBlock::commit`].
    pub fn write(&mut self, layer: usize, n: usize, k: &[f32], v: &[f32], row_stride: usize) {
        self.ensure(n);
        let (hd, kvh_n) = (self.shape.head_dim, self.shape.kv_heads);
        for h in 0..kvh_n {
            let b = self.base(layer, h) + self.len * hd;
            for t in 0..n {
                let src = t * row_stride + h * hd;
                self.k[b + t * hd..b + (t + 1) * hd].copy_from_slice(&k[src..src + hd]);
                self.v[b + t * hd..b + (t + 1) * hd].copy_from_slice(&v[src..src + hd]);
            }
        }
    }

    /// Counts `n` written positions as part of the block (after every layer wrote them).
    pub fn commit(&mut self, n: usize) {
        assert!(self.len + n <= self.cap, "commit past the written positions");
        self.len += n;
    }

    /// Bytes held (both tensors, whole capacity).
    pub fn bytes(&self) -> usize {
        match &self.gpu {
            Some(g) => g.k.bytes() + g.v.bytes(),
            None => (self.k.len() + self.v.len()) * 4,
        }
    }

    // ------------------------------------------------------------ GPU blocks (the decoder's use)

    /// Bytes of one position of one layer, and of one layer at full capacity.
    fn gpu_row_bytes(&self) -> usize {
        self.shape.row() * self.shape.dtype.size()
    }

    /// Byte offset of position `pos` of `layer` in the device buffers.
    pub fn gpu_offset(&self, layer: usize, pos: usize) -> usize {
        (layer * self.cap + pos) * self.gpu_row_bytes()
    }

    /// The device buffers, allocated to the block's capacity on first use.
    pub fn gpu_buffers(&mut self) -> Result<&GpuKv> {
        ensure!(self.shape.device.is_gpu(), "a cpu KV block has no device buffers");
        if self.gpu.is_none() {
            let dev = self.shape.device.gpu()?;
            let bytes = self.shape.layers * self.cap * self.gpu_row_bytes();
            let (k, v) = crate::backend::memory::scope(crate::backend::memory::Category::KvCache, || {
                Ok::<_, anyhow::Error>((dev.zeros(bytes)?, dev.zeros(bytes)?))
            })?;
            self.gpu = Some(GpuKv { k, v });
        }
        Ok(self.gpu.as_ref().unwrap())
    }

    /// Room for `extra` more positions on the device (the growth rule of [`KvBlock::ensure`]).
    pub fn gpu_ensure(&mut self, extra: usize) -> Result<()> {
        let need = self.len + extra;
        if need <= self.cap {
            return self.gpu_buffers().map(|_| ());
        }
        let old = self.gpu.take();
        let old_cap = self.cap;
        self.cap = (need.div_ceil(GROW) * GROW).max(2 * self.cap);
        self.gpu_buffers()?;
        if let Some(o) = old {
            self.gpu_copy_from(&o, old_cap, self.len, 0)?;
        }
        Ok(())
    }

    /// Copies positions `0..n` of every layer of `src` (buffers of a block of capacity `src_cap`)
    /// to positions `at..at + n` here (room must exist).
    fn gpu_copy_from(&self, src: &GpuKv, src_cap: usize, n: usize, at: usize) -> Result<()> {
        let g = self.gpu.as_ref().expect("device buffers");
        let rb = self.gpu_row_bytes();
        for l in 0..self.shape.layers {
            copy_bytes(&g.k, self.gpu_offset(l, at), &src.k, l * src_cap * rb, n * rb)?;
            copy_bytes(&g.v, self.gpu_offset(l, at), &src.v, l * src_cap * rb, n * rb)?;
        }
        Ok(())
    }
}

/// One sequence's cache: a shared frozen prefix (the prompt) and its own positions after it.
#[derive(Debug)]
pub struct SeqCache {
    pub prefix: Option<Arc<KvBlock>>,
    pub own: KvBlock,
}

impl SeqCache {
    /// An empty cache with room for `capacity` positions.
    pub fn new(shape: KvShape, capacity: usize) -> SeqCache {
        SeqCache { prefix: None, own: KvBlock::new(shape, capacity) }
    }

    /// A cache that continues after `prefix`, with room for `capacity` own positions.
    pub fn after(prefix: Arc<KvBlock>, capacity: usize) -> SeqCache {
        let shape = prefix.shape;
        SeqCache { prefix: Some(prefix), own: KvBlock::new(shape, capacity) }
    }

    pub fn prefix_len(&self) -> usize {
        self.prefix.as_ref().map_or(0, |p| p.len())
    }

    /// Positions cached so far (the position of the next token).
    pub fn len(&self) -> usize {
        self.prefix_len() + self.own.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// GPU: makes the own block hold the whole sequence (a shared prefix is copied in, on the
    /// device) with room for `extra` more positions.
    pub fn gpu_prepare(&mut self, extra: usize) -> Result<()> {
        if let Some(p) = self.prefix.take() {
            ensure!(self.own.is_empty(), "a GPU cache copies its prefix before its first own position");
            let mut b = KvBlock::new(p.shape, p.len() + self.own.capacity().max(extra));
            b.gpu_buffers()?;
            if let Some(src) = &p.gpu {
                b.gpu_copy_from(src, p.cap, p.len(), 0)?;
            }
            b.len = p.len();
            self.own = b;
        }
        self.own.gpu_ensure(extra)
    }

    /// Freezes this cache into a shareable prefix (its own block; a cache with a prefix of its
    /// own is first flattened into one block).
    pub fn into_prefix(self) -> Arc<KvBlock> {
        if self.own.shape.device.is_gpu() {
            // The GPU decoder flattens a prefix into the own block at the first step, so a GPU
            // cache has either a prefix and nothing of its own yet, or no prefix.
            return match self.prefix {
                Some(p) if self.own.is_empty() => p,
                _ => Arc::new(self.own),
            };
        }
        match self.prefix {
            None => Arc::new(self.own),
            Some(p) => {
                let s = p.shape;
                let mut b = KvBlock::new(s, p.len() + self.own.len());
                let hd = s.head_dim;
                for l in 0..s.layers {
                    for h in 0..s.kv_heads {
                        let base = b.base(l, h);
                        let (n0, n1) = (p.len() * hd, self.own.len() * hd);
                        b.k[base..base + n0].copy_from_slice(&p.keys(l, h)[..n0]);
                        b.v[base..base + n0].copy_from_slice(&p.values(l, h)[..n0]);
                        b.k[base + n0..base + n0 + n1].copy_from_slice(&self.own.keys(l, h)[..n1]);
                        b.v[base + n0..base + n0 + n1].copy_from_slice(&self.own.values(l, h)[..n1]);
                    }
                }
                b.len = p.len() + self.own.len();
                Arc::new(b)
            }
        }
    }
}
