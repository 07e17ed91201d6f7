//! Paged key/value cache for incremental decoding: f32 on the CPU, the model's activation dtype
//! (bf16, or f32 with `--dtype f32`) on a GPU device.
//!
//! Keys and values live in fixed-size blocks of `block_size` positions (16 by default) handed
//! out by a [`KvPool`]. A sequence's [`SeqCache`] is a block table: position `p` is slot
//! `p % block_size` of its block `p / block_size`. Blocks are reference-counted, so the G
//! samples of a prompt share the blocks of its prefill ([`SeqCache::fork`]); a sample copies a
//! shared block only when it is about to write into it (the last, partial prompt block: copy on
//! write, in [`SeqCache::prepare`]). Memory then follows the tokens actually cached, not the
//! longest possible completion, and a prompt's keys are held once per group.
//!
//! One block is one allocation holding every layer, keys first, then values:
//! - cpu: `[k|v][layer][kv_head][block_size][head_dim]`, so one head's keys in a block are a
//!   contiguous `block_size × head_dim` matrix (attention is a strided GEMM per block);
//! - GPU: `[k|v][layer][block_size][kv_head][head_dim]`, token-major, so one token's keys of a
//!   layer are one contiguous row (the KV append writes rows; the decode-attention kernel reads
//!   position `j` through the block table).
//!
//! A pool keeps freed blocks for reuse (a steady decode allocates nothing) and can be capped at
//! a number of blocks ([`KvPool::set_limit`]); it counts what the scheduler and `--counters`
//! need: blocks in use, their peak, and copies made on write.

use std::sync::{Arc, Mutex};

use anyhow::{ensure, Result};

use crate::backend::GpuBuffer;
use crate::tensor::{DType, Device};

/// Positions per block unless a run says otherwise (`--kv-block-size`).
pub const DEFAULT_BLOCK: usize = 16;

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

    /// Bytes of one element where the cache lives.
    pub fn elem_bytes(&self) -> usize {
        if self.device.is_gpu() {
            self.dtype.size()
        } else {
            4
        }
    }

    /// Bytes one cached position takes (keys and values of every layer).
    pub fn bytes_per_position(&self) -> usize {
        2 * self.layers * self.row() * self.elem_bytes()
    }
}

/// Memory for a run of blocks, allocated at once ([`KvPool::reserve`]); each block in it is
/// keys then values (see the module's layouts).
enum Slab {
    Cpu(Box<[f32]>),
    Gpu(GpuBuffer),
}

impl Slab {
    /// Address of the slab's first element (host address on the cpu).
    fn addr(&mut self) -> u64 {
        match self {
            Slab::Cpu(b) => b.as_mut_ptr() as u64,
            Slab::Gpu(g) => g.ptr(),
        }
    }
}

/// One entry of a block table: the block's id in its pool and the address of its memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRef {
    pub id: u32,
    pub addr: u64,
}

/// The error of a [`SeqCache::prepare`] past the pool's limit: a scheduler waits or preempts
/// on it (`anyhow::Error::is::<OutOfBlocks>`), where any other error is a failure.
#[derive(Debug, Clone, Copy)]
pub struct OutOfBlocks {
    pub limit: usize,
    pub block_size: usize,
}

impl std::fmt::Display for OutOfBlocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "out of KV blocks: all {} blocks of {} positions are in use", self.limit, self.block_size)
    }
}

impl std::error::Error for OutOfBlocks {}

/// What a pool has handed out (see [`KvPool::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PoolStats {
    /// Blocks allocated so far (in use or free for reuse).
    pub allocated: usize,
    /// Blocks referenced by at least one sequence now.
    pub in_use: usize,
    /// The most blocks in use at once.
    pub peak_in_use: usize,
    /// Shared blocks copied because a sequence wrote into them.
    pub cow_copies: u64,
}

struct PoolState {
    slabs: Vec<Slab>,
    /// Each block's address, by id.
    addrs: Vec<u64>,
    refs: Vec<u32>,
    free: Vec<u32>,
    limit: usize,
    stats: PoolStats,
}

/// Blocks of `block_size` positions for caches of one shape (one model).
pub struct KvPool {
    shape: KvShape,
    block_size: usize,
    state: Mutex<PoolState>,
}

impl std::fmt::Debug for KvPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KvPool({:?}, block_size {}, {:?})", self.shape, self.block_size, self.stats())
    }
}

impl KvPool {
    /// An empty pool (blocks are allocated as sequences need them), with no limit.
    pub fn new(shape: KvShape, block_size: usize) -> Result<Arc<KvPool>> {
        ensure!(
            (1..=65536).contains(&block_size),
            "the KV block size must be between 1 and 65536 positions, not {block_size}"
        );
        let state = PoolState {
            slabs: Vec::new(),
            addrs: Vec::new(),
            refs: Vec::new(),
            free: Vec::new(),
            limit: usize::MAX,
            stats: PoolStats::default(),
        };
        Ok(Arc::new(KvPool { shape, block_size, state: Mutex::new(state) }))
    }

    pub fn shape(&self) -> KvShape {
        self.shape
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Elements of one block's keys (or values): every layer of `block_size` positions.
    pub fn half_elems(&self) -> usize {
        self.shape.layers * self.block_size * self.shape.row()
    }

    /// Bytes of one block (keys and values).
    pub fn block_bytes(&self) -> usize {
        2 * self.half_elems() * self.shape.elem_bytes()
    }

    /// Caps the blocks in use at `blocks` (`usize::MAX`: no cap); past it a sequence's
    /// [`SeqCache::prepare`] fails with "out of KV blocks" and the scheduler must wait or preempt.
    pub fn set_limit(&self, blocks: usize) {
        self.state.lock().unwrap().limit = blocks;
    }

    /// Blocks that can still be handed out before the limit.
    pub fn free_blocks(&self) -> usize {
        let s = self.state.lock().unwrap();
        s.limit.saturating_sub(s.stats.in_use)
    }

    pub fn stats(&self) -> PoolStats {
        self.state.lock().unwrap().stats
    }

    /// Blocks a sequence of `positions` positions needs.
    pub fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_size)
    }

    /// Makes sure `blocks` blocks exist (in use or free), allocating the missing ones as one
    /// slab: a run reserves what its sequences can need at most when it admits them, so no
    /// decode step allocates.
    pub fn reserve(&self, blocks: usize) -> Result<()> {
        let mut s = self.state.lock().unwrap();
        let missing = blocks.saturating_sub(s.addrs.len());
        if missing > 0 {
            self.grow(&mut s, missing)?;
        }
        Ok(())
    }

    /// Blocks that exist (in use or free).
    pub fn allocated(&self) -> usize {
        self.state.lock().unwrap().addrs.len()
    }

    fn grow(&self, s: &mut PoolState, blocks: usize) -> Result<()> {
        let per = 2 * self.half_elems();
        let mut slab = if self.shape.device.is_cpu() {
            Slab::Cpu(vec![0.0f32; blocks * per].into_boxed_slice())
        } else {
            let dev = self.shape.device.gpu()?;
            let bytes = blocks * self.block_bytes();
            Slab::Gpu(crate::backend::memory::scope(crate::backend::memory::Category::KvCache, || {
                dev.zeros(bytes)
            })?)
        };
        let base = slab.addr();
        s.slabs.push(slab);
        let step = (per * self.shape.elem_bytes()) as u64;
        for i in 0..blocks {
            s.free.push(s.addrs.len() as u32);
            s.addrs.push(base + i as u64 * step);
            s.refs.push(0);
        }
        // Hand out the lowest ids first (the free list is a stack).
        s.free.sort_unstable_by(|a, b| b.cmp(a));
        s.stats.allocated = s.addrs.len();
        Ok(())
    }

    fn take(&self) -> Result<BlockRef> {
        let mut s = self.state.lock().unwrap();
        if s.stats.in_use >= s.limit {
            return Err(OutOfBlocks { limit: s.limit, block_size: self.block_size }.into());
        }
        if s.free.is_empty() {
            self.grow(&mut s, 1)?;
        }
        let id = s.free.pop().expect("a free block");
        s.refs[id as usize] = 1;
        s.stats.in_use += 1;
        s.stats.peak_in_use = s.stats.peak_in_use.max(s.stats.in_use);
        Ok(BlockRef { id, addr: s.addrs[id as usize] })
    }

    fn share(&self, b: BlockRef) {
        self.state.lock().unwrap().refs[b.id as usize] += 1;
    }

    fn release(&self, b: BlockRef) {
        let mut s = self.state.lock().unwrap();
        let r = &mut s.refs[b.id as usize];
        debug_assert!(*r > 0, "release of a free KV block");
        *r -= 1;
        if *r == 0 {
            s.free.push(b.id);
            s.stats.in_use -= 1;
        }
    }

    fn shared(&self, b: BlockRef) -> bool {
        self.state.lock().unwrap().refs[b.id as usize] > 1
    }

    /// A private copy of `b` (whole block), for a sequence about to write into it.
    fn copy_of(&self, b: BlockRef) -> Result<BlockRef> {
        let n = self.take()?;
        self.state.lock().unwrap().stats.cow_copies += 1;
        if self.shape.device.is_cpu() {
            // SAFETY: both addresses are blocks of this pool's cpu slabs (live while the pool
            // is), distinct, of 2·half f32s each; `n` is private to the caller.
            unsafe {
                std::ptr::copy_nonoverlapping(b.addr as *const f32, n.addr as *mut f32, 2 * self.half_elems())
            };
        } else {
            let dev = self.shape.device.gpu()?;
            // SAFETY: as above, on the device.
            unsafe { dev.dtod(b.addr, n.addr, self.block_bytes())? };
        }
        Ok(n)
    }
}

/// One sequence's cache: its block table in a pool and how many positions it holds.
pub struct SeqCache {
    pool: Arc<KvPool>,
    blocks: Vec<BlockRef>,
    len: usize,
}

impl std::fmt::Debug for SeqCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SeqCache(len {}, {} blocks)", self.len, self.blocks.len())
    }
}

impl Drop for SeqCache {
    fn drop(&mut self) {
        for b in self.blocks.drain(..) {
            self.pool.release(b);
        }
    }
}

impl SeqCache {
    /// An empty cache drawing blocks from `pool`.
    pub fn new(pool: &Arc<KvPool>) -> SeqCache {
        SeqCache { pool: pool.clone(), blocks: Vec::new(), len: 0 }
    }

    /// Another sequence continuing this one: it shares every block (a prompt's prefill, run
    /// once for the G samples of its group); whichever writes first into a shared block gets
    /// its own copy of it.
    pub fn fork(&self) -> SeqCache {
        for &b in &self.blocks {
            self.pool.share(b);
        }
        SeqCache { pool: self.pool.clone(), blocks: self.blocks.clone(), len: self.len }
    }

    /// Another sequence continuing this one's first `n` positions (a cached prompt's prefix):
    /// it shares the blocks holding them; a shared block it writes into is copied first.
    pub fn fork_prefix(&self, n: usize) -> SeqCache {
        assert!(n <= self.len, "a prefix of {n} positions of a cache holding {}", self.len);
        let blocks = self.blocks[..self.pool.blocks_for(n)].to_vec();
        for &b in &blocks {
            self.pool.share(b);
        }
        SeqCache { pool: self.pool.clone(), blocks, len: n }
    }

    pub fn pool(&self) -> &Arc<KvPool> {
        &self.pool
    }

    pub fn shape(&self) -> KvShape {
        self.pool.shape
    }

    /// Positions cached so far (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The block table (blocks holding positions `0..len`, and any prepared after them).
    pub fn blocks(&self) -> &[BlockRef] {
        &self.blocks
    }

    /// Makes positions `len..len + n` writable: new blocks for them and a private copy of a
    /// shared block they fall in. Fails (leaving the cache as it was) when the pool is out of
    /// blocks.
    pub fn prepare(&mut self, n: usize) -> Result<()> {
        let bs = self.pool.block_size;
        let (first, end) = (self.len / bs, (self.len + n).div_ceil(bs));
        if n > 0 && first < self.blocks.len() && self.pool.shared(self.blocks[first]) {
            let copy = self.pool.copy_of(self.blocks[first])?;
            self.pool.release(std::mem::replace(&mut self.blocks[first], copy));
        }
        let before = self.blocks.len();
        while self.blocks.len() < end {
            match self.pool.take() {
                Ok(b) => self.blocks.push(b),
                Err(e) => {
                    for b in self.blocks.drain(before..) {
                        self.pool.release(b);
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Counts `n` written positions as cached (after every layer wrote them).
    pub fn commit(&mut self, n: usize) {
        assert!(self.len + n <= self.blocks.len() * self.pool.block_size, "commit past the prepared blocks");
        self.len += n;
    }

    // ------------------------------------------------------------------------------- the cpu

    /// Writes `n` new positions of one layer at `len..` (`k`, `v`: rows of `kv_heads ×
    /// head_dim`, `row_stride` apart; the blocks prepared). The length moves with
    /// [`SeqCache::commit`].
    pub fn write(&mut self, layer: usize, n: usize, k: &[f32], v: &[f32], row_stride: usize) {
        let s = self.pool.shape;
        let (bs, hd, half) = (self.pool.block_size, s.head_dim, self.pool.half_elems());
        assert!(s.device.is_cpu(), "SeqCache::write is the cpu's");
        assert!(self.len + n <= self.blocks.len() * bs, "write past the prepared blocks");
        for t in 0..n {
            let p = self.len + t;
            let blk = self.blocks[p / bs];
            // SAFETY: `prepare` made this block private to this cache (refcount 1, so nothing
            // else reads or writes it) and the block holds 2·half f32s.
            let mem = unsafe { std::slice::from_raw_parts_mut(blk.addr as *mut f32, 2 * half) };
            for h in 0..s.kv_heads {
                let dst = ((layer * s.kv_heads + h) * bs + p % bs) * hd;
                let src = t * row_stride + h * hd;
                mem[dst..dst + hd].copy_from_slice(&k[src..src + hd]);
                mem[half + dst..half + dst + hd].copy_from_slice(&v[src..src + hd]);
            }
        }
    }

    /// Keys and values of one layer and kv head, block by block, for the first `upto`
    /// positions: `(keys, values, positions)` with `positions × head_dim` row-major slices.
    pub fn segments(&self, layer: usize, kvh: usize, upto: usize) -> Vec<(&[f32], &[f32], usize)> {
        let s = self.pool.shape;
        let (bs, hd, half) = (self.pool.block_size, s.head_dim, self.pool.half_elems());
        let at = (layer * s.kv_heads + kvh) * bs * hd;
        (0..upto.div_ceil(bs))
            .map(|i| {
                let n = (upto - i * bs).min(bs);
                // SAFETY: a cpu block holds 2·half f32s; blocks are read-only while attention
                // reads them (writes happen before, under `&mut`).
                let mem = unsafe { std::slice::from_raw_parts(self.blocks[i].addr as *const f32, 2 * half) };
                (&mem[at..at + n * hd], &mem[half + at..half + at + n * hd], n)
            })
            .collect()
    }

    // ------------------------------------------------------------------------------- a GPU

    /// Device addresses of the keys and the values of position `pos` of `layer` (GPU caches;
    /// the row of every kv head, `row()` elements).
    pub fn gpu_row(&self, layer: usize, pos: usize) -> (u64, u64) {
        let (bs, es) = (self.pool.block_size, self.pool.shape.elem_bytes());
        let k = self.blocks[pos / bs].addr + ((layer * bs + pos % bs) * self.pool.shape.row() * es) as u64;
        (k, k + (self.pool.half_elems() * es) as u64)
    }
}
