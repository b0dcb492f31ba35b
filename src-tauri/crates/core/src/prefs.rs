//! Preference pairs for a character, from its chats: what the user chose
//! (the swipe the chat went on from, or a rewritten reply) over what they
//! passed over, with the exact prompt the reply was written from, and their
//! export as the JSONL TRL's DPOTrainer reads.

use dramatis_persona::prompt::{PromptParts, Speaker};
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
            });
        }
        Ok(out)
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
        for p in self
            .preference_pairs(character_id)?
            .into_iter()
            .filter(|p| !p.excluded)
        {
            let line =
                serde_json::json!({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected});
            out.push_str(&line.to_string());
            out.push('\n');
        }
        Ok(out)
    }
}
