//! What a GPU device was asked to do, counted: kernel launches (cuBLAS calls, memsets and
//! device-to-device copies included: each is a driver call on the stream; a graph's replay is
//! one, the work captured into it is not counted), bytes copied
//! host→device and device→host, synchronisations (explicit ones, downloads, uploads too large
//! for the staging area or made when it is full: see `STAGE_BYTES`), and
//! device allocations. The same counts on emu and on cuda, so budgets checked on emu in CI hold
//! for the launch code a GPU runs. Read them as differences of [`Counts`] snapshots around a
//! phase.

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of a device's counters, or the difference of two.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counts {
    pub launches: u64,
    pub h2d_bytes: u64,
    pub d2h_bytes: u64,
    pub syncs: u64,
    pub allocs: u64,
}

impl std::ops::Sub for Counts {
    type Output = Counts;
    fn sub(self, o: Counts) -> Counts {
        Counts {
            launches: self.launches - o.launches,
            h2d_bytes: self.h2d_bytes - o.h2d_bytes,
            d2h_bytes: self.d2h_bytes - o.d2h_bytes,
            syncs: self.syncs - o.syncs,
            allocs: self.allocs - o.allocs,
        }
    }
}

impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, o: Counts) {
        self.launches += o.launches;
        self.h2d_bytes += o.h2d_bytes;
        self.d2h_bytes += o.d2h_bytes;
        self.syncs += o.syncs;
        self.allocs += o.allocs;
    }
}

/// The live counters of one device (shared by every handle to it).
#[derive(Default, Debug)]
pub struct Counters {
    launches: AtomicU64,
    h2d_bytes: AtomicU64,
    d2h_bytes: AtomicU64,
    syncs: AtomicU64,
    allocs: AtomicU64,
}

impl Counters {
    pub fn snapshot(&self) -> Counts {
        Counts {
            launches: self.launches.load(Ordering::Relaxed),
            h2d_bytes: self.h2d_bytes.load(Ordering::Relaxed),
            d2h_bytes: self.d2h_bytes.load(Ordering::Relaxed),
            syncs: self.syncs.load(Ordering::Relaxed),
            allocs: self.allocs.load(Ordering::Relaxed),
        }
    }
    pub(super) fn launch(&self) {
        self.launches.fetch_add(1, Ordering::Relaxed);
    }
    pub(super) fn sync(&self) {
        self.syncs.fetch_add(1, Ordering::Relaxed);
    }
    pub(super) fn alloc(&self) {
        self.allocs.fetch_add(1, Ordering::Relaxed);
    }
    /// A host→device copy's bytes (staged copies do not synchronise; the caller counts the
    /// synchronisation of a blocking one).
    pub(super) fn h2d(&self, bytes: usize) {
        self.h2d_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }
    /// A blocking device→host copy: its bytes and the synchronisation it implies.
    pub(super) fn d2h(&self, bytes: usize) {
        self.d2h_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.sync();
    }
}

thread_local! {
    static PHASES: std::cell::RefCell<std::collections::BTreeMap<&'static str, Counts>> =
        std::cell::RefCell::default();
}

/// Runs `f` as phase `name` of this thread's work on `dev` (nothing is counted without a
/// device): its counts are added to the phase's total until [`take_phases`].
pub fn phase<T>(dev: Option<&super::GpuDevice>, name: &'static str, f: impl FnOnce() -> T) -> T {
    let Some(dev) = dev else { return f() };
    let c0 = dev.counts();
    let out = f();
    add_phase(name, dev.counts() - c0);
    out
}

/// Adds `counts` to phase `name` (for a phase that is not one closure: snapshot, then add the
/// difference).
pub fn add_phase(name: &'static str, counts: Counts) {
    PHASES.with(|p| *p.borrow_mut().entry(name).or_default() += counts);
}

/// This thread's phase totals since the last call, by phase name.
pub fn take_phases() -> std::collections::BTreeMap<&'static str, Counts> {
    PHASES.with(|p| std::mem::take(&mut *p.borrow_mut()))
}
