use serde::{Deserialize, Serialize};

use crate::card::LIMITS;
use crate::error::ValidationErrors;

/// Who the user plays in a chat: the name behind `{{user}}` and a description
/// the character may know.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PersonaDraft {
    /// The user's name in role-play.
    pub name: String,
    /// What the character may know about the user.
    pub description: String,
}

impl PersonaDraft {
    /// Trims the name and checks both fields' bounds.
    pub fn validated(mut self) -> Result<Self, ValidationErrors> {
        self.name = self.name.trim().to_owned();
        let mut errors = ValidationErrors::default();
        if self.name.is_empty() {
            errors.push("name", "A persona needs a name.");
        } else if self.name.chars().count() > LIMITS.name {
            errors.push(
                "name",
                format!("Keep the name under {} characters.", LIMITS.name),
            );
        }
        if self.description.chars().count() > LIMITS.text {
            errors.push(
                "description",
                format!("Keep the description under {} characters.", LIMITS.text),
            );
        }
        errors.into_result().map(|()| self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persona_needs_a_name() {
        let err = PersonaDraft::default().validated().unwrap_err();
        assert_eq!(err.for_field("name"), Some("A persona needs a name."));
        let ok = PersonaDraft {
            name: " Sam ".into(),
            description: String::new(),
        }
        .validated()
        .unwrap();
        assert_eq!(ok.name, "Sam");
    }
}
