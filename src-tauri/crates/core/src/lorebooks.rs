//! Lorebooks: stored books, where they apply, and the world info a chat sees.
//!
//! Invariants: a stored book always parses back (it is written from a checked
//! [`Lorebook`]); a chat sees its character's embedded book first, then the
//! linked books (global, the character's, the chat's), each once.

use std::path::Path;

use dramatis_persona::ValidationErrors;
use dramatis_persona::lorebook::Lorebook;
use dramatis_store::{LorebookLink, LorebookRow};
use serde::{Deserialize, Serialize};

use crate::{CharacterCard, Dramatis, Error, Result};

/// A lorebook as the Lorebooks view shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LorebookView {
    /// Id.
    pub id: i64,
    /// The book.
    pub book: Lorebook,
    /// Where it applies.
    pub links: Vec<LorebookLink>,
    /// ms since the epoch.
    pub updated_at: i64,
}

/// Export formats for a lorebook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LorebookFormat {
    /// SillyTavern's world-info file (entries keyed by uid).
    WorldInfo,
    /// Character Card V3's standalone `lorebook_v3`.
    V3,
}

/// Bounds on a book typed or imported here.
const MAX_ENTRIES: usize = 10_000;
const MAX_NAME: usize = 256;
const MAX_CONTENT: usize = 200_000;
const MAX_KEYS: usize = 256;

/// Checks a book's size; all problems at once.
pub(crate) fn check_book(book: &Lorebook) -> std::result::Result<(), ValidationErrors> {
    let mut e = ValidationErrors::default();
    if book.name.trim().is_empty() {
        e.push("name", "A lorebook needs a name.");
    } else if book.name.chars().count() > MAX_NAME {
        e.push(
            "name",
            format!("Keep the name under {MAX_NAME} characters."),
        );
    }
    if book.entries.len() > MAX_ENTRIES {
        e.push(
            "entries",
            format!(
                "This book has {} entries; the most a book can have is {MAX_ENTRIES}.",
                book.entries.len()
            ),
        );
    }
    for (i, entry) in book.entries.iter().enumerate() {
        let n = entry.content.chars().count();
        if n > MAX_CONTENT {
            e.push(
                "entries",
                format!(
                    "Entry {} is {n} characters; the most is {MAX_CONTENT}.",
                    i + 1
                ),
            );
        }
        if entry.keys.len() + entry.secondary_keys.len() > MAX_KEYS {
            e.push(
                "entries",
                format!("Entry {} has more than {MAX_KEYS} keys.", i + 1),
            );
        }
    }
    e.into_result()
}

fn view(row: LorebookRow) -> Result<LorebookView> {
    let book: Lorebook = serde_json::from_str(&row.book)
        .map_err(|e| Error::Conflict(format!("lorebook {} is damaged: {e}", row.id)))?;
    Ok(LorebookView {
        id: row.id,
        book,
        links: row.links,
        updated_at: row.updated_at,
    })
}

fn encode(book: &Lorebook) -> String {
    serde_json::to_string(book).expect("a lorebook serializes")
}

impl Dramatis {
    /// Every stored lorebook, by name.
    pub fn list_lorebooks(&self) -> Result<Vec<LorebookView>> {
        self.store()
            .list_lorebooks()?
            .into_iter()
            .map(view)
            .collect()
    }

    /// One lorebook.
    pub fn lorebook(&self, id: i64) -> Result<LorebookView> {
        view(self.store().lorebook(id)?)
    }

    /// Checks and stores a new lorebook.
    pub fn create_lorebook(
        &self,
        mut book: Lorebook,
        links: Vec<LorebookLink>,
    ) -> Result<LorebookView> {
        book.name = book.name.trim().to_owned();
        check_book(&book)?;
        let id = self
            .store()
            .insert_lorebook(&book.name, &encode(&book), &links)?;
        self.lorebook(id)
    }

    /// Checks and saves an edit (and the links, when given); a rejected edit changes nothing.
    pub fn update_lorebook(
        &self,
        id: i64,
        mut book: Lorebook,
        links: Option<Vec<LorebookLink>>,
    ) -> Result<LorebookView> {
        book.name = book.name.trim().to_owned();
        check_book(&book)?;
        self.store()
            .update_lorebook(id, &book.name, &encode(&book), links.as_deref())?;
        self.lorebook(id)
    }

    /// Sets where a lorebook applies.
    pub fn set_lorebook_links(&self, id: i64, links: Vec<LorebookLink>) -> Result<LorebookView> {
        self.store().set_lorebook_links(id, &links)?;
        self.lorebook(id)
    }

    /// Deletes a lorebook.
    pub fn delete_lorebook(&self, id: i64) -> Result<()> {
        Ok(self.store().delete_lorebook(id)?)
    }

    /// A lorebook as a file: the suggested name and the JSON bytes.
    pub fn export_lorebook(&self, id: i64, format: LorebookFormat) -> Result<(String, Vec<u8>)> {
        let v = self.lorebook(id)?;
        let value = match format {
            LorebookFormat::WorldInfo => v.book.to_world_info(),
            LorebookFormat::V3 => v.book.to_v3(),
        };
        let safe = crate::paths::file_stem(&v.book.name, false);
        Ok((
            format!("{safe}.json"),
            serde_json::to_vec_pretty(&value).expect("a value serializes"),
        ))
    }

    /// Writes a lorebook to `path` (atomically).
    pub fn export_lorebook_to(&self, id: i64, format: LorebookFormat, path: &Path) -> Result<()> {
        let (_, bytes) = self.export_lorebook(id, format)?;
        crate::write_atomically(path, &bytes)
    }

    /// The books a chat's world info scans, in order: the character's own
    /// (embedded in the card), then the stored ones linked to every chat, the
    /// character, or this chat. A book that does not parse is skipped.
    pub(crate) fn world_books(
        &self,
        chat_id: i64,
        character_id: i64,
        card: &CharacterCard,
    ) -> Result<Vec<Lorebook>> {
        let mut books = Vec::new();
        if let Some(b) = &card.character_book {
            match Lorebook::from_character_book(b) {
                Ok(b) => books.push(b),
                Err(e) => tracing::warn!(error = %e, "the card's lorebook is unreadable; skipped"),
            }
        }
        for row in self.store().lorebooks_for_chat(chat_id, character_id)? {
            match view(row) {
                Ok(v) => books.push(v.book),
                Err(e) => tracing::warn!(error = %e, "a lorebook is unreadable; skipped"),
            }
        }
        Ok(books)
    }
}
