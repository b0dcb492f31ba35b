//! Characters and user personas: the Character Card V1–V3 fields, their
//! validation, card files (PNG, JSON, CHARX), lorebooks and world-info
//! activation, macros, the card linter, and prompt assembly.
//!
//! Invariants: a [`CharacterCard`] that passed [`CharacterCard::validate`] has a
//! non-empty name and every field within its size bound; unknown keys under
//! `extensions` (and a `character_book`) are carried verbatim, never rewritten.
//! Everything here is pure: bytes or values in, values out; no I/O.

mod avatar;
mod card;
pub mod cardfile;
mod error;
pub mod lint;
pub mod lorebook;
pub mod macros;
pub mod prompt;
mod user_persona;
pub mod worldinfo;

pub use avatar::{Avatar, AvatarFormat, MAX_AVATAR_BYTES, MAX_AVATAR_SIDE};
pub use card::{CharacterCard, LIMITS, Limits};
pub use error::{FieldError, ValidationErrors};
pub use user_persona::PersonaDraft;
