use dramatis_core::{Character, CharacterDraft, CharacterFilter, CharacterSummary, TagCount};
use serde::Deserialize;
use tauri::{AppHandle, Runtime};

use super::blocking;
use crate::CommandError;

/// The gallery's filter: a tag and/or part of a name.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct CharacterQuery {
    /// Only characters with this tag.
    pub tag: Option<String>,
    /// Only characters whose name contains this.
    pub search: Option<String>,
}

/// Characters for the gallery.
#[tauri::command]
pub async fn list_characters<R: Runtime>(
    app: AppHandle<R>,
    query: Option<CharacterQuery>,
) -> Result<Vec<CharacterSummary>, CommandError> {
    let q = query.unwrap_or_default();
    let filter = CharacterFilter {
        tag: q.tag,
        name_contains: q.search,
    };
    blocking(&app, move |d| d.list_characters(&filter)).await
}

/// One character, every field.
#[tauri::command]
pub async fn get_character<R: Runtime>(
    app: AppHandle<R>,
    id: i64,
) -> Result<Character, CommandError> {
    blocking(&app, move |d| d.character(id)).await
}

/// Creates a character from the editor's draft.
#[tauri::command]
pub async fn create_character<R: Runtime>(
    app: AppHandle<R>,
    draft: CharacterDraft,
) -> Result<Character, CommandError> {
    blocking(&app, move |d| d.create_character(draft)).await
}

/// Saves an edit.
#[tauri::command]
pub async fn update_character<R: Runtime>(
    app: AppHandle<R>,
    id: i64,
    draft: CharacterDraft,
) -> Result<Character, CommandError> {
    blocking(&app, move |d| d.update_character(id, draft)).await
}

/// Copies a character.
#[tauri::command]
pub async fn duplicate_character<R: Runtime>(
    app: AppHandle<R>,
    id: i64,
) -> Result<Character, CommandError> {
    blocking(&app, move |d| d.duplicate_character(id)).await
}

/// Deletes a character and its chats (the UI has asked for confirmation).
#[tauri::command]
pub async fn delete_character<R: Runtime>(app: AppHandle<R>, id: i64) -> Result<(), CommandError> {
    blocking(&app, move |d| d.delete_character(id)).await
}

/// Tags in use, for the gallery's filter.
#[tauri::command]
pub async fn list_tags<R: Runtime>(app: AppHandle<R>) -> Result<Vec<TagCount>, CommandError> {
    blocking(&app, |d| d.tags()).await
}

/// Re-installs deleted built-in characters; returns how many.
#[tauri::command]
pub async fn restore_builtins<R: Runtime>(app: AppHandle<R>) -> Result<usize, CommandError> {
    blocking(&app, |d| d.restore_builtins()).await
}
