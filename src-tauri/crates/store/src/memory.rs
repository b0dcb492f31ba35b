//! The prompt behind each reply, and chat memories (summaries of what left
//! the window).
//!
//! Invariants: a memory covers the conversation up to and including one
//! message (`up_to_id`) and is deleted with it, so a branch only ever sees
//! memories of messages on its own path; at most one memory per message.

use rusqlite::{OptionalExtension, params};

use crate::{Error, Result, Store, now_ms};

/// A summary of a chat up to one message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MemoryRow {
    /// Id.
    pub id: i64,
    /// The chat.
    pub chat_id: i64,
    /// The last message it covers.
    pub up_to_id: i64,
    /// The summary.
    pub text: String,
    /// Written or changed by the user (never overwritten by the model).
    pub edited: bool,
    /// ms since the epoch.
    pub updated_at: i64,
}

fn memory(r: &rusqlite::Row<'_>) -> rusqlite::Result<MemoryRow> {
    Ok(MemoryRow {
        id: r.get(0)?,
        chat_id: r.get(1)?,
        up_to_id: r.get(2)?,
        text: r.get(3)?,
        edited: r.get::<_, i64>(4)? != 0,
        updated_at: r.get(5)?,
    })
}

impl Store {
    /// Keeps the prompt (and its JSON description) that produced a reply.
    pub fn set_reply_prompt(&self, message_id: i64, prompt: &str, info: &str) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO reply_prompts (message_id, prompt, info) VALUES (?1, ?2, ?3)
                 ON CONFLICT(message_id) DO UPDATE SET prompt = ?2, info = ?3",
                params![message_id, prompt, info],
            )?;
            Ok(())
        })
    }

    /// The prompt and description behind a reply, if it was generated here.
    pub fn reply_prompt(&self, message_id: i64) -> Result<Option<(String, String)>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT prompt, info FROM reply_prompts WHERE message_id = ?1",
                [message_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    /// For each message of `path` with a stored prompt, how many world-info
    /// entries fired for it (messages with none are left out).
    pub fn world_info_counts(&self, path: &[i64]) -> Result<std::collections::HashMap<i64, usize>> {
        let ids = serde_json::to_string(path).expect("ids serialize");
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT message_id, json_array_length(info, '$.world_info') FROM reply_prompts
             WHERE message_id IN (SELECT value FROM json_each(?1))
               AND json_valid(info) AND json_array_length(info, '$.world_info') > 0",
        )?;
        let found = stmt
            .query_map([ids], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)? as usize))
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(found)
    }

    /// The deepest message on a path (ids oldest first) that has a stored
    /// prompt, with that prompt's description; one query, the prompt text unread.
    pub fn last_reply_info(&self, path: &[i64]) -> Result<Option<(i64, String)>> {
        let ids = serde_json::to_string(path).expect("ids serialize");
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT message_id, info FROM reply_prompts
             WHERE message_id IN (SELECT value FROM json_each(?1))",
        )?;
        let found: std::collections::HashMap<i64, String> = stmt
            .query_map([ids], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(path
            .iter()
            .rev()
            .find_map(|id| found.get(id).map(|info| (*id, info.clone()))))
    }

    /// The newest memory on a path (message ids oldest first): the one that
    /// covers the most of it.
    pub fn memory_on_path(&self, path: &[i64]) -> Result<Option<MemoryRow>> {
        if path.is_empty() {
            return Ok(None);
        }
        let chat_id: Option<i64> = self
            .conn()
            .query_row(
                "SELECT chat_id FROM messages WHERE id = ?1",
                [path[0]],
                |r| r.get(0),
            )
            .optional()?;
        let Some(chat_id) = chat_id else {
            return Ok(None);
        };
        let depth: std::collections::HashMap<i64, usize> =
            path.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        Ok(self
            .memories(chat_id)?
            .into_iter()
            .filter_map(|m| depth.get(&m.up_to_id).map(|d| (*d, m)))
            .max_by_key(|(d, _)| *d)
            .map(|(_, m)| m))
    }

    /// Every memory of a chat, on any branch.
    pub fn memories(&self, chat_id: i64) -> Result<Vec<MemoryRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, chat_id, up_to_id, text, edited, updated_at FROM chat_memories
             WHERE chat_id = ?1 ORDER BY id",
        )?;
        let rows = stmt.query_map([chat_id], memory)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Stores the summary up to `up_to_id` (replacing one there unless the
    /// user edited it and this write is the model's).
    pub fn put_memory(&self, up_to_id: i64, text: &str, by_user: bool) -> Result<MemoryRow> {
        self.write(|tx| {
            let chat_id: i64 = tx
                .query_row("SELECT chat_id FROM messages WHERE id = ?1", [up_to_id], |r| {
                    r.get(0)
                })
                .optional()?
                .ok_or(Error::NotFound {
                    what: "message",
                    id: up_to_id,
                })?;
            let now = now_ms();
            tx.execute(
                "INSERT INTO chat_memories (chat_id, up_to_id, text, edited, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5)
                 ON CONFLICT(up_to_id) DO UPDATE SET text = ?3, edited = ?4, updated_at = ?5
                 WHERE ?4 = 1 OR chat_memories.edited = 0",
                params![chat_id, up_to_id, text, by_user as i64, now],
            )?;
            Ok(tx.query_row(
                "SELECT id, chat_id, up_to_id, text, edited, updated_at FROM chat_memories WHERE up_to_id = ?1",
                [up_to_id],
                memory,
            )?)
        })
    }

    /// Deletes a memory.
    pub fn delete_memory(&self, id: i64) -> Result<()> {
        self.write(|tx| {
            tx.execute("DELETE FROM chat_memories WHERE id = ?1", [id])?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Role;

    fn store() -> (tempfile::TempDir, Store, i64) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db.sqlite")).unwrap();
        let card = dramatis_persona::CharacterCard {
            name: "K".into(),
            ..Default::default()
        };
        let c = s.insert_character(&card, None, None).unwrap();
        let chat = s.create_chat(c, None, "t").unwrap();
        (dir, s, chat)
    }

    #[test]
    fn branches_see_only_their_own_memories_and_deletes_cascade() {
        let (_d, s, chat) = store();
        let a = s.add_message(chat, None, Role::Assistant, "hi").unwrap();
        let b1 = s.add_message(chat, Some(a), Role::User, "one").unwrap();
        let b2 = s.add_message(chat, Some(a), Role::User, "two").unwrap();
        let c1 = s.add_message(chat, Some(b1), Role::Assistant, "x").unwrap();
        s.put_memory(a, "root summary", false).unwrap();
        s.put_memory(c1, "branch one", false).unwrap();
        let m = s.memory_on_path(&[a, b1, c1]).unwrap().unwrap();
        assert_eq!(m.text, "branch one");
        let m = s.memory_on_path(&[a, b2]).unwrap().unwrap();
        assert_eq!(m.text, "root summary");
        // A user's edit survives the model's next write; the user may rewrite it.
        s.put_memory(c1, "edited by hand", true).unwrap();
        let m = s.put_memory(c1, "model again", false).unwrap();
        assert_eq!((m.text.as_str(), m.edited), ("edited by hand", true));
        s.delete_message(b1).unwrap();
        assert_eq!(s.memories(chat).unwrap().len(), 1);
        s.set_reply_prompt(b2, "p", "{}").unwrap();
        s.set_reply_prompt(b2, "p2", "{\"a\":1}").unwrap();
        assert_eq!(s.reply_prompt(b2).unwrap().unwrap().0, "p2");
        s.set_reply_prompt(a, "p0", "{}").unwrap();
        assert_eq!(s.last_reply_info(&[a, b2]).unwrap().unwrap().0, b2);
        assert_eq!(s.last_reply_info(&[a, b1]).unwrap().unwrap().0, a);
        s.delete_message(b2).unwrap();
        assert_eq!(s.reply_prompt(b2).unwrap(), None);
    }
}
