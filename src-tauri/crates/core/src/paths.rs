use std::path::PathBuf;

use crate::{Error, Result};

/// Environment variable that overrides the data folder (tests, portable installs).
pub const DATA_DIR_ENV: &str = "DRAMATIS_DATA_DIR";

/// `$DRAMATIS_DATA_DIR` when set, else the OS's per-user data folder
/// (`~/.local/share/dramatis` on Linux, `~/Library/Application Support/app.dramatis.Dramatis` on macOS).
pub fn default_data_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os(DATA_DIR_ENV).filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    directories::ProjectDirs::from("app", "dramatis", "Dramatis")
        .map(|d| d.data_dir().to_owned())
        .ok_or_else(|| Error::Io {
            context: format!(
                "no home folder found; set {DATA_DIR_ENV} to choose where Dramatis keeps its data"
            ),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })
}
