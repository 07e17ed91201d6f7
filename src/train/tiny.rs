//! The embedded default model: a byte-level BPE tokenizer trained on the synthetic task and a
//! tiny Qwen2-architecture transformer initialised by the program, saved in Hugging Face layout.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use serde_json::json;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::SplitDelimiterBehavior;
use tokenizers::{AddedToken, TokenizerBuilder};

use crate::model::tokenizer::Tokenizer;
use crate::model::{Model, ModelConfig};

pub const ENDOFTEXT: &str = "<|endoftext|>";
pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";
pub const THINK: &str = "<think>";
pub const THINK_END: &str = "</think>";

/// Words, numbers and punctuation runs are pre-tokens, and so is every run of spaces. GPT-2's
/// pattern glues a leading space to the word (`ĠValmora`), so a value copied from the request
/// into a call (`city='Valmora'`) would become other tokens; with spaces apart a copied value
/// is the same token sequence in both places, which is what lets a small model copy values
/// it has never seen.
const PRE_TOKENS: &str = r"\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+|\s+";

/// Byte-level BPE with about `vocab_size` entries trained on `texts`, with the ChatML special
/// tokens and `<think>`/`</think>` as single added tokens.
pub fn train_tokenizer(texts: &[String], vocab_size: usize) -> Result<Tokenizer> {
    let split = Split::new(SplitPattern::Regex(PRE_TOKENS.into()), SplitDelimiterBehavior::Isolated, false)
        .map_err(|e| anyhow!("bad pre-tokenizer pattern: {e}"))?;
    let pre = Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]);
    let mut tk = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None::<NormalizerWrapper>)
        .with_pre_tokenizer(Some(pre))
        .with_post_processor(Some(ByteLevel::new(false, true, true)))
        .with_decoder(Some(ByteLevel::new(false, true, true)))
        .build()
        .map_err(|e| anyhow!("cannot build tokenizer: {e}"))?;
    let specials: Vec<AddedToken> =
        [ENDOFTEXT, IM_START, IM_END].iter().map(|t| AddedToken::from(t.to_string(), true)).collect();
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(2)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(specials)
        .build();
    tk.train(&mut trainer, texts.iter()).map_err(|e| anyhow!("tokenizer training failed: {e}"))?;
    let mut tk: tokenizers::Tokenizer = tk.into();
    tk.add_tokens(&[
        AddedToken::from(THINK.to_string(), false),
        AddedToken::from(THINK_END.to_string(), false),
    ]);
    Ok(Tokenizer::from_inner(tk))
}

/// Sizes of the tiny model.
#[derive(Clone, Copy, Debug)]
pub struct TinySize {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
}

impl TinySize {
    /// The default: ~1M parameters, learns the task on 2 CPU cores in minutes.
    pub const TINY: TinySize = TinySize { hidden: 128, layers: 4, heads: 4, kv_heads: 2, intermediate: 352 };
    /// ~2M parameters: twice the compute of `tiny` per token.
    pub const SMALL: TinySize = TinySize { hidden: 192, layers: 4, heads: 6, kv_heads: 3, intermediate: 512 };
    /// For tests: a few thousand parameters besides the embedding.
    pub const MICRO: TinySize = TinySize { hidden: 32, layers: 1, heads: 2, kv_heads: 1, intermediate: 64 };

    pub fn by_name(name: &str) -> Result<TinySize> {
        match name {
            "tiny" => Ok(Self::TINY),
            "small" => Ok(Self::SMALL),
            "micro" => Ok(Self::MICRO),
            other => anyhow::bail!("unknown model preset `{other}` (tiny, small, micro)"),
        }
    }
}

/// The Qwen2 `config.json` of the tiny model.
pub fn config_json(size: TinySize, vocab_size: usize, eos: u32, bos: u32) -> serde_json::Value {
    config_json_with(size, vocab_size, eos, bos, 10000.0)
}

/// [`config_json`] with RoPE θ `rope_theta`.
fn config_json_with(
    size: TinySize,
    vocab_size: usize,
    eos: u32,
    bos: u32,
    rope_theta: f64,
) -> serde_json::Value {
    json!({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": vocab_size,
        "hidden_size": size.hidden,
        "intermediate_size": size.intermediate,
        "num_hidden_layers": size.layers,
        "num_attention_heads": size.heads,
        "num_key_value_heads": size.kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": rope_theta,
        "tie_word_embeddings": true,
        "torch_dtype": "float32",
        "bos_token_id": bos,
        "eos_token_id": eos,
        "use_sliding_window": false,
    })
}

/// Writes a fresh tiny model with `tokenizer` to `dir` (config, weights, tokenizer.json,
/// tokenizer_config.json, generation_config.json with eos = `<|im_end|>`). With `copy_heads`
/// (and a shape that fits them) layers 0 and 1 start with a previous-token and an induction
/// head (`train::copy_heads`).
pub fn build(
    dir: &Path,
    tokenizer: &Tokenizer,
    size: TinySize,
    seed: u64,
    copy_heads: bool,
) -> Result<Model> {
    let id = |t: &str| tokenizer.token_id(t).with_context(|| format!("tokenizer lacks {t}"));
    let (eos, bos) = (id(IM_END)?, id(ENDOFTEXT)?);
    let wire =
        copy_heads && crate::train::copy_heads::fits(size.hidden, size.layers, size.heads, size.kv_heads);
    let theta = if wire { crate::train::copy_heads::ROPE_THETA } else { 10000.0 };
    let raw = config_json_with(size, tokenizer.vocab_size(), eos, bos, theta);
    let config = ModelConfig::from_json(raw, &dir.join("config.json"))?;
    let mut model = Model::init_random(config, seed)?;
    if wire {
        crate::train::copy_heads::wire(&mut model)?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    tokenizer.save(&dir.join("tokenizer.json"))?;
    let gen = json!({"bos_token_id": bos, "eos_token_id": [eos, bos], "do_sample": false});
    std::fs::write(dir.join("generation_config.json"), serde_json::to_string_pretty(&gen)? + "\n")?;
    let tc = json!({"model_max_length": 2048, "eos_token": IM_END, "pad_token": ENDOFTEXT, "bos_token": null,
        "tokenizer_class": "Qwen2Tokenizer", "chat_template": CHAT_TEMPLATE});
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&tc)? + "\n")?;
    model.dir = Some(dir.to_path_buf());
    model.save(dir, None)?;
    model.config.eos_token_ids = vec![eos, bos];
    Ok(model)
}

/// Plain ChatML (no tools logic: fcgpu renders tool prompts itself).
const CHAT_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
