use rusqlite::{OptionalExtension, Row, Transaction, params};
use serde::{Deserialize, Serialize};

use crate::{Error, Result, Store, now_ms};

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Narration or instructions.
    System,
    /// The person chatting.
    User,
    /// The character.
    Assistant,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
        }
    }

    fn parse(s: &str) -> rusqlite::Result<Self> {
        Ok(match s {
            "system" => Self::System,
            "user" => Self::User,
            "assistant" => Self::Assistant,
            other => {
                return Err(rusqlite::Error::FromSqlConversionFailure(
                    0,
                    rusqlite::types::Type::Text,
                    format!("unknown role {other}").into(),
                ));
            }
        })
    }
}

/// A stored chat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatRow {
    /// Row id.
    pub id: i64,
    /// The character spoken with.
    pub character_id: i64,
    /// The persona the user plays, if it still exists.
    pub persona_id: Option<i64>,
    /// Shown in the chat list.
    pub title: String,
    /// Creation time, ms since the epoch.
    pub created_at: i64,
    /// Last change, ms since the epoch.
    pub updated_at: i64,
}

/// One message: a node of the chat's tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRow {
    /// Row id.
    pub id: i64,
    /// Its chat.
    pub chat_id: i64,
    /// The message it answers; `None` for a first message.
    pub parent_id: Option<i64>,
    /// Who wrote it.
    pub role: Role,
    /// Its text.
    pub content: String,
    /// Creation time, ms since the epoch.
    pub created_at: i64,
}

/// A message found by full-text search.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchHit {
    /// The message.
    pub message_id: i64,
    /// Its chat.
    pub chat_id: i64,
    /// The text around the match, with the match between `[` and `]`.
    pub snippet: String,
}

fn chat_row(r: &Row<'_>) -> rusqlite::Result<ChatRow> {
    Ok(ChatRow {
        id: r.get(0)?,
        character_id: r.get(1)?,
        persona_id: r.get(2)?,
        title: r.get(3)?,
        created_at: r.get(4)?,
        updated_at: r.get(5)?,
    })
}

pub(crate) fn message(r: &Row<'_>) -> rusqlite::Result<MessageRow> {
    Ok(MessageRow {
        id: r.get(0)?,
        chat_id: r.get(1)?,
        parent_id: r.get(2)?,
        role: Role::parse(&r.get::<_, String>(3)?)?,
        content: r.get(4)?,
        created_at: r.get(5)?,
    })
}

/// Makes `id` the selected child of its parent (or the chat's selected root).
fn select_in(tx: &Transaction<'_>, id: i64) -> Result<()> {
    let (chat_id, parent): (i64, Option<i64>) = tx
        .query_row(
            "SELECT chat_id, parent_id FROM messages WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?
        .ok_or(Error::NotFound {
            what: "message",
            id,
        })?;
    match parent {
        Some(p) => tx.execute(
            "UPDATE messages SET selected_child_id = ?2 WHERE id = ?1",
            [p, id],
        )?,
        None => tx.execute(
            "UPDATE chats SET selected_root_id = ?2 WHERE id = ?1",
            [chat_id, id],
        )?,
    };
    tx.execute(
        "UPDATE chats SET updated_at = ?2 WHERE id = ?1",
        params![chat_id, now_ms()],
    )?;
    Ok(())
}

impl Store {
    /// Starts an empty chat with a character.
    pub fn create_chat(
        &self,
        character_id: i64,
        persona_id: Option<i64>,
        title: &str,
    ) -> Result<i64> {
        self.write(|tx| {
            let now = now_ms();
            tx.execute(
                "INSERT INTO chats (character_id, persona_id, title, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?4)",
                params![character_id, persona_id, title, now],
            )?;
            Ok(tx.last_insert_rowid())
        })
    }

    /// One chat.
    pub fn chat(&self, id: i64) -> Result<ChatRow> {
        self.conn()
            .query_row(
                "SELECT id, character_id, persona_id, title, created_at, updated_at FROM chats WHERE id = ?1",
                [id],
                chat_row,
            )
            .optional()?
            .ok_or(Error::NotFound { what: "chat", id })
    }

    /// Adds a message under `parent` (a first message when `None`) and selects it,
    /// in one transaction.
    pub fn add_message(
        &self,
        chat_id: i64,
        parent: Option<i64>,
        role: Role,
        content: &str,
    ) -> Result<i64> {
        self.write(|tx| {
            let now = now_ms();
            tx.execute(
                "INSERT INTO messages (chat_id, parent_id, role, content, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
                params![chat_id, parent, role.as_str(), content, now],
            )
            .map_err(|e| match e.sqlite_error_code() {
                Some(rusqlite::ErrorCode::ConstraintViolation) => Error::NotFound {
                    what: "chat",
                    id: chat_id,
                },
                _ => e.into(),
            })?;
            let id = tx.last_insert_rowid();
            select_in(tx, id)?;
            Ok(id)
        })
    }

    /// Replaces a message's text (streaming writes and edits).
    pub fn set_message_content(&self, id: i64, content: &str) -> Result<()> {
        self.write(|tx| {
            match tx.execute(
                "UPDATE messages SET content = ?2, updated_at = ?3 WHERE id = ?1",
                params![id, content, now_ms()],
            )? {
                0 => Err(Error::NotFound {
                    what: "message",
                    id,
                }),
                _ => Ok(()),
            }
        })
    }

    /// Makes `id` the visible one among its siblings.
    pub fn select_message(&self, id: i64) -> Result<()> {
        self.write(|tx| select_in(tx, id))
    }

    /// The visible conversation: from the selected first message down the
    /// selected children to the leaf.
    pub fn selected_path(&self, chat_id: i64) -> Result<Vec<MessageRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "WITH RECURSIVE path(id, depth) AS (
                 SELECT selected_root_id, 0 FROM chats WHERE id = ?1 AND selected_root_id IS NOT NULL
                 UNION ALL
                 SELECT m.selected_child_id, path.depth + 1 FROM messages m JOIN path ON m.id = path.id
                 WHERE m.selected_child_id IS NOT NULL
             )
             SELECT m.id, m.chat_id, m.parent_id, m.role, m.content, m.created_at
             FROM path JOIN messages m ON m.id = path.id ORDER BY path.depth",
        )?;
        let rows = stmt.query_map([chat_id], message)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The ids of a message and its siblings, oldest first.
    pub fn siblings(&self, id: i64) -> Result<Vec<i64>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT s.id FROM messages m JOIN messages s
               ON s.chat_id = m.chat_id AND s.parent_id IS m.parent_id
             WHERE m.id = ?1 ORDER BY s.id",
        )?;
        let ids: Vec<i64> = stmt
            .query_map([id], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        if ids.is_empty() {
            return Err(Error::NotFound {
                what: "message",
                id,
            });
        }
        Ok(ids)
    }

    /// How many replies (or first messages) `parent` has in a chat so far.
    pub fn child_count(&self, chat_id: i64, parent: Option<i64>) -> Result<usize> {
        let n: i64 = self.conn().query_row(
            "SELECT COUNT(*) FROM messages WHERE chat_id = ?1 AND parent_id IS ?2",
            rusqlite::params![chat_id, parent],
            |r| r.get(0),
        )?;
        Ok(n as usize)
    }

    /// A character's chats, the most recently active first.
    pub fn list_chats(&self, character_id: i64) -> Result<Vec<ChatRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, character_id, persona_id, title, created_at, updated_at FROM chats
             WHERE character_id = ?1 ORDER BY updated_at DESC, id DESC",
        )?;
        let rows = stmt.query_map([character_id], chat_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Deletes a chat and all its messages.
    pub fn delete_chat(&self, id: i64) -> Result<()> {
        self.write(
            |tx| match tx.execute("DELETE FROM chats WHERE id = ?1", [id])? {
                0 => Err(Error::NotFound { what: "chat", id }),
                _ => Ok(()),
            },
        )
    }

    /// One message.
    pub fn message(&self, id: i64) -> Result<MessageRow> {
        self.conn()
            .query_row(
                "SELECT id, chat_id, parent_id, role, content, created_at FROM messages WHERE id = ?1",
                [id],
                message,
            )
            .optional()?
            .ok_or(Error::NotFound {
                what: "message",
                id,
            })
    }

    /// The messages from the first one down to `id`, whichever branch it is on.
    pub fn path_to(&self, id: i64) -> Result<Vec<MessageRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "WITH RECURSIVE up(id, depth) AS (
                 SELECT ?1, 0
                 UNION ALL
                 SELECT m.parent_id, up.depth + 1 FROM messages m JOIN up ON m.id = up.id
                 WHERE m.parent_id IS NOT NULL
             )
             SELECT m.id, m.chat_id, m.parent_id, m.role, m.content, m.created_at
             FROM up JOIN messages m ON m.id = up.id ORDER BY up.depth DESC",
        )?;
        let rows: Vec<MessageRow> = stmt
            .query_map([id], message)?
            .collect::<rusqlite::Result<_>>()?;
        if rows.is_empty() {
            return Err(Error::NotFound {
                what: "message",
                id,
            });
        }
        Ok(rows)
    }

    /// Makes the branch through `id` the visible one (every ancestor selected).
    pub fn select_path(&self, id: i64) -> Result<()> {
        let path = self.path_to(id)?;
        self.write(|tx| {
            for m in &path {
                select_in(tx, m.id)?;
            }
            Ok(())
        })
    }

    /// Deletes a message and everything that follows it on any branch; a
    /// sibling (the newest) becomes the visible one.
    pub fn delete_message(&self, id: i64) -> Result<()> {
        let m = self.message(id)?;
        self.write(|tx| {
            tx.execute("DELETE FROM messages WHERE id = ?1", [id])?;
            let next: Option<i64> = tx
                .query_row(
                    "SELECT id FROM messages WHERE chat_id = ?1 AND parent_id IS ?2 ORDER BY id DESC LIMIT 1",
                    params![m.chat_id, m.parent_id],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(next) = next {
                select_in(tx, next)?;
            }
            Ok(())
        })
    }

    /// Renames a chat.
    pub fn rename_chat(&self, id: i64, title: &str) -> Result<()> {
        self.write(|tx| {
            match tx.execute(
                "UPDATE chats SET title = ?2, updated_at = ?3 WHERE id = ?1",
                params![id, title, now_ms()],
            )? {
                0 => Err(Error::NotFound { what: "chat", id }),
                _ => Ok(()),
            }
        })
    }

    /// A chat's generation settings (JSON), if any were saved.
    pub fn chat_settings(&self, id: i64) -> Result<Option<String>> {
        self.conn()
            .query_row("SELECT settings FROM chats WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?
            .ok_or(Error::NotFound { what: "chat", id })
    }

    /// Saves a chat's generation settings (JSON).
    pub fn set_chat_settings(&self, id: i64, json: &str) -> Result<()> {
        self.write(|tx| {
            match tx.execute(
                "UPDATE chats SET settings = ?2 WHERE id = ?1",
                params![id, json],
            )? {
                0 => Err(Error::NotFound { what: "chat", id }),
                _ => Ok(()),
            }
        })
    }

    /// Creates a whole chat in one transaction: each entry of `path` is one
    /// level of the conversation with its alternatives (swipes) and the index
    /// of the visible one. Either all of it is stored or nothing.
    pub fn insert_chat_tree(
        &self,
        character_id: i64,
        persona_id: Option<i64>,
        title: &str,
        path: &[(Role, Vec<String>, usize)],
    ) -> Result<i64> {
        self.write(|tx| {
            let now = now_ms();
            tx.execute(
                "INSERT INTO chats (character_id, persona_id, title, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?4)",
                params![character_id, persona_id, title, now],
            )?;
            let chat = tx.last_insert_rowid();
            let mut parent: Option<i64> = None;
            for (role, swipes, selected) in path {
                let mut chosen = None;
                for (i, text) in swipes.iter().enumerate() {
                    tx.execute(
                        "INSERT INTO messages (chat_id, parent_id, role, content, created_at, updated_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
                        params![chat, parent, role.as_str(), text, now],
                    )?;
                    if i == *selected || chosen.is_none() {
                        chosen = Some(tx.last_insert_rowid());
                    }
                }
                let Some(c) = chosen else { break };
                select_in(tx, c)?;
                parent = Some(c);
            }
            Ok(chat)
        })
    }

    /// Messages whose text matches `query` (words, any order), best first.
    pub fn search_messages(&self, query: &str, limit: u32) -> Result<Vec<SearchHit>> {
        // Quote every word so user text is never read as FTS5 syntax.
        let fts_query = query
            .split_whitespace()
            .map(|w| format!("\"{}\"", w.replace('"', "\"\"")))
            .collect::<Vec<_>>()
            .join(" ");
        if fts_query.is_empty() {
            return Ok(Vec::new());
        }
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT m.id, m.chat_id, snippet(messages_fts, 0, '[', ']', '…', 12)
             FROM messages_fts JOIN messages m ON m.id = messages_fts.rowid
             WHERE messages_fts MATCH ?1 ORDER BY rank LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![fts_query, limit], |r| {
            Ok(SearchHit {
                message_id: r.get(0)?,
                chat_id: r.get(1)?,
                snippet: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dramatis_persona::CharacterCard;

    fn chat_store() -> (Store, i64) {
        let store = Store::open_in_memory().unwrap();
        let card = CharacterCard {
            name: "Kit".into(),
            ..Default::default()
        };
        let c = store.insert_character(&card, None, None).unwrap();
        let chat = store.create_chat(c, None, "First").unwrap();
        (store, chat)
    }

    #[test]
    fn the_visible_path_follows_selected_children() {
        let (store, chat) = chat_store();
        let g1 = store
            .add_message(chat, None, Role::Assistant, "Hello")
            .unwrap();
        let g2 = store
            .add_message(chat, None, Role::Assistant, "Hi there")
            .unwrap();
        let u = store
            .add_message(chat, Some(g2), Role::User, "Hey")
            .unwrap();
        let a = store
            .add_message(chat, Some(u), Role::Assistant, "What brings you")
            .unwrap();
        let ids = |s: &Store| {
            s.selected_path(chat)
                .unwrap()
                .iter()
                .map(|m| m.id)
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&store), [g2, u, a]);
        assert_eq!(store.siblings(g2).unwrap(), [g1, g2]);
        store.select_message(g1).unwrap();
        assert_eq!(ids(&store), [g1]);
        store.select_message(g2).unwrap();
        assert_eq!(ids(&store), [g2, u, a], "the branch below is remembered");
    }

    #[test]
    fn search_finds_edited_text_and_treats_syntax_as_words() {
        let (store, chat) = chat_store();
        let m = store
            .add_message(chat, None, Role::User, "the lantern flickers")
            .unwrap();
        assert_eq!(
            store.search_messages("lantern", 5).unwrap()[0].message_id,
            m
        );
        store.set_message_content(m, "the candle gutters").unwrap();
        assert!(store.search_messages("lantern", 5).unwrap().is_empty());
        assert_eq!(
            store.search_messages("CANDLE", 5).unwrap()[0].snippet,
            "the [candle] gutters"
        );
        assert!(
            store
                .search_messages("\"unbalanced AND (", 5)
                .unwrap()
                .is_empty()
        );
        assert!(store.search_messages("   ", 5).unwrap().is_empty());
    }

    #[test]
    fn a_message_for_a_missing_chat_is_refused() {
        let (store, _) = chat_store();
        let err = store.add_message(4242, None, Role::User, "x").unwrap_err();
        assert!(matches!(err, Error::NotFound { what: "chat", .. }), "{err}");
    }

    #[test]
    fn deleting_a_character_deletes_its_chats() {
        let (store, chat) = chat_store();
        store.add_message(chat, None, Role::User, "bye").unwrap();
        let character = store.chat(chat).unwrap().character_id;
        store.delete_character(character).unwrap();
        assert!(matches!(store.chat(chat), Err(Error::NotFound { .. })));
        assert!(store.search_messages("bye", 5).unwrap().is_empty());
    }
}
