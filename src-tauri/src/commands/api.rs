//! The local API server (start, stop, settings, status) and the Playground.
//!
//! Invariants: the server runs in the app's tokio runtime and shares the
//! app's engine (requests queue in `core`); at most one server runs; changing
//! the settings stops the old one before the new one binds.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use dramatis_core::llm::SamplerConfig;
use dramatis_core::{ApiModel, ApiServerSettings, Completion, CompletionRequest, PromptInput};
use dramatis_server::{RunningServer, ServerConfig};
use serde::{Deserialize, Serialize};
use tauri::ipc::Channel;
use tauri::{AppHandle, Manager, Runtime};

use super::blocking;
use crate::{Backend, CommandError};

/// The running server (if any), its last start error, and the Playground's stop flag.
#[derive(Default)]
pub struct ApiServer {
    running: tokio::sync::Mutex<Option<RunningServer>>,
    error: std::sync::Mutex<Option<String>>,
    playground: std::sync::Mutex<Option<Arc<AtomicBool>>>,
}

/// What Settings shows about the server.
#[derive(Debug, Clone, Serialize)]
pub struct ApiServerStatus {
    /// The saved settings.
    pub settings: ApiServerSettings,
    /// Where it listens, when it runs.
    pub url: Option<String>,
    /// Why it is not running although enabled (a port in use, say).
    pub error: Option<String>,
    /// Requests served since it started.
    pub requests: u64,
    /// Whether the engine is generating now (for anyone).
    pub busy: bool,
    /// Requests waiting for the engine.
    pub waiting: usize,
}

/// (Re)starts the server as the saved settings say; called at start-up and on change.
pub(crate) async fn apply<R: Runtime>(app: &AppHandle<R>) -> Result<(), CommandError> {
    let backend = app.state::<Backend>().get()?;
    let state = app.state::<ApiServer>();
    // Settings are read under the lock: of two quick saves, the last one runs.
    let mut running = state.running.lock().await;
    let settings = {
        let b = backend.clone();
        tauri::async_runtime::spawn_blocking(move || b.api_server_settings())
            .await
            .map_err(|e| CommandError::from(dramatis_core::Error::Conflict(e.to_string())))??
    };
    if let Some(old) = running.take() {
        old.stop().await;
    }
    *state.error.lock().unwrap_or_else(|p| p.into_inner()) = None;
    if !settings.enabled {
        return Ok(());
    }
    let host = if settings.allow_network {
        [0, 0, 0, 0]
    } else {
        [127, 0, 0, 1]
    };
    let cfg = ServerConfig {
        addr: (host, settings.port).into(),
        api_key: Some(settings.api_key.clone()).filter(|k| !k.is_empty()),
        cors_origins: settings.cors_origins.clone(),
        ..ServerConfig::local(settings.port)
    };
    match dramatis_server::start(backend, cfg).await {
        Ok(s) => *running = Some(s),
        Err(e) => {
            let why = format!("Port {} could not be opened: {e}", settings.port);
            tracing::warn!(%why, "the API server did not start");
            *state.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
        }
    }
    Ok(())
}

async fn status<R: Runtime>(app: &AppHandle<R>) -> Result<ApiServerStatus, CommandError> {
    let backend = app.state::<Backend>().get()?;
    let state = app.state::<ApiServer>();
    let running = state.running.lock().await;
    let (busy, waiting) = backend.engine_load();
    Ok(ApiServerStatus {
        settings: backend.api_server_settings()?,
        // Bound to every interface, this computer still reaches it at 127.0.0.1.
        url: running.as_ref().map(|s| {
            if s.addr.ip().is_unspecified() {
                format!("http://127.0.0.1:{}", s.addr.port())
            } else {
                format!("http://{}", s.addr)
            }
        }),
        error: state
            .error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone(),
        requests: running.as_ref().map_or(0, RunningServer::requests),
        busy,
        waiting,
    })
}

/// The server's settings and state.
#[tauri::command]
pub async fn api_server_status<R: Runtime>(
    app: AppHandle<R>,
) -> Result<ApiServerStatus, CommandError> {
    status(&app).await
}

/// Saves the server's settings and restarts it (or stops it) to match.
#[tauri::command]
pub async fn set_api_server_settings<R: Runtime>(
    app: AppHandle<R>,
    settings: ApiServerSettings,
) -> Result<ApiServerStatus, CommandError> {
    blocking(&app, move |d| d.set_api_server_settings(&settings)).await?;
    apply(&app).await?;
    status(&app).await
}

/// Every model and model+adapter pair (the Playground's and the API's list).
#[tauri::command]
pub async fn api_models<R: Runtime>(app: AppHandle<R>) -> Result<Vec<ApiModel>, CommandError> {
    blocking(&app, |d| d.api_models()).await
}

/// A Playground request: a plain prompt and every sampler setting.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct PlaygroundRequest {
    /// An API model id; `None` is the default model.
    pub model: Option<String>,
    /// The text to continue.
    pub prompt: String,
    /// The most new tokens.
    pub max_tokens: usize,
    /// Sampling.
    pub sampler: SamplerConfig,
    /// Stop strings.
    pub stop: Vec<String>,
}

impl Default for PlaygroundRequest {
    fn default() -> Self {
        Self {
            model: None,
            prompt: String::new(),
            max_tokens: 300,
            sampler: SamplerConfig::default(),
            stop: Vec::new(),
        }
    }
}

/// What the Playground streams.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PlaygroundEvent {
    /// New text.
    Text {
        /// The piece.
        text: String,
    },
}

/// Generates for the Playground, streaming text; `stop_playground` ends it.
#[tauri::command]
pub async fn playground_generate<R: Runtime>(
    app: AppHandle<R>,
    request: PlaygroundRequest,
    on_event: Channel<PlaygroundEvent>,
) -> Result<Completion, CommandError> {
    if request.prompt.trim().is_empty() {
        return Err(dramatis_core::Error::Conflict("write a prompt first".into()).into());
    }
    let flag = Arc::new(AtomicBool::new(false));
    *app.state::<ApiServer>()
        .playground
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(flag.clone());
    let req = CompletionRequest {
        model: request.model,
        input: PromptInput::Text(request.prompt),
        max_tokens: request.max_tokens,
        sampler: request.sampler,
        stop: request.stop,
    };
    let result = blocking(&app, move |d| {
        d.complete(&req, &flag, &mut |t| {
            let _ = on_event.send(PlaygroundEvent::Text { text: t.to_owned() });
        })
    })
    .await;
    // Stop answers false once nothing runs.
    *app.state::<ApiServer>()
        .playground
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = None;
    result
}

/// Stops the Playground's generation; `true` if one was running.
#[tauri::command]
pub async fn stop_playground<R: Runtime>(app: AppHandle<R>) -> Result<bool, CommandError> {
    let state = app.state::<ApiServer>();
    let flag = state
        .playground
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    Ok(match flag {
        Some(f) => !f.swap(true, Ordering::SeqCst),
        None => false,
    })
}
