//! Key/value cache for incremental decoding, f32 on the CPU.
//!
//! A [`KvBlock`] holds the keys and values of a run of consecutive positions for every layer,
//! laid out `[layer][kv_head][capacity][head_dim]` so that one head's keys are a contiguous
//! `len × head_dim` matrix (one strided gemm per head in decode attention). Blocks grow by
//! multiples of [`GROW`] positions, at least doubling (or to an exact size reserved up front),
//! never one realloc per token.
//!
//! A [`SeqCache`] is one sequence's cache: an optional shared, frozen prefix (the prompt, whose
//! prefill the G samples of that prompt share through an `Arc`) followed by its own block.

use std::sync::Arc;

/// Positions added at a time when a block outgrows its capacity.
pub const GROW: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvShape {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

#[derive(Clone, Debug)]
pub struct KvBlock {
    pub shape: KvShape,
    cap: usize,
    len: usize,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl KvBlock {
    pub fn new(shape: KvShape, capacity: usize) -> KvBlock {
        let n = shape.layers * shape.kv_heads * capacity * shape.head_dim;
        KvBlock { shape, cap: capacity, len: 0, k: vec![0.0; n], v: vec![0.0; n] }
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
        (self.k.len() + self.v.len()) * 4
    }
}

/// One sequence's cache: a shared frozen prefix (the prompt) and its own positions after it.
#[derive(Clone, Debug)]
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

    /// Freezes this cache into a shareable prefix (its own block; a cache with a prefix of its
    /// own is first flattened into one block).
    pub fn into_prefix(self) -> Arc<KvBlock> {
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
