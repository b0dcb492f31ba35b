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

/// Writes a file so that a crash leaves either the old file or the new one:
/// a temporary file beside it, synced, then renamed into place.
pub fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> crate::Result<()> {
    use std::io::Write;
    let io = |e: std::io::Error| crate::Error::Io {
        context: format!("cannot write {}", path.display()),
        source: e,
    };
    let tmp = path.with_extension(format!(
        "{}.partial",
        path.extension().and_then(|e| e.to_str()).unwrap_or("tmp")
    ));
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    let result = f.write_all(bytes).and_then(|_| f.sync_all());
    drop(f);
    if let Err(e) = result.and_then(|_| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    Ok(())
}

/// `name` made safe as a file name: letters, digits, space, `-`, `_` (and `.`
/// when `dots`) kept, anything else `_`, at most 80 characters, trimmed.
pub(crate) fn file_stem(name: &str, dots: bool) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || " -_".contains(c) || (dots && c == '.') {
                c
            } else {
                '_'
            }
        })
        .take(80)
        .collect();
    s.trim().to_owned()
}
