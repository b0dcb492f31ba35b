//! Preference pairs, derived from the chat tree: a reply the chat went on
//! from (chosen) against a sibling it passed over (rejected), and a reply's
//! rewritten text against its text before the edit.
//!
//! Invariants: pairs are never stored as rows of their own, so deleting a
//! message removes its pairs and there is no half-written pair; what is stored
//! (an edit's original text, an exclusion) is written in one transaction with
//! the change it belongs to, and goes with its messages.

use std::collections::{HashMap, HashSet};

use rusqlite::params;

use crate::{MessageRow, Result, Role, Store, now_ms};

/// How a pair arose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PairKind {
    /// The user swiped to another reply and went on from it.
    Swipe,
    /// The user rewrote the reply.
    Edit,
}

/// One preference pair as the tree holds it (the prompt is the caller's to build).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairRow {
    /// The chat.
    pub chat_id: i64,
    /// The message both replies answer (`None`: the chat's first message).
    pub parent_id: Option<i64>,
    /// The preferred reply's message.
    pub chosen_id: i64,
    /// The passed-over reply's message (for an in-place edit, the same message).
    pub rejected_id: i64,
    /// The preferred text.
    pub chosen: String,
    /// The passed-over text.
    pub rejected: String,
    /// Swipe or edit.
    pub kind: PairKind,
    /// Left out of training by the user (the pair or its whole chat).
    pub excluded: bool,
}

impl Store {
    /// Rewrites a message's text as a user edit, keeping the first original so
    /// the edit can become a preference pair; one transaction.
    pub fn edit_message_content(&self, id: i64, content: &str) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "INSERT OR IGNORE INTO message_edits (message_id, source_id, original, created_at)
                 SELECT id, NULL, content, ?2 FROM messages WHERE id = ?1",
                params![id, now_ms()],
            )?;
            tx.execute(
                "UPDATE messages SET content = ?2, updated_at = ?3 WHERE id = ?1",
                params![id, content, now_ms()],
            )?;
            Ok(())
        })
    }

    /// Records that `message_id` was written by the user as a rewrite of `source_id`.
    pub fn record_fork_edit(&self, message_id: i64, source_id: i64) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "INSERT OR IGNORE INTO message_edits (message_id, source_id, original, created_at)
                 SELECT ?1, id, content, ?3 FROM messages WHERE id = ?2",
                params![message_id, source_id, now_ms()],
            )?;
            Ok(())
        })
    }

    /// Leaves a pair out of training (or takes it back in).
    pub fn set_pair_excluded(
        &self,
        chosen_id: i64,
        rejected_id: i64,
        excluded: bool,
    ) -> Result<()> {
        self.write(|tx| {
            if excluded {
                tx.execute(
                    "INSERT OR IGNORE INTO preference_exclusions (chosen_id, rejected_id) VALUES (?1, ?2)",
                    params![chosen_id, rejected_id],
                )?;
            } else {
                tx.execute(
                    "DELETE FROM preference_exclusions WHERE chosen_id = ?1 AND rejected_id = ?2",
                    params![chosen_id, rejected_id],
                )?;
            }
            Ok(())
        })
    }

    /// Leaves a whole chat out of training (or takes it back in).
    pub fn set_chat_prefs_excluded(&self, chat_id: i64, excluded: bool) -> Result<()> {
        self.write(|tx| {
            match tx.execute(
                "UPDATE chats SET prefs_excluded = ?2 WHERE id = ?1",
                params![chat_id, excluded],
            )? {
                0 => Err(crate::Error::NotFound {
                    what: "chat",
                    id: chat_id,
                }),
                _ => Ok(()),
            }
        })
    }

    /// Every preference pair in a character's chats, oldest chat first.
    pub fn preference_pairs(&self, character_id: i64) -> Result<Vec<PairRow>> {
        let conn = self.conn();
        let chats: Vec<(i64, bool)> = conn
            .prepare_cached(
                "SELECT id, prefs_excluded FROM chats WHERE character_id = ?1 ORDER BY id",
            )?
            .query_map([character_id], |r| {
                Ok((r.get(0)?, r.get::<_, i64>(1)? != 0))
            })?
            .collect::<rusqlite::Result<_>>()?;
        let excluded: HashSet<(i64, i64)> = conn
            .prepare_cached(
                "SELECT e.chosen_id, e.rejected_id FROM preference_exclusions e
                 JOIN messages m ON m.id = e.chosen_id JOIN chats c ON c.id = m.chat_id
                 WHERE c.character_id = ?1",
            )?
            .query_map([character_id], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let mut out = Vec::new();
        for (chat_id, chat_excluded) in chats {
            let msgs: Vec<MessageRow> = conn
                .prepare_cached(
                    "SELECT id, chat_id, parent_id, role, content, created_at FROM messages
                     WHERE chat_id = ?1 ORDER BY id",
                )?
                .query_map([chat_id], crate::chats::message)?
                .collect::<rusqlite::Result<_>>()?;
            let edits: HashMap<i64, (Option<i64>, String)> = conn
                .prepare_cached(
                    "SELECT e.message_id, e.source_id, e.original FROM message_edits e
                     JOIN messages m ON m.id = e.message_id WHERE m.chat_id = ?1",
                )?
                .query_map([chat_id], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))?
                .collect::<rusqlite::Result<_>>()?;
            let continued: HashSet<i64> = msgs.iter().filter_map(|m| m.parent_id).collect();
            let mut siblings: HashMap<Option<i64>, Vec<&MessageRow>> = HashMap::new();
            for m in msgs.iter().filter(|m| m.role == Role::Assistant) {
                siblings.entry(m.parent_id).or_default().push(m);
            }
            let excluded_pair = |c: i64, r: i64| chat_excluded || excluded.contains(&(c, r));
            for m in msgs.iter().filter(|m| m.role == Role::Assistant) {
                // A rewrite in place: the new text over the old.
                if let Some((None, original)) = edits.get(&m.id)
                    && original.trim() != m.content.trim()
                    && !original.trim().is_empty()
                {
                    out.push(PairRow {
                        chat_id,
                        parent_id: m.parent_id,
                        chosen_id: m.id,
                        rejected_id: m.id,
                        chosen: m.content.clone(),
                        rejected: original.clone(),
                        kind: PairKind::Edit,
                        excluded: excluded_pair(m.id, m.id),
                    });
                }
                // A rewrite as a fork: the new reply over the one it rewrote, at once.
                if let Some((Some(src), _)) = edits.get(&m.id)
                    && let Some(s) = msgs.iter().find(|x| x.id == *src)
                    && s.content.trim() != m.content.trim()
                {
                    out.push(PairRow {
                        chat_id,
                        parent_id: m.parent_id,
                        chosen_id: m.id,
                        rejected_id: s.id,
                        chosen: m.content.clone(),
                        rejected: s.content.clone(),
                        kind: PairKind::Edit,
                        excluded: excluded_pair(m.id, s.id),
                    });
                }
                if !continued.contains(&m.id) {
                    continue;
                }
                // The chat went on from `m`: each sibling it never went on from
                // lost to it (an edit and its source are paired above instead).
                let edit_of =
                    |a: i64, b: i64| matches!(edits.get(&a), Some((Some(src), _)) if *src == b);
                for s in siblings.get(&m.parent_id).into_iter().flatten() {
                    if s.id == m.id
                        || continued.contains(&s.id)
                        || s.content.trim().is_empty()
                        || s.content.trim() == m.content.trim()
                        || edit_of(m.id, s.id)
                        || edit_of(s.id, m.id)
                    {
                        continue;
                    }
                    out.push(PairRow {
                        chat_id,
                        parent_id: m.parent_id,
                        chosen_id: m.id,
                        rejected_id: s.id,
                        chosen: m.content.clone(),
                        rejected: s.content.clone(),
                        kind: PairKind::Swipe,
                        excluded: excluded_pair(m.id, s.id),
                    });
                }
            }
        }
        Ok(out)
    }
}
