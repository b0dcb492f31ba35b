//! Card files, the card linter and lorebooks.

use std::path::PathBuf;

use dramatis_core::{
    CardFormat, CardLint, CharacterCard, ImportOutcome, LorebookFormat, LorebookLink, LorebookView,
    OnDuplicate, persona::lorebook::Lorebook,
};
use tauri::{AppHandle, Runtime};

use super::blocking;
use crate::CommandError;

/// Imports card and lorebook files (from the file dialog or a drop); one
/// outcome per file.
#[tauri::command]
pub async fn import_cards<R: Runtime>(
    app: AppHandle<R>,
    paths: Vec<PathBuf>,
    on_duplicate: Option<OnDuplicate>,
) -> Result<Vec<ImportOutcome>, CommandError> {
    blocking(&app, move |d| {
        Ok(d.import_card_files(&paths, on_duplicate.unwrap_or_default()))
    })
    .await
}

/// Writes a character as a card file at `path`.
#[tauri::command]
pub async fn export_character<R: Runtime>(
    app: AppHandle<R>,
    id: i64,
    format: CardFormat,
    path: PathBuf,
) -> Result<(), CommandError> {
    blocking(&app, move |d| d.export_character_to(id, format, &path)).await
}

/// The linter's report for a card as typed.
#[tauri::command]
pub async fn lint_card<R: Runtime>(
    app: AppHandle<R>,
    card: CharacterCard,
) -> Result<CardLint, CommandError> {
    blocking(&app, move |d| d.lint_card(&card)).await
}

/// Every lorebook.
#[tauri::command]
pub async fn list_lorebooks<R: Runtime>(
    app: AppHandle<R>,
) -> Result<Vec<LorebookView>, CommandError> {
    blocking(&app, |d| d.list_lorebooks()).await
}

/// Stores a new lorebook.
#[tauri::command]
pub async fn create_lorebook<R: Runtime>(
    app: AppHandle<R>,
    book: Lorebook,
    links: Option<Vec<LorebookLink>>,
) -> Result<LorebookView, CommandError> {
    blocking(&app, move |d| {
        d.create_lorebook(book, links.unwrap_or_default())
    })
    .await
}

/// Saves a lorebook (and where it applies, when given).
#[tauri::command]
pub async fn update_lorebook<R: Runtime>(
    app: AppHandle<R>,
    id: i64,
    book: Lorebook,
    links: Option<Vec<LorebookLink>>,
) -> Result<LorebookView, CommandError> {
    blocking(&app, move |d| d.update_lorebook(id, book, links)).await
}

/// Deletes a lorebook.
#[tauri::command]
pub async fn delete_lorebook<R: Runtime>(app: AppHandle<R>, id: i64) -> Result<(), CommandError> {
    blocking(&app, move |d| d.delete_lorebook(id)).await
}

/// Writes a lorebook as a file at `path`.
#[tauri::command]
pub async fn export_lorebook<R: Runtime>(
    app: AppHandle<R>,
    id: i64,
    format: LorebookFormat,
    path: PathBuf,
) -> Result<(), CommandError> {
    blocking(&app, move |d| d.export_lorebook_to(id, format, &path)).await
}
