//! Reading and writing safetensors checkpoints: one file or shards with an index, memory-mapped.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::tensor::{CpuStorage, DType, Tensor};

/// Memory-mapped checkpoint files, and which file holds each tensor.
pub struct WeightFiles {
    maps: Vec<(PathBuf, Mmap)>,
    index: HashMap<String, usize>,
}

impl WeightFiles {
    /// `model.safetensors`, or the shards listed by `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<WeightFiles> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).with_context(|| format!("cannot read {}", index_path.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", index_path.display()))?;
            let map = v.get("weight_map").and_then(|m| m.as_object()).with_context(|| format!("{}: missing `weight_map`", index_path.display()))?;
            let mut names: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|f| dir.join(f)).collect()
        } else if single.exists() {
            vec![single]
        } else {
            bail!("{}: no model.safetensors or model.safetensors.index.json", dir.display());
        };
        let mut maps = Vec::new();
        let mut index = HashMap::new();
        for path in files {
            let file = File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
            // SAFETY: the file is opened read-only; a checkpoint changing under a running job is
            // outside what we support, as in every memory-mapped loader.
            let map = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
            let st = SafeTensors::deserialize(&map).map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e}", path.display()))?;
            for name in st.names() {
                index.insert(name.to_string(), maps.len());
            }
            maps.push((path, map));
        }
        Ok(WeightFiles { maps, index })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.index.keys().cloned().collect();
        v.sort();
        v
    }

    /// The tensor `name` as f32 with the expected shape; the error names tensor and file.
    pub fn load(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let (t, file) = self.load_any(name)?;
        ensure!(t.shape() == shape, "{}: tensor `{name}` has shape {:?}, expected {:?}", file.display(), t.shape(), shape);
        t.to_dtype(DType::F32)
    }

    /// The tensor `name` in its stored dtype.
    pub fn load_any(&self, name: &str) -> Result<(Tensor, &Path)> {
        let &i = self.index.get(name).with_context(|| format!("checkpoint is missing tensor `{name}`"))?;
        let (path, map) = &self.maps[i];
        let st = SafeTensors::deserialize(map).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let view = st.tensor(name).map_err(|e| anyhow::anyhow!("{}: tensor `{name}`: {e}", path.display()))?;
        let bytes = view.data();
        let storage = match view.dtype() {
            Dtype::F32 => CpuStorage::F32(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()),
            Dtype::BF16 => CpuStorage::BF16(bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]])).collect()),
            Dtype::F16 => CpuStorage::F16(bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]])).collect()),
            other => bail!("{}: tensor `{name}` has unsupported dtype {other:?} (supported: F32, BF16, F16)", path.display()),
        };
        Ok((Tensor::from_storage(storage, view.shape())?, path.as_path()))
    }
}

fn st_dtype(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::BF16 => Dtype::BF16,
        DType::F16 => Dtype::F16,
    }
}

/// Writes `tensors` to one safetensors file, converting to `dtype`.
pub fn save(path: &Path, tensors: &[(String, Tensor)], dtype: DType) -> Result<()> {
    let converted: Vec<(String, Vec<usize>, CpuStorage)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.shape().to_vec(), t.to_device(crate::tensor::Device::Cpu)?.cpu_storage()?.to_dtype(dtype))))
        .collect::<Result<_>>()?;
    let views: Vec<(String, safetensors::tensor::TensorView)> = converted
        .iter()
        .map(|(n, s, c)| Ok((n.clone(), safetensors::tensor::TensorView::new(st_dtype(dtype), s.clone(), c.as_bytes())?)))
        .collect::<Result<_, safetensors::SafeTensorError>>()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    safetensors::serialize_to_file(views, Some(meta), path).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    Ok(())
}

/// All tensors of a safetensors file, in their stored dtype (fixtures, optimizer state).
pub fn load_all(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: read-only map of a file we don't modify.
    let map = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
    let st = SafeTensors::deserialize(&map).map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e}", path.display()))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let bytes = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::F64 => bytes.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32).collect(),
            Dtype::BF16 => bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::F16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::I64 => bytes.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f32).collect(),
            Dtype::I32 => bytes.chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().unwrap()) as f32).collect(),
            other => bail!("{}: tensor `{name}` has unsupported dtype {other:?}", path.display()),
        };
        out.insert(name, Tensor::from_vec(data, view.shape())?);
    }
    Ok(out)
}
