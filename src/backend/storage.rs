//! `GpuStorage`: what a tensor on a GPU device holds (`Storage::Gpu`, beside
//! `Storage::Cpu`): a device buffer, its dtype and element count, with
//! conversions to and from host storage.

use anyhow::{ensure, Result};
use half::{bf16, f16};

use super::{GpuBuffer, GpuDevice};
use crate::dtype::DType;
use crate::storage::CpuStorage;

#[derive(Debug)]
pub struct GpuStorage {
    pub buf: GpuBuffer,
    pub dtype: DType,
    pub len: usize,
}

impl GpuStorage {
    /// Copy host storage to `dev`, keeping its dtype.
    pub fn from_cpu(dev: &GpuDevice, s: &CpuStorage) -> Result<GpuStorage> {
        Ok(GpuStorage { buf: dev.upload_bytes(s.as_bytes())?, dtype: s.dtype(), len: s.len() })
    }

    /// Zero-filled storage of `len` elements.
    pub fn zeros(dev: &GpuDevice, dtype: DType, len: usize) -> Result<GpuStorage> {
        Ok(GpuStorage { buf: dev.zeros(len * dtype.size())?, dtype, len })
    }

    /// Uninitialised storage (every element is written by the kernel that fills it).
    pub fn uninit(dev: &GpuDevice, dtype: DType, len: usize) -> Result<GpuStorage> {
        Ok(GpuStorage { buf: dev.alloc(len * dtype.size())?, dtype, len })
    }

    pub fn device(&self) -> &GpuDevice {
        self.buf.device()
    }

    /// Copy back to the host, same dtype.
    pub fn to_cpu(&self) -> Result<CpuStorage> {
        ensure!(
            self.buf.bytes() >= self.len * self.dtype.size(),
            "GpuStorage: buffer shorter than its length"
        );
        fn read<T: bytemuck::Pod + bytemuck::Zeroable>(s: &GpuStorage) -> Result<Vec<T>> {
            let mut v = vec![T::zeroed(); s.len];
            unsafe { s.device().dtoh(s.buf.ptr(), bytemuck::cast_slice_mut(&mut v))? };
            Ok(v)
        }
        Ok(match self.dtype {
            DType::F32 => CpuStorage::F32(read::<f32>(self)?),
            DType::BF16 => CpuStorage::BF16(read::<bf16>(self)?),
            DType::F16 => CpuStorage::F16(read::<f16>(self)?),
        })
    }

    /// Values widened to f32 on the host.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        Ok(self.to_cpu()?.to_f32_vec())
    }

    /// A copy in another dtype, converted on the device (cast kernels).
    pub fn to_dtype(&self, dtype: DType) -> Result<GpuStorage> {
        let out = GpuStorage::uninit(self.device(), dtype, self.len)?;
        crate::kernels::cast::cast(self.device(), &self.buf, self.dtype, &out.buf, dtype, self.len)?;
        Ok(out)
    }
}
