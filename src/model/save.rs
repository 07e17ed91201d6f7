//! Saving a model in Hugging Face layout (config, safetensors, tokenizer files), atomically.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::{weights, Model};
use crate::tensor::DType;

/// Files copied verbatim from the source directory when present.
const SIDE_FILES: [&str; 7] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
];

impl Model {
    /// Writes the model to `dir` in `dtype` (default: the checkpoint's own). The files go to a
    /// temporary sibling directory first, which is renamed over `dir` only once complete.
    pub fn save(&self, dir: &Path, dtype: Option<DType>) -> Result<()> {
        let dtype = dtype.unwrap_or(self.config.dtype);
        write_dir(dir, |tmp| self.write_files(tmp, dtype))
    }

    fn write_files(&self, dir: &Path, dtype: DType) -> Result<()> {
        let mut cfg = self.config.raw.clone();
        if let Some(obj) = cfg.as_object_mut() {
            let key = if obj.contains_key("dtype") && !obj.contains_key("torch_dtype") {
                "dtype"
            } else {
                "torch_dtype"
            };
            obj.insert(key.into(), dtype.hf_name().into());
            obj.insert("tie_word_embeddings".into(), self.lm_head.is_none().into());
        }
        let text = serde_json::to_string_pretty(&cfg)?;
        std::fs::write(dir.join("config.json"), text + "\n")
            .with_context(|| format!("cannot write {}", dir.join("config.json").display()))?;
        weights::save(&dir.join("model.safetensors"), &self.named_params(), dtype)?;
        if let Some(src) = &self.dir {
            for f in SIDE_FILES {
                let p = src.join(f);
                if p.exists() {
                    std::fs::copy(&p, dir.join(f)).with_context(|| format!("cannot copy {}", p.display()))?;
                }
            }
        }
        Ok(())
    }
}

/// Fills a temporary sibling of `dir` with `fill`, then puts it at `dir`, replacing what was
/// there. A failed fill (full disk, bad side file) leaves nothing behind and `dir` untouched.
pub fn write_dir(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = sibling(dir, "tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("cannot clear {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let done = fill(&tmp).and_then(|_| replace_dir(&tmp, dir));
    if done.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    done
}

/// `.<name>.<tag>-<pid>`: a temporary name that `runfs::clean_stale_temps` recognises.
pub(crate) fn sibling(dir: &Path, tag: &str) -> PathBuf {
    crate::runfs::temp_sibling(dir, tag)
}

/// Puts the finished directory `tmp` at `dir`, replacing what was there.
pub fn replace_dir(tmp: &Path, dir: &Path) -> Result<()> {
    let old = sibling(dir, "old");
    if dir.exists() {
        std::fs::rename(dir, &old).with_context(|| format!("cannot move aside {}", dir.display()))?;
    }
    if let Err(e) = std::fs::rename(tmp, dir) {
        // Put the old directory back so a failure never loses it.
        if old.exists() {
            let _ = std::fs::rename(&old, dir);
        }
        return Err(e).with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()));
    }
    // What was moved aside may be a stray file where the directory belongs.
    let removed = if old.is_dir() {
        std::fs::remove_dir_all(&old)
    } else if old.exists() {
        std::fs::remove_file(&old)
    } else {
        Ok(())
    };
    removed.with_context(|| format!("cannot remove {}", old.display()))?;
    Ok(())
}
