use std::path::{Path, PathBuf};

/// What can go wrong with the database.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The file was written by a newer Dramatis; it was left as it was.
    #[error(
        "{path} was written by a newer version of Dramatis (schema {found}; this version knows up to {supported}). \
         Update Dramatis to open it. The file was not changed."
    )]
    TooNew {
        /// The database file.
        path: PathBuf,
        /// Its schema version.
        found: i64,
        /// The newest schema this build knows.
        supported: u32,
    },
    /// The file is an SQLite database of some other program.
    #[error("{path} is not a Dramatis database. The file was not changed.")]
    NotOurs {
        /// The database file.
        path: PathBuf,
    },
    /// The file could not be opened as a database at all.
    #[error("cannot open the database {path}: {source}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// What SQLite said.
        source: rusqlite::Error,
    },
    /// A row the caller named is not there.
    #[error("{what} {id} does not exist")]
    NotFound {
        /// What kind of row ("character", "chat", ...).
        what: &'static str,
        /// Its id.
        id: i64,
    },
    /// The disk is full; the transaction was rolled back and nothing was lost.
    #[error("the disk is full, so the change was not saved (nothing already saved was lost)")]
    DiskFull,
    /// SQLite's integrity check failed, or a stored value cannot be read back.
    #[error("the database is damaged: {0}")]
    Corrupt(String),
    /// Any other SQLite error.
    #[error("database error: {0}")]
    Sqlite(rusqlite::Error),
}

impl Error {
    pub(crate) fn open(path: &Path, source: rusqlite::Error) -> Self {
        Self::Open {
            path: path.to_owned(),
            source,
        }
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DiskFull) => Self::DiskFull,
            Some(rusqlite::ErrorCode::DatabaseCorrupt) => Self::Corrupt(e.to_string()),
            _ => Self::Sqlite(e),
        }
    }
}

/// The store's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
