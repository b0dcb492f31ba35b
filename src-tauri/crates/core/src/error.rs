use dramatis_persona::ValidationErrors;
use serde::Serialize;

/// What a service call can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The input was refused; nothing was changed.
    #[error("{0}")]
    Validation(#[from] ValidationErrors),
    /// The database refused or failed.
    #[error(transparent)]
    Store(dramatis_store::Error),
    /// A named row does not exist.
    #[error("{what} {id} does not exist")]
    NotFound {
        /// What kind of thing.
        what: &'static str,
        /// Its id.
        id: i64,
    },
    /// A file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The request makes no sense in the current state.
    #[error("{0}")]
    Conflict(String),
    /// A download or a dataset failed.
    #[error(transparent)]
    Hub(#[from] dramatis_hub::Error),
    /// Training refused its data or settings, or failed.
    #[error(transparent)]
    Train(dramatis_train::Error),
    /// An imported file had bad lines; nothing was imported.
    #[error("nothing was imported: {}", .0.join("; "))]
    Import(Vec<String>),
    /// Chat needs a model and none is installed.
    #[error("{0}")]
    NoModel(String),
    /// A request named a model that is not installed.
    #[error("{0}")]
    UnknownModel(String),
    /// A model file, tokenizer or adapter was refused, or the engine failed.
    #[error(transparent)]
    Model(#[from] dramatis_llm::Error),
}

/// A stable, machine-readable name for each kind of failure, for the UI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Bad input; see the field errors.
    Validation,
    /// The thing asked for is gone.
    NotFound,
    /// The database is from a newer Dramatis.
    TooNew,
    /// The disk is full.
    DiskFull,
    /// The request conflicts with the current state.
    Conflict,
    /// Storage or file failure.
    Storage,
    /// The network or the hub failed; trying again may help.
    Network,
    /// The user stopped it.
    Cancelled,
    /// A file (model, tokenizer, dataset) is unusable.
    BadFile,
    /// No model is installed.
    NoModel,
    /// The device ran out of memory.
    OutOfMemory,
}

impl Error {
    /// The kind, for the UI to choose how to show it.
    pub fn kind(&self) -> ErrorKind {
        use dramatis_store::Error as S;
        match self {
            Self::Validation(_) => ErrorKind::Validation,
            Self::NotFound { .. } | Self::Store(S::NotFound { .. }) => ErrorKind::NotFound,
            Self::Store(S::TooNew { .. }) => ErrorKind::TooNew,
            Self::Store(S::DiskFull) => ErrorKind::DiskFull,
            Self::Conflict(_) => ErrorKind::Conflict,
            Self::Store(_) | Self::Io { .. } => ErrorKind::Storage,
            Self::Hub(e) => {
                use dramatis_hub::Error as H;
                match e {
                    H::Cancelled => ErrorKind::Cancelled,
                    H::DiskFull { .. } => ErrorKind::DiskFull,
                    H::UnknownEntry(_) => ErrorKind::NotFound,
                    H::Busy(_) => ErrorKind::Conflict,
                    H::Io { .. } => ErrorKind::Storage,
                    H::Checksum { .. }
                    | H::BadDataset { .. }
                    | H::BadRow { .. }
                    | H::Catalog(_) => ErrorKind::BadFile,
                    _ => ErrorKind::Network,
                }
            }
            Self::NoModel(_) => ErrorKind::NoModel,
            Self::UnknownModel(_) => ErrorKind::NotFound,
            Self::Import(_) => ErrorKind::BadFile,
            Self::Train(dramatis_train::Error::Model(m)) => Self::Model(clone_kind(m)).kind(),
            Self::Train(dramatis_train::Error::EmptyDataset(_)) => ErrorKind::BadFile,
            Self::Train(dramatis_train::Error::Config(_)) => ErrorKind::Validation,
            Self::Train(dramatis_train::Error::Io { source, .. })
                if source.kind() == std::io::ErrorKind::StorageFull
                    || source.raw_os_error() == Some(28) =>
            {
                ErrorKind::DiskFull
            }
            Self::Train(_) => ErrorKind::Storage,
            Self::Model(dramatis_llm::Error::Cancelled) => ErrorKind::Cancelled,
            Self::Model(e) if e.to_string().to_lowercase().contains("out of memory") => {
                ErrorKind::OutOfMemory
            }
            Self::Model(dramatis_llm::Error::Io { io, .. })
                if io.kind() == std::io::ErrorKind::StorageFull =>
            {
                ErrorKind::DiskFull
            }
            Self::Model(_) => ErrorKind::BadFile,
        }
    }
}

/// A stand-in with the same kind (engine errors are not `Clone`).
fn clone_kind(e: &dramatis_llm::Error) -> dramatis_llm::Error {
    match e {
        dramatis_llm::Error::Cancelled => dramatis_llm::Error::Cancelled,
        other => dramatis_llm::Error::Invalid(other.to_string()),
    }
}

impl From<dramatis_train::Error> for Error {
    fn from(e: dramatis_train::Error) -> Self {
        match e {
            dramatis_train::Error::Model(m) => Self::Model(m),
            other => Self::Train(other),
        }
    }
}

impl From<dramatis_store::Error> for Error {
    fn from(e: dramatis_store::Error) -> Self {
        match e {
            dramatis_store::Error::NotFound { what, id } => Self::NotFound { what, id },
            other => Self::Store(other),
        }
    }
}

/// The services' result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
