use dramatis_persona::{Avatar, CharacterCard};
use rusqlite::{OptionalExtension, Row, Transaction, params};
use serde::Serialize;

use crate::{Error, Result, Store, now_ms};

/// A stored character: its card and bookkeeping. The avatar bytes are fetched
/// separately ([`Store::avatar`]) so lists stay small.
#[derive(Debug, Clone, PartialEq)]
pub struct CharacterRow {
    /// Row id.
    pub id: i64,
    /// The card's fields.
    pub card: CharacterCard,
    /// The built-in this row was installed from, if any.
    pub builtin_key: Option<String>,
    /// Whether an avatar image is stored.
    pub has_avatar: bool,
    /// Creation time, ms since the epoch.
    pub created_at: i64,
    /// Last change, ms since the epoch (also the avatar's cache key).
    pub updated_at: i64,
}

/// Which characters [`Store::list_characters`] returns.
#[derive(Debug, Clone, Default)]
pub struct CharacterFilter {
    /// Only characters carrying this tag (compared case-insensitively).
    pub tag: Option<String>,
    /// Only characters whose name contains this text (case-insensitively).
    pub name_contains: Option<String>,
}

/// What an update does to the stored avatar.
#[derive(Debug, Clone)]
pub enum AvatarChange {
    /// Leave it as it is.
    Keep,
    /// Replace it.
    Set(Avatar),
    /// Remove it.
    Remove,
}

/// A tag and how many characters carry it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TagCount {
    /// The tag as first written.
    pub tag: String,
    /// Characters carrying it.
    pub count: u32,
}

const COLUMNS: &str = "id, card, builtin_key, avatar IS NOT NULL, created_at, updated_at";

fn from_row(row: &Row<'_>) -> rusqlite::Result<CharacterRow> {
    let card: String = row.get(1)?;
    let card = serde_json::from_str(&card).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Text, Box::new(e))
    })?;
    Ok(CharacterRow {
        id: row.get(0)?,
        card,
        builtin_key: row.get(2)?,
        has_avatar: row.get(3)?,
        created_at: row.get(4)?,
        updated_at: row.get(5)?,
    })
}

fn fold(s: &str) -> String {
    s.to_lowercase()
}

fn write_tags(tx: &Transaction<'_>, id: i64, tags: &[String]) -> Result<()> {
    tx.execute("DELETE FROM character_tags WHERE character_id = ?1", [id])?;
    let mut insert = tx.prepare_cached(
        "INSERT OR IGNORE INTO character_tags (character_id, tag, tag_folded, position) VALUES (?1, ?2, ?3, ?4)",
    )?;
    for (i, tag) in tags.iter().enumerate() {
        insert.execute(params![id, tag, fold(tag), i as i64])?;
    }
    Ok(())
}

fn card_json(card: &CharacterCard) -> Result<String> {
    serde_json::to_string(card).map_err(|e| Error::Corrupt(format!("cannot encode a card: {e}")))
}

impl Store {
    /// Stores a new character (with its tags and avatar) and returns its id.
    /// The caller validates the card first.
    pub fn insert_character(
        &self,
        card: &CharacterCard,
        avatar: Option<&Avatar>,
        builtin_key: Option<&str>,
    ) -> Result<i64> {
        let json = card_json(card)?;
        self.write(|tx| {
            let now = now_ms();
            tx.execute(
                "INSERT INTO characters (name, name_folded, card, avatar, avatar_mime, builtin_key, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)",
                params![
                    card.name,
                    fold(&card.name),
                    json,
                    avatar.map(Avatar::bytes),
                    avatar.map(|a| a.format().mime()),
                    builtin_key,
                    now
                ],
            )?;
            let id = tx.last_insert_rowid();
            write_tags(tx, id, &card.tags)?;
            Ok(id)
        })
    }

    /// Replaces a character's card (and tags), and its avatar as `avatar` says.
    pub fn update_character(
        &self,
        id: i64,
        card: &CharacterCard,
        avatar: AvatarChange,
    ) -> Result<()> {
        let json = card_json(card)?;
        self.write(|tx| {
            let now = now_ms();
            let n = tx.execute(
                "UPDATE characters SET name = ?2, name_folded = ?3, card = ?4, updated_at = max(?5, updated_at + 1) WHERE id = ?1",
                params![id, card.name, fold(&card.name), json, now],
            )?;
            if n == 0 {
                return Err(Error::NotFound { what: "character", id });
            }
            match avatar {
                AvatarChange::Keep => {}
                AvatarChange::Set(a) => {
                    tx.execute(
                        "UPDATE characters SET avatar = ?2, avatar_mime = ?3 WHERE id = ?1",
                        params![id, a.bytes(), a.format().mime()],
                    )?;
                }
                AvatarChange::Remove => {
                    tx.execute(
                        "UPDATE characters SET avatar = NULL, avatar_mime = NULL WHERE id = ?1",
                        [id],
                    )?;
                }
            }
            write_tags(tx, id, &card.tags)
        })
    }

    /// One character.
    pub fn character(&self, id: i64) -> Result<CharacterRow> {
        self.conn()
            .query_row(
                &format!("SELECT {COLUMNS} FROM characters WHERE id = ?1"),
                [id],
                from_row,
            )
            .optional()?
            .ok_or(Error::NotFound {
                what: "character",
                id,
            })
    }

    /// Characters with this name (compared case-insensitively, trimmed) and
    /// this creator (exactly; "" for none): the ones an import would duplicate.
    pub fn characters_named(&self, name: &str, creator: &str) -> Result<Vec<i64>> {
        let conn = self.conn();
        let mut st = conn.prepare_cached(
            "SELECT id FROM characters
             WHERE name_folded = ?1 AND IFNULL(json_extract(card, '$.creator'), '') = ?2
             ORDER BY id",
        )?;
        let ids = st
            .query_map(params![fold(name.trim()), creator], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(ids)
    }

    /// A character's avatar, if it has one.
    pub fn avatar(&self, id: i64) -> Result<Option<Avatar>> {
        let row: Option<(Option<Vec<u8>>, Option<String>)> = self
            .conn()
            .query_row(
                "SELECT avatar, avatar_mime FROM characters WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        match row {
            None => Err(Error::NotFound {
                what: "character",
                id,
            }),
            Some((Some(bytes), Some(mime))) => {
                let format = mime.parse().map_err(Error::Corrupt)?;
                Ok(Some(Avatar::from_trusted(bytes, format)))
            }
            Some(_) => Ok(None),
        }
    }

    /// Characters matching `filter`, by name.
    pub fn list_characters(&self, filter: &CharacterFilter) -> Result<Vec<CharacterRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM characters c
             WHERE (?1 IS NULL OR EXISTS (SELECT 1 FROM character_tags t
                                          WHERE t.character_id = c.id AND t.tag_folded = ?1))
               AND (?2 IS NULL OR instr(name_folded, ?2) > 0)
             ORDER BY name_folded, id"
        ))?;
        let tag = filter.tag.as_deref().map(|t| fold(t.trim()));
        let name = filter
            .name_contains
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(fold);
        let rows = stmt.query_map(params![tag, name], from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Deletes a character and, through the foreign keys, its chats.
    pub fn delete_character(&self, id: i64) -> Result<()> {
        self.write(
            |tx| match tx.execute("DELETE FROM characters WHERE id = ?1", [id])? {
                0 => Err(Error::NotFound {
                    what: "character",
                    id,
                }),
                _ => Ok(()),
            },
        )
    }

    /// Every tag in use, with how many characters carry it, most used first.
    pub fn tags(&self) -> Result<Vec<TagCount>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT min(tag), count(*) FROM character_tags GROUP BY tag_folded ORDER BY count(*) DESC, tag_folded",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(TagCount {
                tag: r.get(0)?,
                count: r.get(1)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The built-in keys currently present.
    pub fn builtin_keys(&self) -> Result<Vec<String>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached("SELECT builtin_key FROM characters WHERE builtin_key IS NOT NULL")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const PNG_1X1: &[u8] = &[
        0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a, 0, 0, 0, 13, b'I', b'H', b'D', b'R', 0, 0,
        0, 1, 0, 0, 0, 1, 8, 6, 0, 0, 0, 0x1f, 0x15, 0xc4, 0x89, 0, 0, 0, 13, b'I', b'D', b'A',
        b'T', 0x78, 0x9c, 0x63, 0xf8, 0xcf, 0xc0, 0xf0, 0x1f, 0, 0x05, 0x00, 0x01, 0xff, 0x89,
        0x99, 0x3d, 0x1d, 0, 0, 0, 0, b'I', b'E', b'N', b'D', 0xae, 0x42, 0x60, 0x82,
    ];

    fn full_card() -> CharacterCard {
        let mut ext = serde_json::Map::new();
        ext.insert(
            "zz_unknown".into(),
            json!({"keep": [1, "two", null, {"deep": true}]}),
        );
        ext.insert("depth_prompt".into(), json!({"prompt": "…", "depth": 4}));
        CharacterCard {
            name: "Ső Yeon-ji 서연지".into(),
            description: "Une archiviste de l'étrange — 🌒".into(),
            personality: "curious, dry".into(),
            scenario: "A night shift at the archive.".into(),
            first_mes: "*looks up* Oh. You found the door.".into(),
            mes_example: "<START>\n{{user}}: hi\n{{char}}: hello".into(),
            creator_notes: "Slow burn mystery".into(),
            system_prompt: "{{original}} Stay in character.".into(),
            post_history_instructions: "Keep replies short.".into(),
            alternate_greetings: vec!["Second hello".into(), "Третье".into()],
            character_book: Some(json!({"entries": [{"keys": ["door"], "content": "It hums."}]})),
            tags: vec!["Mystery".into(), "Archive".into()],
            creator: "dramatis".into(),
            character_version: "1.2".into(),
            extensions: ext,
            other: serde_json::Map::new(),
        }
    }

    #[test]
    fn duplicates_are_found_by_name_and_creator() {
        let store = Store::open_in_memory().unwrap();
        let card = full_card();
        let a = store.insert_character(&card, None, None).unwrap();
        let mut anon = card.clone();
        anon.creator = String::new();
        let b = store.insert_character(&anon, None, None).unwrap();
        assert_eq!(
            store
                .characters_named(&format!("  {} ", card.name.to_uppercase()), "dramatis")
                .unwrap(),
            [a]
        );
        assert_eq!(store.characters_named(&card.name, "").unwrap(), [b]);
        assert!(
            store
                .characters_named(&card.name, "someone")
                .unwrap()
                .is_empty()
        );
        assert!(
            store
                .characters_named("Nobody", "dramatis")
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn every_field_round_trips() {
        let store = Store::open_in_memory().unwrap();
        let card = full_card();
        let avatar = Avatar::parse(PNG_1X1.to_vec()).unwrap();
        let id = store.insert_character(&card, Some(&avatar), None).unwrap();
        let row = store.character(id).unwrap();
        assert_eq!(row.card, card);
        assert!(row.has_avatar);
        assert_eq!(store.avatar(id).unwrap().unwrap(), avatar);
        let keys: Vec<_> = row.card.extensions.keys().collect();
        assert_eq!(keys, ["zz_unknown", "depth_prompt"]);
    }

    #[test]
    fn update_replaces_fields_tags_and_avatar() {
        let store = Store::open_in_memory().unwrap();
        let avatar = Avatar::parse(PNG_1X1.to_vec()).unwrap();
        let id = store
            .insert_character(&full_card(), Some(&avatar), None)
            .unwrap();
        let before = store.character(id).unwrap();
        let mut card = full_card();
        card.name = "Renamed".into();
        card.tags = vec!["Noir".into()];
        store
            .update_character(id, &card, AvatarChange::Remove)
            .unwrap();
        let row = store.character(id).unwrap();
        assert_eq!(row.card.name, "Renamed");
        assert!(!row.has_avatar);
        assert!(row.updated_at > before.updated_at);
        assert_eq!(
            store.tags().unwrap(),
            [TagCount {
                tag: "Noir".into(),
                count: 1
            }]
        );
        let err = store
            .update_character(999, &card, AvatarChange::Keep)
            .unwrap_err();
        assert!(matches!(err, Error::NotFound { id: 999, .. }));
    }

    #[test]
    fn filter_by_tag_and_name_ignores_case_including_non_ascii() {
        let store = Store::open_in_memory().unwrap();
        let mut a = full_card();
        a.name = "Élodie".into();
        a.tags = vec!["Fantasy".into()];
        let mut b = full_card();
        b.name = "Bram".into();
        b.tags = vec!["Sci-Fi".into(), "fantasy-adjacent".into()];
        store.insert_character(&a, None, None).unwrap();
        store.insert_character(&b, None, None).unwrap();
        let names = |f: CharacterFilter| -> Vec<String> {
            store
                .list_characters(&f)
                .unwrap()
                .into_iter()
                .map(|r| r.card.name)
                .collect()
        };
        assert_eq!(names(CharacterFilter::default()), ["Bram", "Élodie"]);
        assert_eq!(
            names(CharacterFilter {
                tag: Some("FANTASY".into()),
                ..Default::default()
            }),
            ["Élodie"]
        );
        assert_eq!(
            names(CharacterFilter {
                name_contains: Some("ÉLO".into()),
                ..Default::default()
            }),
            ["Élodie"]
        );
        assert_eq!(
            names(CharacterFilter {
                name_contains: Some("zzz".into()),
                ..Default::default()
            }),
            Vec::<String>::new()
        );
    }

    #[test]
    fn delete_removes_the_character_and_its_tags() {
        let store = Store::open_in_memory().unwrap();
        let id = store
            .insert_character(&full_card(), None, Some("builtin-x"))
            .unwrap();
        assert_eq!(store.builtin_keys().unwrap(), ["builtin-x"]);
        store.delete_character(id).unwrap();
        assert!(matches!(store.character(id), Err(Error::NotFound { .. })));
        assert!(store.tags().unwrap().is_empty());
        assert!(store.builtin_keys().unwrap().is_empty());
        assert!(matches!(
            store.delete_character(id),
            Err(Error::NotFound { .. })
        ));
    }
}
