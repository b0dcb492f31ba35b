//! Generates the Tauri context and the ACL for the app's own commands.

/// Every command the UI may call; the capability in src-tauri/capabilities grants exactly these.
const COMMANDS: &[&str] = &[
    "app_info",
    "list_characters",
    "get_character",
    "create_character",
    "update_character",
    "duplicate_character",
    "delete_character",
    "list_tags",
    "restore_builtins",
    "list_personas",
    "create_persona",
    "update_persona",
    "delete_persona",
    "set_default_persona",
    "models_overview",
    "download_model",
    "download_dataset",
    "stop_download",
    "import_model",
    "delete_model",
    "set_default_model",
    "quantize_model",
    "list_chats",
    "start_chat",
    "chat_view",
    "send_message",
    "regenerate",
    "continue_reply",
    "stop_generation",
    "select_swipe",
    "edit_message",
    "delete_message",
    "rename_chat",
    "delete_chat",
    "set_chat_settings",
    "search_messages",
    "open_message",
    "export_chat",
    "import_chat",
    "stream_test",
    "inspect_dataset",
    "dataset_downloaded",
    "preview_training_data",
    "estimate_training",
    "start_training",
    "resume_training",
    "stop_training",
    "list_runs",
    "delete_run",
    "list_adapters",
    "attach_adapter",
    "delete_adapter",
    "export_adapter",
    "sample_replies",
];

fn main() {
    tauri_build::try_build(
        tauri_build::Attributes::new()
            .capabilities_path_pattern("src-tauri/capabilities/*.json")
            .app_manifest(tauri_build::AppManifest::new().commands(COMMANDS)),
    )
    .expect("tauri build script");
}
