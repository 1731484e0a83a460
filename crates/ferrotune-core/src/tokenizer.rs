//! `tokenizer.json` (through the `tokenizers` crate) and the special tokens ferrotune needs by name.
//!
//! Text is always encoded without adding special tokens: chat templates write `<|im_start|>` and friends
//! themselves, and the tokenizer's added-token matching turns them into single ids.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// A loaded tokenizer plus the ids of the tokens the templates and the model refer to.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl Tokenizer {
    /// Loads `<dir>/tokenizer.json` (or a `tokenizer.json` path given directly).
    pub fn from_path(path: &Path) -> Result<Self> {
        let file = if path.is_dir() { path.join("tokenizer.json") } else { path.to_path_buf() };
        if !file.exists() {
            bail!(
                "{}: no tokenizer.json; ferrotune reads Hugging Face fast tokenizers (tokenizer.json), \
                 which every Qwen checkpoint ships",
                file.display()
            );
        }
        let inner = tokenizers::Tokenizer::from_file(&file)
            .map_err(|e| anyhow::anyhow!("{}: cannot read tokenizer: {e}", file.display()))?;
        Ok(Self { inner, path: file })
    }

    /// Token ids of `text`, without special tokens added around it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| anyhow::anyhow!("tokenizing failed: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; `skip_special` drops special tokens such as `<|im_end|>`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| anyhow::anyhow!("detokenizing failed: {e}"))
    }

    /// The id of a token given by its text, e.g. `"<|im_end|>"`.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Like [`Tokenizer::token_id`], but an error naming the tokenizer file when the token is unknown.
    pub fn require_token(&self, token: &str) -> Result<u32> {
        self.token_id(token).with_context(|| format!("{}: the tokenizer has no token {token:?}", self.path.display()))
    }

    /// The text of one token id (special tokens included), if the id exists.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of ids the tokenizer knows (base vocabulary plus added tokens).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The underlying `tokenizers` object, for streaming decoders and the like.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
