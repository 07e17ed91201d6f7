//! The cuda device (placeholder until the cudarc driver lands).
use std::ffi::c_void;

use anyhow::{bail, Result};

use super::{Driver, Gemm, GpuKind, Kernel, LaunchCfg};

pub fn available() -> Result<()> {
    bail!("cuda device: not built yet")
}

pub struct CudaDriver;

impl CudaDriver {
    pub fn new(_ordinal: usize) -> Result<CudaDriver> {
        available()?;
        Ok(CudaDriver)
    }
}

impl Driver for CudaDriver {
    fn kind(&self) -> GpuKind { GpuKind::Cuda }
    fn name(&self) -> String { "cuda".into() }
    fn alloc(&self, _bytes: usize) -> Result<u64> { bail!("unreachable") }
    unsafe fn free(&self, _ptr: u64, _bytes: usize) {}
    unsafe fn htod(&self, _src: &[u8], _dst: u64) -> Result<()> { bail!("unreachable") }
    unsafe fn dtoh(&self, _src: u64, _dst: &mut [u8]) -> Result<()> { bail!("unreachable") }
    unsafe fn dtod(&self, _src: u64, _dst: u64, _bytes: usize) -> Result<()> { bail!("unreachable") }
    unsafe fn memset_zero(&self, _dst: u64, _bytes: usize) -> Result<()> { bail!("unreachable") }
    unsafe fn launch(&self, _k: Kernel, _cfg: LaunchCfg, _params: &mut [*mut c_void]) -> Result<()> { bail!("unreachable") }
    unsafe fn gemm(&self, _g: &Gemm) -> Result<()> { bail!("unreachable") }
    fn synchronize(&self) -> Result<()> { Ok(()) }
}
