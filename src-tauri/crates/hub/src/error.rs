use std::path::PathBuf;

/// What a hub operation can fail with. Messages never contain the token.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The catalog file is malformed.
    #[error("the catalog is malformed: {0}")]
    Catalog(String),
    /// No catalog entry has this id.
    #[error("no model or dataset `{0}` in the catalog")]
    UnknownEntry(String),
    /// The hub has no such file (or repository, or revision).
    #[error("{file} was not found on {endpoint} (HTTP 404)")]
    NotFound {
        /// `repo/path`.
        file: String,
        /// The hub's address.
        endpoint: String,
    },
    /// The hub wants a token, or the token has no access.
    #[error("{file} needs a Hugging Face token with access to it (HTTP {status})")]
    Unauthorized {
        /// `repo/path`.
        file: String,
        /// 401 or 403.
        status: u16,
    },
    /// The hub answered with an error status.
    #[error("{file}: the server answered HTTP {status}")]
    Http {
        /// `repo/path`.
        file: String,
        /// The status code.
        status: u16,
    },
    /// The connection failed or broke.
    #[error("{file}: network error: {message}")]
    Network {
        /// `repo/path`.
        file: String,
        /// What happened.
        message: String,
    },
    /// No byte arrived for too long.
    #[error("{file}: the server sent nothing for {secs} s")]
    Stalled {
        /// `repo/path`.
        file: String,
        /// The stall limit.
        secs: u64,
    },
    /// The server's answer lacks what a download needs.
    #[error("{file}: unexpected answer from the hub: {message}")]
    Protocol {
        /// `repo/path`.
        file: String,
        /// What was missing or wrong.
        message: String,
    },
    /// A downloaded or cached file's contents do not match the hub's hash.
    #[error(
        "{file}: checksum mismatch (expected {algorithm} {expected}, got {actual}); the file was removed"
    )]
    Checksum {
        /// `repo/path`.
        file: String,
        /// `sha256` or `git-sha1`.
        algorithm: &'static str,
        /// What the hub reported.
        expected: String,
        /// What the file hashes to.
        actual: String,
    },
    /// Not enough free space for the download.
    #[error(
        "not enough disk space in {}: {} needed, {} free",
        dir.display(),
        crate::human_bytes(*needed),
        crate::human_bytes(*free)
    )]
    DiskFull {
        /// The cache folder.
        dir: PathBuf,
        /// Bytes still to download.
        needed: u64,
        /// Bytes available.
        free: u64,
    },
    /// The download was paused or cancelled by the user.
    #[error("the download was cancelled")]
    Cancelled,
    /// Another download of the same file holds its lock.
    #[error("{0} is already being downloaded")]
    Busy(String),
    /// A file operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A dataset file cannot be read.
    #[error("{}: {message}", path.display())]
    BadDataset {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// One row of a dataset is unusable.
    #[error("{}, row {row}: {message}", path.display())]
    BadRow {
        /// The file.
        path: PathBuf,
        /// 1-based row (line for JSONL and CSV, counting the header).
        row: usize,
        /// What is wrong.
        message: String,
    },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        if is_disk_full(&source) {
            let path = path.into();
            return Self::DiskFull {
                dir: path.parent().map(Into::into).unwrap_or(path),
                needed: 0,
                free: 0,
            };
        }
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// Whether trying again may help (network trouble, 5xx, a stall).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Network { .. } | Self::Stalled { .. } => true,
            Self::Http { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            _ => false,
        }
    }
}

pub(crate) fn is_disk_full(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull || e.raw_os_error() == Some(28)
}

/// Results of this crate.
pub type Result<T> = std::result::Result<T, Error>;
