//! Model assembly on random weights: save/load round trip, packing, gradients, clear errors.

use fcgpu::autograd::no_grad;
use fcgpu::model::{Batch, Model};
use fcgpu::tensor::DType;

mod model_common;

/// A random model whose norms and biases are off their init values too.
fn model(kind: &str, seed: u64) -> Model {
    model_common::model(kind, seed, 0.1, 0.1)
}

#[test]
fn save_load_round_trip_is_exact() {
    for kind in ["qwen2", "qwen3", "llama"] {
        let m = model(kind, 1);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("ckpt");
        m.save(&out, None).unwrap();
        let back = Model::load(&out).unwrap();
        let (a, b) = (m.named_params(), back.named_params());
        assert_eq!(a.len(), b.len(), "{kind}: parameter count");
        for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
            assert_eq!(na, nb);
            assert_eq!(ta.to_vec(), tb.to_vec(), "{kind}: {na} changed in the round trip");
        }
        // bf16: what is saved is exactly what loads back.
        m.save(&out, Some(DType::BF16)).unwrap();
        let back = Model::load(&out).unwrap();
        assert_eq!(back.config.dtype, DType::BF16);
        for ((n, ta), (_, tb)) in m.named_params().iter().zip(&back.named_params()) {
            let expect: Vec<f32> = ta.to_vec().iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
            assert_eq!(expect, tb.to_vec(), "{kind}: {n} in bf16");
        }
    }
}

#[test]
fn packed_batch_equals_separate_sequences() {
    let m = model("qwen3", 2);
    let seqs: Vec<Vec<u32>> = vec![vec![3, 9, 14, 2, 7], vec![5], vec![1, 60, 33]];
    let packed = no_grad(|| m.token_logprobs(&Batch::from_sequences(&seqs), 1.0)).unwrap().to_vec();
    let n = 9;
    let mut off = 0;
    for s in &seqs {
        let one = no_grad(|| m.token_logprobs(&Batch::from_sequences(&[s.clone()]), 1.0)).unwrap().to_vec();
        let l = s.len();
        for t in 0..l - 1 {
            assert!((packed[off + t] - one[t]).abs() < 1e-5, "logprob differs");
            assert!((packed[n + off + t] - one[l + t]).abs() < 1e-5, "entropy differs");
        }
        off += l;
    }
}

#[test]
fn model_gradient_matches_finite_differences() {
    for kind in ["qwen2", "qwen3", "llama"] {
        let mut m = model(kind, 3);
        m.requires_grad();
        let batch = Batch::from_sequences(&[vec![4u32, 8, 15, 16, 23, 42], vec![7, 1, 2]]);
        let loss = m.nll_loss(&batch).unwrap();
        let grads = loss.backward().unwrap();
        let params = m.named_params();
        for (name, p) in params
            .iter()
            .filter(|(n, _)| n.contains("layers.0") || n.contains("embed") || n.contains("model.norm"))
        {
            let g = grads.get(p).unwrap_or_else(|| panic!("{kind}: no gradient for {name}")).to_vec();
            let idx = (name.len() * 7) % p.numel();
            let eps = 1e-2f32;
            let eval = |delta: f32| -> f64 {
                let mut m2 = m.clone();
                m2.visit_mut(&mut |n, t| {
                    if n == name {
                        let mut v = t.to_vec();
                        v[idx] += delta;
                        t.replace_data(v).unwrap();
                    }
                });
                no_grad(|| m2.nll_loss(&batch)).unwrap().to_scalar().unwrap() as f64
            };
            let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps as f64);
            assert!(
                (g[idx] as f64 - numeric).abs() < 2e-3 + 2e-2 * numeric.abs(),
                "{kind}: {name}[{idx}] analytic {} vs numeric {numeric}",
                g[idx]
            );
        }
    }
}

#[test]
fn loading_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let err = Model::load(dir.path()).err().unwrap().to_string();
    assert!(err.contains("config.json"), "{err}");

    let m = model("qwen2", 4);
    let out = dir.path().join("m");
    m.save(&out, None).unwrap();
    let cfg_path = out.join("config.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();

    std::fs::write(&cfg_path, cfg.replace("\"qwen2\"", "\"gpt2\"")).unwrap();
    let err = format!("{:#}", Model::load(&out).err().unwrap());
    assert!(err.contains("unsupported architecture") && err.contains("gpt2"), "{err}");

    std::fs::write(&cfg_path, cfg.replace("\"intermediate_size\": 40", "\"intermediate_size\": 41")).unwrap();
    let err = format!("{:#}", Model::load(&out).err().unwrap());
    assert!(err.contains("mlp.gate_proj.weight") && err.contains("shape"), "{err}");

    std::fs::write(&cfg_path, cfg.replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 3")).unwrap();
    let err = format!("{:#}", Model::load(&out).err().unwrap());
    assert!(err.contains("model.layers.2."), "{err}");

    std::fs::write(&cfg_path, &cfg).unwrap();
    std::fs::write(out.join("model.safetensors"), b"not a safetensors file").unwrap();
    let err = format!("{:#}", Model::load(&out).err().unwrap());
    assert!(err.contains("model.safetensors") && err.contains("safetensors"), "{err}");
}

#[test]
fn adamw_matches_reference_and_clipping_scales() {
    use fcgpu::train::optim::{clip_factor, AdamW, AdamWConfig};
    let cfg = AdamWConfig { lr: 0.1, beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1 };
    let mut p = fcgpu::Tensor::from_vec(vec![1.0, -2.0], &[2]).unwrap().requires_grad();
    let mut opt = AdamW::default();
    let grads = [[0.5f32, -1.0], [0.1, 0.3]];
    let (mut m, mut v, mut x) = ([0.0f64; 2], [0.0f64; 2], [1.0f64, -2.0]);
    for (t, g) in grads.iter().enumerate() {
        opt.begin_step();
        opt.update(&cfg, cfg.lr, "p", &mut p, g).unwrap();
        for i in 0..2 {
            m[i] = 0.9 * m[i] + 0.1 * g[i] as f64;
            v[i] = 0.99 * v[i] + 0.01 * (g[i] as f64).powi(2);
            let (mh, vh) =
                (m[i] / (1.0 - 0.9f64.powi(t as i32 + 1)), v[i] / (1.0 - 0.99f64.powi(t as i32 + 1)));
            x[i] -= 0.1 * (mh / (vh.sqrt() + 1e-8) + 0.1 * x[i]);
        }
    }
    for (a, b) in p.to_vec().iter().zip(x) {
        assert!((*a as f64 - b).abs() < 1e-6, "{a} vs {b}");
    }
    assert!(p.tracks_grad(), "an updated parameter stays trainable");
    assert_eq!(clip_factor(0.5, 1.0), 1.0);
    assert!((clip_factor(4.0, 1.0) - 0.25).abs() < 1e-6);
}

/// Completions sharing their prompt ([`Batch::from_groups`], the prompt computed once) give the
/// log-probs, entropies and parameter gradients of `prompt ++ completion` scored unshared, on the
/// fixture models (Qwen2 with biases, Qwen3 with q/k norms, Llama 3 with its RoPE scaling), on the
/// cpu and on emu (the shared-prefix kernels through the model: f32 to f32 rounding, bf16 to bf16
/// rounding: bf16 holds ~0.4% relative, and the two orders of summation differ by about that).
#[test]
fn shared_prompt_batch_equals_unshared_sequences() {
    use fcgpu::model::Group;
    use fcgpu::tensor::Device;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
    let prompts: [&[u32]; 2] = [&[3, 9, 14, 2, 7, 11, 5], &[6]];
    let comps: [Vec<&[u32]>; 2] = [vec![&[4, 8, 15], &[16], &[23, 42, 1, 2, 3]], vec![&[19, 12]]];
    for (name, dev, dt, tol) in [
        ("qwen2-tiny", Device::Cpu, DType::F32, 1e-5),
        ("qwen3-tiny", Device::Cpu, DType::F32, 1e-5),
        ("llama-tiny-tf5", Device::Cpu, DType::F32, 1e-5),
        ("qwen3-tiny", Device::Emu, DType::F32, 1e-4),
        ("llama-tiny-tf5", Device::Emu, DType::BF16, 2e-2),
    ] {
        let mut m = Model::load(&root.join(name)).unwrap().to_device_as(dev, dt).unwrap();
        m.requires_grad();
        // Shared: only the completion rows.
        let groups: Vec<Group> =
            prompts.iter().zip(&comps).map(|(p, c)| Group { prompt: p, completions: c.clone() }).collect();
        let shared = Batch::from_groups(&groups).unwrap();
        assert_eq!(
            shared.prefix.iter().filter(|p| p.is_some()).count(),
            3,
            "{name}: the one-token prompt has no prefix"
        );
        // Sequence 0 is the first prompt (but its last token); the rest are completions.
        let rows: Vec<usize> = (1..shared.seqs.len()).flat_map(|i| shared.prediction_rows(i)).collect();
        // Unshared: every prompt ++ completion, and its completion rows.
        let mut seqs = Vec::new();
        let mut urows = Vec::new();
        let mut off = 0;
        for (p, cs) in prompts.iter().zip(&comps) {
            for c in cs {
                let s: Vec<u32> = p.iter().chain(c.iter()).copied().collect();
                urows.extend(off + p.len() - 1..off + s.len() - 1);
                off += s.len();
                seqs.push(s);
            }
        }
        assert_eq!(rows.len(), urows.len(), "{name}: one row per completion token");
        let unshared = Batch::from_sequences(&seqs);
        let lp_s = m.token_logprobs_at(&shared, &rows, 1.3).unwrap();
        let lp_u = m.token_logprobs(&unshared, 1.3).unwrap();
        let (vs, vu, (k, n)) = (lp_s.to_vec(), lp_u.to_vec(), (rows.len(), off));
        for (j, &r) in urows.iter().enumerate() {
            assert!(
                (vs[j] - vu[r]).abs() <= tol * (1.0 + vu[r].abs()),
                "{name} {dev}: log-prob of token {j}: {} vs {}",
                vs[j],
                vu[r]
            );
            let e = vu[n + r];
            assert!((vs[k + j] - e).abs() <= tol * (1.0 + e.abs()), "{name} {dev}: entropy of token {j}");
        }
        // A loss on log-probs and entropies: the same gradient for every parameter.
        let w: Vec<f32> = (0..2 * k).map(|i| ((i * 37 % 11) as f32 - 5.0) / 7.0).collect();
        let mut wu = vec![0.0f32; 2 * n];
        for (j, &r) in urows.iter().enumerate() {
            (wu[r], wu[n + r]) = (w[j], w[k + j]);
        }
        let gs = fcgpu::ops::weighted_sum(&lp_s, &w).unwrap().backward().unwrap();
        let gu = fcgpu::ops::weighted_sum(&lp_u, &wu).unwrap().backward().unwrap();
        for (pname, p) in m.named_params() {
            let (a, b) = (gs.get(&p).unwrap().to_vec(), gu.get(&p).unwrap().to_vec());
            let scale = b.iter().fold(0.0f32, |s, x| s.max(x.abs())).max(1e-3);
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= tol * 10.0 * scale, "{name} {dev}: gradient of {pname}: {x} vs {y}");
            }
        }
    }
}
