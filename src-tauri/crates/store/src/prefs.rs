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
    /// Imported from a file.
    Imported,
}

/// A pair imported from a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedPairRow {
    /// Its row.
    pub id: i64,
    /// The character it trains.
    pub character_id: i64,
    /// The prompt, as the file gave it (or wrapped as a user turn).
    pub prompt: String,
    /// The preferred reply.
    pub chosen: String,
    /// The passed-over reply.
    pub rejected: String,
    /// The file's name.
    pub source: String,
    /// Left out of training.
    pub excluded: bool,
}

/// What an import added.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ImportCounts {
    /// New pairs.
    pub added: usize,
    /// Pairs the character had already (left as they were).
    pub duplicates: usize,
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

    /// Adds imported pairs to a character, all or none (one transaction);
    /// a pair it has already is skipped and counted.
    pub fn insert_imported_pairs(
        &self,
        character_id: i64,
        source: &str,
        pairs: &[(String, String, String)],
    ) -> Result<ImportCounts> {
        self.write(|tx| {
            let exists: bool = tx.query_row(
                "SELECT EXISTS(SELECT 1 FROM characters WHERE id = ?1)",
                [character_id],
                |r| r.get(0),
            )?;
            if !exists {
                return Err(crate::Error::NotFound {
                    what: "character",
                    id: character_id,
                });
            }
            let mut counts = ImportCounts::default();
            let mut insert = tx.prepare_cached(
                "INSERT OR IGNORE INTO imported_pairs
                 (character_id, prompt, chosen, rejected, source, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            let now = now_ms();
            for (prompt, chosen, rejected) in pairs {
                match insert.execute(params![
                    character_id,
                    prompt,
                    chosen,
                    rejected,
                    source,
                    now
                ])? {
                    0 => counts.duplicates += 1,
                    _ => counts.added += 1,
                }
            }
            Ok(counts)
        })
    }

    /// A character's imported pairs, in import order.
    pub fn imported_pairs(&self, character_id: i64) -> Result<Vec<ImportedPairRow>> {
        let conn = self.conn();
        let mut st = conn.prepare_cached(
            "SELECT id, character_id, prompt, chosen, rejected, source, excluded
             FROM imported_pairs WHERE character_id = ?1 ORDER BY id",
        )?;
        let rows = st
            .query_map([character_id], |r| {
                Ok(ImportedPairRow {
                    id: r.get(0)?,
                    character_id: r.get(1)?,
                    prompt: r.get(2)?,
                    chosen: r.get(3)?,
                    rejected: r.get(4)?,
                    source: r.get(5)?,
                    excluded: r.get::<_, i64>(6)? != 0,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    /// Leaves an imported pair out of training (or takes it back in).
    pub fn set_imported_pair_excluded(&self, id: i64, excluded: bool) -> Result<()> {
        self.write(|tx| {
            match tx.execute(
                "UPDATE imported_pairs SET excluded = ?2 WHERE id = ?1",
                params![id, excluded],
            )? {
                0 => Err(crate::Error::NotFound {
                    what: "imported pair",
                    id,
                }),
                _ => Ok(()),
            }
        })
    }

    /// Deletes imported pairs of a character: those from `source`, or all.
    pub fn delete_imported_pairs(&self, character_id: i64, source: Option<&str>) -> Result<usize> {
        self.write(|tx| {
            Ok(tx.execute(
                "DELETE FROM imported_pairs WHERE character_id = ?1 AND (?2 IS NULL OR source = ?2)",
                params![character_id, source],
            )?)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(i: usize) -> (String, String, String) {
        (format!("p{i}"), format!("c{i}"), format!("r{i}"))
    }

    #[test]
    fn imported_pairs_are_added_once_toggled_and_go_with_their_character() {
        let store = Store::open_in_memory().unwrap();
        let card = dramatis_persona::CharacterCard {
            name: "K".into(),
            ..Default::default()
        };
        let c = store.insert_character(&card, None, None).unwrap();
        let got = store
            .insert_imported_pairs(c, "a.jsonl", &[pair(1), pair(2), pair(1)])
            .unwrap();
        assert_eq!((got.added, got.duplicates), (2, 1));
        let again = store
            .insert_imported_pairs(c, "b.jsonl", &[pair(2), pair(3)])
            .unwrap();
        assert_eq!((again.added, again.duplicates), (1, 1));
        let rows = store.imported_pairs(c).unwrap();
        assert_eq!(
            rows.iter()
                .map(|r| (r.prompt.as_str(), r.source.as_str()))
                .collect::<Vec<_>>(),
            [("p1", "a.jsonl"), ("p2", "a.jsonl"), ("p3", "b.jsonl")]
        );
        store.set_imported_pair_excluded(rows[1].id, true).unwrap();
        assert!(store.imported_pairs(c).unwrap()[1].excluded);
        assert!(store.set_imported_pair_excluded(9999, true).is_err());
        assert!(store.insert_imported_pairs(9999, "x", &[pair(1)]).is_err());
        assert_eq!(store.delete_imported_pairs(c, Some("b.jsonl")).unwrap(), 1);
        assert_eq!(store.imported_pairs(c).unwrap().len(), 2);
        store.delete_character(c).unwrap();
        assert!(store.imported_pairs(c).unwrap().is_empty());
    }
}
