use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;

use crate::{Error, Result};

/// Phi-2's tokenizer (a GPT-2-style byte-level BPE from tokenizer.json).
#[derive(Debug, Clone)]
pub struct PhiTokenizer {
    inner: Tokenizer,
    path: PathBuf,
    eos: Option<u32>,
}

/// The end-of-text marker, Phi-2's only special token.
pub const END_OF_TEXT: &str = "<|endoftext|>";

impl PhiTokenizer {
    /// Reads a tokenizer.json.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let inner = Tokenizer::from_bytes(&bytes).map_err(|e| Error::Tokenizer {
            path: path.into(),
            message: format!("not a readable tokenizer.json: {e}"),
        })?;
        let eos = inner.token_to_id(END_OF_TEXT);
        Ok(Self {
            inner,
            path: path.into(),
            eos,
        })
    }

    /// The `<|endoftext|>` id, if the vocabulary has it.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Tokens in the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Checks every id this tokenizer can produce is a row of the model.
    pub fn check_fits(&self, model_vocab: usize) -> Result<()> {
        let max_id = self
            .inner
            .get_vocab(true)
            .values()
            .copied()
            .max()
            .unwrap_or(0) as usize;
        if max_id >= model_vocab {
            return Err(Error::Tokenizer {
                path: self.path.clone(),
                message: format!(
                    "this tokenizer has ids up to {max_id}, but the model's vocabulary has {model_vocab} rows: they do not belong together"
                ),
            });
        }
        Ok(())
    }

    /// Token ids of `text` (no special tokens added: Phi-2 uses no BOS).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| self.err(e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// How many tokens `text` takes.
    pub fn count(&self, text: &str) -> Result<usize> {
        Ok(self.encode(text)?.len())
    }

    /// The text of `ids` (bytes that are not yet valid UTF-8 become U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| self.err(e))
    }

    /// A decoder that turns tokens into text pieces as they arrive.
    pub fn stream(&self) -> TextStream<'_> {
        TextStream {
            tok: self,
            ids: Vec::new(),
            start: 0,
        }
    }

    fn err(&self, e: tokenizers::Error) -> Error {
        Error::Tokenizer {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }
}

/// Incremental decoding that never splits a UTF-8 character: a piece is
/// released only once its bytes form whole characters.
#[derive(Debug)]
pub struct TextStream<'a> {
    tok: &'a PhiTokenizer,
    ids: Vec<u32>,
    /// First token not yet released as text.
    start: usize,
}

/// Tokens a character may wait for before its bytes are given up as invalid.
const MAX_PENDING: usize = 4;

impl TextStream<'_> {
    /// Adds a token; returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = self.tok.decode(&self.ids[self.start..])?;
        let pending = self.ids.len() - self.start;
        if text.ends_with('\u{FFFD}') && pending < MAX_PENDING {
            return Ok(None);
        }
        // Release at this clean boundary; later decodes start from here.
        self.start = self.ids.len();
        Ok((!text.is_empty()).then_some(text))
    }

    /// Whatever is still held back (lossy), at the end of generation.
    pub fn finish(&mut self) -> Result<Option<String>> {
        let text = self.tok.decode(&self.ids[self.start..])?;
        self.start = self.ids.len();
        Ok((!text.is_empty()).then_some(text))
    }
}
