//! Writing the converted model: safetensors streamed one tensor at a time (each dequantized
//! when the writer reaches it, so memory holds one tensor, not the model), then every file
//! flushed to disk.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use anyhow::{bail, Context, Result};
use half::bf16;
use safetensors::tensor::View;
use safetensors::Dtype;

use super::arch::Mapped;
use super::dequant::dequantize;
use super::parse::{GgufFile, TensorInfo};
use crate::tensor::DType;

/// One output tensor, dequantized on demand by the safetensors writer.
struct Lazy<'a> {
    bytes: &'a [u8],
    info: &'a TensorInfo,
    map: Mapped,
    dtype: DType,
    /// The first non-finite value met (the writer's `data()` cannot return an error).
    bad: &'a RefCell<Option<String>>,
}

impl Lazy<'_> {
    /// Row `r` of the output comes from this row of the GGUF tensor: the inverse of
    /// convert_hf_to_gguf's `permute`, which stores each head's rows as (half, pair) pairs
    /// interleaved: GGUF row `2i + j` of a head is Hugging Face row `j * half + i`.
    fn source_row(&self, r: usize) -> usize {
        let Some(heads) = self.map.unpermute_heads else { return r };
        let head_dim = self.map.shape[0] / heads;
        let half = head_dim / 2;
        let (h, within) = (r / head_dim, r % head_dim);
        let (j, i) = (within / half, within % half);
        h * head_dim + 2 * i + j
    }

    fn rows(&self) -> (usize, usize) {
        let cols = *self.map.shape.last().expect("at least one dim");
        (self.map.shape.iter().product::<usize>() / cols, cols)
    }
}

impl View for Lazy<'_> {
    fn dtype(&self) -> Dtype {
        match self.dtype {
            DType::BF16 => Dtype::BF16,
            _ => Dtype::F32,
        }
    }

    fn shape(&self) -> &[usize] {
        &self.map.shape
    }

    fn data_len(&self) -> usize {
        self.map.shape.iter().product::<usize>() * if self.dtype == DType::BF16 { 2 } else { 4 }
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let (rows, cols) = self.rows();
        // Rows are whole blocks: the parser checked that a row's length is a block multiple.
        let row_bytes = self.bytes.len() / rows;
        let mut out = Vec::with_capacity(self.data_len());
        let mut row = vec![0f32; cols];
        for r in 0..rows {
            let src = self.source_row(r);
            dequantize(self.info.ggml_type, &self.bytes[src * row_bytes..(src + 1) * row_bytes], &mut row);
            if let Some(c) = row.iter().position(|x| !x.is_finite()) {
                self.bad.borrow_mut().get_or_insert_with(|| {
                    format!(
                        "tensor `{}` has a non-finite value ({}) in row {src}, column {c}",
                        self.info.name, row[c]
                    )
                });
            }
            match self.dtype {
                DType::BF16 => {
                    row.iter().for_each(|x| out.extend_from_slice(&bf16::from_f32(*x).to_le_bytes()))
                }
                _ => row.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            }
        }
        Cow::Owned(out)
    }
}

/// Writes `model.safetensors` at `path` from the planned tensors, in `dtype` (f32 or bf16).
pub fn safetensors(g: &GgufFile, plan: &[(&TensorInfo, Mapped)], dtype: DType, path: &Path) -> Result<()> {
    let bad = RefCell::new(None);
    let views = plan
        .iter()
        .map(|(info, map)| {
            let lazy = Lazy { bytes: g.tensor_bytes(info)?, info, map: map.clone(), dtype, bad: &bad };
            Ok((map.hf_name.clone(), lazy))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    if let Some(why) = bad.into_inner() {
        bail!("{}: {why}", g.path.display());
    }
    sync(path)
}

/// Flushes a written file (or directory) to disk.
pub fn sync(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot flush {} to disk", path.display()))
}

/// Writes `bytes` to `path` and flushes it.
pub fn file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    sync(path)
}

/// Writes pretty JSON with a final newline.
pub fn json(path: &Path, v: &serde_json::Value) -> Result<()> {
    file(path, (serde_json::to_string_pretty(v)? + "\n").as_bytes())
}
