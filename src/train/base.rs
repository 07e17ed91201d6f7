//! The shipped base checkpoint `fc-tiny`: the tiny model after a long SRML SFT on the embedded
//! task, compiled into the binary so that `fcgpu train` starts GRPO from a policy that already
//! copies values, with nothing downloaded and no minutes of warm-up on every run.
//!
//! It is made by one documented command (`scripts/make-base.sh`: `fcgpu sft --config
//! configs/base-fc-tiny.toml`, then its last checkpoint's model files copied into
//! `assets/fc-tiny/`). `assets/fc-tiny/MANIFEST.json` records that command, the SHA-256 of each
//! file and the recipe's first training losses, which `tests/base_model.rs` reproduces.

use std::path::Path;

use anyhow::{Context, Result};

/// `base` value for the shipped checkpoint.
pub const SHIPPED: &str = "fc-tiny";
/// `base` value for a freshly built tiny model (task tokenizer, random weights, copy heads).
pub const SCRATCH: &str = "scratch";

/// The checkpoint's files, as committed under `assets/fc-tiny/`.
pub const FILES: [(&str, &[u8]); 6] = [
    ("config.json", include_bytes!("../../assets/fc-tiny/config.json")),
    ("generation_config.json", include_bytes!("../../assets/fc-tiny/generation_config.json")),
    ("model.safetensors", include_bytes!("../../assets/fc-tiny/model.safetensors")),
    ("tokenizer.json", include_bytes!("../../assets/fc-tiny/tokenizer.json")),
    ("tokenizer_config.json", include_bytes!("../../assets/fc-tiny/tokenizer_config.json")),
    ("MANIFEST.json", include_bytes!("../../assets/fc-tiny/MANIFEST.json")),
];

/// Checks a `base` option: one of the two names.
pub fn check(base: &str) -> Result<()> {
    anyhow::ensure!(
        base == SHIPPED || base == SCRATCH,
        "unknown base `{base}`: `{SHIPPED}` (the shipped checkpoint) or `{SCRATCH}` (a fresh tiny model)"
    );
    Ok(())
}

/// Writes the shipped checkpoint to `dir` unless a complete copy is there, atomically.
pub fn write(dir: &Path) -> Result<()> {
    if FILES.iter().all(|(name, bytes)| std::fs::read(dir.join(name)).is_ok_and(|b| b == *bytes)) {
        return Ok(());
    }
    crate::model::save::write_dir(dir, |tmp| {
        FILES.iter().try_for_each(|(name, bytes)| {
            std::fs::write(tmp.join(name), bytes)
                .with_context(|| format!("cannot write {}", tmp.join(name).display()))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_files_load_as_a_model_with_its_tokenizer() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("base");
        write(&dir).unwrap();
        let m = crate::model::Model::load(&dir).unwrap();
        let tok = crate::model::tokenizer::Tokenizer::load(&dir).unwrap();
        assert_eq!(m.config.vocab_size, tok.vocab_size());
        // A damaged copy is replaced; a complete one is left as it is.
        std::fs::write(dir.join("model.safetensors"), b"damaged").unwrap();
        write(&dir).unwrap();
        assert_eq!(std::fs::read(dir.join("model.safetensors")).unwrap(), FILES[2].1);
        write(&dir).unwrap();
    }

    #[test]
    fn a_stray_file_where_the_base_belongs_is_replaced_without_leftovers() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("base-model");
        std::fs::write(&dir, b"junk").unwrap();
        write(&dir).unwrap();
        assert!(dir.join("model.safetensors").is_file());
        assert_eq!(
            std::fs::read_dir(d.path()).unwrap().count(),
            1,
            "a temporary or moved-aside file was left"
        );
    }

    #[test]
    fn an_unknown_base_is_refused_by_name() {
        let e = check("fc-huge").unwrap_err().to_string();
        assert!(e.contains("fc-huge") && e.contains(SHIPPED) && e.contains(SCRATCH), "{e}");
    }
}
