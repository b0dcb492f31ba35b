//! From text rows to training examples: tokenized, truncated, masked,
//! split into train and eval, and batched by length.

use dramatis_llm::PhiTokenizer;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Which tokens the loss counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossOn {
    /// Every token (the seed recipe).
    #[default]
    All,
    /// Only the character's turns: `<|assistant|>` up to and including its `</s>`.
    AssistantOnly,
}

/// How rows become examples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DataOptions {
    /// Longest example in tokens; longer rows keep their first `max_len` tokens.
    pub max_len: usize,
    /// Which tokens count.
    pub loss_on: LossOn,
    /// Share of rows held out for eval loss.
    pub eval_fraction: f64,
    /// Use only the first N rows (the seed recipe uses 1000).
    pub limit: Option<usize>,
    /// Seeds the split and the order.
    pub seed: u64,
}

impl Default for DataOptions {
    fn default() -> Self {
        Self {
            max_len: 2048,
            loss_on: LossOn::All,
            eval_fraction: 0.05,
            limit: None,
            seed: 42,
        }
    }
}

impl DataOptions {
    /// Refuses a length or eval share no run can use.
    fn check(&self) -> Result<()> {
        if self.max_len < 8 {
            return Err(Error::Config(
                "the maximum length must be at least 8 tokens".into(),
            ));
        }
        if !(0.0..0.5).contains(&self.eval_fraction) {
            return Err(Error::Config(
                "the eval share must be between 0 and 0.5".into(),
            ));
        }
        Ok(())
    }
}

/// One tokenized row.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Tokens, ending with `<|endoftext|>` unless truncated.
    pub ids: Vec<u32>,
    /// For each position t < len-1: whether predicting `ids[t+1]` counts.
    pub weights: Vec<f32>,
    /// The row it came from, as the reader numbers them (1-based; JSONL: the line).
    pub row: usize,
}

/// What preparation found, shown before training starts.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DataReport {
    /// Rows offered (after `limit`).
    pub rows: usize,
    /// Rows used.
    pub used: usize,
    /// Rows cut to `max_len`.
    pub truncated: usize,
    /// Rows with no text.
    pub empty: usize,
    /// Rows the reader could not use (bad JSON, missing column...).
    pub malformed: usize,
    /// Tokens in all used rows.
    pub tokens: usize,
    /// Longest used row in tokens (after truncation).
    pub longest: usize,
    /// Rows for training.
    pub train_rows: usize,
    /// Rows held out for eval.
    pub eval_rows: usize,
}

/// Examples ready for training.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Training examples.
    pub train: Vec<Example>,
    /// Held-out examples.
    pub eval: Vec<Example>,
    /// The report.
    pub report: DataReport,
}

const ASSISTANT: &str = "<|assistant|>";
const END: &str = "</s>";

/// Splits a row into (text, counts) segments for assistant-only loss.
fn segments(text: &str) -> Vec<(&str, bool)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(ASSISTANT) {
        out.push((&rest[..start], false));
        let after = &rest[start..];
        let end = after[ASSISTANT.len()..]
            .find(END)
            .map_or(after.len(), |e| ASSISTANT.len() + e + END.len());
        out.push((&after[..end], true));
        rest = &after[end..];
    }
    out.push((rest, false));
    out.retain(|(s, _)| !s.is_empty());
    out
}

fn tokenize(tok: &PhiTokenizer, text: &str, loss_on: LossOn) -> Result<(Vec<u32>, Vec<bool>)> {
    Ok(match loss_on {
        LossOn::All => {
            let ids = tok.encode(text)?;
            let n = ids.len();
            (ids, vec![true; n])
        }
        LossOn::AssistantOnly => {
            let mut ids = Vec::new();
            let mut mask = Vec::new();
            for (seg, counts) in segments(text) {
                let s = tok.encode(seg)?;
                mask.extend(std::iter::repeat_n(counts, s.len()));
                ids.extend(s);
            }
            (ids, mask)
        }
    })
}

/// Tokenizes `texts` (row number, text), reports, and splits.
/// `malformed` is how many rows the reader already rejected.
pub fn prepare(
    texts: &[(usize, String)],
    malformed: usize,
    tok: &PhiTokenizer,
    opts: &DataOptions,
) -> Result<Prepared> {
    opts.check()?;
    let texts = &texts[..opts.limit.unwrap_or(texts.len()).min(texts.len())];
    let eos = tok
        .eos_id()
        .ok_or_else(|| Error::Config("the tokenizer has no <|endoftext|> token".into()))?;
    let mut report = DataReport {
        rows: texts.len(),
        malformed,
        ..DataReport::default()
    };
    let mut all = Vec::new();
    for &(row, ref text) in texts {
        if text.trim().is_empty() {
            report.empty += 1;
            continue;
        }
        let (mut ids, mut mask) = tokenize(tok, text, opts.loss_on)?;
        ids.push(eos);
        mask.push(true);
        if ids.len() > opts.max_len {
            ids.truncate(opts.max_len);
            mask.truncate(opts.max_len);
            report.truncated += 1;
        }
        if ids.len() < 2 || !mask[1..].iter().any(|&m| m) {
            report.empty += 1;
            continue;
        }
        report.tokens += ids.len();
        report.longest = report.longest.max(ids.len());
        let weights = mask[1..].iter().map(|&m| f32::from(u8::from(m))).collect();
        all.push(Example { ids, weights, row });
    }
    report.used = all.len();
    if all.is_empty() {
        return Err(Error::EmptyDataset(format!(
            "{} rows: {} empty, {} malformed",
            report.rows, report.empty, report.malformed
        )));
    }
    let (train, eval) = split(all, opts.eval_fraction, opts.seed);
    report.train_rows = train.len();
    report.eval_rows = eval.len();
    Ok(Prepared {
        train,
        eval,
        report,
    })
}

/// Splits `all` into (train, eval) by a seeded shuffle: `fraction` of the
/// items, at least one where there are two or more, held out.
fn split<T>(all: Vec<T>, fraction: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    let mut order: Vec<usize> = (0..all.len()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let n_eval = if fraction == 0.0 || all.len() < 2 {
        0
    } else {
        ((all.len() as f64 * fraction).round() as usize).clamp(1, all.len() - 1)
    };
    let mut slots: Vec<Option<T>> = all.into_iter().map(Some).collect();
    let eval: Vec<T> = order[..n_eval]
        .iter()
        .map(|&i| slots[i].take().expect("each index once"))
        .collect();
    (slots.into_iter().flatten().collect(), eval)
}

/// A preference pair as text: the prompt the replies answer (ending where
/// the reply begins) and the preferred and passed-over replies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairText {
    /// The prompt, in the chat format, up to the reply.
    pub prompt: String,
    /// The preferred reply.
    pub chosen: String,
    /// The passed-over reply.
    pub rejected: String,
}

/// A tokenized pair: the replies end with `</s>`, as chat stops there.
#[derive(Debug, Clone, PartialEq)]
pub struct PairExample {
    /// The prompt's tokens (its start cut off when the pair was too long).
    pub prompt: Vec<u32>,
    /// The preferred reply's tokens.
    pub chosen: Vec<u32>,
    /// The passed-over reply's tokens.
    pub rejected: Vec<u32>,
}

impl PairExample {
    /// The longer of the two sequences, in tokens.
    pub fn len(&self) -> usize {
        self.prompt.len() + self.chosen.len().max(self.rejected.len())
    }

    /// Never: a pair has a reply token on each side.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// What pair preparation found, shown before training starts.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PairReport {
    /// Pairs offered.
    pub pairs: usize,
    /// Pairs used.
    pub used: usize,
    /// Pairs longer than the maximum length: the prompt's start was cut off
    /// (and, where a reply alone was too long, the reply's end).
    pub truncated: usize,
    /// Pairs left out: an empty reply, or the same reply on both sides.
    pub empty: usize,
    /// Tokens in all used pairs (prompt once, both replies).
    pub tokens: usize,
    /// Longest used sequence in tokens (after truncation).
    pub longest: usize,
    /// Pairs for training.
    pub train_pairs: usize,
    /// Pairs held out for the eval margin.
    pub eval_pairs: usize,
}

/// Pairs ready for DPO.
#[derive(Debug, Clone)]
pub struct PreparedPairs {
    /// Training pairs.
    pub train: Vec<PairExample>,
    /// Held-out pairs.
    pub eval: Vec<PairExample>,
    /// The report.
    pub report: PairReport,
}

/// The marker a reply ends with in the chat format.
pub const REPLY_END: &str = "</s>";

/// Tokenizes pairs, cuts those longer than `opts.max_len` (the prompt keeps
/// its end, at least a quarter of the length where it is that long; a reply
/// keeps its start), reports, and splits. `opts.loss_on` does not apply:
/// DPO counts only the reply tokens.
pub fn prepare_pairs(
    pairs: &[PairText],
    tok: &PhiTokenizer,
    opts: &DataOptions,
) -> Result<PreparedPairs> {
    opts.check()?;
    let pairs = &pairs[..opts.limit.unwrap_or(pairs.len()).min(pairs.len())];
    let mut report = PairReport {
        pairs: pairs.len(),
        ..PairReport::default()
    };
    let mut all = Vec::new();
    for p in pairs {
        if p.chosen.trim().is_empty() || p.rejected.trim().is_empty() || p.chosen == p.rejected {
            report.empty += 1;
            continue;
        }
        let mut prompt = tok.encode(&p.prompt)?;
        let mut chosen = tok.encode(&format!("{}{REPLY_END}", p.chosen))?;
        let mut rejected = tok.encode(&format!("{}{REPLY_END}", p.rejected))?;
        let reply = chosen.len().max(rejected.len());
        if prompt.len() + reply > opts.max_len {
            report.truncated += 1;
            let keep_prompt = prompt
                .len()
                .min(opts.max_len / 4)
                .max(opts.max_len.saturating_sub(reply))
                .max(1)
                .min(prompt.len());
            prompt.drain(..prompt.len() - keep_prompt);
            let room = opts.max_len - prompt.len();
            chosen.truncate(room);
            rejected.truncate(room);
        }
        if prompt.is_empty() || chosen == rejected {
            report.empty += 1;
            continue;
        }
        let e = PairExample {
            prompt,
            chosen,
            rejected,
        };
        report.tokens += e.prompt.len() + e.chosen.len() + e.rejected.len();
        report.longest = report.longest.max(e.len());
        all.push(e);
    }
    report.used = all.len();
    if all.is_empty() {
        return Err(Error::EmptyDataset(format!(
            "{} pairs: {} with an empty or identical reply",
            report.pairs, report.empty
        )));
    }
    let (train, eval) = split(all, opts.eval_fraction, opts.seed);
    report.train_pairs = train.len();
    report.eval_pairs = eval.len();
    Ok(PreparedPairs {
        train,
        eval,
        report,
    })
}

/// The batches of one epoch, as indices into the training examples:
/// shuffled by `(seed, epoch)`, then, within groups of 50 batches, sorted by
/// length so a batch pads little (Hugging Face's `group_by_length`).
pub fn epoch_batches(lengths: &[usize], batch: usize, seed: u64, epoch: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(
        seed ^ (epoch as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    ));
    let mut out = Vec::new();
    for group in order.chunks(batch * 50) {
        let mut g = group.to_vec();
        g.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        out.extend(g.chunks(batch).map(<[usize]>::to_vec));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assistant_segments_include_their_end_marker() {
        let s = segments(
            "<|system|>S</s>\n<|user|>U</s>\n<|assistant|>A</s>\n<|user|>V</s>\n<|assistant|>B",
        );
        let counted: Vec<&str> = s.iter().filter(|(_, c)| *c).map(|(t, _)| *t).collect();
        assert_eq!(counted, ["<|assistant|>A</s>", "<|assistant|>B"]);
        assert_eq!(
            s.iter().map(|(t, _)| *t).collect::<String>(),
            "<|system|>S</s>\n<|user|>U</s>\n<|assistant|>A</s>\n<|user|>V</s>\n<|assistant|>B"
        );
    }

    #[test]
    fn batches_cover_every_example_once_and_depend_on_the_epoch() {
        let lengths: Vec<usize> = (0..23).map(|i| (i * 7) % 11 + 1).collect();
        let b0 = epoch_batches(&lengths, 4, 1, 0);
        let mut all: Vec<usize> = b0.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..23).collect::<Vec<_>>());
        assert!(
            b0.iter()
                .all(|b| b.windows(2).all(|w| lengths[w[0]] >= lengths[w[1]]))
        );
        assert_eq!(b0, epoch_batches(&lengths, 4, 1, 0));
        assert_ne!(b0, epoch_batches(&lengths, 4, 1, 1));
    }

    #[test]
    fn the_split_holds_out_a_share_and_keeps_every_item() {
        let (train, eval) = split((0..20).collect::<Vec<_>>(), 0.1, 3);
        assert_eq!((train.len(), eval.len()), (18, 2));
        let mut all: Vec<i32> = train.iter().chain(&eval).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..20).collect::<Vec<_>>());
        assert_eq!(split(vec![1], 0.1, 3), (vec![1], vec![]));
        assert_eq!(split(vec![1, 2], 0.0, 3).1, Vec::<i32>::new());
    }
}
