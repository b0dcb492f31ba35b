use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::ValidationErrors;

/// Size bounds on a card's fields. Generous for real cards, small enough that a
/// runaway paste cannot bloat the database or the prompt builder.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Characters in `name`.
    pub name: usize,
    /// Characters in each long text field (description, first_mes, ...).
    pub text: usize,
    /// Characters in short fields (creator, character_version).
    pub short: usize,
    /// Number of tags.
    pub tags: usize,
    /// Characters in one tag.
    pub tag: usize,
    /// Number of alternate greetings.
    pub greetings: usize,
    /// Bytes of `extensions` and `character_book` once serialized.
    pub extensions_bytes: usize,
}

/// The bounds every stored card satisfies.
pub const LIMITS: Limits = Limits {
    name: 128,
    text: 100_000,
    short: 256,
    tags: 64,
    tag: 64,
    greetings: 64,
    extensions_bytes: 1 << 20,
};

/// The hard bounds a card must meet to be imported from a file: far above the
/// editor's [`LIMITS`] (real cards break those), low enough to protect the
/// database. An imported card over `LIMITS` but within these is kept whole.
pub const IMPORT_LIMITS: Limits = Limits {
    name: 1024,
    text: 2_000_000,
    short: 4096,
    tags: 512,
    tag: 1024,
    greetings: 256,
    extensions_bytes: 16 << 20,
};

/// A character as Character Card V2 describes it (the `data` object of a
/// `chara_card_v2` card). Unknown keys of `data` (a V3 card's `nickname`,
/// `assets`, ...) are kept in `other` and written back unchanged.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct CharacterCard {
    /// Display name; `{{char}}` in prompts.
    pub name: String,
    /// Who the character is: appearance, background, manner.
    pub description: String,
    /// A short summary of temperament.
    pub personality: String,
    /// The situation the conversation starts in.
    pub scenario: String,
    /// The character's opening message.
    pub first_mes: String,
    /// Example conversations, separated by `<START>`.
    pub mes_example: String,
    /// Notes for the person using the card; never part of a prompt.
    pub creator_notes: String,
    /// Replaces the app's system prompt when not empty.
    pub system_prompt: String,
    /// Sent after the chat history when not empty.
    pub post_history_instructions: String,
    /// Other opening messages, offered as swipes of the first one.
    pub alternate_greetings: Vec<String>,
    /// The lorebook, kept verbatim.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub character_book: Option<Value>,
    /// Free-form labels used to filter the gallery.
    pub tags: Vec<String>,
    /// Who wrote the card.
    pub creator: String,
    /// The card author's version string.
    pub character_version: String,
    /// Application data, namespaced by app; unknown keys are kept verbatim.
    pub extensions: Map<String, Value>,
    /// Keys of `data` this version does not know, kept verbatim.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

impl CharacterCard {
    /// Trims the name and tags and drops empty or repeated tags (compared
    /// case-insensitively), so equal cards compare equal.
    pub fn normalize(&mut self) {
        self.name = self.name.trim().to_owned();
        let mut seen = std::collections::HashSet::new();
        self.tags = std::mem::take(&mut self.tags)
            .into_iter()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty() && seen.insert(t.to_lowercase()))
            .collect();
    }

    /// Checks every field against [`LIMITS`]; returns all problems at once.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        self.validate_with(&LIMITS)
    }

    /// Checks every field against `l` (such as [`LIMITS`] or
    /// [`IMPORT_LIMITS`]); returns all problems at once, each with its size.
    pub fn validate_with(&self, l: &Limits) -> Result<(), ValidationErrors> {
        let mut errors = ValidationErrors::default();
        if self.name.trim().is_empty() {
            errors.push("name", "A character needs a name.");
        } else if self.name.chars().count() > l.name {
            errors.push(
                "name",
                format!(
                    "The name is {} characters; keep it under {}.",
                    self.name.chars().count(),
                    l.name
                ),
            );
        }
        for (field, value) in [
            ("description", &self.description),
            ("personality", &self.personality),
            ("scenario", &self.scenario),
            ("first_mes", &self.first_mes),
            ("mes_example", &self.mes_example),
            ("creator_notes", &self.creator_notes),
            ("system_prompt", &self.system_prompt),
            ("post_history_instructions", &self.post_history_instructions),
        ] {
            let n = value.chars().count();
            if n > l.text {
                errors.push(
                    field,
                    format!(
                        "This is {n} characters long; the most a field can hold is {}.",
                        l.text
                    ),
                );
            }
        }
        for (field, value) in [
            ("creator", &self.creator),
            ("character_version", &self.character_version),
        ] {
            let n = value.chars().count();
            if n > l.short {
                errors.push(
                    field,
                    format!("This is {n} characters; keep it under {}.", l.short),
                );
            }
        }
        if self.alternate_greetings.len() > l.greetings {
            errors.push(
                "alternate_greetings",
                format!(
                    "There are {} alternate greetings; at most {} are allowed.",
                    self.alternate_greetings.len(),
                    l.greetings
                ),
            );
        } else if let Some(i) = self
            .alternate_greetings
            .iter()
            .position(|g| g.chars().count() > l.text)
        {
            errors.push(
                "alternate_greetings",
                format!(
                    "Greeting {} is {} characters, longer than {}.",
                    i + 1,
                    self.alternate_greetings[i].chars().count(),
                    l.text
                ),
            );
        }
        if self.tags.len() > l.tags {
            errors.push(
                "tags",
                format!(
                    "There are {} tags; at most {} are allowed.",
                    self.tags.len(),
                    l.tags
                ),
            );
        } else if let Some(t) = self.tags.iter().find(|t| t.chars().count() > l.tag) {
            let start: String = t.chars().take(16).collect();
            errors.push(
                "tags",
                format!(
                    "The tag \"{start}…\" is {} characters, longer than {}.",
                    t.chars().count(),
                    l.tag
                ),
            );
        }
        let extra = serde_json::to_vec(&self.extensions).map_or(0, |v| v.len())
            + self
                .character_book
                .as_ref()
                .and_then(|b| serde_json::to_vec(b).ok())
                .map_or(0, |v| v.len())
            + serde_json::to_vec(&self.other).map_or(0, |v| v.len());
        if extra > l.extensions_bytes {
            errors.push(
                "extensions",
                format!(
                    "Extension data is {extra} bytes; the most a card can carry is {}.",
                    l.extensions_bytes
                ),
            );
        }
        errors.into_result()
    }

    /// A one-line summary for the gallery: the first line of the creator's
    /// notes, else the description's first sentence.
    pub fn tagline(&self) -> String {
        const MAX: usize = 120;
        let from_notes = self
            .creator_notes
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty());
        let line = from_notes.map(str::to_owned).unwrap_or_else(|| {
            let d = self.description.trim();
            let end = d
                .char_indices()
                .find(|&(_, c)| matches!(c, '.' | '!' | '?' | '\n'))
                .map_or(d.len(), |(i, c)| i + c.len_utf8());
            d[..end].trim().to_owned()
        });
        if line.chars().count() > MAX {
            let cut: String = line.chars().take(MAX - 1).collect();
            format!("{}…", cut.trim_end())
        } else {
            line
        }
    }

    /// The card as a `chara_card_v2` JSON document.
    pub fn to_v2_json(&self) -> Value {
        serde_json::json!({
            "spec": "chara_card_v2",
            "spec_version": "2.0",
            "data": self,
        })
    }

    /// Reads a card from JSON: V2 and V3 (`{spec, data}`) or a V1 card (the bare fields).
    pub fn from_json(bytes: &[u8]) -> Result<Self, ValidationErrors> {
        let bad = |message: String| {
            let mut e = ValidationErrors::default();
            e.push("card", message);
            e
        };
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("Not valid JSON: {e}.")))?;
        let Value::Object(mut top) = value else {
            return Err(bad("A card must be a JSON object.".into()));
        };
        let data = match top.get("spec").and_then(Value::as_str) {
            Some("chara_card_v2" | "chara_card_v3") => top
                .remove("data")
                .ok_or_else(|| bad("The card has no `data` object.".into()))?,
            Some(other) => return Err(bad(format!("Unknown card spec \"{other}\"."))),
            None => Value::Object(top),
        };
        let mut card: CharacterCard = serde_json::from_value(data)
            .map_err(|e| bad(format!("A field has the wrong type: {e}.")))?;
        card.normalize();
        card.validate()?;
        Ok(card)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn card(name: &str) -> CharacterCard {
        CharacterCard {
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn empty_name_is_rejected() {
        let err = card("   ").validate().unwrap_err();
        assert_eq!(err.for_field("name"), Some("A character needs a name."));
    }

    #[test]
    fn huge_description_is_rejected_with_its_size() {
        let mut c = card("Ada");
        c.description = "x".repeat(10 * 1024 * 1024);
        let err = c.validate().unwrap_err();
        assert!(err.for_field("description").unwrap().contains("10485760"));
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let mut c = card("");
        c.scenario = "y".repeat(LIMITS.text + 1);
        c.tags = vec!["t".repeat(100)];
        let err = c.validate().unwrap_err();
        let fields: Vec<_> = err.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["name", "scenario", "tags"]);
    }

    #[test]
    fn import_limits_accept_what_the_editor_refuses() {
        let mut c = card(&"n".repeat(300));
        c.description = "d".repeat(150_000);
        c.tags = vec!["t".repeat(200)];
        assert!(c.validate().is_err(), "the editor's limits still apply");
        c.validate_with(&IMPORT_LIMITS).unwrap();
        c.description = "d".repeat(IMPORT_LIMITS.text + 1);
        let err = c.validate_with(&IMPORT_LIMITS).unwrap_err();
        let msg = err.for_field("description").unwrap();
        assert!(msg.contains("2000001") && msg.contains("2000000"), "{msg}");
    }

    #[test]
    fn normalize_trims_and_dedups_tags() {
        let mut c = card("  Mira ");
        c.tags = vec![
            " Fantasy".into(),
            "fantasy".into(),
            "".into(),
            "Noir".into(),
        ];
        c.normalize();
        assert_eq!(c.name, "Mira");
        assert_eq!(c.tags, ["Fantasy", "Noir"]);
    }

    #[test]
    fn tagline_prefers_creator_notes_then_first_sentence() {
        let mut c = card("A");
        c.description = "A retired pilot. She flies again.".into();
        assert_eq!(c.tagline(), "A retired pilot.");
        c.creator_notes = "\n  Sky-pirate captain\nmore".into();
        assert_eq!(c.tagline(), "Sky-pirate captain");
        c.creator_notes = "é".repeat(300);
        assert_eq!(c.tagline().chars().count(), 120);
    }

    #[test]
    fn v2_round_trip_keeps_unknown_keys_verbatim() {
        let json = r#"{"spec":"chara_card_v2","spec_version":"2.0","data":{
            "name":"Zoë","description":"Ünïcödé 🌙","tags":["a"],
            "extensions":{"zeta":{"nested":[1,2,{"k":null}]},"alpha":"x"},
            "nickname":"Zo","character_book":{"entries":[{"keys":["moon"],"content":"c"}]}}}"#;
        let c = CharacterCard::from_json(json.as_bytes()).unwrap();
        assert_eq!(c.name, "Zoë");
        assert_eq!(c.other["nickname"], "Zo");
        let keys: Vec<_> = c.extensions.keys().cloned().collect();
        assert_eq!(keys, ["zeta", "alpha"], "extension key order is kept");
        let again =
            CharacterCard::from_json(&serde_json::to_vec(&c.to_v2_json()).unwrap()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn v1_cards_and_bad_json_are_handled() {
        let c = CharacterCard::from_json(br#"{"name":"Old","first_mes":"Hi"}"#).unwrap();
        assert_eq!(c.first_mes, "Hi");
        let err = CharacterCard::from_json(b"{nope").unwrap_err();
        assert!(err.for_field("card").unwrap().starts_with("Not valid JSON"));
        let err = CharacterCard::from_json(br#"{"spec":"x","data":{}}"#).unwrap_err();
        assert!(err.for_field("card").unwrap().contains("Unknown card spec"));
        let err = CharacterCard::from_json(br#"{"name":5}"#).unwrap_err();
        assert!(err.for_field("card").unwrap().contains("wrong type"));
    }
}
