//! The Dramatis desktop shell: builds the Tauri app, registers the commands
//! and the avatar protocol, and hands every call to `dramatis-core`.
//!
//! Invariants: the shell holds no behaviour worth testing on its own; a
//! backend that failed to open (a newer database, say) still lets the window
//! open, and every command then reports why.

mod avatar_protocol;
mod commands;
mod error;

use std::sync::Arc;

use dramatis_core::Dramatis;
use tauri::{Builder, Manager, Runtime};

pub use commands::{AppInfo, CharacterQuery};
pub use error::CommandError;

/// The backend the commands use, or why it could not be opened.
pub struct Backend(Result<Arc<Dramatis>, CommandError>);

impl Backend {
    /// Wraps an opened backend, or the error that kept it from opening.
    pub fn new(result: dramatis_core::Result<Dramatis>) -> Self {
        Self(result.map(Arc::new).map_err(CommandError::from))
    }

    /// The backend, or the startup error for the UI.
    pub fn get(&self) -> Result<Arc<Dramatis>, CommandError> {
        self.0.clone()
    }
}

/// Registers everything the app needs on `builder`; `run` and the tests share it.
pub fn app_builder<R: Runtime>(builder: Builder<R>, backend: Backend) -> Builder<R> {
    builder
        .manage(backend)
        .manage(commands::ApiServer::default())
        .plugin(tauri_plugin_dialog::init())
        .register_asynchronous_uri_scheme_protocol("avatar", avatar_protocol::handle)
        .invoke_handler(commands::handler())
}

/// Starts the desktop app.
pub fn run() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tao=warn,wry=warn".into()),
        )
        .init();
    let backend = Backend::new(Dramatis::open_default());
    if let Err(e) = backend.get() {
        tracing::error!(%e, "the backend did not open; the window will say why");
    }
    app_builder(tauri::Builder::default(), backend)
        .setup(|app| {
            if let Ok(b) = app.state::<Backend>().get() {
                tracing::info!(data_dir = %b.data_dir().display(), "Dramatis started");
            }
            // The local API server, when Settings turned it on.
            let handle = app.handle().clone();
            tauri::async_runtime::spawn(async move {
                if let Err(e) = commands::apply_api_server(&handle).await {
                    tracing::warn!(error = %e.message, "the API server settings could not be read");
                }
            });
            Ok(())
        })
        .run(tauri::generate_context!())
        .expect("error while running the Dramatis window");
}
