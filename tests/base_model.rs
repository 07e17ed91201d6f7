//! The shipped base checkpoint `fc-tiny` (assets/fc-tiny/) is what its documented recipe makes:
//! the files are the ones the manifest recorded, and a short run of the recipe
//! (configs/base-fc-tiny.toml, the first steps of `scripts/make-base.sh`) moves the way the
//! run that made it did.

use std::path::Path;

use fcgpu::tensor::Device;
use fcgpu::train::checkpoint::Start;
use fcgpu::train::sft::{load_config, Trainer};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn manifest() -> Value {
    let text = std::fs::read_to_string("assets/fc-tiny/MANIFEST.json").unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn the_shipped_files_are_the_ones_the_manifest_records() {
    let m = manifest();
    let sums = m["sha256"].as_object().unwrap();
    assert_eq!(sums.len(), 5);
    for (file, want) in sums {
        let bytes = std::fs::read(Path::new("assets/fc-tiny").join(file)).unwrap();
        let got: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            &got,
            want.as_str().unwrap(),
            "{file} differs from the manifest: re-run scripts/make-base.sh"
        );
    }
    let size = std::fs::metadata("assets/fc-tiny/model.safetensors").unwrap().len();
    assert!(size <= 4 << 20, "the shipped model must stay within 4 MiB, is {size} bytes");
}

#[test]
fn a_short_run_of_the_recipe_moves_like_the_run_that_made_the_base() {
    let want: Vec<f32> =
        manifest()["first_losses"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
    assert!(want.len() >= 20);
    let d = tempfile::tempdir().unwrap();
    let mut cfg = load_config(Some(Path::new("configs/base-fc-tiny.toml"))).unwrap();
    cfg.run.run_dir = d.path().join("base");
    cfg.run.eval_samples = 0;
    // The full step count keeps the recipe's learning-rate schedule; only the first steps run.
    let mut t = Trainer::new(cfg, Start::default(), Device::Cpu).unwrap();
    let mut got = Vec::new();
    for _ in 0..want.len() {
        got.push(t.step().unwrap().loss);
    }
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        // Same data, init and schedule: equal up to the machine's float summation order.
        assert!(
            (g - w).abs() <= 1e-2 * w.abs().max(1e-3),
            "step {}: loss {g} vs {w} when the base was made",
            i + 1
        );
    }
    assert!(got[got.len() - 1] < 0.5 * got[0], "the recipe no longer learns: {got:?}");
}
