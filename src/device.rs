//! Where a tensor lives ([`Device`]). A leaf module: opening the GPU behind a tag
//! ([`Device::gpu`], [`Device::resolve`], [`Device::auto`]) is in `crate::backend`.

use anyhow::{bail, Result};

use crate::dtype::DType;

/// Where a tensor lives. `Cpu` computes in f32; `Cuda(n)` and `Emu` are the GPU devices (bf16
/// activations and weights, f32 accumulation), each named by its process-wide handle
/// ([`GpuDevice::shared_cuda`], [`GpuDevice::shared_emu`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    Cuda(u32),
    Emu,
    /// Shapes and dtypes without data: what `fcgpu plan` runs a step on to count its memory.
    Meta,
}

impl Device {
    /// `cpu`, `cuda` (= `cuda:0`), `cuda:N`, `emu`, or `auto`: cuda when the CUDA driver, NVRTC,
    /// cuBLAS and a GPU are all present (probed without touching cudarc's panicking loaders),
    /// else cpu. Names only: [`Device::resolve`] also checks that the device opens.
    pub fn parse(name: &str) -> Result<Device> {
        Ok(match name {
            "cpu" => Device::Cpu,
            "emu" => Device::Emu,
            "meta" => Device::Meta,
            "cuda" => Device::Cuda(0),
            "auto" => Device::auto(),
            _ => match name.strip_prefix("cuda:").and_then(|n| n.parse::<u32>().ok()) {
                Some(n) => Device::Cuda(n),
                None => bail!("unknown device `{name}` (expected cpu, cuda, cuda:N, emu, meta or auto)"),
            },
        })
    }

    pub fn is_cpu(self) -> bool {
        self == Device::Cpu
    }

    pub fn is_gpu(self) -> bool {
        !self.is_cpu()
    }

    /// Storage dtype of model weights and activations here: f32 on the cpu, bf16 on a GPU.
    pub fn compute_dtype(self) -> DType {
        if self.is_cpu() {
            DType::F32
        } else {
            DType::BF16
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Emu => write!(f, "emu"),
            Device::Meta => write!(f, "meta"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}
