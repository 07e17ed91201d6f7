//! The meta device: tensors with a shape and a dtype and no data. Allocations hand out
//! addresses that are never dereferenced, and kernels, GEMMs and copies do nothing; a download
//! reads zeros. Everything above the driver (the ops, the model, the trainers) runs exactly as
//! on emu or cuda, allocation for allocation, so the device's [`super::memory`] counters give
//! the memory a step needs without the memory or the time: `fcgpu plan` runs its steps here.

use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Result;

use super::{Driver, Gemm, GpuKind, Kernel, LaunchCfg};

/// The address space meta allocations come from (never touched).
const BASE: u64 = 1 << 44;

#[derive(Default)]
pub struct MetaDriver {
    next: AtomicU64,
}

impl Driver for MetaDriver {
    fn kind(&self) -> GpuKind {
        GpuKind::Meta
    }
    fn name(&self) -> String {
        "meta (shapes and dtypes, no data)".into()
    }
    fn alloc(&self, bytes: usize) -> Result<u64> {
        let n = super::memory::counted(bytes);
        Ok(BASE + self.next.fetch_add(n, Ordering::Relaxed))
    }
    unsafe fn free(&self, _ptr: u64, _bytes: usize) {}
    unsafe fn htod(&self, _src: &[u8], _dst: u64) -> Result<()> {
        Ok(())
    }
    unsafe fn dtoh(&self, _src: u64, dst: &mut [u8]) -> Result<()> {
        dst.fill(0);
        Ok(())
    }
    unsafe fn dtod(&self, _src: u64, _dst: u64, _bytes: usize) -> Result<()> {
        Ok(())
    }
    unsafe fn memset_zero(&self, _dst: u64, _bytes: usize) -> Result<()> {
        Ok(())
    }
    unsafe fn launch(&self, _k: Kernel, _cfg: LaunchCfg, _params: &mut [*mut c_void]) -> Result<()> {
        Ok(())
    }
    unsafe fn gemm(&self, _g: &Gemm) -> Result<()> {
        Ok(())
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}
