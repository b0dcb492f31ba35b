use std::path::PathBuf;

/// What can go wrong loading or running the model. Every file error names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {io}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error (part of the message, so not repeated as a cause).
        io: std::io::Error,
    },
    /// The file is not in the format its name or contents claim.
    #[error("{path}: {message}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The file ends before its own header says it should.
    #[error(
        "{path} is truncated: it is {actual} bytes but its header needs {expected}; download it again"
    )]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Bytes the header implies.
        expected: u64,
        /// Bytes on disk.
        actual: u64,
    },
    /// A tensor the architecture needs is missing.
    #[error("{path}: tensor `{name}` is missing; this is not a complete Phi-2 model")]
    MissingTensor {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
    },
    /// A tensor has the wrong shape for the configuration.
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    Shape {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// What the config implies.
        expected: Vec<usize>,
        /// What the file holds.
        found: Vec<usize>,
    },
    /// The model is not Phi-2's architecture.
    #[error(
        "{path}: architecture `{found}` is not supported (Dramatis runs Phi-2: `phi2` in GGUF, `phi` / PhiForCausalLM in Hugging Face)"
    )]
    UnknownArchitecture {
        /// The file.
        path: PathBuf,
        /// The architecture it declares.
        found: String,
    },
    /// The tokenizer does not fit the model.
    #[error("{path}: {message}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The adapter cannot be used with this model.
    #[error("{path}: {message}")]
    Adapter {
        /// The adapter's folder or file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The request is invalid (empty prompt, context overflow, ...).
    #[error("{0}")]
    Invalid(String),
    /// The caller cancelled the work; nothing was written.
    #[error("cancelled")]
    Cancelled,
    /// A tensor operation failed.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            io: source,
        }
    }

    pub(crate) fn bad(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::BadFile {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
