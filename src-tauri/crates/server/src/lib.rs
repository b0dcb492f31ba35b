//! Dramatis as a local backend for other front-ends: an OpenAI-compatible API
//! (`/v1/models`, `/v1/completions`, `/v1/chat/completions`) and the KoboldCpp
//! routes SillyTavern's "KoboldCpp" connection calls, on axum, calling
//! `dramatis-core` and nothing below it.
//!
//! Invariants: requests share the app's one engine and wait in its queue (in
//! `core`), so the server never runs two generations at once; a client that
//! goes away (or `/api/extra/abort`) stops its generation; with a key set,
//! every route needs it; bodies are size-limited and parsed here, so a bad
//! body gets a 4xx JSON error saying what; no route reads or writes files.

mod routes;

use std::net::SocketAddr;
use std::sync::Arc;

use dramatis_core::Dramatis;
use tokio::sync::oneshot;

use routes::Shared;

/// How the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Address and port (127.0.0.1 unless the user allows the network).
    pub addr: SocketAddr,
    /// When set, every request must carry `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Browser origins allowed to call (CORS); none by default.
    pub cors_origins: Vec<String>,
    /// The largest request body, in bytes.
    pub max_body_bytes: usize,
    /// The model (an API id) for requests that name none; `None`: the app's default model.
    pub default_model: Option<String>,
}

impl ServerConfig {
    /// Loopback only, on `port`, no key, no CORS, 1 MiB bodies.
    pub fn local(port: u16) -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            api_key: None,
            cors_origins: Vec::new(),
            max_body_bytes: 1 << 20,
            default_model: None,
        }
    }
}

/// A server that is listening; [`RunningServer::stop`] ends it.
#[derive(Debug)]
pub struct RunningServer {
    /// Where it listens (the real port when 0 was asked for).
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    shared: Arc<Shared>,
}

impl RunningServer {
    /// Stops accepting, cancels running generations, and waits for the server to end.
    pub async fn stop(mut self) {
        self.shared.stop_all();
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }

    /// Requests served so far (each route call counts).
    pub fn requests(&self) -> u64 {
        self.shared.requests()
    }
}

/// Binds `cfg.addr` and serves in the current tokio runtime until stopped.
pub async fn start(app: Arc<Dramatis>, cfg: ServerConfig) -> std::io::Result<RunningServer> {
    let listener = tokio::net::TcpListener::bind(cfg.addr).await?;
    let addr = listener.local_addr()?;
    let (router, shared) = routes::router(app, &cfg);
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, router.into_make_service())
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "the API server stopped");
        }
    });
    tracing::info!(%addr, "API server listening");
    Ok(RunningServer {
        addr,
        stop: Some(tx),
        task,
        shared,
    })
}
