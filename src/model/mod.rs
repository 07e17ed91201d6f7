//! Transformer models from Hugging Face checkpoints: Qwen2/2.5, Qwen3 and Llama 3.

mod block;
pub mod checkpoint;
pub mod config;
pub mod decode;
pub mod decode_gpu;
pub mod kv_cache;
pub mod lora;
pub mod save;
pub mod tokenizer;
pub mod weights;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub use config::{Arch, ModelConfig};

use crate::ops::{self, RopeTable};
use crate::tensor::{Device, Tensor};

/// A linear layer in Hugging Face layout (`weight` `[out, in]`, optional `bias` `[out]`), with
/// an optional LoRA adapter added to its output (see [`lora`]).
#[derive(Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<lora::Adapter>,
}

impl Linear {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.lora {
            Some(a) => a.apply(x, &self.weight, self.bias.as_ref()),
            None => ops::linear(x, &self.weight, self.bias.as_ref()),
        }
    }
}

#[derive(Clone)]
pub struct Layer {
    pub input_norm: Tensor,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    pub post_norm: Tensor,
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

/// Packed sequences: token ids of all sequences back to back, each token's position, and each
/// sequence's (start, len) in the packed order. `prefix` (empty, or one entry per sequence)
/// names for a sequence an earlier one whose tokens precede it: its queries see all of that
/// sequence's keys, and its positions continue after it (see [`Batch::from_groups`]).
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub ids: Vec<u32>,
    pub positions: Vec<u32>,
    pub seqs: Vec<(usize, usize)>,
    pub prefix: Vec<Option<usize>>,
}

/// One prompt and the completions that follow it.
pub struct Group<'a> {
    pub prompt: &'a [u32],
    pub completions: Vec<&'a [u32]>,
}

impl Batch {
    pub fn from_sequences<S: AsRef<[u32]>>(seqs: &[S]) -> Batch {
        let mut b = Batch::default();
        for s in seqs {
            let s = s.as_ref();
            b.seqs.push((b.ids.len(), s.len()));
            b.ids.extend_from_slice(s);
            b.positions.extend(0..s.len() as u32);
        }
        b
    }

    /// Groups of completions sharing a prompt, each prompt computed once: per group, the prompt
    /// but its last token is one sequence, and each completion, led by the prompt's last token,
    /// is a sequence with that one as its prefix, positions continuing after it. A completion's
    /// rows then predict exactly what they predict in `prompt ++ completion`: the rows of
    /// sequence `i` (see [`Batch::prediction_rows`]) give the log-probs of its completion tokens.
    /// Sequences are ordered prompt, its completions, next prompt, ...; a one-token prompt has
    /// no prefix sequence. Every prompt needs at least one token.
    pub fn from_groups(groups: &[Group]) -> Result<Batch> {
        let mut b = Batch::default();
        for (gi, g) in groups.iter().enumerate() {
            let Some((&last, head)) = g.prompt.split_last() else {
                anyhow::bail!("group {gi}: an empty prompt");
            };
            let parent = (!head.is_empty()).then(|| {
                b.push(head, 0, None);
                b.seqs.len() - 1
            });
            for c in &g.completions {
                let mut ids = Vec::with_capacity(c.len() + 1);
                ids.push(last);
                ids.extend_from_slice(c);
                b.push(&ids, head.len() as u32, parent);
            }
        }
        if b.prefix.iter().all(Option::is_none) {
            b.prefix.clear();
        }
        Ok(b)
    }

    fn push(&mut self, ids: &[u32], first_pos: u32, prefix: Option<usize>) {
        self.seqs.push((self.ids.len(), ids.len()));
        self.ids.extend_from_slice(ids);
        self.positions.extend(first_pos..first_pos + ids.len() as u32);
        self.prefix.push(prefix);
    }

    /// The rows of sequence `i` that predict a token of it (all but its last).
    pub fn prediction_rows(&self, i: usize) -> std::ops::Range<usize> {
        let (s, l) = self.seqs[i];
        s..s + l.saturating_sub(1)
    }

    /// The next token of each position (0 where a sequence ends; such rows carry no loss).
    pub fn next_tokens(&self) -> Vec<u32> {
        let mut t = vec![0u32; self.ids.len()];
        for &(s, l) in &self.seqs {
            for i in 0..l.saturating_sub(1) {
                t[s + i] = self.ids[s + i + 1];
            }
        }
        t
    }

    /// 1 for rows that predict a token of their own sequence, else 0.
    pub fn target_mask(&self) -> Vec<f32> {
        let mut m = vec![0.0f32; self.ids.len()];
        for &(s, l) in &self.seqs {
            m[s..s + l.saturating_sub(1)].fill(1.0);
        }
        m
    }
}

#[derive(Clone)]
pub struct Model {
    pub config: ModelConfig,
    pub embed: Tensor,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    /// `None` when tied to the embedding.
    pub lm_head: Option<Tensor>,
    pub rope: RopeTable,
    /// Where it was loaded from (tokenizer and generation config live there).
    pub dir: Option<PathBuf>,
    /// Recompute each layer's forward in the backward pass instead of keeping its activations
    /// (`--checkpoint-activations layer`; see [`checkpoint`]).
    pub checkpoint_layers: bool,
}

impl Model {
    /// Every parameter with its checkpoint name, in a fixed order.
    pub fn named_params(&self) -> Vec<(String, Tensor)> {
        let mut v = Vec::new();
        self.visit(&mut |n, t| v.push((n.to_string(), t.clone())));
        v
    }

    fn visit(&self, f: &mut dyn FnMut(&str, &Tensor)) {
        let mut m = self.clone();
        m.visit_mut(&mut |n, t| f(n, t));
    }

    /// Calls `f` on every parameter with its checkpoint name (optimizer updates, loading).
    pub fn visit_mut(&mut self, f: &mut dyn FnMut(&str, &mut Tensor)) {
        f("model.embed_tokens.weight", &mut self.embed);
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            f(&format!("{p}.input_layernorm.weight"), &mut l.input_norm);
            f(&format!("{p}.post_attention_layernorm.weight"), &mut l.post_norm);
            for (name, lin) in [
                ("self_attn.q_proj", &mut l.q_proj),
                ("self_attn.k_proj", &mut l.k_proj),
                ("self_attn.v_proj", &mut l.v_proj),
                ("self_attn.o_proj", &mut l.o_proj),
                ("mlp.gate_proj", &mut l.gate_proj),
                ("mlp.up_proj", &mut l.up_proj),
                ("mlp.down_proj", &mut l.down_proj),
            ] {
                f(&format!("{p}.{name}.weight"), &mut lin.weight);
                if let Some(b) = lin.bias.as_mut() {
                    f(&format!("{p}.{name}.bias"), b);
                }
            }
            if let Some(t) = l.q_norm.as_mut() {
                f(&format!("{p}.self_attn.q_norm.weight"), t);
            }
            if let Some(t) = l.k_norm.as_mut() {
                f(&format!("{p}.self_attn.k_norm.weight"), t);
            }
        }
        f("model.norm.weight", &mut self.norm);
        if let Some(h) = self.lm_head.as_mut() {
            f("lm_head.weight", h);
        }
    }

    /// Where the parameters live.
    pub fn device(&self) -> Device {
        self.embed.device()
    }

    /// A copy with every parameter on `device` in its compute dtype: f32 on the cpu, bf16 on a
    /// GPU (cast on the host, then uploaded: half the bytes). Trainable parameters stay trainable.
    /// On a GPU the f32 master weights for training live in the optimizer (`AdamW::attach`).
    pub fn to_device(&self, device: Device) -> Result<Model> {
        self.to_device_as(device, device.compute_dtype())
    }

    /// [`Model::to_device`] with parameters stored as `dtype`. The GPU ops compute in their
    /// inputs' dtype, so f32 weights on a GPU run every op in f32, attention and the KV cache
    /// included: slower, and equal to the cpu up to f32 rounding.
    pub fn to_device_as(&self, device: Device, dtype: crate::tensor::DType) -> Result<Model> {
        let mut m = self.clone();
        let mut err = None;
        let mut mv = |name: &str, t: &mut Tensor| {
            if err.is_none() {
                match t.to_dtype(dtype).and_then(|c| c.to_device(device)) {
                    Ok(c) => *t = c,
                    Err(e) => err = Some(e.context(format!("moving `{name}` to {device}"))),
                }
            }
        };
        m.visit_mut(&mut mv);
        m.visit_adapters_mut(&mut mv);
        match err {
            Some(e) => Err(e),
            None => Ok(m),
        }
    }

    /// Marks every trainable parameter as trainable: with LoRA adapters, only the adapters (the
    /// base stays frozen: no gradient is computed for it); without, every parameter.
    pub fn requires_grad(&mut self) {
        if self.lora().is_some() {
            self.visit_mut(&mut |_, t| *t = t.detach());
        }
        self.visit_trainable_mut(&mut |_, t| *t = t.detach().requires_grad());
    }

    pub fn lm_head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Builds the model with parameters from `get(name, shape)`.
    pub fn build(
        config: ModelConfig,
        get: &mut dyn FnMut(&str, &[usize]) -> Result<Tensor>,
    ) -> Result<Model> {
        let c = &config;
        let (h, qd, kvd) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        type Get<'a> = dyn FnMut(&str, &[usize]) -> Result<Tensor> + 'a;
        fn linear(get: &mut Get, name: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
            Ok(Linear {
                weight: get(&format!("{name}.weight"), &[out, inp])?,
                bias: if bias { Some(get(&format!("{name}.bias"), &[out])?) } else { None },
                lora: None,
            })
        }
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let q_proj = linear(get, &format!("{p}.self_attn.q_proj"), qd, h, c.qkv_bias)?;
            let k_proj = linear(get, &format!("{p}.self_attn.k_proj"), kvd, h, c.qkv_bias)?;
            let v_proj = linear(get, &format!("{p}.self_attn.v_proj"), kvd, h, c.qkv_bias)?;
            let o_proj = linear(get, &format!("{p}.self_attn.o_proj"), h, qd, c.o_bias)?;
            let gate_proj = linear(get, &format!("{p}.mlp.gate_proj"), c.intermediate_size, h, c.mlp_bias)?;
            let up_proj = linear(get, &format!("{p}.mlp.up_proj"), c.intermediate_size, h, c.mlp_bias)?;
            let down_proj = linear(get, &format!("{p}.mlp.down_proj"), h, c.intermediate_size, c.mlp_bias)?;
            let (q_norm, k_norm) = if c.qk_norm {
                (
                    Some(get(&format!("{p}.self_attn.q_norm.weight"), &[c.head_dim])?),
                    Some(get(&format!("{p}.self_attn.k_norm.weight"), &[c.head_dim])?),
                )
            } else {
                (None, None)
            };
            layers.push(Layer {
                input_norm: get(&format!("{p}.input_layernorm.weight"), &[h])?,
                post_norm: get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                q_proj,
                k_proj,
                v_proj,
                o_proj,
                q_norm,
                k_norm,
                gate_proj,
                up_proj,
                down_proj,
            });
        }
        let embed = get("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let norm = get("model.norm.weight", &[h])?;
        let lm_head =
            if c.tie_word_embeddings { None } else { Some(get("lm_head.weight", &[c.vocab_size, h])?) };
        let rope = RopeTable::new(c.head_dim, c.rope_theta, c.llama3_scaling.as_ref());
        Ok(Model { config, embed, layers, norm, lm_head, rope, dir: None, checkpoint_layers: false })
    }

    /// [`Model::load`] onto `device`, weights stored as `dtype` (`bf16` or `f32`; default: the
    /// device's, f32 on the cpu and bf16 on a GPU). The cpu computes in f32 only.
    pub fn load_on(dir: &Path, device: Device, dtype: Option<&str>) -> Result<Model> {
        use crate::tensor::DType;
        let dtype = match dtype {
            None => device.compute_dtype(),
            Some(s) => match DType::from_hf_name(s) {
                Some(d @ DType::F32) => d,
                Some(d @ DType::BF16) if device.is_gpu() => d,
                _ => anyhow::bail!(
                    "--dtype {s}: {device} computes in {}",
                    if device.is_gpu() { "bf16 or f32" } else { "f32 only" }
                ),
            },
        };
        let model = Model::load(dir)?;
        if device.is_cpu() {
            return Ok(model);
        }
        model.to_device_as(device, dtype)
    }

    /// Loads `config.json` and the safetensors weights of a Hugging Face model directory.
    pub fn load(dir: &Path) -> Result<Model> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let files = weights::WeightFiles::open(dir)?;
        // Sizes far beyond what the files hold are an error before anything is allocated; a
        // near miss is left to the per-tensor checks, whose errors name the tensor.
        let need = config.num_parameters().unwrap_or(u128::MAX);
        if need > files.num_elements().saturating_mul(2) {
            anyhow::bail!(
                "{}: config.json describes {need} parameters but the safetensors files hold only {} values",
                dir.display(),
                files.num_elements()
            );
        }
        config.check_memory(&format!("loading {}", dir.display()))?;
        let mut model = Model::build(config, &mut |name, shape| files.load(name, shape))
            .with_context(|| format!("loading the model in {}", dir.display()))?;
        model.dir = Some(dir.to_path_buf());
        let gc_path = dir.join("generation_config.json");
        // Optional: absent is fine, but one that is there must read (a link to nothing, a FIFO,
        // a device or a failed read is an error naming it).
        if std::fs::symlink_metadata(&gc_path).is_ok() {
            let gc = crate::runfs::read_capped(&gc_path, config::MAX_CONFIG_BYTES)?;
            let v: serde_json::Value = serde_json::from_str(&gc).with_context(|| {
                format!("{}: not valid JSON", dir.join("generation_config.json").display())
            })?;
            let eos = match v.get("eos_token_id") {
                Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
                Some(serde_json::Value::Array(a)) => {
                    a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect()
                }
                _ => vec![],
            };
            if !eos.is_empty() {
                model.config.eos_token_ids = eos;
            }
        }
        Ok(model)
    }

    /// Random parameters: normal(0, 0.02) matrices, unit norms, zero biases (a fresh model).
    pub fn init_random(config: ModelConfig, seed: u64) -> Result<Model> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        Model::build(config, &mut |name, shape| {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else if name.ends_with(".bias") {
                vec![0.0; n]
            } else {
                // Box–Muller; avoids a distributions dependency for one use.
                (0..n)
                    .map(|_| {
                        let (u1, u2): (f32, f32) = (rng.random::<f32>().max(1e-12), rng.random());
                        0.02 * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
                    })
                    .collect()
            };
            Tensor::from_vec(data, shape)
        })
    }

    /// Final-norm hidden states `[tokens, hidden]` of a packed batch.
    pub fn hidden_states(&self, batch: &Batch) -> Result<Tensor> {
        let c = &self.config;
        // A sequence with a prefix continues its positions: its length in the model's context
        // is its last position + 1.
        if let Some(&p) = batch.positions.iter().max().filter(|&&p| p as usize >= c.max_position_embeddings) {
            anyhow::bail!(
                "a sequence of {} tokens exceeds the model's context (max_position_embeddings = {})",
                p as usize + 1,
                c.max_position_embeddings
            );
        }
        let x = if self.checkpoint_layers && crate::autograd::is_enabled() {
            checkpoint::layers_forward(self, batch)?
        } else {
            let mut attn = block::Packed { seqs: &batch.seqs, prefix: &batch.prefix };
            self.layers_forward(&batch.ids, &batch.positions, &mut attn)?
        };
        ops::rms_norm(&x, &self.norm, c.rms_norm_eps)
    }

    /// [`Model::token_logprobs`] at the given rows of the batch only, `[2, rows.len()]`: the LM
    /// head and the log-prob/entropy run on those rows alone (rows that carry a log-prob), and
    /// the gradient flows back to them alone.
    pub fn token_logprobs_at(&self, batch: &Batch, rows: &[usize], temperature: f32) -> Result<Tensor> {
        let h = self.hidden_states(batch)?;
        let n = batch.ids.len();
        if let Some(&r) = rows.iter().find(|&&r| r >= n) {
            anyhow::bail!("row {r} of a batch of {n} tokens");
        }
        let next = batch.next_tokens();
        let targets: Vec<u32> = rows.iter().map(|&r| next[r]).collect();
        // A row gather is an embedding lookup into h (its backward scatter-adds into h's rows).
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let h = ops::embedding(&h, &idx)?;
        ops::linear_logprob_entropy(&h, self.lm_head_weight(), &targets, temperature)
    }

    /// `[2, tokens]`: log p(next token) and next-token entropy at every position of the batch
    /// (rows where a sequence ends hold values for a dummy target; see `Batch::target_mask`).
    pub fn token_logprobs(&self, batch: &Batch, temperature: f32) -> Result<Tensor> {
        let h = self.hidden_states(batch)?;
        ops::linear_logprob_entropy(&h, self.lm_head_weight(), &batch.next_tokens(), temperature)
    }

    /// Mean next-token NLL over every predicted token of the batch (the fixtures' loss).
    pub fn nll_loss(&self, batch: &Batch) -> Result<Tensor> {
        let lp = self.token_logprobs(batch, 1.0)?;
        let mask = batch.target_mask();
        let count = mask.iter().sum::<f32>().max(1.0);
        let mut w: Vec<f32> = mask.iter().map(|m| -m / count).collect();
        w.extend(std::iter::repeat_n(0.0, mask.len()));
        ops::weighted_sum(&lp, &w)
    }
}
