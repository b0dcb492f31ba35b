use dramatis_persona::PersonaDraft;
use rusqlite::{OptionalExtension, Row, params};

use crate::{Error, Result, Store, now_ms};

/// A stored user persona.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersonaRow {
    /// Row id.
    pub id: i64,
    /// Name and description.
    pub persona: PersonaDraft,
    /// Whether new chats use it.
    pub is_default: bool,
}

fn from_row(r: &Row<'_>) -> rusqlite::Result<PersonaRow> {
    Ok(PersonaRow {
        id: r.get(0)?,
        persona: PersonaDraft {
            name: r.get(1)?,
            description: r.get(2)?,
        },
        is_default: r.get(3)?,
    })
}

impl Store {
    /// Stores a persona; the first one becomes the default.
    pub fn insert_persona(&self, p: &PersonaDraft) -> Result<i64> {
        self.write(|tx| {
            let now = now_ms();
            tx.execute(
                "INSERT INTO personas (name, description, is_default, created_at, updated_at)
                 VALUES (?1, ?2, NOT EXISTS (SELECT 1 FROM personas), ?3, ?3)",
                params![p.name, p.description, now],
            )?;
            Ok(tx.last_insert_rowid())
        })
    }

    /// Replaces a persona's name and description.
    pub fn update_persona(&self, id: i64, p: &PersonaDraft) -> Result<()> {
        self.write(|tx| {
            let n = tx.execute(
                "UPDATE personas SET name = ?2, description = ?3, updated_at = ?4 WHERE id = ?1",
                params![id, p.name, p.description, now_ms()],
            )?;
            if n == 0 {
                Err(Error::NotFound {
                    what: "persona",
                    id,
                })
            } else {
                Ok(())
            }
        })
    }

    /// Makes `id` the default persona (and no other).
    pub fn set_default_persona(&self, id: i64) -> Result<()> {
        self.write(|tx| {
            let exists: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM personas WHERE id = ?1)",
                [id],
                |r| r.get(0),
            )?;
            if !exists {
                return Err(Error::NotFound {
                    what: "persona",
                    id,
                });
            }
            tx.execute(
                "UPDATE personas SET is_default = 0 WHERE is_default = 1",
                [],
            )?;
            tx.execute("UPDATE personas SET is_default = 1 WHERE id = ?1", [id])?;
            Ok(())
        })
    }

    /// Deletes a persona. The default passes to the oldest remaining one;
    /// returns `false` (and deletes nothing) if it is the last persona.
    pub fn delete_persona(&self, id: i64) -> Result<bool> {
        self.write(|tx| {
            let count: i64 = tx.query_row("SELECT count(*) FROM personas", [], |r| r.get(0))?;
            let was_default: Option<bool> = tx
                .query_row("SELECT is_default FROM personas WHERE id = ?1", [id], |r| {
                    r.get(0)
                })
                .optional()?;
            let Some(was_default) = was_default else {
                return Err(Error::NotFound {
                    what: "persona",
                    id,
                });
            };
            if count <= 1 {
                return Ok(false);
            }
            tx.execute("DELETE FROM personas WHERE id = ?1", [id])?;
            if was_default {
                tx.execute(
                    "UPDATE personas SET is_default = 1 WHERE id = (SELECT min(id) FROM personas)",
                    [],
                )?;
            }
            Ok(true)
        })
    }

    /// All personas, the default first, then by name.
    pub fn list_personas(&self) -> Result<Vec<PersonaRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, name, description, is_default FROM personas ORDER BY is_default DESC, name, id",
        )?;
        let rows = stmt.query_map([], from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The default persona; `NotFound` when there is none yet.
    pub fn default_persona(&self) -> Result<PersonaDraft> {
        self.conn()
            .query_row(
                "SELECT id, name, description, is_default FROM personas WHERE is_default = 1",
                [],
                from_row,
            )
            .optional()?
            .map(|r| r.persona)
            .ok_or(Error::NotFound {
                what: "default persona",
                id: 0,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str) -> PersonaDraft {
        PersonaDraft {
            name: name.into(),
            description: format!("{name} desc"),
        }
    }

    #[test]
    fn exactly_one_default_persona() {
        let store = Store::open_in_memory().unwrap();
        let a = store.insert_persona(&p("Ash")).unwrap();
        let b = store.insert_persona(&p("Bo")).unwrap();
        assert_eq!(store.default_persona().unwrap().name, "Ash");
        store.set_default_persona(b).unwrap();
        let defaults: Vec<_> = store
            .list_personas()
            .unwrap()
            .into_iter()
            .filter(|r| r.is_default)
            .map(|r| r.id)
            .collect();
        assert_eq!(defaults, [b]);
        assert!(store.delete_persona(b).unwrap());
        assert_eq!(store.default_persona().unwrap().name, "Ash");
        assert!(!store.delete_persona(a).unwrap(), "the last persona stays");
        store.update_persona(a, &p("Ashley")).unwrap();
        assert_eq!(store.default_persona().unwrap(), p("Ashley"));
    }
}
