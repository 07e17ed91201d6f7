//! `config.json` of Qwen2/2.5, Qwen3 and Llama 3 checkpoints (transformers 4.x and 5.x).

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::ops::rope::Llama3Scaling;
use crate::tensor::DType;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Qwen2,
    Qwen3,
    Llama,
}

impl Arch {
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Llama => "llama",
        }
    }
}

#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub llama3_scaling: Option<Llama3Scaling>,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (always for Qwen2).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama/Qwen3 `attention_bias`).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Per-head RMSNorm of q and k before RoPE (Qwen3).
    pub qk_norm: bool,
    pub max_position_embeddings: usize,
    pub dtype: DType,
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    /// The file as read, written back on save with only the changed fields updated.
    pub raw: Value,
}

fn field<'a>(v: &'a Value, key: &str, file: &Path) -> Result<&'a Value> {
    v.get(key).with_context(|| format!("{}: missing field `{key}`", file.display()))
}

fn usize_field(v: &Value, key: &str, file: &Path) -> Result<usize> {
    field(v, key, file)?
        .as_u64()
        .map(|x| x as usize)
        .with_context(|| format!("{}: field `{key}` must be a non-negative integer", file.display()))
}

fn ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
        _ => vec![],
    }
}

/// Largest `config.json` or `generation_config.json` read (real ones are a few KB).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

impl ModelConfig {
    /// An error naming the first id of `ids` that the vocabulary does not have.
    pub fn check_ids(&self, ids: &[u32]) -> Result<()> {
        match ids.iter().find(|&&t| t as usize >= self.vocab_size) {
            Some(bad) => bail!("token id {bad} is outside the vocabulary of {}", self.vocab_size),
            None => Ok(()),
        }
    }

    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        let text = crate::runfs::read_capped(path, MAX_CONFIG_BYTES)?;
        let raw: Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
        Self::from_json(raw, path)
    }

    pub fn from_json(raw: Value, file: &Path) -> Result<ModelConfig> {
        let mt = field(&raw, "model_type", file)?.as_str().unwrap_or("");
        let arch = match mt {
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "llama" => Arch::Llama,
            other => bail!(
                "{}: unsupported architecture `model_type: {other}` (supported: qwen2, qwen3, llama)",
                file.display()
            ),
        };
        let hidden_size = usize_field(&raw, "hidden_size", file)?;
        let num_heads = usize_field(&raw, "num_attention_heads", file)?;
        let num_kv_heads =
            raw.get("num_key_value_heads").and_then(|v| v.as_u64()).map(|x| x as usize).unwrap_or(num_heads);
        let head_dim = match raw.get("head_dim").and_then(|v| v.as_u64()) {
            Some(d) => d as usize,
            None => hidden_size / num_heads.max(1),
        };
        if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 || head_dim % 2 != 0 {
            bail!("{}: inconsistent heads: {num_heads} attention heads, {num_kv_heads} kv heads, head_dim {head_dim}", file.display());
        }
        let (rope_theta, llama3_scaling) = rope(&raw, file)?;
        let attention_bias = raw.get("attention_bias").and_then(|v| v.as_bool()).unwrap_or(false);
        let dtype_name =
            raw.get("torch_dtype").or_else(|| raw.get("dtype")).and_then(|v| v.as_str()).unwrap_or("float32");
        let dtype = DType::from_hf_name(dtype_name)
            .with_context(|| format!("{}: unsupported dtype `{dtype_name}`", file.display()))?;
        let c = ModelConfig {
            arch,
            vocab_size: usize_field(&raw, "vocab_size", file)?,
            hidden_size,
            intermediate_size: usize_field(&raw, "intermediate_size", file)?,
            num_layers: usize_field(&raw, "num_hidden_layers", file)?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: raw.get("rms_norm_eps").and_then(|v| v.as_f64()).unwrap_or(1e-6) as f32,
            rope_theta,
            llama3_scaling,
            tie_word_embeddings: raw.get("tie_word_embeddings").and_then(|v| v.as_bool()).unwrap_or(false),
            qkv_bias: arch == Arch::Qwen2 || attention_bias,
            o_bias: arch != Arch::Qwen2 && attention_bias,
            mlp_bias: raw.get("mlp_bias").and_then(|v| v.as_bool()).unwrap_or(false),
            qk_norm: arch == Arch::Qwen3,
            max_position_embeddings: raw
                .get("max_position_embeddings")
                .and_then(|v| v.as_u64())
                .unwrap_or(32768) as usize,
            dtype,
            eos_token_ids: ids(raw.get("eos_token_id")),
            bos_token_id: ids(raw.get("bos_token_id")).first().copied(),
            raw,
        };
        c.validate(file)?;
        Ok(c)
    }

    /// Rejects sizes and numbers that cannot describe a working model, before anything is
    /// allocated: every dimension positive and bounded, the parameter count computed without
    /// overflow and at most [`MAX_PARAMETERS`], `rms_norm_eps` and `rope_theta` finite and
    /// positive. Errors name the file and the field.
    pub fn validate(&self, file: &Path) -> Result<()> {
        let f = file.display();
        for (name, v, max) in [
            ("vocab_size", self.vocab_size, MAX_DIM),
            ("hidden_size", self.hidden_size, MAX_DIM),
            ("intermediate_size", self.intermediate_size, MAX_DIM),
            ("num_hidden_layers", self.num_layers, MAX_LAYERS),
            ("num_attention_heads", self.num_heads, MAX_HEADS),
            ("num_key_value_heads", self.num_kv_heads, MAX_HEADS),
            ("head_dim", self.head_dim, MAX_DIM),
            ("max_position_embeddings", self.max_position_embeddings, MAX_DIM),
        ] {
            if v == 0 || v > max {
                bail!("{f}: `{name}` is {v}; it must be between 1 and {max}");
            }
        }
        if self.vocab_size > u32::MAX as usize {
            bail!("{f}: `vocab_size` {} does not fit 32-bit token ids", self.vocab_size);
        }
        let n = self.num_parameters().with_context(|| format!("{f}: the parameter count overflows"))?;
        if n > MAX_PARAMETERS {
            bail!("{f}: these sizes make {n} parameters, more than the {MAX_PARAMETERS} supported");
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0 && self.rms_norm_eps < 1.0) {
            bail!("{f}: `rms_norm_eps` is {}; it must be a finite number in (0, 1)", self.rms_norm_eps);
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            bail!("{f}: `rope_theta` is {}; it must be a finite positive number", self.rope_theta);
        }
        if let Some(s) = &self.llama3_scaling {
            for (k, v) in [
                ("factor", s.factor),
                ("low_freq_factor", s.low_freq_factor),
                ("high_freq_factor", s.high_freq_factor),
                ("original_max_position_embeddings", s.original_max_position_embeddings),
            ] {
                if !(v.is_finite() && v > 0.0) {
                    bail!("{f}: rope scaling `{k}` is {v}; it must be a finite positive number");
                }
            }
            if s.high_freq_factor == s.low_freq_factor {
                bail!(
                    "{f}: rope scaling `high_freq_factor` equals `low_freq_factor` ({}); they must differ",
                    s.low_freq_factor
                );
            }
        }
        Ok(())
    }

    /// The number of parameters these sizes describe (None on overflow), in the same layout
    /// as `Model::build`.
    pub fn num_parameters(&self) -> Option<u128> {
        let [v, h, i, l, hd] =
            [self.vocab_size, self.hidden_size, self.intermediate_size, self.num_layers, self.head_dim]
                .map(|x| x as u128);
        let qd = (self.num_heads as u128).checked_mul(hd)?;
        let kvd = (self.num_kv_heads as u128).checked_mul(hd)?;
        let bias = |on: bool, n: u128| if on { n } else { 0 };
        let attn = qd
            .checked_mul(h)?
            .checked_mul(2)?
            .checked_add(kvd.checked_mul(h)?.checked_mul(2)?)?
            .checked_add(bias(self.qkv_bias, qd + 2 * kvd))?
            .checked_add(bias(self.o_bias, h))?
            .checked_add(bias(self.qk_norm, 2 * hd))?;
        let mlp = i.checked_mul(h)?.checked_mul(3)?.checked_add(bias(self.mlp_bias, 2 * i + h))?;
        let layer = attn.checked_add(mlp)?.checked_add(2 * h)?;
        let embed = v.checked_mul(h)?.checked_mul(if self.tie_word_embeddings { 1 } else { 2 })?;
        layer.checked_mul(l)?.checked_add(embed)?.checked_add(h)
    }

    /// An error when this model's f32 weights alone would not fit in the machine's memory
    /// (`what` names the command), instead of an allocation abort.
    pub fn check_memory(&self, what: &str) -> Result<()> {
        let bytes = self.num_parameters().unwrap_or(u128::MAX).saturating_mul(4);
        if let Some(mem) = crate::runfs::physical_memory() {
            if bytes > mem {
                bail!(
                    "{what}: the model's f32 weights need {:.1} GiB; this machine has {:.1} GiB of memory",
                    bytes as f64 / (1u64 << 30) as f64,
                    mem as f64 / (1u64 << 30) as f64
                );
            }
        }
        Ok(())
    }
}

/// Bounds of `config.json` sizes (far above any released model; they keep arithmetic and
/// allocation sizes sane before anything else is checked).
const MAX_DIM: usize = 1 << 24;
const MAX_LAYERS: usize = 1 << 12;
const MAX_HEADS: usize = 1 << 12;
/// 10 trillion parameters.
pub const MAX_PARAMETERS: u128 = 10_000_000_000_000;

/// θ and Llama 3 scaling from `rope_theta` + `rope_scaling` (4.x) or `rope_parameters` (5.x).
fn rope(raw: &Value, file: &Path) -> Result<(f64, Option<Llama3Scaling>)> {
    let params = raw.get("rope_parameters").filter(|v| v.is_object());
    let theta = raw
        .get("rope_theta")
        .and_then(|v| v.as_f64())
        .or_else(|| params.and_then(|p| p.get("rope_theta")).and_then(|v| v.as_f64()))
        .unwrap_or(10000.0);
    let scaling = raw.get("rope_scaling").filter(|v| v.is_object()).or(params);
    let Some(s) = scaling else { return Ok((theta, None)) };
    let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(|v| v.as_str()).unwrap_or("default");
    match kind {
        "default" => Ok((theta, None)),
        "llama3" => {
            let num = |k: &str| -> Result<f32> {
                s.get(k)
                    .and_then(|v| v.as_f64())
                    .map(|x| x as f32)
                    .with_context(|| format!("{}: llama3 rope scaling needs `{k}`", file.display()))
            };
            Ok((
                theta,
                Some(Llama3Scaling {
                    factor: num("factor")?,
                    low_freq_factor: num("low_freq_factor")?,
                    high_freq_factor: num("high_freq_factor")?,
                    original_max_position_embeddings: num("original_max_position_embeddings")?,
                }),
            ))
        }
        other => bail!("{}: unsupported rope scaling `{other}` (supported: default, llama3)", file.display()),
    }
}
