use dramatis_core::{ErrorKind, FieldError};
use serde::Serialize;

/// What a command sends the UI when it fails: `{kind, message, fields}`.
#[derive(Debug, Clone, Serialize, thiserror::Error)]
#[error("{message}")]
pub struct CommandError {
    /// Machine-readable kind, for the UI to choose how to show it.
    pub kind: ErrorKind,
    /// A sentence for the person using the app.
    pub message: String,
    /// Per-field problems, for inline form errors.
    pub fields: Vec<FieldError>,
}

impl From<dramatis_core::Error> for CommandError {
    fn from(e: dramatis_core::Error) -> Self {
        let fields = match &e {
            dramatis_core::Error::Validation(v) => v.0.clone(),
            _ => Vec::new(),
        };
        if !matches!(e.kind(), ErrorKind::Validation | ErrorKind::NotFound) {
            tracing::warn!(error = %e, "command failed");
        }
        Self {
            kind: e.kind(),
            message: e.to_string(),
            fields,
        }
    }
}

impl From<tauri::Error> for CommandError {
    fn from(e: tauri::Error) -> Self {
        Self {
            kind: ErrorKind::Storage,
            message: e.to_string(),
            fields: Vec::new(),
        }
    }
}
