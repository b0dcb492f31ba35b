//! Chats: starting one with a character, sending and streaming replies,
//! swipes, edits that fork branches, continue, delete, search, and
//! SillyTavern-compatible export and import.
//!
//! Invariants: the user's message is stored before generation starts; a reply
//! is a stored message from its first token on, its text written at least
//! every [`FLUSH_EVERY`] and on stop, error and completion; one generation
//! runs at a time; the prompt is assembled only by
//! [`dramatis_persona::prompt::PromptParts::build`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dramatis_llm::{
    GenerateParams, PhiTokenizer, PrefillCounts, Reuse, SamplerConfig, Session, StopReason,
};
use dramatis_persona::prompt::{
    AuthorNote, PromptFormat, PromptParts, SectionKind, Speaker, Window, replace_macros,
};
use dramatis_store::{MessageRow, Role};
use serde::{Deserialize, Serialize};

use crate::{Dramatis, Error, Result};

/// The longest a streamed reply goes unsaved.
pub const FLUSH_EVERY: Duration = Duration::from_millis(400);

/// The system prompt setting used when a card has none.
pub(crate) const GLOBAL_SYSTEM_PROMPT: &str = "global_system_prompt";

/// Sampling and layout for one chat. Defaults are the seed recipe's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ChatSettings {
    /// Role-play markers or a plain transcript.
    pub format: PromptFormat,
    /// 0 is greedy.
    pub temperature: f32,
    /// 0 keeps all.
    pub top_k: usize,
    /// 1 keeps all.
    pub top_p: f32,
    /// 0 is off.
    pub min_p: f32,
    /// 1 is off.
    pub repetition_penalty: f32,
    /// Longest reply in tokens.
    pub max_new_tokens: usize,
    /// A fixed seed makes replies reproducible; `None` draws a new one each time.
    pub seed: Option<u64>,
    /// What happens at the window's edge.
    pub context: ContextMode,
    /// The author's note.
    pub author_note: AuthorNote,
    /// Whether the model keeps a summary of what left the window.
    pub memory: bool,
    /// The most tokens the summary takes in the prompt.
    pub memory_budget: usize,
    /// Where the summary goes: `None` after the character's definition, or
    /// in the chat this many messages from the end.
    pub memory_depth: Option<usize>,
    /// How many of the newest messages world info scans for keys.
    pub world_scan_depth: usize,
    /// The share of the context window lorebook entries may take, in percent.
    pub world_budget_percent: usize,
    /// Whether fired entries' text can fire other entries.
    pub world_recursive: bool,
}

/// How a chat longer than the window is fed to the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContextMode {
    /// Old turns leave the cached keys and values in place and the rest move
    /// up (re-rotated): a turn computes only its new tokens. Approximate.
    #[default]
    Shift,
    /// Every prompt is what a fresh start would compute; history leaves in
    /// quarter-window steps, so the full re-read comes once every few turns.
    Exact,
}

impl ContextMode {
    fn window(self, budget: usize) -> Window {
        Window {
            step: match self {
                Self::Shift => budget / 8,
                Self::Exact => budget / 4,
            },
        }
    }

    fn reuse(self) -> Reuse {
        match self {
            Self::Shift => Reuse::Shift,
            Self::Exact => Reuse::Prefix,
        }
    }
}

impl Default for ChatSettings {
    fn default() -> Self {
        Self {
            format: PromptFormat::Roleplay,
            temperature: 0.7,
            top_k: 50,
            top_p: 0.95,
            min_p: 0.0,
            repetition_penalty: 1.0,
            max_new_tokens: 300,
            seed: None,
            context: ContextMode::Shift,
            author_note: AuthorNote::default(),
            memory: true,
            memory_budget: 200,
            memory_depth: None,
            world_scan_depth: 2,
            world_budget_percent: 25,
            world_recursive: false,
        }
    }
}

impl ChatSettings {
    fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Conflict(m.to_owned()));
        if !(0.0..=5.0).contains(&self.temperature) {
            return bad("temperature must be between 0 and 5");
        }
        if !(0.0..=1.0).contains(&self.top_p) || !(0.0..=1.0).contains(&self.min_p) {
            return bad("top-p and min-p must be between 0 and 1");
        }
        if !(0.5..=3.0).contains(&self.repetition_penalty) {
            return bad("the repetition penalty must be between 0.5 and 3");
        }
        if !(1..=1536).contains(&self.max_new_tokens) {
            return bad("the reply length must be between 1 and 1536 tokens");
        }
        if self.memory_budget > 1024 || self.memory_depth.is_some_and(|d| d > 1000) {
            return bad("the summary may take at most 1024 tokens, at a depth of at most 1000");
        }
        if self.world_scan_depth > 1000 || self.world_budget_percent > 90 {
            return bad(
                "world info scans at most 1000 messages and takes at most 90% of the window",
            );
        }
        if self.author_note.text.len() > 8_000 || self.author_note.depth > 1000 {
            return bad("the author's note is limited to 8,000 characters and a depth of 1000");
        }
        Ok(())
    }

    fn sampler(&self) -> SamplerConfig {
        SamplerConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0)
            }),
            ..SamplerConfig::default()
        }
    }
}

/// A message as the chat view shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatMessage {
    /// Id.
    pub id: i64,
    /// The message it answers.
    pub parent_id: Option<i64>,
    /// `user`, `assistant` or `system`.
    pub role: Role,
    /// Text (macros already replaced).
    pub content: String,
    /// Its position among its siblings (swipes), from 0.
    pub swipe_index: usize,
    /// How many siblings there are.
    pub swipe_count: usize,
    /// ms since the epoch.
    pub created_at: i64,
    /// Lorebook entries that fired for this reply (0 for others).
    pub world_info: usize,
}

/// A chat in the list.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatSummary {
    /// Id.
    pub id: i64,
    /// The character.
    pub character_id: i64,
    /// Title.
    pub title: String,
    /// The last visible message, shortened.
    pub last_message: Option<String>,
    /// Visible messages.
    pub message_count: usize,
    /// ms since the epoch.
    pub updated_at: i64,
}

/// A chat with its visible messages.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatView {
    /// The chat.
    pub chat: ChatSummary,
    /// The character's name.
    pub character_name: String,
    /// The user persona's name.
    pub user_name: String,
    /// The visible branch, oldest first.
    pub messages: Vec<ChatMessage>,
    /// Its settings.
    pub settings: ChatSettings,
    /// The first message the last reply's prompt held: the character
    /// remembers only the summary of what comes before it.
    pub window_start_id: Option<i64>,
    /// The summary this branch uses, if any.
    pub memory: Option<dramatis_store::MemoryRow>,
}

/// One part of a reply's prompt, as the inspector shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptSection {
    /// What it is.
    pub kind: SectionKind,
    /// Its tokens.
    pub tokens: usize,
    /// Its byte range in the prompt.
    pub start: usize,
    /// The range's end.
    pub end: usize,
    /// Its text (cut from the stored prompt by the range when read).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub text: String,
}

/// What went into a reply: the exact prompt, by section, and what the window
/// and the cache did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptReport {
    /// The prompt's tokens.
    pub tokens: usize,
    /// Its budget.
    pub budget: usize,
    /// The model's context window.
    pub context: usize,
    /// The parts in order; their text joined is the prompt.
    pub sections: Vec<PromptSection>,
    /// Turns of history left out (the oldest).
    pub turns_dropped: usize,
    /// Turns of history in all.
    pub turns_total: usize,
    /// The first message in the window.
    pub first_message_id: Option<i64>,
    /// The summary's message coverage, when a summary was in.
    pub memory_up_to_id: Option<i64>,
    /// How the window was handled.
    pub mode: ContextMode,
    /// Reused, shifted and computed tokens (absent until the prefill ran).
    pub counts: Option<PrefillCounts>,
    /// The lorebook entries that fired for this reply, and why.
    #[serde(default)]
    pub world_info: Vec<dramatis_persona::worldinfo::Activated>,
    /// Entries that fired but did not fit the lorebooks' budget: (book, entry, comment).
    #[serde(default)]
    pub world_info_dropped: Vec<String>,
    /// The model (and adapter) that wrote the reply, as the API names it.
    #[serde(default)]
    pub model: Option<String>,
}

/// What a streaming generation reports, in order: `loading` (only when the
/// model must be loaded first), `started`, any number of `text`, `finished`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ChatEvent {
    /// Other requests (from an app using the local API) run first.
    Waiting {
        /// How many go before this reply.
        ahead: usize,
    },
    /// The model is being loaded.
    Loading {
        /// Its name.
        model: String,
    },
    /// The reply exists (empty, or the text being continued).
    Started {
        /// The user's message, stored before generation.
        user_message: Option<ChatMessage>,
        /// The reply being written.
        reply: ChatMessage,
        /// Tokens in the prompt.
        prompt_tokens: usize,
        /// The prompt's budget (context minus reply length).
        budget: usize,
        /// Turns of history that fit.
        turns_included: usize,
        /// Turns of history in all.
        turns_total: usize,
        /// The first message in the window.
        first_message_id: Option<i64>,
        /// Tokens per section, in order.
        sections: Vec<(SectionKind, usize)>,
    },
    /// A piece of the reply (whole characters).
    Text {
        /// The piece.
        text: String,
    },
    /// The reply is complete and stored.
    Finished {
        /// The stored reply.
        reply: ChatMessage,
        /// Why it ended.
        stop_reason: StopReason,
        /// Tokens generated.
        tokens: usize,
        /// Decode speed.
        tokens_per_sec: f64,
        /// What the prompt reused, shifted and computed.
        counts: PrefillCounts,
    },
}

/// A search hit with where to open it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MessageHit {
    /// The message.
    pub message_id: i64,
    /// Its chat.
    pub chat_id: i64,
    /// The chat's title.
    pub chat_title: String,
    /// The character.
    pub character_id: i64,
    /// The character's name.
    pub character_name: String,
    /// Text around the match, the match between `[` and `]`.
    pub snippet: String,
    /// Ids from the first message down to the hit: select these to show it.
    pub path: Vec<i64>,
    /// Whether that branch is the one visible now.
    pub on_visible_branch: bool,
}

/// A loaded model with its session (KV cache) and the adapter in use.
pub(crate) struct Engine {
    pub(crate) model_id: i64,
    pub(crate) tokenizer: PhiTokenizer,
    pub(crate) session: Session,
    pub(crate) adapter: Option<(i64, Arc<dramatis_llm::LoraAdapter>)>,
}

/// The engine and the running generation's stop flag.
#[derive(Default)]
pub(crate) struct ChatRuntime {
    /// Who generates next: chat replies and API requests, in arrival order.
    pub(crate) queue: crate::queue::EngineQueue,
    pub(crate) engine: Mutex<Option<Engine>>,
    pub(crate) generating: Mutex<Option<Arc<AtomicBool>>>,
    /// The running summary's stop flag: a reply sets it and goes first.
    pub(crate) summarizing: Mutex<Option<Arc<AtomicBool>>>,
}

impl std::fmt::Debug for ChatRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatRuntime").finish_non_exhaustive()
    }
}

/// Clears the running flag when a generation ends, however it ends.
pub(crate) struct Running<'a>(pub(crate) &'a Mutex<Option<Arc<AtomicBool>>>);
impl Drop for Running<'_> {
    fn drop(&mut self) {
        *self.0.lock().unwrap() = None;
    }
}

pub(crate) fn speaker(r: Role) -> Speaker {
    match r {
        Role::User => Speaker::User,
        Role::Assistant => Speaker::Assistant,
        Role::System => Speaker::System,
    }
}

fn shorten(s: &str, n: usize) -> String {
    let mut out: String = s.chars().take(n).collect();
    if s.chars().count() > n {
        out.push('…');
    }
    out
}

/// How the chat list and the UI refer to a reply's ending.
fn finish_text(base: &str, generated: &str, continuing: bool) -> String {
    if continuing {
        format!("{base}{generated}")
    } else {
        generated.trim().to_owned()
    }
}

impl Dramatis {
    fn chat_message(&self, m: &MessageRow) -> Result<ChatMessage> {
        let siblings = self.store().siblings(m.id)?;
        Ok(ChatMessage {
            id: m.id,
            parent_id: m.parent_id,
            role: m.role,
            content: m.content.clone(),
            swipe_index: siblings.iter().position(|&s| s == m.id).unwrap_or(0),
            swipe_count: siblings.len(),
            created_at: m.created_at,
            world_info: 0,
        })
    }

    fn summary(&self, c: &dramatis_store::ChatRow) -> Result<ChatSummary> {
        let path = self.store().selected_path(c.id)?;
        Ok(ChatSummary {
            id: c.id,
            character_id: c.character_id,
            title: c.title.clone(),
            last_message: path.last().map(|m| shorten(&m.content, 120)),
            message_count: path.len(),
            updated_at: c.updated_at,
        })
    }

    /// The persona a chat is played as: its own, else the default.
    pub(crate) fn chat_persona(&self, persona_id: Option<i64>) -> Result<crate::Persona> {
        let all = self.personas()?;
        persona_id
            .and_then(|id| all.iter().find(|p| p.id == id).cloned())
            .or_else(|| all.iter().find(|p| p.is_default).cloned())
            .or_else(|| all.first().cloned())
            .ok_or(Error::NotFound {
                what: "persona",
                id: 0,
            })
    }

    /// A character's chats, the most recent first.
    pub fn list_chats(&self, character_id: i64) -> Result<Vec<ChatSummary>> {
        self.character(character_id)?;
        self.store()
            .list_chats(character_id)?
            .iter()
            .map(|c| self.summary(c))
            .collect()
    }

    /// A chat with its visible branch.
    pub fn chat_view(&self, chat_id: i64) -> Result<ChatView> {
        let c = self.store().chat(chat_id)?;
        let character = self.character(c.character_id)?;
        let persona = self.chat_persona(c.persona_id)?;
        let rows = self.store().selected_path(chat_id)?;
        let path: Vec<i64> = rows.iter().map(|m| m.id).collect();
        let lore = self.store().world_info_counts(&path)?;
        let messages: Vec<ChatMessage> = rows
            .iter()
            .map(|m| {
                let mut msg = self.chat_message(m)?;
                msg.world_info = lore.get(&m.id).copied().unwrap_or(0);
                Ok(msg)
            })
            .collect::<Result<_>>()?;
        let window_start_id = self.window_start(&path)?;
        Ok(ChatView {
            chat: self.summary(&c)?,
            character_name: character.card.name,
            user_name: persona.name,
            messages,
            settings: self.chat_settings(chat_id)?,
            window_start_id,
            memory: self.store().memory_on_path(&path)?,
        })
    }

    /// Where the window of the branch's last generated reply began.
    pub(crate) fn window_start(&self, path: &[i64]) -> Result<Option<i64>> {
        Ok(match self.store().last_reply_info(path)? {
            Some((_, info)) => parse_report(&info)?.first_message_id,
            None => None,
        })
    }

    /// The prompt that produced a reply (`None` for messages not generated here).
    pub fn prompt_report(&self, message_id: i64) -> Result<Option<PromptReport>> {
        let Some((text, info)) = self.store().reply_prompt(message_id)? else {
            return Ok(None);
        };
        let mut r = parse_report(&info)?;
        // The text is stored once; sections are cut from it by their byte ranges.
        for sec in &mut r.sections {
            sec.text = text.get(sec.start..sec.end).unwrap_or_default().to_owned();
        }
        Ok(Some(r))
    }

    /// Writes (or rewrites) the summary the chat's visible branch uses, by
    /// hand: it covers the messages before the window (or the first message
    /// when nothing has left it yet) and the model never overwrites it.
    pub fn set_chat_memory(&self, chat_id: i64, text: &str) -> Result<ChatView> {
        if text.len() > 16_000 {
            return Err(Error::Conflict(
                "a summary is limited to 16,000 characters".into(),
            ));
        }
        let path: Vec<i64> = self
            .store()
            .selected_path(chat_id)?
            .iter()
            .map(|m| m.id)
            .collect();
        let current = self.store().memory_on_path(&path)?;
        let up_to = match &current {
            Some(m) => m.up_to_id,
            None => {
                let start = self.window_start(&path)?;
                let at = start
                    .and_then(|s| path.iter().position(|&id| id == s))
                    .unwrap_or(1);
                *path.get(at.saturating_sub(1)).ok_or_else(|| {
                    Error::Conflict("an empty chat has nothing to summarize".into())
                })?
            }
        };
        if text.trim().is_empty() {
            if let Some(m) = current {
                self.store().delete_memory(m.id)?;
            }
        } else {
            self.store().put_memory(up_to, text.trim(), true)?;
        }
        self.chat_view(chat_id)
    }

    /// Starts a chat: the card's greeting and alternate greetings become the
    /// swipes of the first message (macros replaced, the first one shown).
    pub fn start_chat(&self, character_id: i64) -> Result<ChatView> {
        let character = self.character(character_id)?;
        let persona = self.chat_persona(None)?;
        let card = &character.card;
        let greetings: Vec<String> = std::iter::once(&card.first_mes)
            .chain(&card.alternate_greetings)
            .map(|g| replace_macros(g.trim(), &card.name, &persona.name))
            .filter(|g| !g.is_empty())
            .collect();
        let n = self.store().list_chats(character_id)?.len();
        let title = if n == 0 {
            format!("Chat with {}", card.name)
        } else {
            format!("Chat with {} ({})", card.name, n + 1)
        };
        let path = if greetings.is_empty() {
            Vec::new()
        } else {
            vec![(Role::Assistant, greetings, 0)]
        };
        let id = self
            .store()
            .insert_chat_tree(character_id, Some(persona.id), &title, &path)?;
        self.chat_view(id)
    }

    /// Renames a chat.
    pub fn rename_chat(&self, chat_id: i64, title: &str) -> Result<ChatView> {
        let title = title.trim();
        if title.is_empty() || title.chars().count() > 200 {
            return Err(Error::Conflict(
                "a chat title needs 1 to 200 characters".into(),
            ));
        }
        self.store().rename_chat(chat_id, title)?;
        self.chat_view(chat_id)
    }

    /// Deletes a chat and its messages.
    pub fn delete_chat(&self, chat_id: i64) -> Result<()> {
        Ok(self.store().delete_chat(chat_id)?)
    }

    /// A chat's settings (the defaults until changed).
    pub fn chat_settings(&self, chat_id: i64) -> Result<ChatSettings> {
        Ok(self
            .store()
            .chat_settings(chat_id)?
            .and_then(|j| serde_json::from_str(&j).ok())
            .unwrap_or_default())
    }

    /// Saves a chat's settings.
    pub fn set_chat_settings(&self, chat_id: i64, s: &ChatSettings) -> Result<ChatView> {
        s.validate()?;
        self.store().set_chat_settings(
            chat_id,
            &serde_json::to_string(s).expect("settings serialize"),
        )?;
        self.chat_view(chat_id)
    }

    /// Shows the `index`th sibling of a message (a swipe) and its branch.
    pub fn select_swipe(&self, message_id: i64, index: usize) -> Result<ChatView> {
        let m = self.store().message(message_id)?;
        let siblings = self.store().siblings(message_id)?;
        let target = *siblings.get(index).ok_or(Error::NotFound {
            what: "swipe",
            id: index as i64,
        })?;
        self.store().select_message(target)?;
        self.chat_view(m.chat_id)
    }

    /// Edits a message. The last message changes in place; an earlier one
    /// forks: the edit becomes a new branch and the old one stays reachable.
    pub fn edit_message(&self, message_id: i64, content: &str) -> Result<ChatView> {
        let m = self.store().message(message_id)?;
        let path = self.store().selected_path(m.chat_id)?;
        let is_last = path.last().map(|l| l.id) == Some(message_id);
        // A character's reply rewritten by the user keeps what it said before:
        // the two make a preference pair.
        match (is_last, m.role) {
            (true, Role::Assistant) => self.store().edit_message_content(message_id, content)?,
            (true, _) => self.store().set_message_content(message_id, content)?,
            (false, role) => {
                let new = self
                    .store()
                    .add_message(m.chat_id, m.parent_id, role, content)?;
                if role == Role::Assistant {
                    self.store().record_fork_edit(new, m.id)?;
                }
            }
        }
        self.chat_view(m.chat_id)
    }

    /// Deletes a message and what follows it.
    pub fn delete_message(&self, message_id: i64) -> Result<ChatView> {
        let m = self.store().message(message_id)?;
        self.store().delete_message(message_id)?;
        self.chat_view(m.chat_id)
    }

    /// Stops the running generation; its text so far is kept. False when none runs.
    pub fn stop_generation(&self) -> bool {
        match &*self.chat_runtime.generating.lock().unwrap() {
            Some(flag) => {
                flag.store(true, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }

    /// Whether a reply is being generated.
    pub fn is_generating(&self) -> bool {
        self.chat_runtime.generating.lock().unwrap().is_some()
    }

    /// Stores the user's message, then streams the character's reply.
    pub fn send_message(
        &self,
        chat_id: i64,
        text: &str,
        sink: &mut (dyn FnMut(ChatEvent) + Send),
    ) -> Result<ChatView> {
        if text.trim().is_empty() {
            return Err(Error::Conflict("the message is empty".into()));
        }
        let path = self.store().selected_path(chat_id)?;
        let user = self.store().add_message(
            chat_id,
            path.last().map(|m| m.id),
            Role::User,
            text.trim_end(),
        )?;
        let user_msg = self.chat_message(&self.store().message(user)?)?;
        self.generate(chat_id, Some(user), None, Some(user_msg), sink)
    }

    /// Writes another reply beside `message_id` (a new swipe); the old one stays.
    pub fn regenerate(
        &self,
        message_id: i64,
        sink: &mut (dyn FnMut(ChatEvent) + Send),
    ) -> Result<ChatView> {
        let m = self.store().message(message_id)?;
        if m.role != Role::Assistant {
            return Err(Error::Conflict(
                "only a character's reply can be regenerated".into(),
            ));
        }
        self.generate(m.chat_id, m.parent_id, None, None, sink)
    }

    /// Continues the last reply where it stopped.
    pub fn continue_reply(
        &self,
        chat_id: i64,
        sink: &mut (dyn FnMut(ChatEvent) + Send),
    ) -> Result<ChatView> {
        let path = self.store().selected_path(chat_id)?;
        let last = path
            .last()
            .filter(|m| m.role == Role::Assistant)
            .ok_or_else(|| {
                Error::Conflict("only a character's last reply can be continued".into())
            })?;
        self.generate(chat_id, last.parent_id, Some(last.clone()), None, sink)
    }

    /// Loads the default model into the engine if another (or none) is loaded.
    pub(crate) fn ensure_engine<'a>(
        &self,
        slot: &'a mut Option<Engine>,
        sink: &mut (dyn FnMut(ChatEvent) + Send),
    ) -> Result<&'a mut Engine> {
        let model = self.default_model()?.ok_or_else(|| {
            Error::NoModel(
                "No model is installed yet: download Phi-2 (or import one) in Models.".into(),
            )
        })?;
        self.ensure_model(slot, &model, sink)
    }

    /// Loads `model` into the engine if another (or none) is loaded.
    pub(crate) fn ensure_model<'a>(
        &self,
        slot: &'a mut Option<Engine>,
        model: &crate::Model,
        sink: &mut (dyn FnMut(ChatEvent) + Send),
    ) -> Result<&'a mut Engine> {
        if slot.as_ref().map(|e| e.model_id) != Some(model.id) {
            *slot = None;
            sink(ChatEvent::Loading {
                model: model.name.clone(),
            });
            let started = Instant::now();
            let phi = dramatis_llm::load_model(std::path::Path::new(&model.path), self.device())?;
            let tokenizer = PhiTokenizer::from_file(std::path::Path::new(&model.tokenizer_path))?;
            tokenizer.check_fits(phi.config().vocab_size)?;
            tracing::info!(model = %model.name, secs = started.elapsed().as_secs_f64(), "model loaded");
            *slot = Some(Engine {
                model_id: model.id,
                tokenizer,
                session: Session::new(Arc::new(phi)),
                adapter: None,
            });
        }
        Ok(slot.as_mut().expect("set above"))
    }

    /// Switches the session to the character's adapter (or none), loading
    /// it once; the base stays loaded.
    pub(crate) fn use_adapter(&self, engine: &mut Engine, adapter_id: Option<i64>) -> Result<()> {
        let want = match adapter_id {
            // An attachment to an adapter since deleted is ignored.
            Some(id) => self.store().adapter(id).ok(),
            None => None,
        };
        match want {
            None => {
                engine.adapter = None;
                engine.session.set_adapter(None);
            }
            Some(a) if engine.adapter.as_ref().map(|x| x.0) != Some(a.id) => {
                let lora = dramatis_llm::LoraAdapter::load_peft(
                    std::path::Path::new(&a.path),
                    engine.session.model().config(),
                    engine.session.model().device(),
                )?;
                let lora = Arc::new(lora);
                engine.session.set_adapter(Some(lora.clone()));
                engine.adapter = Some((a.id, lora));
            }
            Some(_) => {}
        }
        Ok(())
    }

    /// The model the chat engine holds, if it is `model_id` and free.
    pub(crate) fn loaded_model(&self, model_id: i64) -> Option<Arc<dramatis_llm::Phi>> {
        let slot = self.chat_runtime.engine.try_lock().ok()?;
        slot.as_ref()
            .filter(|e| e.model_id == model_id)
            .map(|e| e.session.model().clone())
    }

    /// The one place replies are generated: a new reply under `parent`, or
    /// `continuing` an existing one.
    fn generate(
        &self,
        chat_id: i64,
        parent: Option<i64>,
        continuing: Option<MessageRow>,
        user_message: Option<ChatMessage>,
        sink: &mut (dyn FnMut(ChatEvent) + Send),
    ) -> Result<ChatView> {
        let cancel = {
            let mut g = self.chat_runtime.generating.lock().unwrap();
            if g.is_some() {
                return Err(Error::Conflict("a reply is already being written".into()));
            }
            let flag = Arc::new(AtomicBool::new(false));
            *g = Some(flag.clone());
            flag
        };
        let _running = Running(&self.chat_runtime.generating);
        // A summary in the background never delays a reply: it stops, and is
        // written again after this reply.
        if let Some(f) = self.chat_runtime.summarizing.lock().unwrap().as_ref() {
            f.store(true, Ordering::SeqCst);
        }
        let chat = self.store().chat(chat_id)?;
        let card = self.character(chat.character_id)?.card;
        let persona = self.chat_persona(chat.persona_id)?;
        let settings = self.chat_settings(chat_id)?;
        let global: String = self
            .store()
            .setting(GLOBAL_SYSTEM_PROMPT)?
            .unwrap_or_default();
        let rows = match parent {
            Some(p) => self.store().path_to(p)?,
            None => Vec::new(),
        };
        let path: Vec<i64> = rows.iter().map(|m| m.id).collect();
        let history: Vec<(Speaker, String)> = rows
            .into_iter()
            .map(|m| (speaker(m.role), m.content))
            .collect();
        let memory = if settings.memory {
            self.store().memory_on_path(&path)?
        } else {
            None
        };
        // In line behind API requests (and they behind this); stop works while waiting.
        let (busy, ahead) = self.engine_load();
        if busy {
            sink(ChatEvent::Waiting { ahead: ahead + 1 });
        }
        let Some(_turn) = self.chat_runtime.queue.acquire(&cancel) else {
            return self.chat_view(chat_id);
        };
        if cancel.load(Ordering::SeqCst) {
            return self.chat_view(chat_id);
        }
        let mut slot = self
            .chat_runtime
            .engine
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let engine = self.ensure_engine(&mut slot, sink)?;
        self.use_adapter(engine, crate::training::attached_adapter(&card))?;
        let ctx = engine.session.model().config().max_position_embeddings;
        // The reply gets what it asks for, up to half the context.
        let budget = ctx - settings.max_new_tokens.min(ctx / 2);
        let tokenizer = &engine.tokenizer;
        // The summary replaces what it covers: history starts after it.
        let skip = memory
            .as_ref()
            .and_then(|m| path.iter().position(|&id| id == m.up_to_id))
            .map_or(0, |i| i + 1);
        // A new reply (a regenerate too) rolls again; the same reply, continued or
        // rebuilt, rolls the same.
        let swipe = match &continuing {
            Some(m) => self
                .store()
                .siblings(m.id)?
                .iter()
                .position(|&s| s == m.id)
                .unwrap_or(0),
            None => self.store().child_count(chat_id, parent)?,
        };
        let env = dramatis_persona::prompt::MacroEnv {
            now: chrono_now(),
            reply_seed: seed_of(&[chat_id, parent.unwrap_or(0), swipe as i64]),
            chat_seed: seed_of(&[chat_id]),
        };
        let books = self.world_books(chat_id, chat.character_id, &card)?;
        let world = {
            let refs: Vec<&dramatis_persona::lorebook::Lorebook> = books.iter().collect();
            let names: Vec<dramatis_persona::worldinfo::ScanMessage<'_>> = history
                .iter()
                .map(|(s, t)| dramatis_persona::worldinfo::ScanMessage {
                    name: match s {
                        Speaker::User => persona.name.as_str(),
                        Speaker::Assistant => card.name.as_str(),
                        Speaker::System => "Narrator",
                    },
                    text: t.as_str(),
                })
                .collect();
            dramatis_persona::worldinfo::activate(
                &dramatis_persona::worldinfo::Scan {
                    books: &refs,
                    messages: &names,
                    scan_depth: settings.world_scan_depth,
                    budget: ctx * settings.world_budget_percent / 100,
                    recursive: settings.world_recursive,
                    max_recursion: 3,
                    seed: env.reply_seed,
                    case_sensitive: false,
                    match_whole_words: false,
                },
                |t| tokenizer_count(tokenizer, t),
            )
        };
        let world_dropped: Vec<String> = world
            .over_budget
            .iter()
            .filter_map(|&(b, e)| books.get(b)?.entries.get(e))
            .map(entry_label)
            .collect();
        let prompt = PromptParts {
            card: &card,
            user_name: &persona.name,
            user_description: &persona.description,
            global_system_prompt: &global,
            history: &history[skip..],
            continue_from: continuing.as_ref().map(|m| m.content.as_str()),
            format: settings.format,
            memory: memory.as_ref().map_or("", |m| m.text.as_str()),
            memory_budget: settings.memory_budget,
            memory_depth: settings.memory_depth,
            author_note: Some(&settings.author_note),
            window: settings.context.window(budget),
            world: &world.entries,
            env,
        }
        .build(budget, |t| tokenizer_count(tokenizer, t));
        let first_message_id = path.get(skip + prompt.first_turn()).copied();
        let mut report = PromptReport {
            tokens: 0,
            budget,
            context: ctx,
            sections: prompt
                .sections
                .iter()
                .map(|s| PromptSection {
                    kind: s.kind,
                    tokens: s.tokens,
                    start: s.start,
                    end: s.end,
                    text: String::new(),
                })
                .collect(),
            turns_dropped: skip + prompt.first_turn(),
            turns_total: history.len(),
            first_message_id,
            memory_up_to_id: memory.as_ref().map(|m| m.up_to_id),
            mode: settings.context,
            counts: None,
            world_info: world.entries.clone(),
            world_info_dropped: world_dropped,
            model: self.engine_label(engine),
        };
        let ids = tokenizer.encode(&prompt.text)?;
        report.tokens = ids.len();
        let save_report = |report: &PromptReport, reply_id: i64| {
            let info = serde_json::to_string(report).expect("report serializes");
            if let Err(e) = self.store().set_reply_prompt(reply_id, &prompt.text, &info) {
                tracing::warn!(error = %e, "the reply's prompt was not kept");
            }
        };
        let (reply_id, base) = match &continuing {
            Some(m) => (m.id, m.content.clone()),
            None => (
                self.store()
                    .add_message(chat_id, parent, Role::Assistant, "")?,
                String::new(),
            ),
        };
        sink(ChatEvent::Started {
            user_message,
            reply: self.chat_message(&self.store().message(reply_id)?)?,
            prompt_tokens: ids.len(),
            budget,
            turns_included: prompt.turns_included,
            turns_total: prompt.turns_total,
            first_message_id,
            sections: prompt.sections.iter().map(|s| (s.kind, s.tokens)).collect(),
        });
        let params = GenerateParams {
            sampler: settings.sampler(),
            max_new_tokens: settings.max_new_tokens,
            stop: prompt.stop.clone(),
            reuse: settings.context.reuse(),
        };
        let mut text = String::new();
        let mut last_flush = Instant::now();
        let mut flush_error = None;
        let result = engine
            .session
            .generate(tokenizer, &ids, &params, &cancel, |piece| {
                text.push_str(piece);
                sink(ChatEvent::Text {
                    text: piece.to_owned(),
                });
                if last_flush.elapsed() >= FLUSH_EVERY {
                    last_flush = Instant::now();
                    let so_far = finish_text(&base, &text, continuing.is_some());
                    if let Err(e) = self.store().set_message_content(reply_id, &so_far) {
                        // Keep generating; the error is reported at the end.
                        flush_error.get_or_insert(e);
                        cancel.store(true, Ordering::SeqCst);
                    }
                }
            });
        drop(slot);
        let final_text = finish_text(&base, &text, continuing.is_some());
        match result {
            Ok(g) if continuing.is_none() && final_text.is_empty() => {
                // Stopped (or ended) before a single character: no empty reply is left.
                self.store().delete_message(reply_id)?;
                if let Some(e) = flush_error {
                    return Err(e.into());
                }
                tracing::info!(reason = ?g.stop_reason, "reply ended before any text");
                self.chat_view(chat_id)
            }
            Ok(g) => {
                self.store().set_message_content(reply_id, &final_text)?;
                report.counts = Some(g.counts);
                save_report(&report, reply_id);
                if let Some(e) = flush_error {
                    return Err(e.into());
                }
                let secs = g.decode.as_secs_f64();
                sink(ChatEvent::Finished {
                    reply: self.chat_message(&self.store().message(reply_id)?)?,
                    stop_reason: g.stop_reason,
                    tokens: g.token_ids.len(),
                    tokens_per_sec: if secs > 0.0 {
                        g.token_ids.len() as f64 / secs
                    } else {
                        0.0
                    },
                    counts: g.counts,
                });
                self.chat_view(chat_id)
            }
            Err(e) => {
                // Keep what was written; a new reply with nothing in it goes.
                if continuing.is_none() && final_text.is_empty() {
                    let _ = self.store().delete_message(reply_id);
                } else {
                    let _ = self.store().set_message_content(reply_id, &final_text);
                    save_report(&report, reply_id);
                }
                Err(e.into())
            }
        }
    }
}

/// The first line of a SillyTavern chat file.
#[derive(Debug, Serialize, Deserialize)]
struct StHeader {
    user_name: String,
    character_name: String,
    #[serde(default)]
    create_date: serde_json::Value,
    #[serde(default)]
    chat_metadata: serde_json::Value,
}

/// One message line of a SillyTavern chat file.
#[derive(Debug, Serialize, Deserialize)]
struct StMessage {
    name: String,
    is_user: bool,
    #[serde(default)]
    is_system: bool,
    #[serde(default)]
    send_date: serde_json::Value,
    mes: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    swipes: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    swipe_id: Option<usize>,
    #[serde(default)]
    extra: serde_json::Value,
}

fn tokenizer_count(t: &dramatis_llm::PhiTokenizer, text: &str) -> usize {
    t.count(text).unwrap_or(text.len())
}

/// A stable 64-bit seed from a few numbers (FNV-1a over their bytes).
fn seed_of(parts: &[i64]) -> u64 {
    parts
        .iter()
        .flat_map(|p| p.to_le_bytes())
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
}

/// The local time, for `{{time}}` and friends.
fn chrono_now() -> chrono::DateTime<chrono::FixedOffset> {
    chrono::Local::now().fixed_offset()
}

/// How an entry is named in reports: its comment, else its first key.
fn entry_label(e: &dramatis_persona::lorebook::Entry) -> String {
    if !e.comment.trim().is_empty() {
        e.comment.trim().to_owned()
    } else {
        e.keys
            .first()
            .cloned()
            .unwrap_or_else(|| format!("entry {}", e.id))
    }
}

/// A stored [`PromptReport`] (its sections' texts empty).
fn parse_report(info: &str) -> Result<PromptReport> {
    serde_json::from_str(info)
        .map_err(|e| Error::Conflict(format!("the stored prompt report is unreadable: {e}")))
}

/// SillyTavern's author's note keys in `chat_metadata` (position 1: in the
/// chat at a depth, the only placement Dramatis has; role 0: system).
fn note_metadata(note: &AuthorNote) -> serde_json::Value {
    if note.text.trim().is_empty() {
        return serde_json::json!({});
    }
    serde_json::json!({
        "note_prompt": note.text,
        "note_interval": note.interval,
        "note_depth": note.depth,
        "note_position": 1,
        "note_role": 0,
    })
}

/// The author's note a SillyTavern chat carries, if any: every placement
/// becomes "in the chat at its depth"; a note over the limits is cut to them.
fn note_from_metadata(meta: &serde_json::Value) -> Option<AuthorNote> {
    let text = meta.get("note_prompt")?.as_str()?.trim();
    if text.is_empty() {
        return None;
    }
    let num = |k: &str, default: u64| {
        meta.get(k)
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(default)
    };
    let mut end = text.len().min(8_000);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Some(AuthorNote {
        text: text[..end].to_owned(),
        depth: num("note_depth", 4).min(1000) as usize,
        interval: num("note_interval", 1).min(10_000) as usize,
    })
}

/// Export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExportFormat {
    /// SillyTavern's chat JSONL (the visible branch with its swipes).
    Jsonl,
    /// A readable transcript.
    Markdown,
}

fn iso_date(ms: i64) -> String {
    // Days since the epoch to a civil date (Howard Hinnant's algorithm).
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

impl Dramatis {
    /// Full-text search over every message, with the path that opens each hit.
    pub fn search_messages(&self, query: &str, limit: u32) -> Result<Vec<MessageHit>> {
        let hits = self.store().search_messages(query, limit)?;
        let mut out = Vec::with_capacity(hits.len());
        for h in hits {
            let chat = self.store().chat(h.chat_id)?;
            let character = self.character(chat.character_id)?;
            let path: Vec<i64> = self
                .store()
                .path_to(h.message_id)?
                .iter()
                .map(|m| m.id)
                .collect();
            let visible: Vec<i64> = self
                .store()
                .selected_path(h.chat_id)?
                .iter()
                .map(|m| m.id)
                .collect();
            out.push(MessageHit {
                message_id: h.message_id,
                chat_id: h.chat_id,
                chat_title: chat.title,
                character_id: chat.character_id,
                character_name: character.card.name,
                snippet: h.snippet,
                on_visible_branch: visible.starts_with(&path),
                path,
            });
        }
        Ok(out)
    }

    /// Opens a chat on the branch that holds `message_id`.
    pub fn open_message(&self, message_id: i64) -> Result<ChatView> {
        let m = self.store().message(message_id)?;
        self.store().select_path(message_id)?;
        self.chat_view(m.chat_id)
    }

    /// A chat as SillyTavern JSONL or Markdown.
    pub fn export_chat(&self, chat_id: i64, format: ExportFormat) -> Result<String> {
        let view = self.chat_view(chat_id)?;
        let created = self.store().chat(chat_id)?.created_at;
        match format {
            ExportFormat::Jsonl => {
                let mut lines = vec![
                    serde_json::to_string(&StHeader {
                        user_name: view.user_name.clone(),
                        character_name: view.character_name.clone(),
                        create_date: iso_date(created).into(),
                        chat_metadata: note_metadata(&view.settings.author_note),
                    })
                    .expect("serializes"),
                ];
                for m in &view.messages {
                    let swipes = if m.swipe_count > 1 {
                        let ids = self.store().siblings(m.id)?;
                        Some(
                            ids.iter()
                                .map(|&id| Ok(self.store().message(id)?.content))
                                .collect::<Result<Vec<_>>>()?,
                        )
                    } else {
                        None
                    };
                    lines.push(
                        serde_json::to_string(&StMessage {
                            name: if m.role == Role::User {
                                view.user_name.clone()
                            } else {
                                view.character_name.clone()
                            },
                            is_user: m.role == Role::User,
                            is_system: m.role == Role::System,
                            send_date: iso_date(m.created_at).into(),
                            mes: m.content.clone(),
                            swipe_id: swipes.as_ref().map(|_| m.swipe_index),
                            swipes,
                            extra: serde_json::json!({}),
                        })
                        .expect("serializes"),
                    );
                }
                Ok(lines.join("\n") + "\n")
            }
            ExportFormat::Markdown => {
                let mut s = format!("# {}\n\n", view.chat.title);
                for m in &view.messages {
                    let who = if m.role == Role::User {
                        &view.user_name
                    } else {
                        &view.character_name
                    };
                    s.push_str(&format!("**{who}:** {}\n\n", m.content.trim()));
                }
                Ok(s)
            }
        }
    }

    /// Imports a SillyTavern JSONL chat for a character. Every line is
    /// checked first; any bad line (reported with its number) imports nothing.
    pub fn import_chat(&self, character_id: i64, jsonl: &str) -> Result<ChatView> {
        let character = self.character(character_id)?;
        let mut problems = Vec::new();
        let mut header: Option<StHeader> = None;
        let mut path = Vec::new();
        for (i, line) in jsonl.lines().enumerate() {
            let n = i + 1;
            if line.trim().is_empty() {
                continue;
            }
            if header.is_none() && path.is_empty() && problems.is_empty() {
                match serde_json::from_str::<StHeader>(line) {
                    Ok(h) => {
                        header = Some(h);
                        continue;
                    }
                    Err(e) if serde_json::from_str::<StMessage>(line).is_err() => {
                        problems.push(format!("line {n}: not a SillyTavern chat header ({e})"));
                        continue;
                    }
                    Err(_) => {}
                }
            }
            match serde_json::from_str::<StMessage>(line) {
                Ok(m) => {
                    let role = if m.is_user {
                        Role::User
                    } else if m.is_system {
                        Role::System
                    } else {
                        Role::Assistant
                    };
                    let (swipes, selected) = match m.swipes {
                        Some(s) if !s.is_empty() => {
                            let sel = m.swipe_id.unwrap_or(0);
                            if sel >= s.len() {
                                problems.push(format!(
                                    "line {n}: swipe_id {sel} but only {} swipes",
                                    s.len()
                                ));
                                continue;
                            }
                            if s[sel] != m.mes {
                                // ST keeps `mes` equal to the chosen swipe; trust `mes`.
                                let mut s = s;
                                s[sel] = m.mes;
                                (s, sel)
                            } else {
                                (s, sel)
                            }
                        }
                        _ => (vec![m.mes], 0),
                    };
                    path.push((role, swipes, selected));
                }
                Err(e) => problems.push(format!("line {n}: {e}")),
            }
        }
        if !problems.is_empty() {
            return Err(Error::Import(problems));
        }
        if path.is_empty() {
            return Err(Error::Import(vec!["the file holds no messages".into()]));
        }
        let persona = self.chat_persona(None)?;
        let title = format!(
            "Imported: {}",
            header
                .as_ref()
                .map(|h| h.character_name.clone())
                .filter(|n| !n.is_empty())
                .unwrap_or(character.card.name)
        );
        let note = header
            .as_ref()
            .and_then(|h| note_from_metadata(&h.chat_metadata));
        let id = self
            .store()
            .insert_chat_tree(character_id, Some(persona.id), &title, &path)?;
        if let Some(author_note) = note {
            let settings = ChatSettings {
                author_note,
                ..ChatSettings::default()
            };
            return self.set_chat_settings(id, &settings);
        }
        self.chat_view(id)
    }
}
