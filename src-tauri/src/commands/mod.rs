//! Tauri commands, one file per domain. Each deserializes its typed request,
//! calls a `dramatis-core` service on a blocking thread, and maps the error.

mod api;
mod app;
mod cards;
mod characters;
mod chats;
mod models;
mod personas;
mod prefs;
mod training;

use std::sync::Arc;

use dramatis_core::Dramatis;
use tauri::ipc::Invoke;
use tauri::{AppHandle, Manager, Runtime};

pub use api::ApiServer;
pub(crate) use api::apply as apply_api_server;
pub use app::AppInfo;
pub use characters::CharacterQuery;

use crate::{Backend, CommandError};

/// The invoke handler with every command; build.rs lists the same names for the ACL.
pub(crate) fn handler<R: Runtime>() -> impl Fn(Invoke<R>) -> bool + Send + Sync + 'static {
    tauri::generate_handler![
        app::app_info,
        api::api_server_status,
        api::set_api_server_settings,
        api::api_models,
        api::playground_generate,
        api::stop_playground,
        characters::list_characters,
        characters::get_character,
        characters::create_character,
        characters::update_character,
        characters::duplicate_character,
        characters::delete_character,
        characters::list_tags,
        characters::restore_builtins,
        cards::import_cards,
        cards::export_character,
        cards::lint_card,
        cards::list_lorebooks,
        cards::create_lorebook,
        cards::update_lorebook,
        cards::delete_lorebook,
        cards::export_lorebook,
        personas::list_personas,
        personas::create_persona,
        personas::update_persona,
        personas::delete_persona,
        personas::set_default_persona,
        models::models_overview,
        models::download_model,
        models::download_dataset,
        models::stop_download,
        models::import_model,
        models::delete_model,
        models::set_default_model,
        models::quantize_model,
        chats::list_chats,
        chats::start_chat,
        chats::chat_view,
        chats::send_message,
        chats::regenerate,
        chats::continue_reply,
        chats::stop_generation,
        chats::select_swipe,
        chats::edit_message,
        chats::delete_message,
        chats::rename_chat,
        chats::delete_chat,
        chats::set_chat_settings,
        chats::prompt_report,
        chats::set_chat_memory,
        chats::update_memory,
        chats::stop_memory_update,
        chats::search_messages,
        chats::open_message,
        chats::export_chat,
        chats::import_chat,
        chats::stream_test,
        prefs::preference_pairs,
        prefs::set_pair_excluded,
        prefs::set_chat_prefs_excluded,
        prefs::export_preferences,
        prefs::import_preferences,
        prefs::set_imported_pair_excluded,
        prefs::delete_imported_pairs,
        training::inspect_dataset,
        training::dataset_downloaded,
        training::preview_training_data,
        training::estimate_training,
        training::start_training,
        training::resume_training,
        training::stop_training,
        training::list_runs,
        training::delete_run,
        training::list_adapters,
        training::attach_adapter,
        training::delete_adapter,
        training::export_adapter,
        training::sample_replies,
    ]
}

/// Runs a service call off the async runtime (SQLite blocks).
async fn blocking<R: Runtime, T: Send + 'static>(
    app: &AppHandle<R>,
    f: impl FnOnce(&Dramatis) -> dramatis_core::Result<T> + Send + 'static,
) -> Result<T, CommandError> {
    let backend: Arc<Dramatis> = app.state::<Backend>().get()?;
    tauri::async_runtime::spawn_blocking(move || f(&backend))
        .await?
        .map_err(CommandError::from)
}
