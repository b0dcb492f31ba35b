//! Preference pairs: the Preferences view.

use std::path::PathBuf;

use dramatis_core::PreferencePair;
use tauri::{AppHandle, Runtime};

use super::blocking;
use crate::CommandError;

/// A character's pairs.
#[tauri::command]
pub async fn preference_pairs<R: Runtime>(
    app: AppHandle<R>,
    character_id: i64,
) -> Result<Vec<PreferencePair>, CommandError> {
    blocking(&app, move |d| d.preference_pairs(character_id)).await
}

/// Leaves a pair out of training, or takes it back in.
#[tauri::command]
pub async fn set_pair_excluded<R: Runtime>(
    app: AppHandle<R>,
    chosen_id: i64,
    rejected_id: i64,
    excluded: bool,
) -> Result<(), CommandError> {
    blocking(&app, move |d| {
        d.set_pair_excluded(chosen_id, rejected_id, excluded)
    })
    .await
}

/// Leaves a chat's pairs out of training, or takes them back in.
#[tauri::command]
pub async fn set_chat_prefs_excluded<R: Runtime>(
    app: AppHandle<R>,
    chat_id: i64,
    excluded: bool,
) -> Result<(), CommandError> {
    blocking(&app, move |d| d.set_chat_prefs_excluded(chat_id, excluded)).await
}

/// Writes a character's pairs as TRL DPO JSONL at `path`; returns how many.
#[tauri::command]
pub async fn export_preferences<R: Runtime>(
    app: AppHandle<R>,
    character_id: i64,
    path: PathBuf,
) -> Result<usize, CommandError> {
    blocking(&app, move |d| {
        let jsonl = d.export_preferences(character_id)?;
        dramatis_core::write_atomically(&path, jsonl.as_bytes())?;
        Ok(jsonl.lines().count())
    })
    .await
}

/// Adds pairs from a TRL DPO JSONL file to a character.
#[tauri::command]
pub async fn import_preferences<R: Runtime>(
    app: AppHandle<R>,
    character_id: i64,
    path: PathBuf,
) -> Result<dramatis_core::PrefsImport, CommandError> {
    blocking(&app, move |d| d.import_preferences(character_id, &path)).await
}

/// Leaves an imported pair out of training, or takes it back in.
#[tauri::command]
pub async fn set_imported_pair_excluded<R: Runtime>(
    app: AppHandle<R>,
    id: i64,
    excluded: bool,
) -> Result<(), CommandError> {
    blocking(&app, move |d| d.set_imported_pair_excluded(id, excluded)).await
}

/// Deletes a character's imported pairs from one file (or all); returns how many.
#[tauri::command]
pub async fn delete_imported_pairs<R: Runtime>(
    app: AppHandle<R>,
    character_id: i64,
    source: Option<String>,
) -> Result<usize, CommandError> {
    blocking(&app, move |d| {
        d.delete_imported_pairs(character_id, source.as_deref())
    })
    .await
}
