use dramatis_core::{Persona, PersonaDraft};
use tauri::{AppHandle, Runtime};

use super::blocking;
use crate::CommandError;

/// All personas, the default first.
#[tauri::command]
pub async fn list_personas<R: Runtime>(app: AppHandle<R>) -> Result<Vec<Persona>, CommandError> {
    blocking(&app, |d| d.personas()).await
}

/// Adds a persona; returns the new list.
#[tauri::command]
pub async fn create_persona<R: Runtime>(
    app: AppHandle<R>,
    draft: PersonaDraft,
) -> Result<Vec<Persona>, CommandError> {
    blocking(&app, move |d| d.create_persona(draft)).await
}

/// Edits a persona; returns the new list.
#[tauri::command]
pub async fn update_persona<R: Runtime>(
    app: AppHandle<R>,
    id: i64,
    draft: PersonaDraft,
) -> Result<Vec<Persona>, CommandError> {
    blocking(&app, move |d| d.update_persona(id, draft)).await
}

/// Deletes a persona (not the last); returns the new list.
#[tauri::command]
pub async fn delete_persona<R: Runtime>(
    app: AppHandle<R>,
    id: i64,
) -> Result<Vec<Persona>, CommandError> {
    blocking(&app, move |d| d.delete_persona(id)).await
}

/// Makes a persona the default; returns the new list.
#[tauri::command]
pub async fn set_default_persona<R: Runtime>(
    app: AppHandle<R>,
    id: i64,
) -> Result<Vec<Persona>, CommandError> {
    blocking(&app, move |d| d.set_default_persona(id)).await
}
