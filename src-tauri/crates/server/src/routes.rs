//! The routes: request bodies in (lenient about the many aliases front-ends
//! send, strict about values), one generation path, OpenAI and KoboldCpp
//! response shapes out.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use dramatis_core::llm::SamplerConfig;
use dramatis_core::{
    ChatTurn, Completion, CompletionRequest, Dramatis, ErrorKind, FinishReason, PromptInput,
};
use futures_util::Stream;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::ServerConfig;

/// What every route sees: the app, the key, and the running generations.
#[derive(Debug)]
pub struct Shared {
    app: Arc<Dramatis>,
    api_key: Option<String>,
    default_model: Option<String>,
    /// Listening on loopback only: requests must name a local host (no DNS rebinding).
    loopback: bool,
    /// Set by `abort_all` when the server stops: new generations start cancelled.
    stopping: AtomicBool,
    /// Generations waiting or running, bounded so waiters cannot use up the app's threads.
    pending: std::sync::atomic::AtomicUsize,
    running: Mutex<Vec<Arc<AtomicBool>>>,
    requests: AtomicU64,
    /// The largest request body read.
    max_body: usize,
}

impl Shared {
    /// Stops every generation this server started.
    pub fn abort_all(&self) -> usize {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        for f in running.iter() {
            f.store(true, Ordering::SeqCst);
        }
        running.len()
    }

    /// Stops every generation and makes later ones start stopped (shutdown).
    pub fn stop_all(&self) -> usize {
        self.stopping.store(true, Ordering::SeqCst);
        self.abort_all()
    }

    /// Requests served so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

pub(crate) fn router(app: Arc<Dramatis>, cfg: &ServerConfig) -> (Router, Arc<Shared>) {
    let shared = Arc::new(Shared {
        app,
        api_key: cfg.api_key.clone().filter(|k| !k.is_empty()),
        default_model: cfg.default_model.clone(),
        loopback: cfg.addr.ip().is_loopback(),
        stopping: AtomicBool::new(false),
        pending: std::sync::atomic::AtomicUsize::new(0),
        running: Mutex::new(Vec::new()),
        requests: AtomicU64::new(0),
        max_body: cfg.max_body_bytes,
    });
    let mut r = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/api/v1/model", get(kobold_model))
        .route("/api/v1/info/version", get(kobold_api_version))
        .route("/api/extra/version", get(kobold_version))
        .route("/api/v1/config/max_context_length", get(kobold_context))
        .route("/api/extra/true_max_context_length", get(kobold_context))
        .route("/api/v1/generate", post(kobold_generate))
        .route("/api/extra/generate/stream", post(kobold_stream))
        .route("/api/extra/abort", post(kobold_abort))
        .route("/api/extra/tokencount", post(kobold_tokencount))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(shared.clone(), guard))
        .layer(DefaultBodyLimit::max(cfg.max_body_bytes))
        .with_state(shared.clone());
    let origins: Vec<HeaderValue> = cfg
        .cors_origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o.trim()).ok())
        .collect();
    if !origins.is_empty() {
        r = r.layer(
            CorsLayer::new()
                .allow_origin(AllowOrigin::list(origins))
                .allow_methods([Method::GET, Method::POST])
                .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION]),
        );
    }
    (r, shared)
}

/// The error body: OpenAI's shape on /v1, KoboldCpp's on /api.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    kobold: bool,
}

impl ApiError {
    fn bad(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kobold: false,
        }
    }

    fn kobold(mut self) -> Self {
        self.kobold = true;
        self
    }
}

impl From<dramatis_core::Error> for ApiError {
    fn from(e: dramatis_core::Error) -> Self {
        let status = match e.kind() {
            ErrorKind::Validation | ErrorKind::Conflict => StatusCode::BAD_REQUEST,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::NoModel => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self {
            status,
            message: e.to_string(),
            kobold: false,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = if self.status.is_client_error() {
            "invalid_request_error"
        } else {
            "server_error"
        };
        let body = if self.kobold {
            json!({"detail": {"msg": self.message, "type": kind}})
        } else {
            json!({"error": {"message": self.message, "type": kind, "code": self.status.as_u16()}})
        };
        (self.status, Json(body)).into_response()
    }
}

/// Counts requests, checks the key, and turns a too-large body into a JSON 413.
async fn guard(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    req: axum::extract::Request,
    next: Next,
) -> Response {
    s.requests.fetch_add(1, Ordering::Relaxed);
    let kobold = req.uri().path().starts_with("/api/");
    let refuse = |status: StatusCode, message: &str| {
        ApiError {
            status,
            message: message.into(),
            kobold,
        }
        .into_response()
    };
    // A web page may not reach a loopback server through a name it controls.
    if s.loopback {
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let name = match host.strip_prefix('[') {
            Some(rest) => rest.split(']').next().unwrap_or(""),
            None => host.split(':').next().unwrap_or(""),
        };
        if !matches!(name, "localhost" | "127.0.0.1" | "::1") {
            return refuse(
                StatusCode::FORBIDDEN,
                "this server only answers requests for localhost or 127.0.0.1",
            );
        }
    }
    // A page's form or no-cors request cannot send JSON without a preflight.
    if req.method() == Method::POST {
        let json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.trim_start()
                    .to_ascii_lowercase()
                    .starts_with("application/json")
            });
        if !json {
            return refuse(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "send the body as JSON with Content-Type: application/json",
            );
        }
    }
    if let Some(key) = &s.api_key {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if given != Some(key.as_str()) {
            return ApiError {
                status: StatusCode::UNAUTHORIZED,
                message: "this server needs an API key: send Authorization: Bearer <key>".into(),
                kobold,
            }
            .into_response();
        }
    }
    // A body declared larger than the limit is read and dropped (up to a
    // bound, for a while) before the answer: a client still sending it gets
    // the 413, not a connection closed under its upload.
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > s.max_body as u64) {
        drain(req.into_body()).await;
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            "the request body is too large",
        );
    }
    let res = next.run(req).await;
    if res.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: "the request body is too large".into(),
            kobold,
        }
        .into_response();
    }
    res
}

/// The most of a refused body read before answering, and for how long.
const DRAIN_BYTES: usize = 64 << 20;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads and drops `body`, up to [`DRAIN_BYTES`] within [`DRAIN_TIME`].
async fn drain(body: axum::body::Body) {
    use futures_util::StreamExt;
    let mut stream = body.into_data_stream();
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        let mut seen = 0;
        while let Some(Ok(chunk)) = stream.next().await {
            seen += chunk.len();
            if seen > DRAIN_BYTES {
                break;
            }
        }
    })
    .await;
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message:
            "no such route; see /v1/models, /v1/completions, /v1/chat/completions, /api/v1/generate"
                .into(),
        kobold: false,
    }
}

fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad("the request has no JSON body"));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad(format!("the body is not valid JSON for this route: {e}")))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A string or a list of strings (`stop`, `prompt`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// The sampler fields every generation route shares. Front-ends send the
/// same setting under several names (OpenAI, llama.cpp and KoboldCpp ones),
/// often more than one at once: the first name present wins.
#[derive(Debug, Clone, Default)]
struct Sampling {
    max_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    min_p: Option<f64>,
    repetition_penalty: Option<f64>,
    penalty_range: Option<i64>,
    frequency_penalty: Option<f64>,
    presence_penalty: Option<f64>,
    seed: Option<i64>,
    stop: Option<OneOrMany>,
    n: Option<i64>,
    stream: Option<bool>,
    model: Option<String>,
    max_context_length: Option<i64>,
}

/// The value of the first of `names` present (and not null) in `body`.
fn pick<T: for<'de> Deserialize<'de>>(
    body: &serde_json::Map<String, Value>,
    names: &[&str],
) -> Result<Option<T>, ApiError> {
    for name in names {
        match body.get(*name) {
            None | Some(Value::Null) => continue,
            Some(v) => {
                return serde_json::from_value(v.clone())
                    .map(Some)
                    .map_err(|e| ApiError::bad(format!("{name} has the wrong type: {e}")));
            }
        }
    }
    Ok(None)
}

impl Sampling {
    fn from_body(b: &serde_json::Map<String, Value>) -> Result<Self, ApiError> {
        Ok(Self {
            max_tokens: pick(
                b,
                &[
                    "max_tokens",
                    "max_completion_tokens",
                    "max_new_tokens",
                    "n_predict",
                    "max_length",
                ],
            )?,
            temperature: pick(b, &["temperature"])?,
            top_p: pick(b, &["top_p"])?,
            top_k: pick(b, &["top_k"])?,
            min_p: pick(b, &["min_p"])?,
            repetition_penalty: pick(b, &["repetition_penalty", "rep_pen", "repeat_penalty"])?,
            penalty_range: pick(
                b,
                &["rep_pen_range", "repeat_last_n", "repetition_penalty_range"],
            )?,
            frequency_penalty: pick(b, &["frequency_penalty"])?,
            presence_penalty: pick(b, &["presence_penalty"])?,
            seed: pick(b, &["seed", "sampler_seed"])?,
            stop: pick(b, &["stop", "stop_sequence", "stopping_strings"])?,
            n: pick(b, &["n"])?,
            stream: pick(b, &["stream"])?,
            model: pick(b, &["model"])?,
            max_context_length: pick(b, &["max_context_length", "truncation_length"])?,
        })
    }
}

impl Sampling {
    /// Checks every value; `default_max` when the client gave no length.
    fn request(
        self,
        input: PromptInput,
        default_max: usize,
    ) -> Result<(CompletionRequest, bool), ApiError> {
        let range =
            |name: &str, v: Option<f64>, lo: f64, hi: f64, default: f64| -> Result<f32, ApiError> {
                match v {
                    None => Ok(default as f32),
                    Some(x) if x.is_finite() && (lo..=hi).contains(&x) => Ok(x as f32),
                    Some(x) => Err(ApiError::bad(format!(
                        "{name} must be between {lo} and {hi}, not {x}"
                    ))),
                }
            };
        let max_tokens = match self.max_tokens {
            None => default_max,
            Some(n) if n >= 1 => usize::try_from(n).unwrap_or(usize::MAX),
            Some(n) => {
                return Err(ApiError::bad(format!(
                    "max_tokens must be at least 1, not {n}"
                )));
            }
        };
        if let Some(n) = self.n
            && n != 1
        {
            return Err(ApiError::bad(format!("only n = 1 is supported, not {n}")));
        }
        if let Some(c) = self.max_context_length
            && c < 1
        {
            return Err(ApiError::bad(format!(
                "max_context_length must be positive, not {c}"
            )));
        }
        let top_k = match self.top_k {
            None => 0,
            Some(k) if k >= 0 => usize::try_from(k).unwrap_or(0),
            // OpenAI-style clients send -1 for "off".
            Some(-1) => 0,
            Some(k) => return Err(ApiError::bad(format!("top_k must be 0 or more, not {k}"))),
        };
        let stop: Vec<String> = self
            .stop
            .map(OneOrMany::into_vec)
            .unwrap_or_default()
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect();
        if stop.len() > 32 {
            return Err(ApiError::bad("at most 32 stop strings"));
        }
        let sampler = SamplerConfig {
            temperature: range("temperature", self.temperature, 0.0, 5.0, 0.7)?,
            top_k,
            top_p: range("top_p", self.top_p, 0.0, 1.0, 1.0)?,
            min_p: range("min_p", self.min_p, 0.0, 1.0, 0.0)?,
            repetition_penalty: range(
                "repetition_penalty",
                self.repetition_penalty,
                0.1,
                5.0,
                1.0,
            )?,
            presence_penalty: range("presence_penalty", self.presence_penalty, -2.0, 2.0, 0.0)?,
            frequency_penalty: range("frequency_penalty", self.frequency_penalty, -2.0, 2.0, 0.0)?,
            penalty_window: match self.penalty_range {
                Some(n) if n > 0 => usize::try_from(n).unwrap_or(64),
                _ => SamplerConfig::default().penalty_window,
            },
            seed: match self.seed {
                Some(s) if s >= 0 => s as u64,
                // -1 (KoboldCpp's "random") or none: a new seed.
                _ => SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64),
            },
        };
        Ok((
            CompletionRequest {
                model: self.model,
                input,
                max_tokens,
                sampler,
                stop,
            },
            self.stream.unwrap_or(false),
        ))
    }
}

/// Names the request's model (the server's default when it names none), so
/// an unknown model is a 404 before any stream starts and every chunk says
/// which model wrote it.
async fn resolve(
    s: &Arc<Shared>,
    mut req: CompletionRequest,
    kobold: bool,
) -> Result<CompletionRequest, ApiError> {
    if req.model.as_deref().is_none_or(|m| m.trim().is_empty()) {
        req.model = s.default_model.clone();
    }
    let (app, id) = (s.app.clone(), req.model.clone());
    let m = tokio::task::spawn_blocking(move || app.resolve_api_model(id.as_deref()))
        .await
        .map_err(|e| ApiError::from(dramatis_core::Error::Conflict(e.to_string())))?
        .map_err(|e| {
            let e = ApiError::from(e);
            if kobold { e.kobold() } else { e }
        })?;
    req.model = Some(m.id);
    Ok(req)
}

/// What the generation thread sends: pieces, then the end.
enum Piece {
    Text(String),
    Done(Result<Completion, dramatis_core::Error>),
}

/// Sets a generation's cancel flag when dropped: a client that goes away
/// (the response future or the stream dropped) stops its generation.
struct CancelOnDrop {
    flag: Arc<AtomicBool>,
    shared: Arc<Shared>,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.flag.store(true, Ordering::SeqCst);
        let mut running = self
            .shared
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        running.retain(|f| !Arc::ptr_eq(f, &self.flag));
    }
}

/// The most generations waiting or running at once; more get a 503, so
/// waiters never use up the blocking threads the app's commands need too.
const MAX_PENDING: usize = 32;

/// Counts a generation as pending until its thread ends.
struct Pending(Arc<Shared>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Starts a generation on a blocking thread; its pieces arrive on the receiver.
fn spawn(
    shared: &Arc<Shared>,
    req: CompletionRequest,
) -> Result<(mpsc::UnboundedReceiver<Piece>, CancelOnDrop), ApiError> {
    if shared.pending.fetch_add(1, Ordering::SeqCst) >= MAX_PENDING {
        shared.pending.fetch_sub(1, Ordering::SeqCst);
        return Err(ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: format!(
                "{MAX_PENDING} requests are already waiting for the engine; try again shortly"
            ),
            kobold: false,
        });
    }
    let pending = Pending(shared.clone());
    // A server that is stopping starts nothing.
    let flag = Arc::new(AtomicBool::new(shared.stopping.load(Ordering::SeqCst)));
    shared
        .running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(flag.clone());
    let (tx, rx) = mpsc::unbounded_channel();
    let app = shared.app.clone();
    let cancel = flag.clone();
    tokio::task::spawn_blocking(move || {
        let _pending = pending;
        let result = app.complete(&req, &cancel, &mut |p| {
            let _ = tx.send(Piece::Text(p.to_owned()));
        });
        let _ = tx.send(Piece::Done(result));
    });
    Ok((
        rx,
        CancelOnDrop {
            flag,
            shared: shared.clone(),
        },
    ))
}

/// Waits for the whole text (the guard cancels if this future is dropped).
async fn collect(shared: &Arc<Shared>, req: CompletionRequest) -> Result<Completion, ApiError> {
    let (mut rx, _guard) = spawn(shared, req)?;
    while let Some(p) = rx.recv().await {
        if let Piece::Done(r) = p {
            return Ok(r?);
        }
    }
    Err(ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message: "the generation ended without a result".into(),
        kobold: false,
    })
}

/// A server-sent event stream of a generation: `piece` makes each text event,
/// `end` the closing ones; dropping the stream (the client went away) cancels
/// the generation.
fn event_stream(
    shared: Arc<Shared>,
    req: CompletionRequest,
    piece: impl Fn(&str) -> Event + Send + Sync + 'static,
    end: impl Fn(Result<Completion, dramatis_core::Error>) -> Vec<Event> + Send + Sync + 'static,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    struct Open {
        rx: mpsc::UnboundedReceiver<Piece>,
        _guard: CancelOnDrop,
        pending: std::collections::VecDeque<Event>,
        done: bool,
    }
    let (rx, guard) = spawn(&shared, req)?;
    let (piece, end) = (Arc::new(piece), Arc::new(end));
    let open = Open {
        rx,
        _guard: guard,
        pending: Default::default(),
        done: false,
    };
    let stream = futures_util::stream::unfold(open, move |mut st| {
        let (piece, end) = (piece.clone(), end.clone());
        async move {
            if let Some(e) = st.pending.pop_front() {
                return Some((Ok(e), st));
            }
            if st.done {
                return None;
            }
            match st.rx.recv().await {
                Some(Piece::Text(t)) => Some((Ok(piece(&t)), st)),
                Some(Piece::Done(r)) => {
                    st.done = true;
                    st.pending.extend(end(r));
                    let e = st.pending.pop_front()?;
                    Some((Ok(e), st))
                }
                None => None,
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

fn finish(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
}

fn usage(c: &Completion) -> Value {
    json!({
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "total_tokens": c.prompt_tokens + c.completion_tokens,
        // OpenAI's field for prompt tokens served from the cache.
        "prompt_tokens_details": {"cached_tokens": c.reused_tokens},
    })
}

fn error_event(e: dramatis_core::Error) -> Event {
    let err = ApiError::from(e);
    Event::default()
        .data(json!({"error": {"message": err.message, "type": "server_error"}}).to_string())
}

async fn models(State(s): State<Arc<Shared>>) -> Result<Json<Value>, ApiError> {
    let app = s.app.clone();
    let list = tokio::task::spawn_blocking(move || app.api_models())
        .await
        .map_err(|e| ApiError::from(dramatis_core::Error::Conflict(e.to_string())))??;
    Ok(Json(json!({
        "object": "list",
        "data": list.iter().map(|m| json!({
            "id": m.id, "object": "model", "created": m.created / 1000, "owned_by": "dramatis",
            "context_length": m.context,
        })).collect::<Vec<_>>(),
    })))
}

/// A JSON object body (every generation route takes one).
fn object(body: &Bytes) -> Result<serde_json::Map<String, Value>, ApiError> {
    match parse::<Value>(body)? {
        Value::Object(m) => Ok(m),
        _ => Err(ApiError::bad("the body must be a JSON object")),
    }
}

async fn completions(State(s): State<Arc<Shared>>, body: Bytes) -> Result<Response, ApiError> {
    let b = object(&body)?;
    let prompt = match pick::<OneOrMany>(&b, &["prompt"])? {
        None => return Err(ApiError::bad("prompt is required")),
        Some(OneOrMany::One(p)) => p,
        Some(OneOrMany::Many(mut v)) if v.len() == 1 => v.remove(0),
        Some(OneOrMany::Many(v)) => {
            return Err(ApiError::bad(format!(
                "one prompt per request, not {}",
                v.len()
            )));
        }
    };
    let (req, stream) = Sampling::from_body(&b)?.request(PromptInput::Text(prompt), 16)?;
    let req = resolve(&s, req, false).await?;
    let id = format!("cmpl-{}", now_secs());
    let created = now_secs();
    if stream {
        let (id2, model) = (id.clone(), req.model.clone().unwrap_or_default());
        return Ok(event_stream(
            s.clone(),
            req,
            move |t| {
                Event::default().data(
                    json!({"id": id, "object": "text_completion", "created": created, "model": model,
                       "choices": [{"text": t, "index": 0, "logprobs": null, "finish_reason": null}]})
                    .to_string(),
                )
            },
            move |r| match r {
                Ok(c) => vec![
                    Event::default().data(
                        json!({"id": id2, "object": "text_completion", "created": created, "model": c.model,
                           "choices": [{"text": "", "index": 0, "logprobs": null, "finish_reason": finish(c.finish_reason)}],
                           "usage": usage(&c)})
                        .to_string(),
                    ),
                    Event::default().data("[DONE]"),
                ],
                Err(e) => vec![error_event(e), Event::default().data("[DONE]")],
            },
        )?
        .into_response());
    }
    let c = collect(&s, req).await?;
    Ok(Json(json!({
        "id": id, "object": "text_completion", "created": created, "model": c.model,
        "choices": [{"text": c.text, "index": 0, "logprobs": null, "finish_reason": finish(c.finish_reason)}],
        "usage": usage(&c),
    }))
    .into_response())
}

/// A chat message's content: a string, or OpenAI's list of parts (text kept).
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Value>),
}

#[derive(Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

async fn chat_completions(State(s): State<Arc<Shared>>, body: Bytes) -> Result<Response, ApiError> {
    let b = object(&body)?;
    let messages = pick::<Vec<Message>>(&b, &["messages"])?
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::bad("messages is required and must not be empty"))?;
    let mut turns = Vec::with_capacity(messages.len());
    for m in messages {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => return Err(ApiError::bad(format!("unknown message role \"{other}\""))),
        };
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("\n"),
        };
        turns.push(ChatTurn {
            role: role.to_owned(),
            content,
        });
    }
    let (req, stream) = Sampling::from_body(&b)?.request(PromptInput::Chat(turns), 512)?;
    let req = resolve(&s, req, false).await?;
    let id = format!("chatcmpl-{}", now_secs());
    let created = now_secs();
    let chunk = move |id: &str, model: &str, delta: Value, finish: Value| {
        json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    if stream {
        let (id2, model) = (id.clone(), req.model.clone().unwrap_or_default());
        let first = std::sync::atomic::AtomicBool::new(true);
        return Ok(event_stream(
            s.clone(),
            req,
            move |t| {
                // The first chunk carries the role, as OpenAI's do.
                let delta = if first.swap(false, Ordering::SeqCst) {
                    json!({"role": "assistant", "content": t})
                } else {
                    json!({"content": t})
                };
                Event::default().data(chunk(&id, &model, delta, Value::Null).to_string())
            },
            move |r| match r {
                Ok(c) => {
                    let mut last = chunk(&id2, &c.model, json!({}), json!(finish(c.finish_reason)));
                    last["usage"] = usage(&c);
                    vec![
                        Event::default().data(last.to_string()),
                        Event::default().data("[DONE]"),
                    ]
                }
                Err(e) => vec![error_event(e), Event::default().data("[DONE]")],
            },
        )?
        .into_response());
    }
    let c = collect(&s, req).await?;
    Ok(Json(json!({
        "id": id, "object": "chat.completion", "created": created, "model": c.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                     "finish_reason": finish(c.finish_reason)}],
        "usage": usage(&c),
    }))
    .into_response())
}

async fn default_model(s: &Arc<Shared>) -> Result<dramatis_core::ApiModel, ApiError> {
    let (app, id) = (s.app.clone(), s.default_model.clone());
    tokio::task::spawn_blocking(move || app.resolve_api_model(id.as_deref()))
        .await
        .map_err(|e| ApiError::from(dramatis_core::Error::Conflict(e.to_string())))?
        .map_err(|e| ApiError::from(e).kobold())
}

async fn kobold_model(State(s): State<Arc<Shared>>) -> Result<Json<Value>, ApiError> {
    let m = default_model(&s).await?;
    Ok(Json(json!({"result": format!("koboldcpp/{}", m.id)})))
}

async fn kobold_api_version() -> Json<Value> {
    Json(json!({"result": "1.2.5"}))
}

async fn kobold_version() -> Json<Value> {
    // SillyTavern turns on streaming and token counting for KoboldCpp ≥ 1.30.
    Json(json!({"result": "KoboldCpp", "version": "1.80.0", "protected": false, "txt2img": false}))
}

async fn kobold_context(State(s): State<Arc<Shared>>) -> Result<Json<Value>, ApiError> {
    let m = default_model(&s).await?;
    Ok(Json(json!({"value": m.context})))
}

fn kobold_request(body: &Bytes) -> Result<CompletionRequest, ApiError> {
    let b = object(body).map_err(ApiError::kobold)?;
    let prompt = pick::<String>(&b, &["prompt"])
        .map_err(ApiError::kobold)?
        .ok_or_else(|| ApiError::bad("prompt is required").kobold())?;
    // KoboldCpp's default length is 100 tokens.
    let (req, _) = Sampling::from_body(&b)
        .and_then(|s| s.request(PromptInput::Text(prompt), 100))
        .map_err(ApiError::kobold)?;
    Ok(req)
}

async fn kobold_generate(
    State(s): State<Arc<Shared>>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let req = resolve(&s, kobold_request(&body)?, true).await?;
    let c = collect(&s, req).await.map_err(ApiError::kobold)?;
    Ok(Json(
        json!({"results": [{"text": c.text, "finish_reason": finish(c.finish_reason)}]}),
    ))
}

async fn kobold_stream(State(s): State<Arc<Shared>>, body: Bytes) -> Result<Response, ApiError> {
    let req = resolve(&s, kobold_request(&body)?, true).await?;
    Ok(event_stream(
        s.clone(),
        req,
        |t| {
            Event::default()
                .event("message")
                .data(json!({"token": t}).to_string())
        },
        |r| match r {
            Ok(c) => {
                vec![Event::default().event("message").data(
                    json!({"token": "", "finish_reason": finish(c.finish_reason)}).to_string(),
                )]
            }
            Err(e) => vec![error_event(e)],
        },
    )
    .map_err(ApiError::kobold)?
    .into_response())
}

async fn kobold_abort(State(s): State<Arc<Shared>>) -> Json<Value> {
    let n = s.abort_all();
    Json(json!({"success": n > 0, "done": "true"}))
}

#[derive(Deserialize)]
struct CountBody {
    prompt: Option<String>,
}

async fn kobold_tokencount(
    State(s): State<Arc<Shared>>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let b: CountBody = parse(&body).map_err(ApiError::kobold)?;
    let text = b.prompt.unwrap_or_default();
    let (app, id) = (s.app.clone(), s.default_model.clone());
    let ids = tokio::task::spawn_blocking(move || app.tokenize(id.as_deref(), &text))
        .await
        .map_err(|e| ApiError::from(dramatis_core::Error::Conflict(e.to_string())))?
        .map_err(|e| ApiError::from(e).kobold())?;
    Ok(Json(json!({"value": ids.len(), "ids": ids})))
}
