//! Preference pairs for a character, from its chats: what the user chose
//! (the swipe the chat went on from, or a rewritten reply) over what they
//! passed over, with the exact prompt the reply was written from; pairs
//! imported from a file; and their export and import as the JSONL TRL's
//! DPOTrainer reads.
//!
//! Invariants: an import is all or nothing in the database (one
//! transaction), lines it could not use are listed with their number and
//! reason, and anything it changed (a prompt wrapped as a user turn, NUL
//! characters removed) is counted in its report.

use std::path::Path;

use dramatis_persona::prompt::{self, PromptParts, Speaker};
use dramatis_store::PairKind;

use crate::chats::speaker;
use serde::Serialize;

use crate::{Dramatis, Result};

/// A pair as the Preferences view shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PreferencePair {
    /// The chat it comes from.
    pub chat_id: i64,
    /// That chat's title.
    pub chat_title: String,
    /// The preferred reply.
    pub chosen_id: i64,
    /// The passed-over reply (the same message for an in-place edit).
    pub rejected_id: i64,
    /// Swipe or edit.
    pub kind: PairKind,
    /// The exact prompt the reply was written from (rebuilt for imported chats).
    pub prompt: String,
    /// Whether `prompt` is the stored one (false: rebuilt from the chat).
    pub exact_prompt: bool,
    /// The preferred text.
    pub chosen: String,
    /// The passed-over text.
    pub rejected: String,
    /// The model (and adapter) that wrote each, when it was written here.
    pub chosen_model: Option<String>,
    /// See `chosen_model`.
    pub rejected_model: Option<String>,
    /// Left out of training.
    pub excluded: bool,
    /// For an imported pair: its row (`chat_id`, `chosen_id` and
    /// `rejected_id` are 0) and the file it came from.
    pub imported_id: Option<i64>,
    /// See `imported_id`.
    pub source: Option<String>,
}

/// A line of an imported file that was not used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LineProblem {
    /// 1-based line (or array item) number.
    pub line: usize,
    /// Why.
    pub message: String,
}

/// What an import of preference pairs did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PrefsImport {
    /// New pairs.
    pub added: usize,
    /// Pairs the character had already.
    pub duplicates: usize,
    /// Lines not used, with their reason (the first 50).
    pub skipped: Vec<LineProblem>,
    /// How many lines were not used in all.
    pub skipped_count: usize,
    /// What was changed to import them, in words.
    pub changed: Vec<String>,
}

/// The largest preference file read.
pub const MAX_PREFS_FILE_BYTES: u64 = 256 << 20;
/// The longest prompt or reply kept, in bytes.
pub const MAX_PAIR_FIELD_BYTES: usize = 1 << 20;
/// The most pairs one file may add.
pub const MAX_PAIRS_PER_FILE: usize = 100_000;

/// A field as TRL writes it: text, or (the conversational form) a list of
/// `{role, content}` messages.
fn field_text(v: &serde_json::Value, is_prompt: bool) -> std::result::Result<String, String> {
    match v {
        serde_json::Value::String(s) => Ok(s.clone()),
        serde_json::Value::Array(msgs) => {
            let mut out = String::new();
            for m in msgs {
                let role = m.get("role").and_then(|r| r.as_str()).unwrap_or("");
                let content = match m.get("content") {
                    Some(serde_json::Value::String(c)) => c.as_str(),
                    _ => return Err("a message without text `content`".into()),
                };
                let speaker = match role {
                    "system" => Speaker::System,
                    "user" | "human" => Speaker::User,
                    "assistant" | "gpt" | "model" => Speaker::Assistant,
                    other => return Err(format!("a message with the role `{other}`")),
                };
                if is_prompt {
                    out.push_str(&prompt::turn(speaker, content));
                } else if speaker == Speaker::Assistant {
                    out.push_str(content);
                }
            }
            if is_prompt {
                out.push_str(prompt::reply_opening());
            }
            Ok(out)
        }
        _ => Err("text or a list of messages was expected".into()),
    }
}

/// Reads preference pairs from TRL's JSONL: `prompt`, `chosen`, `rejected`
/// as text or as lists of `{role, content}` messages (a JSON array of those
/// objects too). Lines it cannot use are skipped and listed; a file with no
/// usable line is an error that says why. The report's `added` is the
/// number of pairs read.
pub fn read_preference_file(path: &Path) -> Result<(Vec<dramatis_train::PairText>, PrefsImport)> {
    let io = |e: std::io::Error| crate::Error::Io {
        context: format!("cannot read {}", path.display()),
        source: e,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_file() {
        return Err(crate::Error::Import(vec![format!(
            "{} is a folder, not a JSONL file",
            path.display()
        )]));
    }
    if meta.len() > MAX_PREFS_FILE_BYTES {
        return Err(crate::Error::Import(vec![format!(
            "the file is {} MiB; the most a preference file can be is {} MiB",
            meta.len() >> 20,
            MAX_PREFS_FILE_BYTES >> 20
        )]));
    }
    let bytes = std::fs::read(path).map_err(io)?;
    let text = String::from_utf8_lossy(&bytes);
    let replaced = text.matches('\u{fffd}').count()
        - bytes
            .windows(3)
            .filter(|w| *w == [0xef, 0xbf, 0xbd])
            .count();
    let mut parsed = parse_pairs(&text);
    let mut changed = Vec::new();
    if replaced > 0 {
        changed.push(format!(
            "{replaced} sequences that were not UTF-8 were replaced by �"
        ));
    }
    if parsed.wrapped > 0 {
        let (n, was) = match parsed.wrapped {
            1 => ("1 prompt".to_owned(), "was"),
            n => (format!("{n} prompts"), "were"),
        };
        changed.push(format!(
            "{n} without chat markers {was} made a user's turn (`<|user|>…</s>` then `<|assistant|>`)"
        ));
    }
    if parsed.nuls > 0 {
        changed.push(format!("{} NUL characters were removed", parsed.nuls));
    }
    if parsed.pairs.len() > MAX_PAIRS_PER_FILE {
        changed.push(format!(
            "only the first {MAX_PAIRS_PER_FILE} of {} pairs were read",
            parsed.pairs.len()
        ));
        parsed.pairs.truncate(MAX_PAIRS_PER_FILE);
    }
    if parsed.pairs.is_empty() {
        let mut why: Vec<String> = parsed
            .skipped
            .iter()
            .take(5)
            .map(|p| format!("line {}: {}", p.line, p.message))
            .collect();
        if why.is_empty() {
            why.push("the file has no pairs".into());
        }
        return Err(crate::Error::Import(why));
    }
    let skipped_count = parsed.skipped.len();
    parsed.skipped.truncate(50);
    let report = PrefsImport {
        added: parsed.pairs.len(),
        duplicates: 0,
        skipped: parsed.skipped,
        skipped_count,
        changed,
    };
    let pairs = parsed
        .pairs
        .into_iter()
        .map(|(prompt, chosen, rejected)| dramatis_train::PairText {
            prompt,
            chosen,
            rejected,
        })
        .collect();
    Ok((pairs, report))
}

/// Parsed pairs, lines not used, and how many prompts were wrapped and NULs removed.
struct Parsed {
    pairs: Vec<(String, String, String)>,
    skipped: Vec<LineProblem>,
    wrapped: usize,
    nuls: usize,
}

/// Reads TRL's preference JSONL (or a JSON array of the same objects).
fn parse_pairs(text: &str) -> Parsed {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut out = Parsed {
        pairs: Vec::new(),
        skipped: Vec::new(),
        wrapped: 0,
        nuls: 0,
    };
    let items: Vec<(usize, std::result::Result<serde_json::Value, String>)> =
        if text.trim_start().starts_with('[') {
            match serde_json::from_str::<Vec<serde_json::Value>>(text) {
                Ok(v) => v
                    .into_iter()
                    .enumerate()
                    .map(|(i, v)| (i + 1, Ok(v)))
                    .collect(),
                Err(e) => vec![(e.line(), Err(format!("not a JSON array: {e}")))],
            }
        } else {
            text.lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
                .map(|(i, l)| {
                    (
                        i + 1,
                        serde_json::from_str(l.trim()).map_err(|e| format!("not JSON: {e}")),
                    )
                })
                .collect()
        };
    for (line, item) in items {
        let got = item.and_then(|v| {
            let obj = v.as_object().ok_or("not a JSON object")?;
            let get = |k: &str| {
                let v = obj.get(k).ok_or_else(|| format!("no `{k}`"))?;
                let t = field_text(v, k == "prompt").map_err(|e| format!("`{k}`: {e}"))?;
                if t.len() > MAX_PAIR_FIELD_BYTES {
                    return Err(format!(
                        "`{k}` is longer than {} MiB",
                        MAX_PAIR_FIELD_BYTES >> 20
                    ));
                }
                Ok(t)
            };
            let (p, c, r) = (get("prompt")?, get("chosen")?, get("rejected")?);
            if c.trim().is_empty() || r.trim().is_empty() {
                return Err("an empty reply".to_owned());
            }
            if c.trim() == r.trim() {
                return Err("the same reply on both sides".to_owned());
            }
            Ok((p, c, r))
        });
        match got {
            Ok((mut p, mut c, mut r)) => {
                for t in [&mut p, &mut c, &mut r] {
                    if t.contains('\0') {
                        out.nuls += t.matches('\0').count();
                        *t = t.replace('\0', "");
                    }
                }
                if !p.contains(prompt::ASSISTANT) && !p.contains(prompt::USER) {
                    p = format!(
                        "{}{}",
                        prompt::turn(Speaker::User, &p),
                        prompt::reply_opening()
                    );
                    out.wrapped += 1;
                }
                out.pairs.push((p, c, r));
            }
            Err(message) => out.skipped.push(LineProblem { line, message }),
        }
    }
    out
}

impl Dramatis {
    /// Every preference pair in a character's chats.
    pub fn preference_pairs(&self, character_id: i64) -> Result<Vec<PreferencePair>> {
        let card = self.character(character_id)?.card;
        let rows = self.store().preference_pairs(character_id)?;
        let mut out = Vec::with_capacity(rows.len());
        let mut chats = std::collections::HashMap::new();
        for r in rows {
            let chat = match chats.entry(r.chat_id) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(self.store().chat(r.chat_id)?)
                }
            };
            let info = |id: i64| -> Option<(String, Option<String>)> {
                let (prompt, info) = self.store().reply_prompt(id).ok()??;
                let model = serde_json::from_str::<serde_json::Value>(&info)
                    .ok()
                    .and_then(|v| v.get("model")?.as_str().map(str::to_owned));
                Some((prompt, model))
            };
            let chosen_info = info(r.chosen_id);
            let rejected_info = if r.rejected_id == r.chosen_id {
                None
            } else {
                info(r.rejected_id)
            };
            let (prompt, exact) = match chosen_info.as_ref().or(rejected_info.as_ref()) {
                Some((p, _)) => (p.clone(), true),
                None => {
                    // An imported chat: the prompt as chat would build it today.
                    let persona = self.chat_persona(chat.persona_id)?;
                    let history: Vec<(Speaker, String)> = match r.parent_id {
                        Some(p) => self
                            .store()
                            .path_to(p)?
                            .into_iter()
                            .map(|m| (speaker(m.role), m.content))
                            .collect(),
                        None => Vec::new(),
                    };
                    let p = PromptParts::new(&card, &persona.name, &persona.description, &history)
                        .build(usize::MAX / 4, str::len);
                    (p.text, false)
                }
            };
            out.push(PreferencePair {
                chat_id: r.chat_id,
                chat_title: chat.title.clone(),
                chosen_id: r.chosen_id,
                rejected_id: r.rejected_id,
                kind: r.kind,
                prompt,
                exact_prompt: exact,
                chosen: r.chosen,
                rejected: r.rejected,
                chosen_model: chosen_info.and_then(|i| i.1),
                rejected_model: if r.kind == PairKind::Edit && r.rejected_id == r.chosen_id {
                    None
                } else {
                    rejected_info.and_then(|i| i.1)
                },
                excluded: r.excluded,
                imported_id: None,
                source: None,
            });
        }
        for r in self.store().imported_pairs(character_id)? {
            out.push(PreferencePair {
                chat_id: 0,
                chat_title: format!("Imported from {}", r.source),
                chosen_id: 0,
                rejected_id: 0,
                kind: PairKind::Imported,
                prompt: r.prompt,
                exact_prompt: true,
                chosen: r.chosen,
                rejected: r.rejected,
                chosen_model: None,
                rejected_model: None,
                excluded: r.excluded,
                imported_id: Some(r.id),
                source: Some(r.source),
            });
        }
        Ok(out)
    }

    /// Leaves an imported pair out of training, or takes it back in.
    pub fn set_imported_pair_excluded(&self, id: i64, excluded: bool) -> Result<()> {
        Ok(self.store().set_imported_pair_excluded(id, excluded)?)
    }

    /// Deletes a character's imported pairs: those from the file `source`, or all.
    pub fn delete_imported_pairs(&self, character_id: i64, source: Option<&str>) -> Result<usize> {
        Ok(self.store().delete_imported_pairs(character_id, source)?)
    }

    /// Imports preference pairs for a character from TRL's JSONL (see
    /// [`read_preference_file`]); all the file's usable pairs or none.
    pub fn import_preferences(&self, character_id: i64, path: &Path) -> Result<PrefsImport> {
        self.character(character_id)?;
        let (read, mut report) = read_preference_file(path)?;
        // A pair its chats already hold (an export read back) is not added twice.
        let held: std::collections::HashSet<(String, String, String)> = self
            .preference_pairs(character_id)?
            .into_iter()
            .filter(|p| p.imported_id.is_none())
            .map(|p| (p.prompt, p.chosen, p.rejected))
            .collect();
        let before = read.len();
        let pairs: Vec<(String, String, String)> = read
            .into_iter()
            .map(|p| (p.prompt, p.chosen, p.rejected))
            .filter(|p| !held.contains(p))
            .collect();
        let in_chats = before - pairs.len();
        let source = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "a file".into());
        let counts = self
            .store()
            .insert_imported_pairs(character_id, &source, &pairs)?;
        report.added = counts.added;
        report.duplicates = counts.duplicates + in_chats;
        Ok(report)
    }

    /// A character's pairs that train (not left out), as text.
    pub fn training_pairs(&self, character_id: i64) -> Result<Vec<PreferencePair>> {
        Ok(self
            .preference_pairs(character_id)?
            .into_iter()
            .filter(|p| !p.excluded)
            .collect())
    }

    /// Leaves a pair out of training, or takes it back in.
    pub fn set_pair_excluded(
        &self,
        chosen_id: i64,
        rejected_id: i64,
        excluded: bool,
    ) -> Result<()> {
        Ok(self
            .store()
            .set_pair_excluded(chosen_id, rejected_id, excluded)?)
    }

    /// Leaves a whole chat out of training, or takes it back in.
    pub fn set_chat_prefs_excluded(&self, chat_id: i64, excluded: bool) -> Result<()> {
        Ok(self.store().set_chat_prefs_excluded(chat_id, excluded)?)
    }

    /// A character's pairs (those not left out) as JSONL in the shape TRL's
    /// DPOTrainer reads: one `{"prompt", "chosen", "rejected"}` object a line.
    pub fn export_preferences(&self, character_id: i64) -> Result<String> {
        let mut out = String::new();
        for p in self.training_pairs(character_id)? {
            let line =
                serde_json::json!({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected});
            out.push_str(&line.to_string());
            out.push('\n');
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trl_lines_text_and_conversational_are_read_and_bad_lines_named() {
        let text = concat!(
            "\u{feff}{\"prompt\": \"<|user|>Hi</s>\\n<|assistant|>\", \"chosen\": \"Hello!\", \"rejected\": \"Go.\"}\n",
            "\n",
            "{\"prompt\": [{\"role\": \"system\", \"content\": \"Be Kit.\"}, {\"role\": \"user\", \"content\": \"Hi \"}],",
            " \"chosen\": [{\"role\": \"assistant\", \"content\": \"Beep!\"}], \"rejected\": [{\"role\": \"assistant\", \"content\": \"No.\"}]}\n",
            "{\"prompt\": \"What is 2+2?\", \"chosen\": \"4\\u0000\", \"rejected\": \"5\"}\n",
            "not json\n",
            "{\"prompt\": \"x\", \"chosen\": \"same\", \"rejected\": \"same\"}\n",
            "{\"prompt\": \"x\", \"chosen\": 3, \"rejected\": \"a\"}\n",
            "[1]\n",
            "{\"prompt\": [{\"role\": \"wizard\", \"content\": \"x\"}], \"chosen\": \"a\", \"rejected\": \"b\"}\n",
        );
        let p = parse_pairs(text);
        assert_eq!(p.pairs.len(), 3);
        assert_eq!(p.pairs[0].0, "<|user|>Hi</s>\n<|assistant|>");
        assert_eq!(
            p.pairs[1],
            (
                "<|system|>Be Kit.</s>\n<|user|>Hi</s>\n<|assistant|>".to_owned(),
                "Beep!".to_owned(),
                "No.".to_owned()
            )
        );
        assert_eq!(p.pairs[2].0, "<|user|>What is 2+2?</s>\n<|assistant|>");
        assert_eq!(p.pairs[2].1, "4");
        assert_eq!((p.wrapped, p.nuls), (1, 1));
        let lines: Vec<usize> = p.skipped.iter().map(|s| s.line).collect();
        assert_eq!(lines, [5, 6, 7, 8, 9]);
        assert!(p.skipped[0].message.starts_with("not JSON"));
        assert!(p.skipped[1].message.contains("same reply"));
        assert!(p.skipped[2].message.contains("`chosen`"));
        assert!(p.skipped[3].message.contains("object"));
        assert!(p.skipped[4].message.contains("wizard"));
        // A JSON array of the same objects.
        let arr = parse_pairs(
            "[{\"prompt\": \"<|user|>a</s>\\n<|assistant|>\", \"chosen\": \"b\", \"rejected\": \"c\"}]",
        );
        assert_eq!((arr.pairs.len(), arr.wrapped), (1, 0));
        let broken = parse_pairs("[{");
        assert!(broken.pairs.is_empty() && broken.skipped.len() == 1);
    }
}
