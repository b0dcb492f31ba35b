//! Character service: create, edit, duplicate, delete, list.

use base64::Engine as _;
use dramatis_persona::lorebook::Lorebook;
use dramatis_persona::{Avatar, CharacterCard, LIMITS, ValidationErrors};
use dramatis_store::{AvatarChange, CharacterFilter, CharacterRow, TagCount};
use serde::{Deserialize, Serialize};

use crate::{Dramatis, Result};

/// What the editor sends: the card and what to do with the avatar.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct CharacterDraft {
    /// The card's fields.
    pub card: CharacterCard,
    /// Avatar change.
    #[serde(default)]
    pub avatar: AvatarEdit,
    /// The card's own lorebook, as the editor edited it; `None` leaves
    /// `card.character_book` as sent.
    #[serde(default)]
    pub book: Option<BookEdit>,
}

/// An edit of the card's embedded lorebook.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BookEdit {
    /// Replace it with this book (written in the card's `character_book` shape).
    Set {
        /// The book.
        book: Box<Lorebook>,
    },
    /// Remove it.
    Remove,
}

/// An avatar change from the editor.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AvatarEdit {
    /// Keep the current one (none for a new character).
    #[default]
    Keep,
    /// Remove it.
    Remove,
    /// Use this image, base64-encoded.
    Set {
        /// The file's bytes in standard base64.
        data_base64: String,
    },
}

/// A character as the editor shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Character {
    /// Id.
    pub id: i64,
    /// All card fields.
    pub card: CharacterCard,
    /// Whether it ships with the app.
    pub builtin: bool,
    /// Changes whenever the avatar may have; `None` when there is no avatar.
    pub avatar_version: Option<i64>,
    /// The card's own lorebook, read for the editor (`None` when it has none
    /// or it cannot be read; `card.character_book` stays as stored).
    pub book: Option<Lorebook>,
    /// Gallery summary line.
    pub tagline: String,
    /// Creation time, ms since the epoch.
    pub created_at: i64,
    /// Last change, ms since the epoch.
    pub updated_at: i64,
}

/// A character as the gallery shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CharacterSummary {
    /// Id.
    pub id: i64,
    /// Name.
    pub name: String,
    /// One line about them.
    pub tagline: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Whether it ships with the app.
    pub builtin: bool,
    /// Changes whenever the avatar may have; `None` when there is no avatar.
    pub avatar_version: Option<i64>,
}

impl From<CharacterRow> for Character {
    fn from(r: CharacterRow) -> Self {
        Self {
            id: r.id,
            book: r
                .card
                .character_book
                .as_ref()
                .and_then(|b| Lorebook::from_character_book(b).ok()),
            tagline: r.card.tagline(),
            builtin: r.builtin_key.is_some(),
            avatar_version: r.has_avatar.then_some(r.updated_at),
            created_at: r.created_at,
            updated_at: r.updated_at,
            card: r.card,
        }
    }
}

impl From<CharacterRow> for CharacterSummary {
    fn from(r: CharacterRow) -> Self {
        let c = Character::from(r);
        Self {
            id: c.id,
            tagline: c.tagline,
            builtin: c.builtin,
            avatar_version: c.avatar_version,
            name: c.card.name,
            tags: c.card.tags,
        }
    }
}

/// Checks a draft completely: every card problem and the avatar's, together.
/// Whether `field` (as validation names it) has the same value in both cards.
fn unchanged(field: &str, new: &CharacterCard, old: &CharacterCard) -> bool {
    if field == "extensions" {
        return new.extensions == old.extensions
            && new.character_book == old.character_book
            && new.other == old.other;
    }
    let (Ok(a), Ok(b)) = (serde_json::to_value(new), serde_json::to_value(old)) else {
        return false;
    };
    a.get(field).is_some() && a.get(field) == b.get(field)
}

/// Checks a draft completely: every card problem and the avatar's, together.
/// Editing an imported card that is over the editor's limits (a 300-character
/// name) only complains about the fields the edit changed: what was imported
/// whole stays whole.
fn check_edit(
    draft: CharacterDraft,
    previous: &CharacterCard,
) -> Result<(CharacterCard, AvatarChange)> {
    check_with(draft, Some(previous))
}

fn check(draft: CharacterDraft) -> Result<(CharacterCard, AvatarChange)> {
    check_with(draft, None)
}

fn check_with(
    draft: CharacterDraft,
    previous: Option<&CharacterCard>,
) -> Result<(CharacterCard, AvatarChange)> {
    let CharacterDraft {
        mut card,
        avatar,
        book,
    } = draft;
    card.normalize();
    // The edited book goes in first, so the card's size limits see it.
    let mut book_errors = ValidationErrors::default();
    match book {
        None => {}
        Some(BookEdit::Remove) => card.character_book = None,
        Some(BookEdit::Set { mut book }) => {
            if book.name.trim().is_empty() {
                book.name = card.name.clone();
            }
            match crate::lorebooks::check_book(&book) {
                Ok(()) => card.character_book = Some(book.to_character_book()),
                Err(e) => book_errors.0.extend(e.0.into_iter().map(|mut f| {
                    f.field = format!("character_book.{}", f.field);
                    f
                })),
            }
        }
    }
    let mut errors = card.validate().err().unwrap_or_default();
    if let Some(p) = previous {
        errors.0.retain(|e| {
            (e.field == "name" && card.name.trim().is_empty()) || !unchanged(&e.field, &card, p)
        });
    }
    errors.0.extend(book_errors.0);
    let change = match avatar {
        AvatarEdit::Keep => AvatarChange::Keep,
        AvatarEdit::Remove => AvatarChange::Remove,
        AvatarEdit::Set { data_base64 } => {
            match base64::engine::general_purpose::STANDARD
                .decode(data_base64.as_bytes())
                .map_err(|_| {
                    let mut e = ValidationErrors::default();
                    e.push("avatar", "The image data is not valid base64.");
                    e
                })
                .and_then(Avatar::parse)
            {
                Ok(a) => AvatarChange::Set(a),
                Err(e) => {
                    errors.0.extend(e.0);
                    AvatarChange::Keep
                }
            }
        }
    };
    errors.into_result()?;
    Ok((card, change))
}

impl Dramatis {
    /// Characters matching `filter`, by name.
    pub fn list_characters(&self, filter: &CharacterFilter) -> Result<Vec<CharacterSummary>> {
        Ok(self
            .store
            .list_characters(filter)?
            .into_iter()
            .map(Into::into)
            .collect())
    }

    /// One character with every field.
    pub fn character(&self, id: i64) -> Result<Character> {
        Ok(self.store.character(id)?.into())
    }

    /// The avatar image of a character, if any.
    pub fn avatar(&self, id: i64) -> Result<Option<Avatar>> {
        Ok(self.store.avatar(id)?)
    }

    /// Validates and stores a new character.
    pub fn create_character(&self, draft: CharacterDraft) -> Result<Character> {
        let (card, avatar) = check(draft)?;
        let avatar = match avatar {
            AvatarChange::Set(a) => Some(a),
            AvatarChange::Keep | AvatarChange::Remove => None,
        };
        let id = self.store.insert_character(&card, avatar.as_ref(), None)?;
        self.character(id)
    }

    /// Validates and saves an edit; a rejected edit changes nothing.
    pub fn update_character(&self, id: i64, draft: CharacterDraft) -> Result<Character> {
        let previous = self.store().character(id)?.card;
        let (card, avatar) = check_edit(draft, &previous)?;
        self.store.update_character(id, &card, avatar)?;
        self.character(id)
    }

    /// Copies a character (card and avatar) under the name "<name> (copy)".
    pub fn duplicate_character(&self, id: i64) -> Result<Character> {
        let mut card = self.store.character(id)?.card;
        let avatar = self.store.avatar(id)?;
        const SUFFIX: &str = " (copy)";
        let keep = LIMITS.name - SUFFIX.chars().count();
        card.name = format!(
            "{}{SUFFIX}",
            card.name.chars().take(keep).collect::<String>()
        );
        let new = self.store.insert_character(&card, avatar.as_ref(), None)?;
        self.character(new)
    }

    /// Deletes a character and its chats.
    pub fn delete_character(&self, id: i64) -> Result<()> {
        Ok(self.store.delete_character(id)?)
    }

    /// Tags in use, most used first.
    pub fn tags(&self) -> Result<Vec<TagCount>> {
        Ok(self.store.tags()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    fn app() -> (tempfile::TempDir, Dramatis) {
        let dir = tempfile::tempdir().unwrap();
        let app = Dramatis::open(dir.path()).unwrap();
        (dir, app)
    }

    fn draft(name: &str) -> CharacterDraft {
        CharacterDraft {
            card: CharacterCard {
                name: name.into(),
                tags: vec!["Test".into()],
                ..Default::default()
            },
            avatar: AvatarEdit::Keep,
            book: None,
        }
    }

    fn png() -> String {
        base64::engine::general_purpose::STANDARD.encode(crate::BUILTINS[0].avatar_png)
    }

    #[test]
    fn first_start_installs_six_builtins_and_a_persona_once() {
        let dir = tempfile::tempdir().unwrap();
        let app = Dramatis::open(dir.path()).unwrap();
        let all = app.list_characters(&CharacterFilter::default()).unwrap();
        assert_eq!(all.len(), 6);
        assert!(all.iter().all(|c| c.builtin && c.avatar_version.is_some()));
        assert_eq!(app.personas().unwrap().len(), 1);
        let victim = all[0].id;
        app.delete_character(victim).unwrap();
        drop(app);
        let app = Dramatis::open(dir.path()).unwrap();
        assert_eq!(
            app.list_characters(&CharacterFilter::default())
                .unwrap()
                .len(),
            5,
            "a deleted built-in stays deleted"
        );
        assert_eq!(app.restore_builtins().unwrap(), 1);
        assert_eq!(app.restore_builtins().unwrap(), 0);
        assert_eq!(
            app.list_characters(&CharacterFilter::default())
                .unwrap()
                .len(),
            6
        );
    }

    #[test]
    fn create_edit_duplicate_delete() {
        let (_d, app) = app();
        let mut d = draft("Nadia");
        d.avatar = AvatarEdit::Set { data_base64: png() };
        let c = app.create_character(d).unwrap();
        assert!(c.avatar_version.is_some());
        let mut edit = draft("Nadia Orlova");
        edit.card.description = "Cartographer.".into();
        let edited = app.update_character(c.id, edit).unwrap();
        assert_eq!(edited.card.description, "Cartographer.");
        assert!(edited.avatar_version.is_some(), "Keep keeps the avatar");
        let copy = app.duplicate_character(c.id).unwrap();
        assert_eq!(copy.card.name, "Nadia Orlova (copy)");
        assert!(!copy.builtin);
        assert_eq!(app.avatar(copy.id).unwrap(), app.avatar(c.id).unwrap());
        app.delete_character(c.id).unwrap();
        assert_eq!(app.character(c.id).unwrap_err().kind(), ErrorKind::NotFound);
        assert_eq!(
            app.character(copy.id).unwrap().card.name,
            "Nadia Orlova (copy)"
        );
    }

    #[test]
    fn a_rejected_edit_changes_nothing_and_reports_every_field() {
        let (_d, app) = app();
        let c = app.create_character(draft("Orin")).unwrap();
        let mut bad = draft("");
        bad.card.description = "d".repeat(10 * 1024 * 1024);
        bad.avatar = AvatarEdit::Set {
            data_base64: base64::engine::general_purpose::STANDARD.encode(b"GIF? no, text"),
        };
        let err = app.update_character(c.id, bad).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Validation);
        let crate::Error::Validation(v) = err else {
            unreachable!()
        };
        assert!(v.for_field("name").is_some());
        assert!(v.for_field("description").is_some());
        assert!(v.for_field("avatar").unwrap().contains("not a PNG"));
        assert_eq!(app.character(c.id).unwrap(), c, "nothing changed");
    }

    #[test]
    fn an_imported_card_over_the_editors_limits_stays_editable() {
        let (_d, app) = app();
        let long_name = "N".repeat(300);
        let json = serde_json::json!({"name": long_name, "tags": ["t".repeat(200)]});
        let o = app.import_card_bytes(
            "long.json",
            &serde_json::to_vec(&json).unwrap(),
            crate::OnDuplicate::Ask,
        );
        let crate::ImportOutcome::Imported { character, .. } = o else {
            panic!("{o:?}")
        };
        assert_eq!(character.name, long_name, "imported whole");
        let mut edit = app.character(character.id).unwrap().card;
        edit.description = "Now with a description.".into();
        let saved = app
            .update_character(
                character.id,
                CharacterDraft {
                    card: edit.clone(),
                    avatar: AvatarEdit::Keep,
                    book: None,
                },
            )
            .unwrap();
        assert_eq!(saved.card.name, long_name, "the untouched long name stays");
        // Changing the long field itself meets the editor's limit.
        edit.name = "M".repeat(200);
        let err = app
            .update_character(
                character.id,
                CharacterDraft {
                    card: edit,
                    avatar: AvatarEdit::Keep,
                    book: None,
                },
            )
            .unwrap_err();
        let crate::Error::Validation(v) = err else {
            panic!()
        };
        assert!(v.for_field("name").is_some());
        assert!(
            v.for_field("tags").is_none(),
            "the imported tag was not touched"
        );
    }

    #[test]
    fn invalid_new_characters_are_not_stored() {
        let (_d, app) = app();
        let before = app
            .list_characters(&CharacterFilter::default())
            .unwrap()
            .len();
        let mut bad = draft("Valid name");
        bad.avatar = AvatarEdit::Set {
            data_base64: "%%%".into(),
        };
        assert_eq!(
            app.create_character(bad).unwrap_err().kind(),
            ErrorKind::Validation
        );
        assert_eq!(
            app.create_character(draft("  ")).unwrap_err().kind(),
            ErrorKind::Validation
        );
        assert_eq!(
            app.list_characters(&CharacterFilter::default())
                .unwrap()
                .len(),
            before
        );
    }

    #[test]
    fn filters_by_tag_and_name() {
        let (_d, app) = app();
        let by_tag = app
            .list_characters(&CharacterFilter {
                tag: Some("mystery".into()),
                ..Default::default()
            })
            .unwrap();
        assert!(by_tag.len() >= 2);
        assert!(
            by_tag
                .iter()
                .all(|c| c.tags.iter().any(|t| t.eq_ignore_ascii_case("mystery")))
        );
        let by_name = app
            .list_characters(&CharacterFilter {
                name_contains: Some("wren".into()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(by_name.len(), 1);
        assert_eq!(by_name[0].name, "Wren Ashdown");
        assert!(
            app.tags()
                .unwrap()
                .iter()
                .any(|t| t.tag == "Fantasy" && t.count == 2)
        );
    }
}
