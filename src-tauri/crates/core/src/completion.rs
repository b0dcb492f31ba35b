//! Plain generation for other front-ends (the local API server) and the
//! Playground: a prompt or a list of chat messages in, streamed text out, on
//! the one engine the chat uses.
//!
//! Invariants: a request waits its turn in the engine queue (arrival order,
//! chat replies included) and never runs beside another; its cancel flag stops
//! it while waiting or generating; the engine's prefix cache serves it like a
//! chat turn, so a front-end that re-sends the whole history each turn only
//! computes the new tokens.

use std::sync::atomic::{AtomicBool, Ordering};

use dramatis_llm::{GenerateParams, Reuse, SamplerConfig, StopReason};
use dramatis_persona::prompt::{self, Speaker};
use serde::{Deserialize, Serialize};

use crate::{Dramatis, Error, Result};

/// A model as an API client names it: an installed model, or a model with one
/// of the adapters trained on it (`phi-2-q4_k_m+kestrel`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiModel {
    /// The id clients send.
    pub id: String,
    /// The installed model.
    pub model_id: i64,
    /// The adapter applied, if any.
    pub adapter_id: Option<i64>,
    /// The context window, in tokens.
    pub context: usize,
    /// ms since the epoch the adapter was made (0 for a plain model).
    pub created: i64,
}

/// One message of a chat-style request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatTurn {
    /// `system`, `user` or `assistant` (`developer` counts as system).
    pub role: String,
    /// The text.
    pub content: String,
}

/// What to continue: plain text, or a chat laid out in the role-play markers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptInput {
    /// Continue this text exactly.
    Text(String),
    /// A chat: each message as a turn, then the opening of the reply.
    Chat(Vec<ChatTurn>),
}

/// A generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    /// An [`ApiModel::id`]; `None` is the default model without an adapter.
    pub model: Option<String>,
    /// What to continue.
    pub input: PromptInput,
    /// The most new tokens.
    pub max_tokens: usize,
    /// Sampling.
    pub sampler: SamplerConfig,
    /// Stop strings (chat requests also stop at the role-play markers).
    pub stop: Vec<String>,
}

/// Why a completion ended, as the OpenAI API names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The end of text or a stop string.
    Stop,
    /// The token limit or the context window.
    Length,
    /// Stopped by the client (abort or disconnect).
    Cancelled,
}

/// A finished (or stopped) completion.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Completion {
    /// The id of the model that ran.
    pub model: String,
    /// The new text.
    pub text: String,
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Prompt tokens reused from the engine's cache.
    pub reused_tokens: usize,
    /// Generated tokens per second.
    pub tokens_per_sec: f64,
}

/// Bounds on a request, so a hostile client cannot make the engine loop.
const MAX_PROMPT_BYTES: usize = 1 << 20;

/// A model's context window from its file header (Phi-2's 2,048 if unreadable).
fn model_context(path: &str) -> usize {
    dramatis_llm::inspect_model(std::path::Path::new(path))
        .map(|i| i.config.max_position_embeddings)
        .unwrap_or(2048)
}

fn slug(name: &str) -> String {
    let s: String = name
        .trim()
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || "-_.".contains(c) {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    s.trim_matches('-').to_owned()
}

/// The role-play layout of a chat request: what adapters are trained on.
pub fn chat_prompt(turns: &[ChatTurn]) -> String {
    let mut text = String::new();
    for t in turns {
        let who = match t.role.as_str() {
            "user" => Speaker::User,
            "assistant" => Speaker::Assistant,
            _ => Speaker::System,
        };
        text.push_str(&prompt::turn(who, &t.content));
    }
    text.push_str(prompt::reply_opening());
    text
}

impl Dramatis {
    /// Every model an API client may name, the plain models first.
    pub fn api_models(&self) -> Result<Vec<ApiModel>> {
        self.api_model_list(true)
    }

    /// The list, with each model's context read from its file header only
    /// when asked (a request naming one model needs only that one's).
    pub(crate) fn api_model_list(&self, with_context: bool) -> Result<Vec<ApiModel>> {
        let models = self.list_models()?;
        let adapters = self.store().list_adapters()?;
        let mut out = Vec::new();
        for m in &models {
            let context = if with_context {
                model_context(&m.path)
            } else {
                0
            };
            out.push(ApiModel {
                id: slug(&m.name),
                model_id: m.id,
                adapter_id: None,
                context,
                created: 0,
            });
            for a in adapters.iter().filter(|a| a.base_model_id == Some(m.id)) {
                out.push(ApiModel {
                    id: format!("{}+{}", slug(&m.name), slug(&a.name)),
                    model_id: m.id,
                    adapter_id: Some(a.id),
                    context,
                    created: a.created_at,
                });
            }
        }
        // Two models (or adapters) of one name: later ones get their row id.
        let mut seen = std::collections::HashSet::new();
        for m in &mut out {
            if !seen.insert(m.id.clone()) {
                m.id = format!("{}-{}", m.id, m.adapter_id.unwrap_or(m.model_id));
                seen.insert(m.id.clone());
            }
        }
        Ok(out)
    }

    /// The model a request names (`None`: the default model).
    pub fn resolve_api_model(&self, id: Option<&str>) -> Result<ApiModel> {
        let all = self.api_model_list(false)?;
        let mut found = self.find_api_model(&all, id)?;
        let path = self.model(found.model_id)?.path;
        found.context = model_context(&path);
        Ok(found)
    }

    fn find_api_model(&self, all: &[ApiModel], id: Option<&str>) -> Result<ApiModel> {
        match id.map(str::trim).filter(|s| !s.is_empty()) {
            None => {
                let default = self.default_model()?.ok_or_else(|| {
                    Error::NoModel(
                        "No model is installed yet: download or import one in Dramatis.".into(),
                    )
                })?;
                all.iter()
                    .find(|m| m.model_id == default.id && m.adapter_id.is_none())
                    .cloned()
                    .ok_or_else(|| Error::NoModel("the default model is gone".into()))
            }
            Some(want) => {
                let lower = want.to_ascii_lowercase();
                // Front-ends send odd ids ("koboldcpp/phi-2", a file name): the
                // id itself, its last path part, then a display name made an id.
                let last = lower.rsplit('/').next().unwrap_or(&lower).to_owned();
                let named = slug(want);
                all.iter()
                    .find(|m| m.id == lower)
                    .or_else(|| all.iter().find(|m| m.id == last))
                    .or_else(|| all.iter().find(|m| m.id == named))
                    .cloned()
                    .ok_or_else(|| {
                        Error::UnknownModel(format!(
                            "no model is called \"{want}\"; GET /v1/models lists {}",
                            all.iter()
                                .map(|m| m.id.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ))
                    })
            }
        }
    }

    /// Generates for a request, streaming each new piece of text to `on_text`;
    /// waits for the engine first. `cancel` stops it (while waiting, too).
    pub fn complete(
        &self,
        req: &CompletionRequest,
        cancel: &AtomicBool,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Completion> {
        let text = match &req.input {
            PromptInput::Text(t) => t.clone(),
            PromptInput::Chat(turns) => chat_prompt(turns),
        };
        if text.len() > MAX_PROMPT_BYTES {
            return Err(Error::Conflict(format!(
                "the prompt is {} bytes; the most is {MAX_PROMPT_BYTES}",
                text.len()
            )));
        }
        if req.max_tokens == 0 {
            return Err(Error::Conflict("max_tokens must be at least 1".into()));
        }
        if text.is_empty() {
            return Err(Error::Conflict("the prompt is empty".into()));
        }
        let model = self.resolve_api_model(req.model.as_deref())?;
        // A background summary gives way, as it does to a chat reply.
        if let Some(f) = self.chat_runtime.summarizing.lock().unwrap().as_ref() {
            f.store(true, Ordering::SeqCst);
        }
        let cancelled = Completion {
            model: model.id.clone(),
            text: String::new(),
            prompt_tokens: 0,
            completion_tokens: 0,
            finish_reason: FinishReason::Cancelled,
            reused_tokens: 0,
            tokens_per_sec: 0.0,
        };
        let Some(_turn) = self.chat_runtime.queue.acquire(cancel) else {
            return Ok(cancelled);
        };
        if cancel.load(Ordering::SeqCst) {
            return Ok(cancelled);
        }
        let mut slot = self
            .chat_runtime
            .engine
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let installed = self.model(model.model_id)?;
        let engine = self.ensure_model(&mut slot, &installed, &mut |_| {})?;
        self.use_adapter(engine, model.adapter_id)?;
        let ids = engine.tokenizer.encode(&text)?;
        let ctx = engine.session.model().config().max_position_embeddings;
        if ids.len() >= ctx {
            return Err(Error::Conflict(format!(
                "the prompt is {} tokens; the model's context holds {ctx}",
                ids.len()
            )));
        }
        let mut stop = req.stop.clone();
        if matches!(req.input, PromptInput::Chat(_)) {
            stop.extend(prompt::stop_strings());
        }
        let params = GenerateParams {
            sampler: req.sampler.clone(),
            // What fits: the window bounds the reply, as llama.cpp servers do.
            max_new_tokens: req.max_tokens.min(ctx - ids.len()),
            stop,
            reuse: Reuse::Prefix,
        };
        let g = engine
            .session
            .generate(&engine.tokenizer, &ids, &params, cancel, |piece| {
                on_text(piece)
            })?;
        let finish_reason = match g.stop_reason {
            StopReason::EndOfText | StopReason::StopString => FinishReason::Stop,
            StopReason::MaxTokens | StopReason::ContextFull => FinishReason::Length,
            StopReason::Cancelled => FinishReason::Cancelled,
        };
        let secs = g.decode.as_secs_f64();
        Ok(Completion {
            model: model.id,
            completion_tokens: g.token_ids.len(),
            tokens_per_sec: if secs > 0.0 {
                g.token_ids.len() as f64 / secs
            } else {
                0.0
            },
            text: g.text,
            prompt_tokens: g.prompt_tokens,
            finish_reason,
            reused_tokens: g.reused_tokens,
        })
    }

    /// The token ids of `text` with a model's tokenizer (`None`: the default model).
    pub fn tokenize(&self, model: Option<&str>, text: &str) -> Result<Vec<u32>> {
        let m = self.resolve_api_model(model)?;
        let installed = self.model(m.model_id)?;
        let t = self.cached_tokenizer(&installed.tokenizer_path)?;
        Ok(t.encode(text)?)
    }

    /// Registers a PEFT adapter folder (left where it is) as trained on
    /// `model_id`, after loading it against that model's shape; returns its id.
    /// A folder already registered is not registered twice.
    pub fn register_adapter(&self, dir: &std::path::Path, model_id: i64) -> Result<i64> {
        let dir = dir.canonicalize().map_err(|e| Error::Io {
            context: format!("cannot read {}", dir.display()),
            source: e,
        })?;
        let path = dir.to_string_lossy().into_owned();
        if let Some(a) = self
            .store()
            .list_adapters()?
            .into_iter()
            .find(|a| a.path == path)
        {
            return Ok(a.id);
        }
        let m = self.model(model_id)?;
        let info = dramatis_llm::inspect_model(std::path::Path::new(&m.path))?;
        dramatis_llm::LoraAdapter::load_peft(&dir, &info.config, &dramatis_llm::Device::Cpu)?;
        let name = dir
            .file_name()
            .map_or("adapter".into(), |n| n.to_string_lossy().into_owned());
        Ok(self.store().insert_adapter(&crate::AdapterRow {
            id: 0,
            name,
            run_id: None,
            base_model_id: Some(model_id),
            base_sha256: m.sha256.clone(),
            path,
            recipe: serde_json::json!({"registered": true}).to_string(),
            metrics: "{}".into(),
            created_at: 0,
        })?)
    }

    /// The API id of the model and adapter an engine holds (what a reply records).
    pub(crate) fn engine_label(&self, engine: &crate::chats::Engine) -> Option<String> {
        let adapter = engine.adapter.as_ref().map(|a| a.0);
        self.api_model_list(false)
            .ok()?
            .into_iter()
            .find(|m| m.model_id == engine.model_id && m.adapter_id == adapter)
            .map(|m| m.id)
    }

    /// Whether the engine is generating now, and how many wait behind it.
    pub fn engine_load(&self) -> (bool, usize) {
        (
            self.chat_runtime.queue.busy(),
            self.chat_runtime.queue.waiting(),
        )
    }
}

/// The local API server's settings (Settings → Local API).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ApiServerSettings {
    /// Off by default.
    pub enabled: bool,
    /// KoboldCpp's 5001 by default, so front-ends find it.
    pub port: u16,
    /// When not empty, every request needs `Authorization: Bearer <key>`.
    pub api_key: String,
    /// Listen on every interface instead of 127.0.0.1.
    pub allow_network: bool,
    /// Browser origins allowed to call (CORS), one per entry.
    pub cors_origins: Vec<String>,
}

impl Default for ApiServerSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            port: 5001,
            api_key: String::new(),
            allow_network: false,
            cors_origins: Vec::new(),
        }
    }
}

const API_SERVER: &str = "api_server";

impl ApiServerSettings {
    fn check(&self) -> Result<()> {
        if self.port < 1024 {
            return Err(Error::Conflict(
                "use a port from 1024 to 65535 (ports below need administrator rights)".into(),
            ));
        }
        if self.api_key.len() > 256 || self.api_key.chars().any(char::is_whitespace) {
            return Err(Error::Conflict(
                "the API key may not contain spaces and is at most 256 characters".into(),
            ));
        }
        if self.allow_network && self.api_key.is_empty() {
            return Err(Error::Conflict(
                "set an API key before letting other devices on the network in".into(),
            ));
        }
        for o in &self.cors_origins {
            if !(o.starts_with("http://") || o.starts_with("https://")) || o.len() > 200 {
                return Err(Error::Conflict(format!(
                    "\"{o}\" is not an origin: write it like http://localhost:8000"
                )));
            }
        }
        Ok(())
    }
}

impl Dramatis {
    /// The API server's saved settings.
    pub fn api_server_settings(&self) -> Result<ApiServerSettings> {
        Ok(self.store().setting(API_SERVER)?.unwrap_or_default())
    }

    /// Checks and saves the API server's settings (the shell restarts it).
    pub fn set_api_server_settings(&self, s: &ApiServerSettings) -> Result<ApiServerSettings> {
        let mut s = s.clone();
        s.cors_origins = s
            .cors_origins
            .iter()
            .map(|o| o.trim().trim_end_matches('/').to_owned())
            .filter(|o| !o.is_empty())
            .collect();
        s.check()?;
        self.store().set_setting(API_SERVER, &s)?;
        Ok(s)
    }
}
