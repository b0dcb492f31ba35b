//! User personas: who the user plays.

use dramatis_persona::PersonaDraft;
use serde::Serialize;

use crate::{Dramatis, Error, Result};

/// A user persona as the UI shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Persona {
    /// Id.
    pub id: i64,
    /// Name behind `{{user}}`.
    pub name: String,
    /// What characters may know about the user.
    pub description: String,
    /// Whether new chats use it.
    pub is_default: bool,
}

impl Dramatis {
    /// All personas, the default first.
    pub fn personas(&self) -> Result<Vec<Persona>> {
        Ok(self
            .store
            .list_personas()?
            .into_iter()
            .map(|r| Persona {
                id: r.id,
                name: r.persona.name,
                description: r.persona.description,
                is_default: r.is_default,
            })
            .collect())
    }

    /// Validates and stores a persona.
    pub fn create_persona(&self, draft: PersonaDraft) -> Result<Vec<Persona>> {
        self.store.insert_persona(&draft.validated()?)?;
        self.personas()
    }

    /// Validates and saves a persona edit.
    pub fn update_persona(&self, id: i64, draft: PersonaDraft) -> Result<Vec<Persona>> {
        self.store.update_persona(id, &draft.validated()?)?;
        self.personas()
    }

    /// Makes a persona the default.
    pub fn set_default_persona(&self, id: i64) -> Result<Vec<Persona>> {
        self.store.set_default_persona(id)?;
        self.personas()
    }

    /// Deletes a persona; the last one cannot be deleted.
    pub fn delete_persona(&self, id: i64) -> Result<Vec<Persona>> {
        if !self.store.delete_persona(id)? {
            return Err(Error::Conflict(
                "You need at least one persona, so the last one cannot be deleted.".into(),
            ));
        }
        self.personas()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn persona_lifecycle() {
        let dir = tempfile::tempdir().unwrap();
        let app = Dramatis::open(dir.path()).unwrap();
        let first = app.personas().unwrap()[0].clone();
        assert!(first.is_default);
        let list = app
            .create_persona(PersonaDraft {
                name: "Rook".into(),
                description: "A bard".into(),
            })
            .unwrap();
        let rook = list.iter().find(|p| p.name == "Rook").unwrap().id;
        let list = app.set_default_persona(rook).unwrap();
        assert_eq!(list[0].id, rook);
        assert_eq!(app.delete_persona(first.id).unwrap().len(), 1);
        assert_eq!(
            app.delete_persona(rook).unwrap_err().kind(),
            ErrorKind::Conflict
        );
        assert_eq!(
            app.update_persona(rook, PersonaDraft::default())
                .unwrap_err()
                .kind(),
            ErrorKind::Validation
        );
    }
}
