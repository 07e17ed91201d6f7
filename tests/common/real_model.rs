//! Where the real-model tests find SmolLM2-135M-Instruct (converted by
//! `scripts/get-model.sh smollm2-135m`): `$FCGPU_REAL_MODEL`, which must then hold it (the test
//! command sets it, so a missing model fails there), else
//! `${FCGPU_CACHE:-$HOME/.cache/fcgpu}/models/smollm2-135m`, skipped with a message when absent.

use std::path::PathBuf;

pub fn real_model_dir() -> Option<PathBuf> {
    let complete = |d: &PathBuf| {
        ["config.json", "model.safetensors", "tokenizer.json"].iter().all(|f| d.join(f).is_file())
    };
    if let Some(dir) = std::env::var_os("FCGPU_REAL_MODEL") {
        let dir = PathBuf::from(dir);
        assert!(
            complete(&dir),
            "FCGPU_REAL_MODEL={} holds no converted model (config.json, model.safetensors, tokenizer.json)",
            dir.display()
        );
        return Some(dir);
    }
    let cache = match std::env::var_os("FCGPU_CACHE") {
        Some(c) => PathBuf::from(c),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".cache/fcgpu"),
    };
    let dir = cache.join("models/smollm2-135m");
    if complete(&dir) {
        Some(dir)
    } else {
        eprintln!("skipped: run scripts/get-model.sh smollm2-135m (no model in {})", dir.display());
        None
    }
}
