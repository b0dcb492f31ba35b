//! A generation session: one KV cache reused across turns.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};
use serde::Serialize;

use crate::{
    Error, KvCache, Logits, LoraAdapter, Phi, PhiTokenizer, Result, Sampler, SamplerConfig,
};

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    /// Sampling settings.
    pub sampler: SamplerConfig,
    /// Stop after this many new tokens.
    pub max_new_tokens: usize,
    /// Stop (and cut the text) where one of these appears. `<|endoftext|>` always stops.
    pub stop: Vec<String>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            sampler: SamplerConfig::default(),
            max_new_tokens: 300,
            stop: Vec::new(),
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The model wrote `<|endoftext|>`.
    EndOfText,
    /// A stop string appeared.
    StopString,
    /// `max_new_tokens` was reached.
    MaxTokens,
    /// The context window is full.
    ContextFull,
    /// The cancel flag was set.
    Cancelled,
}

/// The result of one generation.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    /// The text, cut before any stop string.
    pub text: String,
    /// The generated token ids (the end-of-text token excluded).
    pub token_ids: Vec<u32>,
    /// Why it ended.
    pub stop_reason: StopReason,
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values were reused from the last turn.
    pub reused_tokens: usize,
    /// Time to compute the new prompt tokens and the first token's logits.
    #[serde(with = "secs")]
    pub prefill: Duration,
    /// Time for the rest of the tokens.
    #[serde(with = "secs")]
    pub decode: Duration,
}

mod secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

/// Prompt tokens run per forward pass; bounds the attention scores' memory.
const PREFILL_CHUNK: usize = 512;

/// Prompt tokens per forward pass for `model`. On x86 CPUs candle 0.11 runs
/// Q4_K matmuls of 32 rows or more through AMX tiles that it packs as a third
/// copy of every weight; measured on a 2-core AMX machine, 31-row chunks
/// prefill 1.5× faster at half the peak memory. Other types keep big chunks
/// (Q8_0: 512 rows are 1.3× faster than 31).
fn prefill_chunk(model: &Phi) -> usize {
    if model.device().is_cpu() && model.quant_type() == Some(candle_core::quantized::GgmlDType::Q4K)
    {
        31
    } else {
        PREFILL_CHUNK
    }
}

/// A model, a KV cache and the tokens it holds: each new prompt reuses the
/// longest common prefix with the last one and computes only the rest.
#[derive(Debug)]
pub struct Session {
    model: Arc<Phi>,
    cache: KvCache,
    /// The tokens whose keys and values are in `cache`.
    tokens: Vec<u32>,
    adapter: Option<Arc<LoraAdapter>>,
    prefill_chunk: usize,
}

impl Session {
    /// A session with an empty cache.
    pub fn new(model: Arc<Phi>) -> Self {
        let cache = model.new_cache();
        let prefill_chunk = prefill_chunk(&model);
        Self {
            model,
            cache,
            tokens: Vec::new(),
            adapter: None,
            prefill_chunk,
        }
    }

    /// The model.
    pub fn model(&self) -> &Arc<Phi> {
        &self.model
    }

    /// Uses `adapter` (or none) from now on; the cache is dropped if it changes.
    pub fn set_adapter(&mut self, adapter: Option<Arc<LoraAdapter>>) {
        let same = match (&self.adapter, &adapter) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        if !same {
            self.cache.clear();
            self.tokens.clear();
        }
        self.adapter = adapter;
    }

    /// Tokens currently cached.
    pub fn cached_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// Bytes held by the KV cache.
    pub fn cache_bytes(&self) -> usize {
        self.cache.bytes()
    }

    /// Computes `prompt` (reusing the cached prefix) and returns the logits
    /// that follow it, and how many tokens were reused.
    pub fn prefill(&mut self, prompt: &[u32]) -> Result<(Vec<f32>, usize)> {
        if prompt.is_empty() {
            return Err(Error::Invalid("the prompt is empty".into()));
        }
        let max = self.model.config().max_position_embeddings;
        if prompt.len() >= max {
            return Err(Error::Invalid(format!(
                "the prompt is {} tokens; the model's context holds {max}, and a reply needs room",
                prompt.len()
            )));
        }
        let common = self
            .tokens
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        // At least one token must run to get the next logits.
        let reuse = common.min(prompt.len() - 1);
        self.cache.truncate(reuse);
        self.tokens.truncate(reuse);
        let mut logits = None;
        for chunk in prompt[reuse..].chunks(self.prefill_chunk) {
            logits = Some(self.step(chunk)?);
        }
        Ok((logits.expect("at least one token ran"), reuse))
    }

    /// Runs `tokens` after the cache and returns the last position's logits.
    fn step(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let input = Tensor::new(tokens, self.model.device())?.unsqueeze(0)?;
        let out = match self.model.forward(
            &input,
            Some(&mut self.cache),
            Logits::Last,
            self.adapter.as_deref(),
        ) {
            Ok(out) => out,
            Err(e) => {
                // A failed step may have written some layers: keep the cache
                // consistent with `tokens` by dropping whatever it holds beyond.
                self.cache.truncate(self.tokens.len());
                return Err(e);
            }
        };
        self.tokens.extend_from_slice(tokens);
        Ok(out.squeeze(0)?.to_dtype(DType::F32)?.to_vec1()?)
    }

    /// Generates a reply to `prompt`, calling `on_text` with each new piece of
    /// text (whole characters only, stop strings never shown) until a stop
    /// condition or `cancel` is set.
    pub fn generate(
        &mut self,
        tokenizer: &PhiTokenizer,
        prompt: &[u32],
        params: &GenerateParams,
        cancel: &AtomicBool,
        mut on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        let started = Instant::now();
        let (mut logits, reused) = self.prefill(prompt)?;
        let prefill = started.elapsed();
        let decode_start = Instant::now();
        let mut sampler = Sampler::new(params.sampler.clone());
        let eos = tokenizer.eos_id();
        let mut stream = tokenizer.stream();
        let mut stops = StopScanner::new(&params.stop);
        let mut generated: Vec<u32> = Vec::new();
        let max_ctx = self.model.config().max_position_embeddings;
        let reason = loop {
            if cancel.load(Ordering::Relaxed) {
                break StopReason::Cancelled;
            }
            if generated.len() >= params.max_new_tokens {
                break StopReason::MaxTokens;
            }
            // The cached tokens are exactly the prompt and what was generated so far.
            let next = sampler.sample(&logits, &self.tokens);
            if Some(next) == eos {
                break StopReason::EndOfText;
            }
            generated.push(next);
            if let Some(piece) = stream.push(next)?
                && stops.feed(&piece, &mut on_text)
            {
                break StopReason::StopString;
            }
            if self.tokens.len() + 1 >= max_ctx {
                break StopReason::ContextFull;
            }
            logits = self.step(&[next])?;
        };
        if reason != StopReason::StopString {
            if let Some(rest) = stream.finish()? {
                stops.feed(&rest, &mut on_text);
            }
            stops.flush(&mut on_text);
        }
        Ok(Generation {
            text: stops.text,
            token_ids: generated,
            stop_reason: reason,
            prompt_tokens: prompt.len(),
            reused_tokens: reused,
            prefill,
            decode: decode_start.elapsed(),
        })
    }

    /// Runs one more token after the cached ones and returns the next logits.
    pub fn push(&mut self, token: u32) -> Result<Vec<f32>> {
        self.step(&[token])
    }

    /// Keeps only the first `len` cached tokens.
    pub fn truncate(&mut self, len: usize) {
        self.cache.truncate(len);
        self.tokens.truncate(len);
    }

    /// Forgets the cache (after an adapter change or to free memory).
    pub fn reset(&mut self) {
        self.cache.clear();
        self.tokens.clear();
    }
}

/// Finds stop strings in streamed text, holding back any tail that could be
/// the start of one so a stop string is never partly shown.
struct StopScanner<'a> {
    stops: &'a [String],
    /// Text released to the caller.
    text: String,
    /// Text held back.
    held: String,
}

impl<'a> StopScanner<'a> {
    fn new(stops: &'a [String]) -> Self {
        Self {
            stops,
            text: String::new(),
            held: String::new(),
        }
    }

    /// Adds a piece; releases what is safe; returns true at a stop string.
    fn feed(&mut self, piece: &str, out: &mut impl FnMut(&str)) -> bool {
        self.held.push_str(piece);
        let first_stop = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first_stop {
            let before = self.held[..at].to_owned();
            self.release(&before, out);
            self.held.clear();
            return true;
        }
        // Hold the longest tail that is a prefix of some stop string.
        let keep = self
            .stops
            .iter()
            .map(|s| {
                (1..s.len().min(self.held.len() + 1))
                    .rev()
                    .find(|&n| s.is_char_boundary(n) && self.held.ends_with(&s[..n]))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let now = self.held[..cut].to_owned();
        self.held.drain(..cut);
        self.release(&now, out);
        false
    }

    fn flush(&mut self, out: &mut impl FnMut(&str)) {
        let rest = std::mem::take(&mut self.held);
        self.release(&rest, out);
    }

    fn release(&mut self, s: &str, out: &mut impl FnMut(&str)) {
        if !s.is_empty() {
            self.text.push_str(s);
            out(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(stops: &[&str], pieces: &[&str]) -> (Vec<String>, String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut s = StopScanner::new(&stops);
        let mut shown = Vec::new();
        let mut stopped = false;
        for p in pieces {
            if s.feed(p, &mut |t| shown.push(t.to_owned())) {
                stopped = true;
                break;
            }
        }
        if !stopped {
            s.flush(&mut |t| shown.push(t.to_owned()));
        }
        (shown, s.text, stopped)
    }

    #[test]
    fn a_stop_string_split_across_pieces_is_never_shown() {
        let (shown, text, stopped) = scan(&["<|user|>"], &["Hello", " there<", "|us", "er|> more"]);
        assert!(stopped);
        assert_eq!(text, "Hello there");
        assert_eq!(shown.concat(), "Hello there");
        assert!(shown.iter().all(|p| !p.contains('<')));
    }

    #[test]
    fn a_false_start_is_released() {
        let (_, text, stopped) = scan(&["<|user|>"], &["a <", "b> c"]);
        assert!(!stopped);
        assert_eq!(text, "a <b> c");
    }

    #[test]
    fn earliest_stop_wins_and_multibyte_text_is_safe() {
        let (_, text, stopped) = scan(&["END", "</s>"], &["café 🌙</s>x END"]);
        assert!(stopped);
        assert_eq!(text, "café 🌙");
    }
}
