//! Reading and writing safetensors checkpoints: one file or shards with an index, memory-mapped.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::storage::MappedF32;
use crate::tensor::{CpuStorage, DType, Tensor};

/// Memory-mapped checkpoint files, and which file holds each tensor. f32 tensors are read in
/// place from the maps (see [`MappedF32`]: the files must not be truncated while a model
/// loaded from them is alive); bf16 and f16 ones are copied.
pub struct WeightFiles {
    maps: Vec<(PathBuf, Arc<Mmap>)>,
    index: HashMap<String, usize>,
    /// Elements over all tensors of all files (from the headers).
    elements: u128,
}

/// Largest `model.safetensors.index.json` read (real ones are tens of KB).
const MAX_INDEX_BYTES: u64 = 64 << 20;

impl WeightFiles {
    /// `model.safetensors`, or the shards listed by `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<WeightFiles> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index_path.exists() {
            let text = crate::runfs::read_capped(&index_path, MAX_INDEX_BYTES)?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: not valid JSON", index_path.display()))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .with_context(|| format!("{}: missing `weight_map`", index_path.display()))?;
            let mut names: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|f| shard_path(dir, &index_path, f)).collect::<Result<_>>()?
        } else if single.exists() {
            vec![single]
        } else {
            bail!("{}: no model.safetensors or model.safetensors.index.json", dir.display());
        };
        let mut maps = Vec::new();
        let mut index = HashMap::new();
        let mut elements = 0u128;
        for path in files {
            let file = File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
            // SAFETY: the file is opened and mapped read-only. A checkpoint truncated or rewritten
            // in place under a running job is outside what we support, as in every
            // memory-mapped loader (truncation: SIGBUS on the next read of a lost page).
            let map =
                unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
            let map = Arc::new(map);
            let st = SafeTensors::deserialize(&map)
                .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e}", path.display()))?;
            for (name, view) in st.tensors() {
                elements += view.shape().iter().map(|&d| d as u128).product::<u128>();
                index.insert(name.to_string(), maps.len());
            }
            maps.push((path, map));
        }
        Ok(WeightFiles { maps, index, elements })
    }

    /// Elements over all stored tensors.
    pub fn num_elements(&self) -> u128 {
        self.elements
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
        ensure!(
            t.shape() == shape,
            "{}: tensor `{name}` has shape {:?}, expected {:?}",
            file.display(),
            t.shape(),
            shape
        );
        let t = t.to_dtype(DType::F32)?;
        // A NaN or infinite weight poisons every output silently; name it at load time.
        if let Some(i) = t.f32s()?.iter().position(|x| !x.is_finite()) {
            bail!(
                "{}: tensor `{name}` has a non-finite value ({} at flat index {i})",
                file.display(),
                t.f32s()?[i]
            );
        }
        Ok(t)
    }

    /// The tensor `name` in its stored dtype.
    pub fn load_any(&self, name: &str) -> Result<(Tensor, &Path)> {
        let &i = self.index.get(name).with_context(|| format!("checkpoint is missing tensor `{name}`"))?;
        let (path, map) = &self.maps[i];
        let st = SafeTensors::deserialize(map).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let view =
            st.tensor(name).map_err(|e| anyhow::anyhow!("{}: tensor `{name}`: {e}", path.display()))?;
        let bytes = view.data();
        let storage = match view.dtype() {
            Dtype::F32 => {
                // In place when aligned (safetensors writers align f32 data); else copied.
                let offset = bytes.as_ptr() as usize - map.as_ptr() as usize;
                match MappedF32::new(Arc::clone(map), offset, bytes.len() / 4) {
                    Some(m) => CpuStorage::F32Mapped(m),
                    None => CpuStorage::F32(
                        bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
                    ),
                }
            }
            Dtype::BF16 => {
                CpuStorage::BF16(bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]])).collect())
            }
            Dtype::F16 => {
                CpuStorage::F16(bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]])).collect())
            }
            other => bail!(
                "{}: tensor `{name}` has unsupported dtype {other:?} (supported: F32, BF16, F16)",
                path.display()
            ),
        };
        Ok((Tensor::from_storage(storage, view.shape())?, path.as_path()))
    }
}

/// The path of shard `name` listed in `index_path`: a plain relative path that stays inside
/// `dir` (no absolute path, no `..`, and no symlink leading out of it).
fn shard_path(dir: &Path, index_path: &Path, name: &str) -> Result<PathBuf> {
    use std::path::Component;
    let rel = Path::new(name);
    let plain =
        !name.is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    ensure!(
        plain,
        "{}: shard path `{name}` must be a relative path inside the model directory",
        index_path.display()
    );
    let path = dir.join(rel);
    if let (Ok(real), Ok(root)) = (path.canonicalize(), dir.canonicalize()) {
        ensure!(
            real.starts_with(&root),
            "{}: shard `{name}` resolves to {}, outside the model directory {}",
            index_path.display(),
            real.display(),
            root.display()
        );
    }
    Ok(path)
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
        .map(|(n, t)| {
            Ok((
                n.clone(),
                t.shape().to_vec(),
                t.to_device(crate::tensor::Device::Cpu)?.cpu_storage()?.to_dtype(dtype),
            ))
        })
        .collect::<Result<_>>()?;
    let views: Vec<(String, safetensors::tensor::TensorView)> = converted
        .iter()
        .map(|(n, s, c)| {
            Ok((n.clone(), safetensors::tensor::TensorView::new(st_dtype(dtype), s.clone(), c.as_bytes())?))
        })
        .collect::<Result<_, safetensors::SafeTensorError>>()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    safetensors::serialize_to_file(views, Some(meta), path)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    Ok(())
}

/// All tensors of a safetensors file, in their stored dtype (fixtures, optimizer state).
pub fn load_all(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: read-only map of a file we don't modify.
    let map = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
    let st = SafeTensors::deserialize(&map)
        .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e}", path.display()))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let bytes = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => {
                bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
            }
            Dtype::F64 => {
                bytes.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32).collect()
            }
            Dtype::BF16 => {
                bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
            }
            Dtype::F16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::I64 => {
                bytes.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f32).collect()
            }
            Dtype::I32 => {
                bytes.chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().unwrap()) as f32).collect()
            }
            other => bail!("{}: tensor `{name}` has unsupported dtype {other:?}", path.display()),
        };
        out.insert(name, Tensor::from_vec(data, view.shape())?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage_of(t: &Tensor) -> &CpuStorage {
        t.cpu_storage().unwrap()
    }

    #[test]
    fn f32_weights_are_read_in_place_and_never_written_back() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("model.safetensors");
        let w = Tensor::from_vec(vec![1.0, -2.5, 3.25, 4.0, 5.0, 6.0], &[2, 3]).unwrap();
        let b = Tensor::from_vec(vec![0.5, 0.25], &[2]).unwrap();
        save(&path, &[("w".into(), w), ("b".into(), b)], DType::F32).unwrap();
        let before = std::fs::read(&path).unwrap();
        let files = WeightFiles::open(tmp.path()).unwrap();
        let t = files.load("w", &[2, 3]).unwrap();
        assert!(matches!(storage_of(&t), CpuStorage::F32Mapped(_)), "{:?}", storage_of(&t));
        assert_eq!(t.f32s().unwrap(), &[1.0, -2.5, 3.25, 4.0, 5.0, 6.0]);
        // An optimizer step gives the parameter new storage: the map and the file keep the old
        // values, and the mapping outlives `files` for as long as a tensor uses it.
        let mut p = t.clone().requires_grad();
        p.replace_data(vec![0.0; 6]).unwrap();
        drop(files);
        assert_eq!(p.f32s().unwrap(), &[0.0; 6]);
        assert_eq!(t.f32s().unwrap(), &[1.0, -2.5, 3.25, 4.0, 5.0, 6.0]);
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    /// A file whose f32 data starts off a 4-byte boundary (safetensors allows it) is copied.
    #[test]
    fn misaligned_f32_data_is_copied() {
        let tmp = tempfile::tempdir().unwrap();
        let mut header = r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#.to_string();
        while (8 + header.len()) % 4 != 2 {
            header.push(' ');
        }
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header.as_bytes());
        bytes.extend(1.5f32.to_le_bytes());
        bytes.extend((-7.0f32).to_le_bytes());
        std::fs::write(tmp.path().join("model.safetensors"), bytes).unwrap();
        let t = WeightFiles::open(tmp.path()).unwrap().load("w", &[2]).unwrap();
        assert!(matches!(storage_of(&t), CpuStorage::F32(_)));
        assert_eq!(t.f32s().unwrap(), &[1.5, -7.0]);
    }

    #[test]
    fn bf16_weights_are_upcast_to_owned_f32() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("model.safetensors");
        let w = Tensor::from_vec(vec![1.0, -2.5, 3.25], &[3]).unwrap();
        save(&path, &[("w".into(), w)], DType::BF16).unwrap();
        let t = WeightFiles::open(tmp.path()).unwrap().load("w", &[3]).unwrap();
        assert!(matches!(storage_of(&t), CpuStorage::F32(_)));
        assert_eq!(t.f32s().unwrap(), &[1.0, -2.5, 3.25]);
    }
}
