//! Dramatis's SQLite database.
//!
//! Invariants: one file, WAL journal, foreign keys on; the schema version is
//! SQLite's `user_version` and only grows through [`migrations`]; a database
//! from a newer Dramatis, or not from Dramatis at all, is refused before
//! anything is written to it; every change that touches several rows runs in
//! one transaction, so a crash leaves either all of it or none.

mod characters;
mod chats;
mod error;
mod lorebooks;
mod memory;
mod migrations;
mod models;
mod personas;
mod prefs;
mod settings;
mod training;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OpenFlags, Transaction};

pub use characters::{AvatarChange, CharacterFilter, CharacterRow, TagCount};
pub use chats::{ChatRow, MessageRow, Role, SearchHit};
pub use error::{Error, Result};
pub use lorebooks::{LorebookLink, LorebookRow};
pub use memory::MemoryRow;
pub use migrations::SCHEMA_VERSION;
pub use models::ModelRow;
pub use personas::PersonaRow;
pub use prefs::{ImportCounts, ImportedPairRow, PairKind, PairRow};
pub use training::{AdapterRow, RunRow};

/// `PRAGMA application_id` of a Dramatis database ("DRMA").
const APPLICATION_ID: i64 = 0x4452_4d41;

/// An open Dramatis database. Cheap to share behind an `Arc`; calls are
/// serialized on one connection, other processes and [`Store`]s may read
/// concurrently thanks to WAL.
#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
    path: PathBuf,
}

impl Store {
    /// Opens (creating if needed) the database at `path` and migrates it to
    /// [`SCHEMA_VERSION`]. A newer or foreign database is refused untouched.
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| Error::open(path, e))?;
        Self::setup(conn, path.to_owned())
    }

    /// A private in-memory database, for tests and previews.
    pub fn open_in_memory() -> Result<Self> {
        Self::setup(Connection::open_in_memory()?, PathBuf::from(":memory:"))
    }

    fn setup(mut conn: Connection, path: PathBuf) -> Result<Self> {
        // Read-only checks come first: refusing a file must not change it.
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| Error::open(&path, e))?;
        let app_id: i64 = conn.query_row("PRAGMA application_id", [], |r| r.get(0))?;
        if version > i64::from(SCHEMA_VERSION) {
            return Err(Error::TooNew {
                path,
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        let has_tables: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table')",
            [],
            |r| r.get(0),
        )?;
        if app_id != APPLICATION_ID && (app_id != 0 || has_tables) {
            return Err(Error::NotOurs { path });
        }
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // NORMAL is durable across application crashes in WAL mode; only an OS
        // crash can lose the last transactions, never corrupt the file.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", true)?;
        migrations::migrate(&mut conn, SCHEMA_VERSION)?;
        conn.pragma_update(None, "application_id", APPLICATION_ID)?;
        Ok(Self {
            conn: Mutex::new(conn),
            path,
        })
    }

    /// Where the database lives (`:memory:` for an in-memory one).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version of the open database.
    pub fn schema_version(&self) -> Result<u32> {
        Ok(self
            .conn()
            .query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    /// Runs SQLite's own consistency check; `Ok(())` when it reports "ok".
    pub fn integrity_check(&self) -> Result<()> {
        let report: String = self
            .conn()
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
        if report == "ok" {
            Ok(())
        } else {
            Err(Error::Corrupt(report))
        }
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written (the
        // transaction rolls back on drop), so the connection stays usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` in one immediate transaction: all its writes land, or none.
    fn write<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }
}

/// Milliseconds since the Unix epoch, the unit of every stored timestamp.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_database_is_at_the_latest_version_with_wal() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("d.db")).unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        let mode: String = store
            .conn()
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let fk: bool = store
            .conn()
            .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
            .unwrap();
        assert!(fk);
        store.integrity_check().unwrap();
    }

    #[test]
    fn reopening_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.db");
        drop(Store::open(&path).unwrap());
        let store = Store::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
    }

    #[test]
    fn a_foreign_sqlite_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("other.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE t (x);")
            .unwrap();
        let err = Store::open(&path).unwrap_err();
        assert!(matches!(err, Error::NotOurs { .. }), "{err}");
    }

    #[test]
    fn a_file_that_is_not_sqlite_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk.db");
        std::fs::write(&path, vec![0x42u8; 8192]).unwrap();
        let err = Store::open(&path).unwrap_err().to_string();
        assert!(err.contains("junk.db"), "{err}");
        assert!(err.contains("not a database"), "{err}");
    }
}
