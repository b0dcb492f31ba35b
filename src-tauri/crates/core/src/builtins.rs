//! The characters that ship with Dramatis (assets/characters), compiled in.

use dramatis_persona::{Avatar, CharacterCard};

use crate::{Dramatis, Result};

/// A built-in character: its stable key, card JSON and avatar.
#[derive(Debug, Clone, Copy)]
pub struct Builtin {
    /// Stable identity, kept in the database to know which built-ins exist.
    pub key: &'static str,
    /// Character Card V2 JSON.
    pub card_json: &'static str,
    /// PNG avatar.
    pub avatar_png: &'static [u8],
}

macro_rules! builtin {
    ($key:literal) => {
        Builtin {
            key: $key,
            card_json: include_str!(concat!("../../../../assets/characters/", $key, ".json")),
            avatar_png: include_bytes!(concat!("../../../../assets/characters/", $key, ".png")),
        }
    };
}

/// Every built-in character, in gallery order.
pub const BUILTINS: &[Builtin] = &[
    builtin!("june-park"),
    builtin!("captain-isolde-varga"),
    builtin!("wren-ashdown"),
    builtin!("inspector-tomas-reyes"),
    builtin!("kestrel"),
    builtin!("lady-evangeline-thorne"),
];

impl Builtin {
    /// Parses the shipped card and avatar (checked by this crate's tests).
    pub fn load(&self) -> Result<(CharacterCard, Avatar)> {
        let card = CharacterCard::from_json(self.card_json.as_bytes())?;
        let avatar = Avatar::parse(self.avatar_png.to_vec())?;
        Ok((card, avatar))
    }
}

impl Dramatis {
    /// Installs every built-in character that is not in the database (all of
    /// them on first start; the deleted ones later). Edited built-ins are left
    /// as the user made them. Returns how many were installed.
    pub fn restore_builtins(&self) -> Result<usize> {
        let present = self.store.builtin_keys()?;
        let mut installed = 0;
        for b in BUILTINS
            .iter()
            .filter(|b| !present.iter().any(|k| k == b.key))
        {
            let (card, avatar) = b.load()?;
            self.store
                .insert_character(&card, Some(&avatar), Some(b.key))?;
            installed += 1;
        }
        Ok(installed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_is_a_valid_card_with_an_avatar() {
        assert_eq!(BUILTINS.len(), 6);
        let mut genres = std::collections::HashSet::new();
        for b in BUILTINS {
            let (card, avatar) = b.load().unwrap_or_else(|e| panic!("{}: {e}", b.key));
            assert!(!card.first_mes.is_empty(), "{} has no greeting", b.key);
            assert!(!card.description.is_empty());
            assert!(card.tagline().len() > 10, "{} has no tagline", b.key);
            assert_eq!(avatar.format().mime(), "image/png");
            genres.insert(card.tags[0].clone());
        }
        assert!(
            genres.len() >= 5,
            "built-ins should span genres: {genres:?}"
        );
    }
}
