//! GGUF (llama.cpp's model file) to a Hugging Face model directory: `fcgpu convert`.
//!
//! `parse` reads the container, `types` and `dequant` the tensor encodings, `arch` maps an
//! architecture's names and sizes, `tokenizer` rebuilds the tokenizer, `write` streams the
//! output. docs/models.md describes what is supported and how it was checked.

pub mod arch;
pub mod dequant;
pub mod parse;
pub mod tokenizer;
pub mod types;
mod write;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::tensor::DType;
pub use parse::{GgufFile, TensorInfo, Value};

/// Bumped whenever the converter's output changes, so that caches (scripts/get-model.sh)
/// know to convert again.
pub const CONVERTER_VERSION: u32 = 1;

/// What a conversion wrote.
#[derive(Debug)]
pub struct Summary {
    pub arch: &'static str,
    pub tensors: usize,
    pub parameters: u64,
    /// Tensors per ggml type name.
    pub types: BTreeMap<&'static str, usize>,
    pub tied: bool,
    pub vocab: u64,
}

/// Converts `from` (a GGUF file) into the directory `out` (which must not exist unless the
/// caller decided to replace it), writing `dtype` weights (f32 or bf16). The files go to a
/// temporary sibling that is flushed and renamed into place only when complete: on any error
/// nothing is left at `out`.
pub fn convert(from: &Path, out: &Path, dtype: DType) -> Result<Summary> {
    if dtype == DType::F16 {
        bail!("--dtype must be f32 or bf16");
    }
    let g = GgufFile::open(from)?;
    let ctx = || format!("{}", from.display());
    let arch = arch::Arch::from_gguf(&g).with_context(ctx)?;
    let h = arch::Hparams::read(&g, arch).with_context(ctx)?;
    // Every layer has at least 9 tensors: a block count the file cannot hold is a lie, caught
    // before the expected names are listed.
    if h.layers.saturating_mul(9) > g.tensors.len() as u64 {
        bail!(
            "{}: `{}.block_count` is {} but the file has only {} tensors",
            from.display(),
            arch.name(),
            h.layers,
            g.tensors.len()
        );
    }
    let tok = tokenizer::build(&g).with_context(ctx)?;
    let embd = g
        .tensor("token_embd.weight")
        .with_context(|| format!("{}: tensor `token_embd.weight` is missing", from.display()))?;
    let vocab = *embd.dims.last().expect("parsed tensors have dims");
    if tok.vocab_size as u64 > vocab {
        bail!(
            "{}: the tokenizer has {} tokens but `token_embd.weight` has only {vocab} rows",
            from.display(),
            tok.vocab_size
        );
    }
    let tied = g.tensor("output.weight").is_none();
    let plan = arch::plan(&g.tensors, &arch::expected(&h, vocab, tied)).with_context(ctx)?;
    let ids = arch::SpecialIds {
        bos: tok.bos.as_ref().map(|t| t.0),
        eos: tok.eos.as_ref().map(|t| t.0),
        pad: tok.pad.as_ref().map(|t| t.0),
    };
    let config = arch::config_json(&h, vocab, tied, &ids, dtype.hf_name());
    let source_sha256 = sha256(from)?;
    crate::model::save::write_dir(out, |dir| {
        write::json(&dir.join("config.json"), &config)?;
        let mut gen = serde_json::Map::new();
        ids.insert_into(&mut gen);
        write::json(&dir.join("generation_config.json"), &gen.into())?;
        let tj = dir.join("tokenizer.json");
        tok.tokenizer.save(&tj, false).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", tj.display()))?;
        write::sync(&tj)?;
        write::json(&dir.join("tokenizer_config.json"), &tokenizer::config_json(&tok, h.context))?;
        if let Some(t) = &tok.chat_template {
            write::file(&dir.join("chat_template.jinja"), t.as_bytes())?;
        }
        write::safetensors(&g, &plan, dtype, &dir.join("model.safetensors"))?;
        let stamp = json!({
            "converter_version": CONVERTER_VERSION,
            "source": from.file_name().map(|n| n.to_string_lossy().into_owned()),
            "source_sha256": source_sha256,
            "dtype": dtype.hf_name(),
        });
        write::json(&dir.join("fcgpu_convert.json"), &stamp)?;
        write::sync(dir)
    })?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        write::sync(parent)?;
    }
    let mut types = BTreeMap::new();
    for (t, _) in &plan {
        *types.entry(t.ggml_type.name()).or_insert(0) += 1;
    }
    Ok(Summary {
        arch: arch.name(),
        tensors: plan.len(),
        parameters: plan.iter().map(|(t, _)| t.num_elements()).sum(),
        types,
        tied,
        vocab,
    })
}

/// The hex sha256 of a file.
pub fn sha256(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
