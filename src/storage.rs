//! Host storage of tensor data ([`CpuStorage`]). A leaf module beside `dtype`.

use std::sync::Arc;

use half::{bf16, f16};
use memmap2::Mmap;

use crate::dtype::DType;

/// Host storage. CPU ops compute in f32; bf16/f16 exist for loading and saving checkpoints.
#[derive(Clone, Debug)]
pub enum CpuStorage {
    F32(Vec<f32>),
    /// f32 values read in place from a checkpoint's memory map (see [`MappedF32`]).
    F32Mapped(MappedF32),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
}

/// f32 values that live in a read-only memory map of a safetensors file: loading a f32
/// checkpoint costs no copy, and the pages are the kernel's page cache (shared with other
/// processes reading the file, and dropped under memory pressure rather than swapped).
///
/// Nothing can write through it: the map is read-only and only `&[f32]` is handed out; a
/// tensor that changes (an optimizer step) gets new storage (`Tensor::replace_data`). The
/// file must not be truncated while it is mapped: the kernel then kills the process with
/// SIGBUS on the next read of a page past the new end, and a file rewritten in place changes
/// the weights under the process. Replacing it with a new file (write, then rename, as
/// fcgpu's own `save` and `write_dir` do) is safe: the mapped inode lives on until unmapped.
#[derive(Clone)]
pub struct MappedF32 {
    map: Arc<Mmap>,
    offset: usize,
    len: usize,
}

impl MappedF32 {
    /// The `len` f32 values at byte `offset` of `map`; `None` when they cannot be read in
    /// place (out of range, not 4-byte aligned, or a big-endian host), so the caller copies.
    pub fn new(map: Arc<Mmap>, offset: usize, len: usize) -> Option<MappedF32> {
        let end = len.checked_mul(4)?.checked_add(offset)?;
        let bytes = map.get(offset..end)?;
        if cfg!(target_endian = "big") || bytemuck::try_cast_slice::<u8, f32>(bytes).is_err() {
            return None;
        }
        Some(MappedF32 { map, offset, len })
    }

    pub fn as_slice(&self) -> &[f32] {
        // In range and aligned: checked in `new`, and a map never moves.
        bytemuck::cast_slice(&self.map[self.offset..self.offset + 4 * self.len])
    }
}

impl std::fmt::Debug for MappedF32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MappedF32({} values at byte {})", self.len, self.offset)
    }
}

impl CpuStorage {
    pub fn len(&self) -> usize {
        match self {
            CpuStorage::F32(v) => v.len(),
            CpuStorage::F32Mapped(m) => m.len,
            CpuStorage::BF16(v) => v.len(),
            CpuStorage::F16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) | CpuStorage::F32Mapped(_) => DType::F32,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::F16(_) => DType::F16,
        }
    }

    /// The f32 values in place (owned or mapped), or `None` for bf16/f16.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match self {
            CpuStorage::F32(v) => Some(v),
            CpuStorage::F32Mapped(m) => Some(m.as_slice()),
            CpuStorage::BF16(_) | CpuStorage::F16(_) => None,
        }
    }

    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self {
            CpuStorage::F32(v) => v.clone(),
            CpuStorage::F32Mapped(m) => m.as_slice().to_vec(),
            CpuStorage::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            CpuStorage::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// The values in `dtype` (a mapped f32 storage stays mapped: cloning it copies nothing).
    pub fn to_dtype(&self, dtype: DType) -> CpuStorage {
        if dtype == self.dtype() {
            return self.clone();
        }
        let f = self.to_f32_vec();
        match dtype {
            DType::F32 => CpuStorage::F32(f),
            DType::BF16 => CpuStorage::BF16(f.iter().map(|&x| bf16::from_f32(x)).collect()),
            DType::F16 => CpuStorage::F16(f.iter().map(|&x| f16::from_f32(x)).collect()),
        }
    }

    /// Little-endian bytes, as safetensors stores them.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            CpuStorage::F32(v) => bytemuck::cast_slice(v),
            CpuStorage::F32Mapped(m) => bytemuck::cast_slice(m.as_slice()),
            CpuStorage::BF16(v) => bytemuck::cast_slice(v),
            CpuStorage::F16(v) => bytemuck::cast_slice(v),
        }
    }
}
