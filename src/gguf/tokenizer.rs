//! The GGUF tokenizer (`tokenizer.ggml.model == "gpt2"`) rebuilt as a Hugging Face byte-level
//! BPE with the `tokenizers` crate, its pre-split following `tokenizer.ggml.pre` the way
//! llama.cpp does (llama-vocab.cpp) and the family's own tokenizer.json does upstream.

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value as Json};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use super::parse::{GgufFile, Value};

/// Llama 3's split (its tokenizer.json; llama.cpp's `llama-bpe`): numbers in groups of 3.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split (its tokenizer.json; llama.cpp's `qwen2`): digits one by one.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-split types supported, for error messages.
pub const SUPPORTED_PRE: &str = "smollm, llama-bpe, qwen2";

/// GGUF token types (llama.cpp's `llama_token_type`).
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

/// What tokenizer_config.json and config.json need besides the tokenizer itself.
pub struct TokenizerFiles {
    pub tokenizer: Tokenizer,
    pub vocab_size: usize,
    pub bos: Option<(u32, String)>,
    pub eos: Option<(u32, String)>,
    pub pad: Option<(u32, String)>,
    pub unk: Option<(u32, String)>,
    pub add_bos: bool,
    /// (id, content, special) of every added token.
    pub added: Vec<(u32, String, bool)>,
    pub chat_template: Option<String>,
}

fn str_array<'a>(g: &'a GgufFile, key: &str) -> Result<Vec<&'a str>> {
    let arr = g.get(key).and_then(Value::as_array).with_context(|| format!("missing array `{key}`"))?;
    arr.iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str().with_context(|| format!("`{key}`[{i}] is a {}, not a string", v.type_name()))
        })
        .collect()
}

fn bool_key(g: &GgufFile, key: &str, default: bool) -> Result<bool> {
    match g.get(key) {
        None => Ok(default),
        Some(v) => v.as_bool().with_context(|| format!("`{key}` is a {}, not a bool", v.type_name())),
    }
}

/// Builds the tokenizer from the GGUF metadata.
pub fn build(g: &GgufFile) -> Result<TokenizerFiles> {
    build_inner(g).context("rebuilding the tokenizer from the GGUF metadata")
}

fn build_inner(g: &GgufFile) -> Result<TokenizerFiles> {
    let model =
        g.get("tokenizer.ggml.model").and_then(Value::as_str).context("missing `tokenizer.ggml.model`")?;
    if model != "gpt2" {
        bail!("tokenizer model `{model}` is not supported (only `gpt2`, a byte-level BPE, is)");
    }
    let pre = g.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default");
    let tokens = str_array(g, "tokenizer.ggml.tokens")?;
    let merges = str_array(g, "tokenizer.ggml.merges")?;
    let types = token_types(g, tokens.len())?;
    // Later duplicates win, as in transformers' GGUF import (a dict built in id order).
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.to_string(), i as u32)).collect();
    let merges = merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let (a, b) = m
                .split_once(' ')
                .with_context(|| format!("merge {i} `{m}` has no space between its two parts"))?;
            Ok((a.to_string(), b.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(pre == "llama-bpe")
        .build()
        .map_err(|e| anyhow::anyhow!("cannot build the BPE model: {e}"))?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(pre_tokenizer(pre)?));
    if pre == "qwen2" {
        tok.with_normalizer(Some(NFC));
    }
    tok.with_decoder(Some(ByteLevel::default()));
    let special = |key: &str| -> Result<Option<(u32, String)>> {
        let Some(v) = g.get(key) else { return Ok(None) };
        let id = v.as_u64().with_context(|| format!("`{key}` is a {}, not a token id", v.type_name()))?;
        let t = tokens
            .get(id as usize)
            .with_context(|| format!("`{key}` is {id}, outside the {} tokens", tokens.len()))?;
        Ok(Some((id as u32, t.to_string())))
    };
    let (bos, eos) = (special("tokenizer.ggml.bos_token_id")?, special("tokenizer.ggml.eos_token_id")?);
    let (pad, unk) =
        (special("tokenizer.ggml.padding_token_id")?, special("tokenizer.ggml.unknown_token_id")?);
    let add_bos = bool_key(g, "tokenizer.ggml.add_bos_token", false)?;
    let add_eos = bool_key(g, "tokenizer.ggml.add_eos_token", false)?;
    tok.with_post_processor(Some(post_processor(add_bos.then_some(&bos), add_eos.then_some(&eos))?));
    let mut added = Vec::new();
    for (i, (&t, &ty)) in tokens.iter().zip(&types).enumerate() {
        if ty == TYPE_CONTROL || ty == TYPE_USER_DEFINED {
            added.push((i as u32, t.to_string(), ty == TYPE_CONTROL));
        }
    }
    let token = |special: bool| -> Vec<AddedToken> {
        let kept = added.iter().filter(|(_, _, s)| *s == special);
        kept.map(|(_, t, _)| AddedToken::from(t.clone(), special).normalized(false)).collect()
    };
    tok.add_special_tokens(&token(true));
    tok.add_tokens(&token(false));
    for (id, t, _) in &added {
        if tok.token_to_id(t) != Some(*id) {
            bail!("added token `{t}` (id {id}) does not keep its id in the rebuilt tokenizer (a duplicate token?)");
        }
    }
    let chat_template = match g.get("tokenizer.chat_template") {
        None => None,
        Some(v) => Some(v.as_str().context("`tokenizer.chat_template` is not a string")?.to_string()),
    };
    Ok(TokenizerFiles {
        tokenizer: tok,
        vocab_size: tokens.len(),
        bos,
        eos,
        pad,
        unk,
        add_bos,
        added,
        chat_template,
    })
}

fn token_types(g: &GgufFile, n: usize) -> Result<Vec<i64>> {
    let Some(v) = g.get("tokenizer.ggml.token_type") else {
        return Ok(vec![1; n]);
    };
    let arr = v.as_array().context("`tokenizer.ggml.token_type` is not an array")?;
    if arr.len() != n {
        bail!("`tokenizer.ggml.token_type` has {} entries for {n} tokens", arr.len());
    }
    arr.iter()
        .enumerate()
        .map(|(i, x)| {
            x.as_i64().with_context(|| format!("`tokenizer.ggml.token_type`[{i}] is not an integer"))
        })
        .collect()
}

/// The pre-tokenizer of `tokenizer.ggml.pre`, as the family's upstream tokenizer.json has it.
/// `smollm`: llama.cpp splits `\p{N}` first, then GPT-2's regex; upstream SmolLM2 does the same
/// with Digits(individual) + ByteLevel(use_regex).
fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper> {
    let split = |re: &str| -> Result<PreTokenizerWrapper> {
        let s = Split::new(SplitPattern::Regex(re.into()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| anyhow::anyhow!("bad split pattern: {e}"))?;
        Ok(s.into())
    };
    let parts: Vec<PreTokenizerWrapper> = match pre {
        "smollm" => vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()],
        "llama-bpe" => vec![split(LLAMA3_SPLIT)?, ByteLevel::new(false, true, false).into()],
        "qwen2" => vec![split(QWEN2_SPLIT)?, ByteLevel::new(false, false, false).into()],
        other => bail!(
            "`tokenizer.ggml.pre` is `{other}`, a pre-tokenizer this converter does not know (supported: {SUPPORTED_PRE})"
        ),
    };
    Ok(Sequence::new(parts).into())
}

/// BOS/EOS added around each sequence when the GGUF asks for them; otherwise the byte-level
/// post-processor that adds nothing.
fn post_processor(
    bos: Option<&Option<(u32, String)>>,
    eos: Option<&Option<(u32, String)>>,
) -> Result<tokenizers::PostProcessorWrapper> {
    let need = |x: Option<&Option<(u32, String)>>, what: &str| -> Result<Option<(u32, String)>> {
        match x {
            None => Ok(None),
            Some(None) => bail!("`tokenizer.ggml.add_{what}_token` is set but there is no {what} token id"),
            Some(Some(t)) => Ok(Some(t.clone())),
        }
    };
    let (bos, eos) = (need(bos, "bos")?, need(eos, "eos")?);
    if bos.is_none() && eos.is_none() {
        return Ok(ByteLevel::new(true, false, true).into());
    }
    let wrap = |seq: &str, type_id: u32| {
        let mut parts = Vec::new();
        if let Some((_, b)) = &bos {
            parts.push(format!("{b}:{type_id}"));
        }
        parts.push(format!("{seq}:{type_id}"));
        if let Some((_, e)) = &eos {
            parts.push(format!("{e}:{type_id}"));
        }
        parts.join(" ")
    };
    let specials: Vec<(String, u32)> = bos.iter().chain(eos.iter()).map(|(i, t)| (t.clone(), *i)).collect();
    let tp = TemplateProcessing::builder()
        .try_single(wrap("$A", 0))
        .and_then(|b| b.try_pair(format!("{} {}", wrap("$A", 0), wrap("$B", 1))))
        .map_err(|e| anyhow::anyhow!("bad post-processor template: {e}"))?
        .special_tokens(specials)
        .build()
        .map_err(|e| anyhow::anyhow!("bad post-processor: {e}"))?;
    Ok(tp.into())
}

/// tokenizer_config.json: special tokens, added tokens and the chat template.
pub fn config_json(t: &TokenizerFiles, max_length: u64) -> Json {
    let mut decoder = Map::new();
    for (id, content, special) in &t.added {
        decoder.insert(
            id.to_string(),
            json!({"content": content, "lstrip": false, "normalized": false, "rstrip": false,
                   "single_word": false, "special": special}),
        );
    }
    let mut c = Map::new();
    c.insert("add_bos_token".into(), t.add_bos.into());
    c.insert("add_prefix_space".into(), false.into());
    c.insert("added_tokens_decoder".into(), decoder.into());
    for (key, tok) in
        [("bos_token", &t.bos), ("eos_token", &t.eos), ("pad_token", &t.pad), ("unk_token", &t.unk)]
    {
        if let Some((_, s)) = tok {
            c.insert(key.into(), s.clone().into());
        }
    }
    if let Some(tpl) = &t.chat_template {
        c.insert("chat_template".into(), tpl.clone().into());
    }
    c.insert("clean_up_tokenization_spaces".into(), false.into());
    c.insert("model_max_length".into(), max_length.into());
    c.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
    c.into()
}
