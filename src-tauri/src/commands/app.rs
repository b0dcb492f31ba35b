use serde::Serialize;
use tauri::{AppHandle, Runtime};

use super::blocking;
use crate::CommandError;

/// What the Settings view shows about this installation.
#[derive(Debug, Clone, Serialize)]
pub struct AppInfo {
    /// The app's version.
    pub version: String,
    /// Where the database and files live.
    pub data_dir: String,
    /// The database's schema version.
    pub schema_version: u32,
}

/// Facts about the installation; fails with the startup error if the backend did not open.
#[tauri::command]
pub async fn app_info<R: Runtime>(app: AppHandle<R>) -> Result<AppInfo, CommandError> {
    let version = app.package_info().version.to_string();
    blocking(&app, move |d| {
        Ok(AppInfo {
            version,
            data_dir: d.data_dir().display().to_string(),
            schema_version: d.store().schema_version()?,
        })
    })
    .await
}
