//! Lorebooks of their own (world info not embedded in a card) and the links
//! that say where each applies.
//!
//! Invariants: a book is stored as one JSON document the persona crate reads;
//! a link names a character, a chat, or neither (every chat), never both, and
//! goes when its book, character or chat is deleted.

use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::{Error, Result, Store, now_ms};

/// A stored lorebook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LorebookRow {
    /// Id.
    pub id: i64,
    /// Its name (also inside the JSON; kept here for lists).
    pub name: String,
    /// The book, JSON.
    pub book: String,
    /// Where it applies.
    pub links: Vec<LorebookLink>,
    /// ms since the epoch.
    pub updated_at: i64,
}

/// Where a lorebook applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "scope", content = "id", rename_all = "snake_case")]
pub enum LorebookLink {
    /// Every chat.
    Global,
    /// Every chat with this character.
    Character(i64),
    /// This one chat.
    Chat(i64),
}

fn links_of(conn: &rusqlite::Connection, id: i64) -> Result<Vec<LorebookLink>> {
    let mut st = conn.prepare_cached(
        "SELECT character_id, chat_id FROM lorebook_links WHERE lorebook_id = ?1
         ORDER BY character_id IS NOT NULL, chat_id IS NOT NULL, character_id, chat_id",
    )?;
    let links = st
        .query_map([id], |r| {
            Ok(
                match (r.get::<_, Option<i64>>(0)?, r.get::<_, Option<i64>>(1)?) {
                    (Some(c), _) => LorebookLink::Character(c),
                    (None, Some(c)) => LorebookLink::Chat(c),
                    (None, None) => LorebookLink::Global,
                },
            )
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(links)
}

fn write_links(tx: &rusqlite::Transaction<'_>, id: i64, links: &[LorebookLink]) -> Result<()> {
    tx.execute("DELETE FROM lorebook_links WHERE lorebook_id = ?1", [id])?;
    let mut ins = tx.prepare_cached(
        "INSERT OR IGNORE INTO lorebook_links (lorebook_id, character_id, chat_id) VALUES (?1, ?2, ?3)",
    )?;
    for l in links {
        let (character, chat) = match *l {
            LorebookLink::Global => (None, None),
            LorebookLink::Character(c) => (Some(c), None),
            LorebookLink::Chat(c) => (None, Some(c)),
        };
        ins.execute(params![id, character, chat])
            .map_err(|e| match e {
                rusqlite::Error::SqliteFailure(f, _)
                    if f.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    Error::NotFound {
                        what: if character.is_some() {
                            "character"
                        } else {
                            "chat"
                        },
                        id: character.or(chat).unwrap_or_default(),
                    }
                }
                e => e.into(),
            })?;
    }
    Ok(())
}

impl Store {
    /// Stores a new lorebook with its links; returns its id.
    pub fn insert_lorebook(&self, name: &str, book: &str, links: &[LorebookLink]) -> Result<i64> {
        self.write(|tx| {
            let now = now_ms();
            tx.execute(
                "INSERT INTO lorebooks (name, book, created_at, updated_at) VALUES (?1, ?2, ?3, ?3)",
                params![name, book, now],
            )?;
            let id = tx.last_insert_rowid();
            write_links(tx, id, links)?;
            Ok(id)
        })
    }

    /// Replaces a lorebook's content (and its links, when given).
    pub fn update_lorebook(
        &self,
        id: i64,
        name: &str,
        book: &str,
        links: Option<&[LorebookLink]>,
    ) -> Result<()> {
        self.write(|tx| {
            let n = tx.execute(
                "UPDATE lorebooks SET name = ?2, book = ?3, updated_at = ?4 WHERE id = ?1",
                params![id, name, book, now_ms()],
            )?;
            if n == 0 {
                return Err(Error::NotFound {
                    what: "lorebook",
                    id,
                });
            }
            if let Some(links) = links {
                write_links(tx, id, links)?;
            }
            Ok(())
        })
    }

    /// Sets where a lorebook applies.
    pub fn set_lorebook_links(&self, id: i64, links: &[LorebookLink]) -> Result<()> {
        self.write(|tx| {
            let exists: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM lorebooks WHERE id = ?1)",
                [id],
                |r| r.get(0),
            )?;
            if !exists {
                return Err(Error::NotFound {
                    what: "lorebook",
                    id,
                });
            }
            write_links(tx, id, links)
        })
    }

    /// One lorebook.
    pub fn lorebook(&self, id: i64) -> Result<LorebookRow> {
        let conn = self.conn();
        let row = conn
            .query_row(
                "SELECT id, name, book, updated_at FROM lorebooks WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?
            .ok_or(Error::NotFound {
                what: "lorebook",
                id,
            })?;
        Ok(LorebookRow {
            id: row.0,
            name: row.1,
            book: row.2,
            links: links_of(&conn, id)?,
            updated_at: row.3,
        })
    }

    /// Every lorebook, by name.
    pub fn list_lorebooks(&self) -> Result<Vec<LorebookRow>> {
        let ids: Vec<i64> = {
            let conn = self.conn();
            let mut st =
                conn.prepare("SELECT id FROM lorebooks ORDER BY name COLLATE NOCASE, id")?;
            st.query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?
        };
        ids.into_iter().map(|id| self.lorebook(id)).collect()
    }

    /// The books that apply to a chat with a character: global ones, the
    /// character's and the chat's, each once, oldest first.
    pub fn lorebooks_for_chat(&self, chat_id: i64, character_id: i64) -> Result<Vec<LorebookRow>> {
        let ids: Vec<i64> = {
            let conn = self.conn();
            let mut st = conn.prepare_cached(
                "SELECT DISTINCT lorebook_id FROM lorebook_links
                 WHERE (character_id IS NULL AND chat_id IS NULL)
                    OR character_id = ?2 OR chat_id = ?1
                 ORDER BY lorebook_id",
            )?;
            st.query_map(params![chat_id, character_id], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?
        };
        ids.into_iter().map(|id| self.lorebook(id)).collect()
    }

    /// Deletes a lorebook and its links.
    pub fn delete_lorebook(&self, id: i64) -> Result<()> {
        self.write(
            |tx| match tx.execute("DELETE FROM lorebooks WHERE id = ?1", [id])? {
                0 => Err(Error::NotFound {
                    what: "lorebook",
                    id,
                }),
                _ => Ok(()),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_with_chat() -> (Store, i64, i64) {
        let s = Store::open_in_memory().unwrap();
        let card = dramatis_persona::CharacterCard {
            name: "Kestrel".into(),
            ..Default::default()
        };
        let c = s.insert_character(&card, None, None).unwrap();
        let chat = s.create_chat(c, None, "t").unwrap();
        (s, c, chat)
    }

    #[test]
    fn links_choose_which_books_a_chat_sees() {
        let (s, c, chat) = store_with_chat();
        let other_card = dramatis_persona::CharacterCard {
            name: "Other".into(),
            ..Default::default()
        };
        let other = s.insert_character(&other_card, None, None).unwrap();
        let other_chat = s.create_chat(other, None, "o").unwrap();
        let global = s
            .insert_lorebook("World", "{}", &[LorebookLink::Global])
            .unwrap();
        let mine = s
            .insert_lorebook("Ship", "{}", &[LorebookLink::Character(c)])
            .unwrap();
        let this_chat = s
            .insert_lorebook(
                "Scene",
                "{}",
                &[LorebookLink::Chat(chat), LorebookLink::Chat(chat)],
            )
            .unwrap();
        let unlinked = s.insert_lorebook("Drafts", "{}", &[]).unwrap();
        let ids = |v: Vec<LorebookRow>| v.into_iter().map(|r| r.id).collect::<Vec<_>>();
        assert_eq!(
            ids(s.lorebooks_for_chat(chat, c).unwrap()),
            [global, mine, this_chat]
        );
        assert_eq!(
            ids(s.lorebooks_for_chat(other_chat, other).unwrap()),
            [global]
        );
        assert_eq!(
            s.lorebook(this_chat).unwrap().links,
            [LorebookLink::Chat(chat)]
        );
        assert_eq!(s.list_lorebooks().unwrap().len(), 4);
        s.delete_character(c).unwrap();
        assert!(
            s.lorebook(mine).unwrap().links.is_empty(),
            "links go with the character"
        );
        s.delete_lorebook(unlinked).unwrap();
        assert!(matches!(s.lorebook(unlinked), Err(Error::NotFound { .. })));
    }

    #[test]
    fn a_link_to_a_missing_character_changes_nothing() {
        let (s, c, _) = store_with_chat();
        let id = s
            .insert_lorebook("Ship", r#"{"a":1}"#, &[LorebookLink::Character(c)])
            .unwrap();
        let err = s
            .update_lorebook(id, "Renamed", "{}", Some(&[LorebookLink::Character(9999)]))
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::NotFound {
                    what: "character",
                    ..
                }
            ),
            "{err}"
        );
        let row = s.lorebook(id).unwrap();
        assert_eq!(
            (row.name.as_str(), row.book.as_str()),
            ("Ship", r#"{"a":1}"#)
        );
        assert_eq!(row.links, [LorebookLink::Character(c)]);
    }
}
