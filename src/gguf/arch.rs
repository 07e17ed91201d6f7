//! Architectures: GGUF hyper-parameters to a Hugging Face config.json, and GGUF tensor names
//! to Hugging Face names and shapes, for `llama` and `qwen2`.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value as Json};

use super::parse::{GgufFile, TensorInfo, Value};

/// The architectures supported, for error messages.
pub const SUPPORTED_ARCH: &str = "llama, qwen2";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
}

/// The model's sizes, read from `<arch>.*` metadata.
#[derive(Clone, Debug)]
pub struct Hparams {
    pub arch: Arch,
    pub hidden: u64,
    pub layers: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    pub intermediate: u64,
    pub context: u64,
    pub rope_theta: f64,
    pub rms_eps: f64,
}

impl Arch {
    pub fn from_gguf(g: &GgufFile) -> Result<Arch> {
        let a = g
            .get("general.architecture")
            .and_then(Value::as_str)
            .context("missing `general.architecture`")?;
        match a {
            "llama" => Ok(Arch::Llama),
            "qwen2" => Ok(Arch::Qwen2),
            other => bail!("architecture `{other}` is not supported (supported: {SUPPORTED_ARCH})"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }
}

/// The shortest decimal that reads back as the same f32 (GGUF stores these as f32; config.json
/// then says `1e-05`, not `9.999999747378752e-06`).
fn f32_decimal(x: f64) -> f64 {
    (x as f32).to_string().parse().unwrap_or(x)
}

impl Hparams {
    pub fn read(g: &GgufFile, arch: Arch) -> Result<Hparams> {
        let p = arch.name();
        let int = |k: &str| -> Result<Option<u64>> {
            let key = format!("{p}.{k}");
            match g.get(&key) {
                None => Ok(None),
                Some(v) => match v.as_u64() {
                    Some(0) => bail!("`{key}` is 0"),
                    Some(x) if x <= 1 << 24 => Ok(Some(x)),
                    Some(x) => bail!("`{key}` is {x}, beyond any supported size"),
                    None => bail!(
                        "`{key}` is a {}, not one positive integer (per-layer values are not supported)",
                        v.type_name()
                    ),
                },
            }
        };
        let need = |k: &str| -> Result<u64> { int(k)?.with_context(|| format!("missing `{p}.{k}`")) };
        let float = |k: &str| -> Result<Option<f64>> {
            let key = format!("{p}.{k}");
            match g.get(&key) {
                None => Ok(None),
                Some(v) => match v.as_f64() {
                    Some(x) if x.is_finite() && x > 0.0 => Ok(Some(f32_decimal(x))),
                    _ => bail!("`{key}` must be a finite positive number"),
                },
            }
        };
        let hidden = need("embedding_length")?;
        let heads = need("attention.head_count")?;
        let kv_heads = int("attention.head_count_kv")?.unwrap_or(heads);
        if hidden % heads != 0 && int("attention.key_length")?.is_none() {
            bail!("`{p}.embedding_length` {hidden} is not a multiple of `{p}.attention.head_count` {heads}");
        }
        let head_dim = int("attention.key_length")?.unwrap_or(hidden / heads);
        if int("attention.value_length")?.is_some_and(|v| v != head_dim) {
            bail!("`{p}.attention.value_length` differs from the key length {head_dim}; not supported");
        }
        if int("rope.dimension_count")?.is_some_and(|r| r != head_dim) {
            bail!("`{p}.rope.dimension_count` is not the head size {head_dim}: partial rotary embeddings are not supported");
        }
        if heads % kv_heads != 0 || head_dim % 2 != 0 {
            bail!("inconsistent heads: {heads} attention heads, {kv_heads} kv heads, head size {head_dim}");
        }
        let scaling = g.get(&format!("{p}.rope.scaling.type")).and_then(Value::as_str).unwrap_or("none");
        if scaling != "none" {
            bail!("`{p}.rope.scaling.type` is `{scaling}`: rope scaling is not supported");
        }
        Ok(Hparams {
            arch,
            hidden,
            layers: need("block_count")?,
            heads,
            kv_heads,
            head_dim,
            intermediate: need("feed_forward_length")?,
            context: int("context_length")?.unwrap_or(4096),
            rope_theta: float("rope.freq_base")?.unwrap_or(10000.0),
            rms_eps: float("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-6),
        })
    }
}

/// Where one GGUF tensor goes.
#[derive(Clone, Debug)]
pub struct Mapped {
    pub hf_name: String,
    pub shape: Vec<usize>,
    /// llama.cpp interleaves the rotary halves of each Q/K head's rows
    /// (convert_hf_to_gguf's `permute`); this many heads are put back in Hugging Face order.
    pub unpermute_heads: Option<usize>,
}

/// The Hugging Face name and expected shape of every tensor the model needs, by GGUF name.
pub fn expected(h: &Hparams, vocab: u64, tied: bool) -> BTreeMap<String, Mapped> {
    let [hid, inter, qd, kvd] =
        [h.hidden, h.intermediate, h.heads * h.head_dim, h.kv_heads * h.head_dim].map(|x| x as usize);
    let llama = h.arch == Arch::Llama;
    let mut m = BTreeMap::new();
    let mut put = |g: String, hf: String, shape: Vec<usize>, heads: Option<u64>| {
        m.insert(g, Mapped { hf_name: hf, shape, unpermute_heads: heads.map(|x| x as usize) });
    };
    put("token_embd.weight".into(), "model.embed_tokens.weight".into(), vec![vocab as usize, hid], None);
    put("output_norm.weight".into(), "model.norm.weight".into(), vec![hid], None);
    if !tied {
        put("output.weight".into(), "lm_head.weight".into(), vec![vocab as usize, hid], None);
    }
    for i in 0..h.layers {
        let (b, p) = (format!("blk.{i}"), format!("model.layers.{i}"));
        let attn = [
            ("attn_q", "q_proj", qd, hid, Some(h.heads)),
            ("attn_k", "k_proj", kvd, hid, Some(h.kv_heads)),
            ("attn_v", "v_proj", kvd, hid, None),
            ("attn_output", "o_proj", hid, qd, None),
        ];
        for (g, hf, rows, cols, heads) in attn {
            put(
                format!("{b}.{g}.weight"),
                format!("{p}.self_attn.{hf}.weight"),
                vec![rows, cols],
                heads.filter(|_| llama),
            );
            if !llama && g != "attn_output" {
                put(format!("{b}.{g}.bias"), format!("{p}.self_attn.{hf}.bias"), vec![rows], None);
            }
        }
        for (g, hf, rows, cols) in [
            ("ffn_gate", "gate_proj", inter, hid),
            ("ffn_up", "up_proj", inter, hid),
            ("ffn_down", "down_proj", hid, inter),
        ] {
            put(format!("{b}.{g}.weight"), format!("{p}.mlp.{hf}.weight"), vec![rows, cols], None);
        }
        put(format!("{b}.attn_norm.weight"), format!("{p}.input_layernorm.weight"), vec![hid], None);
        put(format!("{b}.ffn_norm.weight"), format!("{p}.post_attention_layernorm.weight"), vec![hid], None);
    }
    m
}

/// Pairs each GGUF tensor with where it goes: every expected tensor present with its shape,
/// nothing left over (a tensor this converter would drop is an error, never a silent loss).
pub fn plan<'a>(
    tensors: &'a [TensorInfo],
    expected: &BTreeMap<String, Mapped>,
) -> Result<Vec<(&'a TensorInfo, Mapped)>> {
    let mut out = Vec::with_capacity(expected.len());
    for t in tensors {
        let Some(m) = expected.get(&t.name) else {
            let why = if t.name == "rope_freqs.weight" {
                " (Llama 3.1-style rope scaling is not supported)"
            } else {
                ""
            };
            bail!("tensor `{}` has no place in the model{why}", t.name);
        };
        if t.shape() != m.shape {
            bail!("tensor `{}` has shape {:?}, expected {:?} from the metadata", t.name, t.shape(), m.shape);
        }
        if t.nbytes.is_none() {
            bail!(
                "tensor `{}` has type {}, which this converter does not dequantize (supported: {})",
                t.name,
                t.ggml_type,
                super::types::GgmlType::supported_names()
            );
        }
        out.push((t, m.clone()));
    }
    if out.len() < expected.len() {
        let present: std::collections::HashSet<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
        if let Some(missing) = expected.keys().find(|k| !present.contains(k.as_str())) {
            bail!("tensor `{missing}` is missing");
        }
    }
    Ok(out)
}

/// config.json in transformers' layout, from the hyper-parameters and the tokenizer's ids.
pub fn config_json(h: &Hparams, vocab: u64, tied: bool, ids: &SpecialIds, dtype: &str) -> Json {
    let mut c = json!({
        "architectures": [match h.arch { Arch::Llama => "LlamaForCausalLM", Arch::Qwen2 => "Qwen2ForCausalLM" }],
        "model_type": h.arch.name(),
        "attention_dropout": 0.0,
        "head_dim": h.head_dim,
        "hidden_act": "silu",
        "hidden_size": h.hidden,
        "initializer_range": 0.02,
        "intermediate_size": h.intermediate,
        "max_position_embeddings": h.context,
        "num_attention_heads": h.heads,
        "num_hidden_layers": h.layers,
        "num_key_value_heads": h.kv_heads,
        "rms_norm_eps": h.rms_eps,
        "rope_scaling": null,
        "rope_theta": h.rope_theta,
        "tie_word_embeddings": tied,
        "torch_dtype": dtype,
        "use_cache": true,
        "vocab_size": vocab,
    });
    let o = c.as_object_mut().expect("an object");
    match h.arch {
        Arch::Llama => {
            o.insert("attention_bias".into(), false.into());
            o.insert("mlp_bias".into(), false.into());
        }
        Arch::Qwen2 => {
            o.insert("use_sliding_window".into(), false.into());
            o.insert("sliding_window".into(), h.context.into());
            o.insert("max_window_layers".into(), h.layers.into());
        }
    }
    ids.insert_into(o);
    c
}

/// bos/eos/pad ids for config.json and generation_config.json.
#[derive(Clone, Debug, Default)]
pub struct SpecialIds {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub pad: Option<u32>,
}

impl SpecialIds {
    pub fn insert_into(&self, o: &mut serde_json::Map<String, Json>) {
        for (k, v) in [("bos_token_id", self.bos), ("eos_token_id", self.eos), ("pad_token_id", self.pad)] {
            if let Some(id) = v {
                o.insert(k.into(), id.into());
            }
        }
    }
}
