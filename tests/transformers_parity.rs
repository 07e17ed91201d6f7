//! The model against transformers: fixtures made by `tools/make_reference.py` (float64
//! references from tiny random checkpoints written by transformers 4.x and 5.x).

use std::path::{Path, PathBuf};

use fcgpu::autograd::no_grad;
use fcgpu::model::{tokenizer::Tokenizer, weights::load_all, Batch, Model};

fn fixture_dirs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("reference.safetensors").exists())
        .collect();
    v.sort();
    assert!(v.len() >= 5, "expected the reference fixtures in {}", root.display());
    v
}

fn ids(t: &fcgpu::Tensor) -> Vec<u32> {
    t.to_vec().iter().map(|&x| x as u32).collect()
}

fn sequences(r: &std::collections::BTreeMap<String, fcgpu::Tensor>) -> Vec<Vec<u32>> {
    (0..).map_while(|i| r.get(&format!("input_ids.{i}")).map(ids)).collect()
}

#[test]
fn logprobs_and_entropies_match_transformers() {
    for dir in fixture_dirs() {
        let model = Model::load(&dir).unwrap();
        let r = load_all(&dir.join("reference.safetensors")).unwrap();
        let seqs = sequences(&r);
        // Packed together, as the trainer runs them.
        let out = no_grad(|| model.token_logprobs(&Batch::from_sequences(&seqs), 1.0)).unwrap().to_vec();
        let n: usize = seqs.iter().map(|s| s.len()).sum();
        let mut off = 0;
        let mut worst = 0.0f32;
        for (i, s) in seqs.iter().enumerate() {
            let (lp, ent) = (r[&format!("logprobs.{i}")].to_vec(), r[&format!("entropy.{i}")].to_vec());
            assert_eq!(lp.len(), s.len().saturating_sub(1));
            for t in 0..lp.len() {
                worst = worst.max((out[off + t] - lp[t]).abs()).max((out[n + off + t] - ent[t]).abs());
            }
            off += s.len();
        }
        assert!(worst < 2e-4, "{}: max |Δ| {worst}", dir.display());
        eprintln!("{}: max |Δ logprob/entropy| = {worst:.2e}", dir.file_name().unwrap().to_string_lossy());
    }
}

#[test]
fn loss_and_every_gradient_match_transformers() {
    for dir in fixture_dirs() {
        let mut model = Model::load(&dir).unwrap();
        model.requires_grad();
        let r = load_all(&dir.join("reference.safetensors")).unwrap();
        let loss = model.nll_loss(&Batch::from_sequences(&sequences(&r))).unwrap();
        let expect = r["loss"].to_scalar().unwrap();
        assert!(
            (loss.to_scalar().unwrap() - expect).abs() < 1e-4,
            "{}: loss {} vs {expect}",
            dir.display(),
            loss.to_scalar().unwrap()
        );
        let grads = loss.backward().unwrap();
        let mut worst = 0.0f64;
        for (name, p) in model.named_params() {
            let reference = r
                .get(&format!("grad.{name}"))
                .unwrap_or_else(|| panic!("{}: no reference gradient for {name}", dir.display()))
                .to_vec();
            let g = grads.get(&p).map(|g| g.to_vec()).unwrap_or_else(|| vec![0.0; p.numel()]);
            let diff: f64 =
                g.iter().zip(&reference).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>().sqrt();
            let norm: f64 = reference.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().sqrt();
            let rel = diff / norm.max(1e-12);
            worst = worst.max(rel);
            assert!(rel < 1e-3, "{}: gradient of {name} off by {rel:.2e} relative", dir.display());
        }
        eprintln!(
            "{}: worst relative gradient error {worst:.2e}",
            dir.file_name().unwrap().to_string_lossy()
        );
    }
}

#[test]
fn tokenizer_matches_transformers() {
    for dir in fixture_dirs() {
        let tok = Tokenizer::load(&dir).unwrap();
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
        let texts = meta["texts"].as_array().unwrap();
        let expect = meta["text_ids"].as_array().unwrap();
        for (t, e) in texts.iter().zip(expect) {
            let e: Vec<u32> = e.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
            assert_eq!(tok.encode(t.as_str().unwrap(), false).unwrap(), e, "{}: {t}", dir.display());
        }
    }
}

#[test]
fn fixtures_cover_every_family_dtype_and_layout() {
    let dirs = fixture_dirs();
    let models: Vec<Model> = dirs.iter().map(|d| Model::load(d).unwrap()).collect();
    use fcgpu::model::Arch;
    for arch in [Arch::Qwen2, Arch::Qwen3, Arch::Llama] {
        assert!(models.iter().any(|m| m.config.arch == arch), "no {arch:?} fixture");
    }
    assert!(models.iter().any(|m| m.config.dtype == fcgpu::DType::BF16));
    assert!(models.iter().any(|m| m.config.llama3_scaling.is_some()));
    assert!(models.iter().any(|m| m.lm_head.is_none()) && models.iter().any(|m| m.lm_head.is_some()));
    assert!(dirs.iter().any(|d| d.join("model.safetensors.index.json").exists()), "no sharded fixture");
    assert!(
        models.iter().any(|m| m.config.raw.get("rope_parameters").is_some()),
        "no transformers 5.x config"
    );
}
