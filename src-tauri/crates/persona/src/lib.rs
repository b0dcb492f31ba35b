//! Characters and user personas: the Character Card V2 fields, their
//! validation, and the avatar image rules.
//!
//! Invariants: a [`CharacterCard`] that passed [`CharacterCard::validate`] has a
//! non-empty name and every field within its size bound; unknown keys under
//! `extensions` (and a `character_book`) are carried verbatim, never rewritten.

mod avatar;
mod card;
mod error;
pub mod prompt;
mod user_persona;

pub use avatar::{Avatar, AvatarFormat, MAX_AVATAR_BYTES, MAX_AVATAR_SIDE};
pub use card::{CharacterCard, LIMITS, Limits};
pub use error::{FieldError, ValidationErrors};
pub use user_persona::PersonaDraft;
