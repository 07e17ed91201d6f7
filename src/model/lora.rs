//! LoRA adapters (Hu et al. 2021) in PEFT's layout: a target projection `y = W·x + b` becomes
//! `y = W·x + b + (alpha/r)·B·A·dropout(x)`, A `[r, in]`, B `[out, r]`. The base weights stay
//! frozen (no gradient, no optimizer state); only A and B train. The adapter is two small extra
//! `linear`s through the same ops as the base (so every device runs it with its own kernels),
//! never a merged copy of the weights.
//!
//! Files: `adapter_config.json` + `adapter_model.safetensors` with PEFT's key names
//! (`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`), so that
//! `peft.PeftModel.from_pretrained` loads what fcgpu writes and fcgpu loads what PEFT writes.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use super::{Linear, Model, ModelConfig};
use crate::ops;
use crate::tensor::{DType, Device, Tensor};

/// The projections an adapter can target, in the order of a layer.
pub const TARGETS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// PEFT's prefix in front of the base model's own parameter names.
const PEFT_PREFIX: &str = "base_model.model.";

/// Rank, scale numerator, dropout and target projections of the adapters (`[run.lora]` in a
/// training config; the `--lora-*` flags).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f32,
    #[serde(default)]
    pub dropout: f32,
    /// Names from [`TARGETS`], in that order, no repeats.
    #[serde(default = "all_targets")]
    pub targets: Vec<String>,
}

fn all_targets() -> Vec<String> {
    TARGETS.iter().map(|s| s.to_string()).collect()
}

impl LoraConfig {
    /// A checked config; `targets` is a comma-separated list of [`TARGETS`] names (or
    /// `all-linear`, PEFT's name for all of them).
    pub fn new(rank: usize, alpha: f32, dropout: f32, targets: &str) -> Result<LoraConfig> {
        let list: Vec<&str> = targets.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
        let cfg = LoraConfig { rank, alpha, dropout, targets: parse_targets(&list)? };
        cfg.check()?;
        Ok(cfg)
    }

    /// The checks of [`LoraConfig::new`] on a config read from a file (targets included).
    pub fn validate(&self) -> Result<()> {
        let names: Vec<&str> = self.targets.iter().map(String::as_str).collect();
        parse_targets(&names)?;
        self.check()
    }

    fn check(&self) -> Result<()> {
        ensure!(self.rank > 0, "LoRA rank 0: the rank must be at least 1");
        ensure!(
            self.alpha.is_finite() && self.alpha > 0.0,
            "LoRA alpha {}: must be a finite number above 0",
            self.alpha
        );
        ensure!(
            self.dropout.is_finite() && (0.0..1.0).contains(&self.dropout),
            "LoRA dropout {}: must be in [0, 1)",
            self.dropout
        );
        Ok(())
    }

    /// `alpha / rank`, the factor on `B·A·x`.
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }

    /// An error when a target projection of `c` is narrower than the rank (a rank above a
    /// layer's width adds parameters and no capacity; PEFT models never have one).
    pub fn check_model(&self, c: &ModelConfig) -> Result<()> {
        for t in &self.targets {
            let (out_f, in_f) = target_shape(c, t);
            ensure!(
                self.rank <= out_f.min(in_f),
                "LoRA rank {} is larger than {t}'s width ({out_f}x{in_f}: at most {})",
                self.rank,
                out_f.min(in_f)
            );
        }
        Ok(())
    }

    /// Parameters of the adapters on a model of shape `c`: `rank · (in + out)` per target and
    /// layer.
    pub fn params(&self, c: &ModelConfig) -> u64 {
        let per_layer: usize = self
            .targets
            .iter()
            .map(|t| {
                let (out_f, in_f) = target_shape(c, t);
                out_f + in_f
            })
            .sum();
        (per_layer * self.rank * c.num_layers) as u64
    }

    /// `adapter_config.json` as PEFT writes it for these adapters on the base in `base`.
    pub fn to_peft_json(&self, base: &str) -> Value {
        json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base,
            "r": self.rank,
            "lora_alpha": shortest(self.alpha),
            "lora_dropout": shortest(self.dropout),
            "target_modules": self.targets,
            "bias": "none",
            "fan_in_fan_out": false,
            "use_rslora": false,
            "use_dora": false,
            "modules_to_save": null,
            "layers_to_transform": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "init_lora_weights": true,
            "inference_mode": true
        })
    }

    /// Reads a PEFT `adapter_config.json`. Variants fcgpu does not compute (DoRA, rsLoRA, per-layer
    /// ranks, extra trained modules, trained biases) are errors naming the field.
    pub fn from_peft_file(path: &Path) -> Result<(LoraConfig, Option<String>)> {
        let text = crate::runfs::read_capped(path, super::config::MAX_CONFIG_BYTES)?;
        let v: Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
        let at = |what: String| format!("{}: {what}", path.display());
        let peft_type = v.get("peft_type").and_then(Value::as_str).unwrap_or("LORA");
        ensure!(peft_type == "LORA", at(format!("peft_type `{peft_type}`: fcgpu reads LORA adapters only")));
        let rank = v
            .get("r")
            .and_then(Value::as_u64)
            .with_context(|| at("field `r` must be a positive integer".into()))?;
        let alpha = v
            .get("lora_alpha")
            .and_then(Value::as_f64)
            .with_context(|| at("field `lora_alpha` must be a number".into()))?;
        let dropout = v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);
        // Fields of PEFT variants fcgpu does not compute: each must be at its default.
        let off = |x: &Value| match x {
            Value::Null | Value::Bool(false) => true,
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.is_empty(),
            _ => false,
        };
        let ok_list: [(&str, fn(&Value) -> bool); 13] = [
            ("use_dora", off),
            ("use_rslora", off),
            ("use_qalora", off),
            ("lora_bias", off),
            ("fan_in_fan_out", off),
            ("modules_to_save", off),
            ("layers_to_transform", off),
            ("layer_replication", off),
            ("trainable_token_indices", off),
            ("target_parameters", off),
            ("alora_invocation_tokens", off),
            ("rank_pattern", off),
            ("alpha_pattern", off),
        ];
        if let Some(b) = v.get("bias").filter(|b| !b.is_null() && *b != &json!("none")) {
            bail!(at(format!("`bias` = {b}: fcgpu supports plain LoRA only (bias \"none\")")));
        }
        for (key, ok) in ok_list {
            if let Some(x) = v.get(key) {
                ensure!(
                    ok(x),
                    at(format!("`{key}` = {x}: fcgpu supports plain LoRA only (this field at its default)"))
                );
            }
        }
        let targets: Vec<String> = match v.get("target_modules") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(str::to_string)
                        .with_context(|| at(format!("target_modules entry {x} is not a string")))
                })
                .collect::<Result<_>>()?,
            Some(Value::String(s)) => vec![s.clone()],
            _ => bail!(at("field `target_modules` must be a list of projection names".into())),
        };
        let names: Vec<&str> = targets.iter().map(String::as_str).collect();
        let cfg = LoraConfig {
            rank: rank as usize,
            alpha: alpha as f32,
            dropout: dropout as f32,
            targets: parse_targets(&names).with_context(|| at("target_modules".into()))?,
        };
        cfg.check().with_context(|| path.display().to_string())?;
        let base = v.get("base_model_name_or_path").and_then(Value::as_str).map(str::to_string);
        Ok((cfg, base))
    }
}

/// `x` as the f64 with its shortest decimal form (0.1, not 0.10000000149011612).
fn shortest(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(x as f64)
}

fn parse_targets(list: &[&str]) -> Result<Vec<String>> {
    if list == ["all-linear"] {
        return Ok(all_targets());
    }
    ensure!(!list.is_empty(), "no LoRA target: name some of {}", TARGETS.join(","));
    for t in list {
        ensure!(TARGETS.contains(t), "unknown LoRA target `{t}`: the targets are {}", TARGETS.join(","));
    }
    Ok(TARGETS.iter().filter(|t| list.contains(t)).map(|s| s.to_string()).collect())
}

/// `[out, in]` of target `t` in a model of config `c`.
fn target_shape(c: &ModelConfig, t: &str) -> (usize, usize) {
    let (h, qd, kvd, i) =
        (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size);
    match t {
        "q_proj" => (qd, h),
        "k_proj" | "v_proj" => (kvd, h),
        "o_proj" => (h, qd),
        "gate_proj" | "up_proj" => (i, h),
        _ => (h, i),
    }
}

/// What every adapter of one model shares: the config, whether adapters are on (off: the base
/// model, GRPO's reference policy), and the dropout stream.
#[derive(Debug)]
struct Shared {
    cfg: LoraConfig,
    enabled: AtomicBool,
    seed: u64,
    calls: AtomicU64,
}

/// The adapter of one projection: A `[r, in]`, B `[out, r]`.
#[derive(Clone)]
pub struct Adapter {
    pub a: Tensor,
    pub b: Tensor,
    shared: Arc<Shared>,
}

impl Adapter {
    /// A lone adapter (A `[r, in]`, B `[out, r]`) with its own on/off switch and dropout stream
    /// (tests of the op; models get theirs from [`Model::add_lora`] or [`Model::load_adapter`]).
    pub fn new(a: Tensor, b: Tensor, cfg: &LoraConfig, seed: u64) -> Adapter {
        let shared = Arc::new(Shared {
            cfg: cfg.clone(),
            enabled: AtomicBool::new(true),
            seed,
            calls: AtomicU64::new(0),
        });
        Adapter { a, b, shared }
    }

    /// Whether adapters are on (see [`Model::without_adapters`]).
    pub fn active(&self) -> bool {
        self.shared.enabled.load(Ordering::Relaxed)
    }

    /// `alpha / r`.
    pub fn scale(&self) -> f32 {
        self.shared.cfg.scale()
    }

    /// The adapted projection `x·Wᵀ + b + (alpha/r)·B·A·dropout(x)` ([`ops::lora_linear`]), or
    /// the base's `x·Wᵀ + b` while adapters are switched off. Dropout acts only in forwards that
    /// record a graph (training); rollouts, reference and eval run without.
    pub fn apply(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        let s = &self.shared;
        if !s.enabled.load(Ordering::Relaxed) {
            return ops::linear(x, w, b);
        }
        let p = s.cfg.dropout;
        let xd = if p > 0.0 && crate::autograd::is_enabled() {
            let call = s.calls.fetch_add(1, Ordering::Relaxed);
            Some(ops::mul(x, &dropout_mask(x, p, s.seed, call)?)?)
        } else {
            None
        };
        ops::lora_linear(x, xd.as_ref(), w, b, &self.a, &self.b, s.cfg.scale())
    }
}

/// Inverted dropout: each element kept with probability 1-p and scaled by 1/(1-p), from a
/// stream fixed by the seed and the call number: a fresh run is reproducible; a resumed one
/// starts the stream again (its masks differ from an uninterrupted run's). Drawn on the host
/// (one upload per target and forward on a GPU).
fn dropout_mask(like: &Tensor, p: f32, seed: u64, call: u64) -> Result<Tensor> {
    use rand::{Rng, SeedableRng};
    if like.device() == Device::Meta {
        // The same f32 upload as below with no values to draw (a calloc the upload never reads).
        return Tensor::from_vec_like(vec![0.0; like.numel()], like.shape(), like);
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ call.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let keep = 1.0 / (1.0 - p);
    let m: Vec<f32> = (0..like.numel()).map(|_| if rng.random::<f32>() < p { 0.0 } else { keep }).collect();
    Tensor::from_vec_like(m, like.shape(), like)
}

/// A tensor with a shape and no data on the meta device (`fcgpu plan`).
fn meta_tensor(dtype: DType, shape: &[usize]) -> Result<Tensor> {
    let dev = Device::Meta.gpu()?;
    let n = shape.iter().product();
    Tensor::from_gpu(crate::backend::storage::GpuStorage::uninit(&dev, dtype, n)?, shape)
}

/// The linear layers of layer `l` with their target names.
fn targets_of(l: &mut super::Layer) -> [(&'static str, &'static str, &mut Linear); 7] {
    [
        ("self_attn", "q_proj", &mut l.q_proj),
        ("self_attn", "k_proj", &mut l.k_proj),
        ("self_attn", "v_proj", &mut l.v_proj),
        ("self_attn", "o_proj", &mut l.o_proj),
        ("mlp", "gate_proj", &mut l.gate_proj),
        ("mlp", "up_proj", &mut l.up_proj),
        ("mlp", "down_proj", &mut l.down_proj),
    ]
}

impl Model {
    /// The adapters' config, `None` for a model without adapters.
    pub fn lora(&self) -> Option<LoraConfig> {
        self.layers
            .iter()
            .flat_map(|l| {
                [&l.q_proj, &l.k_proj, &l.v_proj, &l.o_proj, &l.gate_proj, &l.up_proj, &l.down_proj]
            })
            .find_map(|p| p.lora.as_ref().map(|a| a.shared.cfg.clone()))
    }

    /// New adapters on every target of every layer, initialised as PEFT does: A
    /// Kaiming-uniform (a = √5, i.e. U(−1/√in, 1/√in)), B zero, so the model starts as the base.
    /// `seed` fixes A and the dropout stream. Errors (rank, targets) come before any allocation.
    pub fn add_lora(&mut self, cfg: &LoraConfig, seed: u64) -> Result<()> {
        use rand::{Rng, SeedableRng};
        cfg.check()?;
        cfg.check_model(&self.config)?;
        ensure!(self.lora().is_none(), "the model already has LoRA adapters");
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut fresh = BTreeMap::new();
        let meta = self.device() == Device::Meta;
        for i in 0..self.layers.len() {
            for t in &cfg.targets {
                let (out_f, in_f) = target_shape(&self.config, t);
                if meta {
                    // No values to draw (a 7B plan would draw tens of millions, for nothing).
                    let dt = self.embed.dtype();
                    fresh.insert(
                        (i, t.clone()),
                        (meta_tensor(dt, &[cfg.rank, in_f])?, meta_tensor(dt, &[out_f, cfg.rank])?),
                    );
                    continue;
                }
                let bound = 1.0 / (in_f as f32).sqrt();
                let a: Vec<f32> = (0..cfg.rank * in_f).map(|_| rng.random_range(-bound..bound)).collect();
                fresh.insert(
                    (i, t.clone()),
                    (Tensor::from_vec(a, &[cfg.rank, in_f])?, Tensor::zeros(&[out_f, cfg.rank])),
                );
            }
        }
        self.set_adapters(cfg, seed, fresh)
    }

    /// Puts adapters `(A, B)` by (layer, target) on the model, on its device and in its weights'
    /// dtype; trainable when the model's parameters are.
    fn set_adapters(
        &mut self,
        cfg: &LoraConfig,
        seed: u64,
        mut ab: BTreeMap<(usize, String), (Tensor, Tensor)>,
    ) -> Result<()> {
        let shared = Arc::new(Shared {
            cfg: cfg.clone(),
            enabled: AtomicBool::new(true),
            seed,
            calls: AtomicU64::new(0),
        });
        let (device, dtype) = (self.device(), self.embed.dtype());
        for (i, l) in self.layers.iter_mut().enumerate() {
            for (_, t, lin) in targets_of(l) {
                lin.lora = match ab.remove(&(i, t.to_string())) {
                    None => None,
                    Some((a, b)) => Some(Adapter {
                        a: a.to_dtype(dtype)?.to_device(device)?,
                        b: b.to_dtype(dtype)?.to_device(device)?,
                        shared: shared.clone(),
                    }),
                };
            }
        }
        self.requires_grad();
        Ok(())
    }

    /// Calls `f` on every adapter matrix with its name (`model.layers.N.self_attn.q_proj.lora_A.weight`).
    pub fn visit_adapters_mut(&mut self, f: &mut dyn FnMut(&str, &mut Tensor)) {
        for (i, l) in self.layers.iter_mut().enumerate() {
            for (part, t, lin) in targets_of(l) {
                if let Some(ad) = lin.lora.as_mut() {
                    f(&format!("model.layers.{i}.{part}.{t}.lora_A.weight"), &mut ad.a);
                    f(&format!("model.layers.{i}.{part}.{t}.lora_B.weight"), &mut ad.b);
                }
            }
        }
    }

    /// The parameters a run trains: the adapters when the model has them, else every parameter.
    pub fn trainable_params(&self) -> Vec<(String, Tensor)> {
        let mut v = Vec::new();
        let mut m = self.clone();
        m.visit_trainable_mut(&mut |n, t| v.push((n.to_string(), t.clone())));
        v
    }

    /// [`Model::visit_mut`] over the trainable parameters only (see [`Model::trainable_params`]).
    pub fn visit_trainable_mut(&mut self, f: &mut dyn FnMut(&str, &mut Tensor)) {
        if self.lora().is_some() {
            self.visit_adapters_mut(f)
        } else {
            self.visit_mut(f)
        }
    }

    /// Runs `f` with the adapters switched off: the base model (GRPO's reference policy), with
    /// no second copy of the weights. Adapters are back on afterwards, also when `f` fails.
    pub fn without_adapters<T>(&self, f: impl FnOnce() -> T) -> T {
        let shared = self
            .layers
            .iter()
            .flat_map(|l| {
                [&l.q_proj, &l.o_proj, &l.gate_proj, &l.k_proj, &l.v_proj, &l.up_proj, &l.down_proj]
            })
            .find_map(|p| p.lora.as_ref().map(|a| a.shared.clone()));
        struct On(Option<Arc<Shared>>, bool);
        impl Drop for On {
            fn drop(&mut self) {
                if let Some(s) = &self.0 {
                    s.enabled.store(self.1, Ordering::Relaxed);
                }
            }
        }
        let prev = shared.as_ref().map(|s| s.enabled.swap(false, Ordering::Relaxed)).unwrap_or(true);
        let _on = On(shared, prev);
        f()
    }

    /// The adapters with PEFT's key names, on the cpu in f32.
    fn peft_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut m = self.clone();
        let mut v = Vec::new();
        m.visit_adapters_mut(&mut |n, t| v.push((format!("{PEFT_PREFIX}{n}"), t.clone())));
        v.into_iter()
            .map(|(n, t)| Ok((n, t.to_device(crate::tensor::Device::Cpu)?.to_dtype(DType::F32)?)))
            .collect()
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` (f32) into the existing
    /// directory `dir` (callers write into a temporary directory renamed into place).
    pub fn write_adapter_files(&self, dir: &Path) -> Result<()> {
        let cfg = self.lora().context("the model has no LoRA adapters to save")?;
        let base =
            self.dir.as_ref().map(|d| std::fs::canonicalize(d).unwrap_or(d.clone()).display().to_string());
        let json = serde_json::to_string_pretty(&cfg.to_peft_json(base.as_deref().unwrap_or("")))? + "\n";
        let tensors = self.peft_tensors()?;
        for (n, t) in &tensors {
            ensure!(
                t.f32s()?.iter().all(|x| x.is_finite()),
                "the adapter weight `{n}` is not all finite; the run diverged"
            );
        }
        super::weights::save(&dir.join(WEIGHTS_FILE), &tensors, DType::F32)?;
        crate::runfs::write_atomic(&dir.join(CONFIG_FILE), json.as_bytes())
    }

    /// The model a training run starts from: the base in `dir`, with fresh adapters when `lora`
    /// is given (their A drawn from `seed`).
    pub fn load_for_training(dir: &Path, lora: Option<&LoraConfig>, seed: u64) -> Result<Model> {
        if let Some(l) = lora {
            // Rank and targets against the base's shapes before its weights are read.
            l.check_model(&ModelConfig::from_file(&dir.join("config.json"))?)?;
        }
        let mut m = Model::load(dir)?;
        if let Some(l) = lora {
            m.add_lora(l, seed)?;
        }
        Ok(m)
    }

    /// [`Model::load_on`] with the PEFT adapter in `adapter` on it (on the same device, in the
    /// weights' dtype). The adapter's rank and targets are checked against the base's config
    /// before any weight is read.
    pub fn load_on_with_adapter(
        dir: &Path,
        adapter: Option<&Path>,
        device: crate::tensor::Device,
        dtype: Option<&str>,
    ) -> Result<Model> {
        let Some(ad) = adapter else { return Model::load_on(dir, device, dtype) };
        let (cfg, _) = LoraConfig::from_peft_file(&ad.join(CONFIG_FILE))?;
        cfg.check_model(&ModelConfig::from_file(&dir.join("config.json"))?)
            .with_context(|| format!("the adapter in {} on the model in {}", ad.display(), dir.display()))?;
        let mut m = Model::load_on(dir, device, dtype)?;
        m.load_adapter(ad)?;
        Ok(m)
    }

    /// The base named by the PEFT adapter in `dir` (its `base_model_name_or_path`, or `base`
    /// when given) with that adapter on it: a LoRA run's checkpoint.
    pub fn load_with_adapter(dir: &Path, base: Option<&Path>) -> Result<Model> {
        let cfg_path = dir.join(CONFIG_FILE);
        let (_, named) = LoraConfig::from_peft_file(&cfg_path)?;
        let base = match (base, named.as_deref()) {
            (Some(b), _) => b.to_path_buf(),
            (None, Some(n)) if !n.is_empty() => std::path::PathBuf::from(n),
            _ => bail!("{}: no `base_model_name_or_path`; name the base model", cfg_path.display()),
        };
        let mut m = Model::load(&base).with_context(|| format!("the base model of {}", dir.display()))?;
        m.load_adapter(dir)?;
        Ok(m)
    }

    /// Loads the PEFT adapter in `dir` onto this model (which must have none). Every expected
    /// key must be there with the shape this base gives it, and no other key: an adapter trained
    /// on another base is an error naming the first tensor that does not fit, before any compute.
    pub fn load_adapter(&mut self, dir: &Path) -> Result<()> {
        let (cfg, _) = LoraConfig::from_peft_file(&dir.join(CONFIG_FILE))?;
        cfg.check_model(&self.config).with_context(|| format!("the adapter in {}", dir.display()))?;
        let file = dir.join(WEIGHTS_FILE);
        let mut found = super::weights::load_all(&file)?;
        let mut ab = BTreeMap::new();
        for i in 0..self.config.num_layers {
            for t in &cfg.targets {
                let part = if ["q_proj", "k_proj", "v_proj", "o_proj"].contains(&t.as_str()) {
                    "self_attn"
                } else {
                    "mlp"
                };
                let (out_f, in_f) = target_shape(&self.config, t);
                let mut take = |which: &str, shape: [usize; 2]| -> Result<Tensor> {
                    let key = format!("{PEFT_PREFIX}model.layers.{i}.{part}.{t}.{which}.weight");
                    let t = found.remove(&key).with_context(|| {
                        format!("{}: missing tensor `{key}` (adapter_config.json names {t} with {} layers in the base)", file.display(), self.config.num_layers)
                    })?;
                    ensure!(t.shape() == shape, "{}: tensor `{key}` has shape {:?}, this base needs {:?} (an adapter for another model?)", file.display(), t.shape(), shape);
                    ensure!(
                        t.f32s()?.iter().all(|x| x.is_finite()),
                        "{}: tensor `{key}` has a non-finite value",
                        file.display()
                    );
                    Ok(t)
                };
                let a = take("lora_A", [cfg.rank, in_f])?;
                let b = take("lora_B", [out_f, cfg.rank])?;
                ab.insert((i, t.clone()), (a, b));
            }
        }
        if let Some(extra) = found.keys().next() {
            bail!("{}: tensor `{extra}` is not an adapter of this base's targets (an adapter for another model?)", file.display());
        }
        ensure!(self.lora().is_none(), "the model already has LoRA adapters");
        self.set_adapters(&cfg, 0, ab)
    }

    /// A plain model with every adapter folded in: `W + (alpha/r)·B·A` (f32, on the cpu).
    pub fn merged(&self) -> Result<Model> {
        crate::autograd::no_grad(|| self.merged_inner())
    }

    fn merged_inner(&self) -> Result<Model> {
        let mut m = self.to_device_as(crate::tensor::Device::Cpu, DType::F32)?;
        let Some(cfg) = m.lora() else { return Ok(m) };
        for l in m.layers.iter_mut() {
            for (_, _, lin) in targets_of(l) {
                if let Some(ad) = lin.lora.take() {
                    // (B·A) = linear(Aᵀ, B): rows of Aᵀ are the `in` inputs.
                    let at = transpose(&ad.a)?;
                    let ba_t = ops::linear(&at, &ad.b, None)?; // [in, out]
                    let delta = transpose(&ba_t)?;
                    let w: Vec<f32> = lin
                        .weight
                        .f32s()?
                        .iter()
                        .zip(delta.f32s()?)
                        .map(|(w, d)| w + cfg.scale() * d)
                        .collect();
                    lin.weight = Tensor::from_vec(w, lin.weight.shape())?;
                }
            }
        }
        Ok(m)
    }
}

/// The transpose of a 2-D cpu tensor (no graph).
fn transpose(t: &Tensor) -> Result<Tensor> {
    let (r, c) = (t.dim(0), t.dim(1));
    let v = t.f32s()?;
    let mut o = vec![0.0; r * c];
    for i in 0..r {
        for j in 0..c {
            o[j * r + i] = v[i * c + j];
        }
    }
    Tensor::from_vec(o, &[c, r])
}
