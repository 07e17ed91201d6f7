//! The model's `tokenizer.json`, through the tokenizers crate.

use std::path::Path;

use anyhow::Result;

/// Largest `tokenizer.json` read (the largest published ones are about 35 MB).
pub const MAX_TOKENIZER_BYTES: u64 = 128 << 20;

/// Bytes of text allowed per position of a model's context: byte-level BPE spends at least one
/// byte per token, and real text averages 3-5, so a text longer than this is far past the
/// context anyway. Refusing it before tokenizing keeps memory and time bounded (`logprobs`,
/// `generate` and `serve` all apply it).
pub const TEXT_BYTES_PER_POSITION: usize = 16;

/// The most bytes of text worth tokenizing for a context of `ctx` positions.
pub fn max_text_bytes(ctx: usize) -> usize {
    ctx.saturating_mul(TEXT_BYTES_PER_POSITION)
}

/// The longest JSON line worth reading for a context of `ctx` positions: its text, or its token
/// ids (at most ~11 bytes each), plus room for the field names.
pub fn max_line_bytes(ctx: usize) -> usize {
    ctx.saturating_mul(TEXT_BYTES_PER_POSITION.max(12)).saturating_add(64)
}

#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    pub fn load(dir: &Path) -> Result<Tokenizer> {
        let path = dir.join("tokenizer.json");
        anyhow::ensure!(path.exists(), "{}: missing tokenizer.json (needed to tokenize text)", dir.display());
        let text = crate::runfs::read_capped(&path, MAX_TOKENIZER_BYTES)?;
        let inner: tokenizers::Tokenizer =
            text.parse().map_err(|e| anyhow::anyhow!("{}: cannot load tokenizer: {e}", path.display()))?;
        Ok(Tokenizer { inner })
    }

    pub fn from_inner(inner: tokenizers::Tokenizer) -> Tokenizer {
        Tokenizer { inner }
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Ids of `text`; `special` adds what the tokenizer's post-processor adds (BOS for Llama 3),
    /// as transformers' `tokenizer(text)` does.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, special).map_err(|e| anyhow::anyhow!("tokenizing failed: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| anyhow::anyhow!("decoding failed: {e}"))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        self.inner.save(path, false).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
    }
}
