//! Device memory, counted: every allocation a [`super::GpuDevice`] makes and every free, the
//! same way on cuda, emu and meta (it is the one allocation path, `GpuDevice::alloc`), each
//! rounded up to [`GRANULE`] bytes as the allocators round them (emu aligns to 256 bytes; the
//! CUDA pools hand out 256-byte-aligned blocks). Live bytes and their peak are kept per
//! [`Category`], so a peak can be split into weights, optimizer state, gradients and so on:
//! code that allocates long-lived state says what it is with [`scope`]; everything else is an
//! activation. `fcgpu plan` reads the peak of a step run on the meta device; the tests read the
//! same counters on emu.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Allocations are counted in multiples of this many bytes.
pub const GRANULE: usize = 256;

/// What an allocation holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// The model's working weights (bf16 on a GPU).
    Weights,
    /// LoRA adapter weights.
    Adapters,
    /// Parameter gradients (the step's sums).
    Gradients,
    /// f32 master weights and AdamW moments.
    Optimizer,
    /// The rollouts' KV cache.
    KvCache,
    /// Activations of the forward and backward passes (the default).
    Activations,
    /// Chunks of the LM head's logits.
    LogitsChunks,
    /// Scratch space of kernels and the decode loop.
    Workspace,
}

impl Category {
    pub const ALL: [Category; 8] = [
        Category::Weights,
        Category::Adapters,
        Category::Gradients,
        Category::Optimizer,
        Category::KvCache,
        Category::Activations,
        Category::LogitsChunks,
        Category::Workspace,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Category::Weights => "weights",
            Category::Adapters => "adapters",
            Category::Gradients => "gradients",
            Category::Optimizer => "optimizer",
            Category::KvCache => "kv_cache",
            Category::Activations => "activations",
            Category::LogitsChunks => "logits_chunks",
            Category::Workspace => "workspace",
        }
    }
    fn index(self) -> usize {
        self as usize
    }
}

const N: usize = Category::ALL.len();

thread_local! {
    static CURRENT: Cell<Category> = const { Cell::new(Category::Activations) };
}

/// Runs `f` with this thread's allocations counted as `cat` (nested scopes: the innermost).
pub fn scope<T>(cat: Category, f: impl FnOnce() -> T) -> T {
    struct Restore(Category);
    impl Drop for Restore {
        fn drop(&mut self) {
            CURRENT.with(|c| c.set(self.0));
        }
    }
    let _r = Restore(CURRENT.with(|c| c.replace(cat)));
    f()
}

/// The category this thread's allocations are counted as now.
pub fn current() -> Category {
    CURRENT.with(|c| c.get())
}

/// Bytes an allocation of `bytes` counts for.
pub fn counted(bytes: usize) -> u64 {
    bytes.max(1).next_multiple_of(GRANULE) as u64
}

/// Live bytes by category, and the split at the highest total seen since the last reset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemSnapshot {
    pub live: [u64; N],
    pub peak: [u64; N],
}

impl MemSnapshot {
    pub fn live_total(&self) -> u64 {
        self.live.iter().sum()
    }
    pub fn peak_total(&self) -> u64 {
        self.peak.iter().sum()
    }
    pub fn peak_of(&self, c: Category) -> u64 {
        self.peak[c.index()]
    }
    pub fn live_of(&self, c: Category) -> u64 {
        self.live[c.index()]
    }
}

/// The live counters of one device.
#[derive(Default, Debug)]
pub struct MemCounters {
    live: [AtomicU64; N],
    total: AtomicU64,
    /// The split of the live bytes when the total was highest.
    peak: Mutex<[u64; N]>,
    peak_total: AtomicU64,
}

impl MemCounters {
    pub(super) fn alloc(&self, cat: Category, bytes: u64) {
        self.live[cat.index()].fetch_add(bytes, Ordering::Relaxed);
        let total = self.total.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if total > self.peak_total.load(Ordering::Relaxed) {
            let mut p = self.peak.lock().unwrap();
            if total > self.peak_total.load(Ordering::Relaxed) {
                self.peak_total.store(total, Ordering::Relaxed);
                for (d, l) in p.iter_mut().zip(&self.live) {
                    *d = l.load(Ordering::Relaxed);
                }
            }
        }
    }
    pub(super) fn free(&self, cat: Category, bytes: u64) {
        self.live[cat.index()].fetch_sub(bytes, Ordering::Relaxed);
        self.total.fetch_sub(bytes, Ordering::Relaxed);
    }
    /// Moves `bytes` from category `from` to `to` (the total does not change).
    pub(super) fn recount(&self, from: Category, to: Category, bytes: u64) {
        self.live[to.index()].fetch_add(bytes, Ordering::Relaxed);
        self.live[from.index()].fetch_sub(bytes, Ordering::Relaxed);
    }
    pub fn snapshot(&self) -> MemSnapshot {
        let p = self.peak.lock().unwrap();
        MemSnapshot { live: std::array::from_fn(|i| self.live[i].load(Ordering::Relaxed)), peak: *p }
    }
    /// Starts a new peak from what is live now.
    pub fn reset_peak(&self) {
        let mut p = self.peak.lock().unwrap();
        for (d, l) in p.iter_mut().zip(&self.live) {
            *d = l.load(Ordering::Relaxed);
        }
        self.peak_total.store(self.total.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}
