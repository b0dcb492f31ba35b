use std::path::PathBuf;
use std::time::{Duration, Instant};

use dramatis_core::{
    ChatEvent, ChatSettings, ChatSummary, ChatView, ExportFormat, MemoryUpdate, MessageHit,
    PromptReport, StreamReport,
};
use tauri::ipc::Channel;
use tauri::{AppHandle, Runtime};

use super::blocking;
use crate::CommandError;

/// The window redraws about this often; text arriving faster is sent in one message.
const FRAME: Duration = Duration::from_millis(16);

/// Forwards generation events to the window, coalescing text pieces that
/// arrive within one frame of the last send (a fast stream would otherwise
/// cost the webview one message per token). Order is kept: other events
/// flush the pending text first, and so does dropping the sink.
struct Forward {
    channel: Channel<ChatEvent>,
    pending: String,
    last_send: Option<Instant>,
}

impl Forward {
    fn push(&mut self, e: ChatEvent) {
        match e {
            ChatEvent::Text { text } => {
                self.pending.push_str(&text);
                if self.last_send.is_none_or(|t| t.elapsed() >= FRAME) {
                    self.flush();
                }
            }
            other => {
                self.flush();
                self.send(other);
            }
        }
    }

    fn flush(&mut self) {
        if !self.pending.is_empty() {
            let text = std::mem::take(&mut self.pending);
            self.send(ChatEvent::Text { text });
        }
    }

    fn send(&mut self, e: ChatEvent) {
        self.last_send = Some(Instant::now());
        // A closed window drops the channel; the reply is still stored.
        let _ = self.channel.send(e);
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.flush();
    }
}

fn forward(channel: Channel<ChatEvent>) -> impl FnMut(ChatEvent) + Send {
    let mut f = Forward {
        channel,
        pending: String::new(),
        last_send: None,
    };
    move |e| f.push(e)
}

/// A character's chats, the most recent first.
#[tauri::command]
pub async fn list_chats<R: Runtime>(
    app: AppHandle<R>,
    character_id: i64,
) -> Result<Vec<ChatSummary>, CommandError> {
    blocking(&app, move |d| d.list_chats(character_id)).await
}

/// Starts a chat with the character's greetings.
#[tauri::command]
pub async fn start_chat<R: Runtime>(
    app: AppHandle<R>,
    character_id: i64,
) -> Result<ChatView, CommandError> {
    blocking(&app, move |d| d.start_chat(character_id)).await
}

/// A chat's visible branch and settings.
#[tauri::command]
pub async fn chat_view<R: Runtime>(
    app: AppHandle<R>,
    chat_id: i64,
) -> Result<ChatView, CommandError> {
    blocking(&app, move |d| d.chat_view(chat_id)).await
}

/// Stores the user's message and streams the reply through `on_event`.
#[tauri::command]
pub async fn send_message<R: Runtime>(
    app: AppHandle<R>,
    chat_id: i64,
    text: String,
    on_event: Channel<ChatEvent>,
) -> Result<ChatView, CommandError> {
    blocking(&app, move |d| {
        d.send_message(chat_id, &text, &mut forward(on_event))
    })
    .await
}

/// A new swipe beside a reply.
#[tauri::command]
pub async fn regenerate<R: Runtime>(
    app: AppHandle<R>,
    message_id: i64,
    on_event: Channel<ChatEvent>,
) -> Result<ChatView, CommandError> {
    blocking(&app, move |d| {
        d.regenerate(message_id, &mut forward(on_event))
    })
    .await
}

/// Continues the last reply.
#[tauri::command]
pub async fn continue_reply<R: Runtime>(
    app: AppHandle<R>,
    chat_id: i64,
    on_event: Channel<ChatEvent>,
) -> Result<ChatView, CommandError> {
    blocking(&app, move |d| {
        d.continue_reply(chat_id, &mut forward(on_event))
    })
    .await
}

/// Stops the reply being written (its text is kept).
#[tauri::command]
pub async fn stop_generation<R: Runtime>(app: AppHandle<R>) -> Result<bool, CommandError> {
    blocking(&app, |d| Ok(d.stop_generation())).await
}

/// Shows another swipe of a message.
#[tauri::command]
pub async fn select_swipe<R: Runtime>(
    app: AppHandle<R>,
    message_id: i64,
    index: usize,
) -> Result<ChatView, CommandError> {
    blocking(&app, move |d| d.select_swipe(message_id, index)).await
}

/// Edits a message (an earlier one forks a branch).
#[tauri::command]
pub async fn edit_message<R: Runtime>(
    app: AppHandle<R>,
    message_id: i64,
    content: String,
) -> Result<ChatView, CommandError> {
    blocking(&app, move |d| d.edit_message(message_id, &content)).await
}

/// Deletes a message and what follows it.
#[tauri::command]
pub async fn delete_message<R: Runtime>(
    app: AppHandle<R>,
    message_id: i64,
) -> Result<ChatView, CommandError> {
    blocking(&app, move |d| d.delete_message(message_id)).await
}

/// Renames a chat.
#[tauri::command]
pub async fn rename_chat<R: Runtime>(
    app: AppHandle<R>,
    chat_id: i64,
    title: String,
) -> Result<ChatView, CommandError> {
    blocking(&app, move |d| d.rename_chat(chat_id, &title)).await
}

/// Deletes a chat.
#[tauri::command]
pub async fn delete_chat<R: Runtime>(app: AppHandle<R>, chat_id: i64) -> Result<(), CommandError> {
    blocking(&app, move |d| d.delete_chat(chat_id)).await
}

/// Saves a chat's sampler settings.
#[tauri::command]
pub async fn set_chat_settings<R: Runtime>(
    app: AppHandle<R>,
    chat_id: i64,
    settings: ChatSettings,
) -> Result<ChatView, CommandError> {
    blocking(&app, move |d| d.set_chat_settings(chat_id, &settings)).await
}

/// The exact prompt behind a reply, by section, with the window's and the
/// cache's counts (`None` for messages not generated here).
#[tauri::command]
pub async fn prompt_report<R: Runtime>(
    app: AppHandle<R>,
    message_id: i64,
) -> Result<Option<PromptReport>, CommandError> {
    blocking(&app, move |d| d.prompt_report(message_id)).await
}

/// Writes the summary the chat's visible branch uses (empty text removes it).
#[tauri::command]
pub async fn set_chat_memory<R: Runtime>(
    app: AppHandle<R>,
    chat_id: i64,
    text: String,
) -> Result<ChatView, CommandError> {
    blocking(&app, move |d| d.set_chat_memory(chat_id, &text)).await
}

/// Folds what left the chat's window into its summary, in the background
/// (a reply started meanwhile stops it).
#[tauri::command]
pub async fn update_memory<R: Runtime>(
    app: AppHandle<R>,
    chat_id: i64,
) -> Result<MemoryUpdate, CommandError> {
    blocking(&app, move |d| d.update_memory(chat_id)).await
}

/// Stops a running summary.
#[tauri::command]
pub async fn stop_memory_update<R: Runtime>(app: AppHandle<R>) -> Result<bool, CommandError> {
    blocking(&app, move |d| Ok(d.stop_memory_update())).await
}

/// Full-text search over all messages.
#[tauri::command]
pub async fn search_messages<R: Runtime>(
    app: AppHandle<R>,
    query: String,
) -> Result<Vec<MessageHit>, CommandError> {
    blocking(&app, move |d| d.search_messages(&query, 50)).await
}

/// Opens a chat on the branch holding a message.
#[tauri::command]
pub async fn open_message<R: Runtime>(
    app: AppHandle<R>,
    message_id: i64,
) -> Result<ChatView, CommandError> {
    blocking(&app, move |d| d.open_message(message_id)).await
}

/// A chat as SillyTavern JSONL or Markdown text; with `path`, also written
/// there (atomically: a temporary file renamed into place).
#[tauri::command]
pub async fn export_chat<R: Runtime>(
    app: AppHandle<R>,
    chat_id: i64,
    format: ExportFormat,
    path: Option<PathBuf>,
) -> Result<String, CommandError> {
    blocking(&app, move |d| {
        let text = d.export_chat(chat_id, format)?;
        if let Some(path) = path {
            dramatis_core::write_atomically(&path, text.as_bytes())?;
        }
        Ok(text)
    })
    .await
}

/// Imports a SillyTavern JSONL chat from a file for a character.
#[tauri::command]
pub async fn import_chat<R: Runtime>(
    app: AppHandle<R>,
    character_id: i64,
    path: PathBuf,
) -> Result<ChatView, CommandError> {
    blocking(&app, move |d| {
        let text = std::fs::read_to_string(&path).map_err(|e| dramatis_core::Error::Io {
            context: format!("cannot read {}", path.display()),
            source: e,
        })?;
        d.import_chat(character_id, &text)
    })
    .await
}

/// A self-test: `count` numbered pieces at `per_sec` through the reply
/// channel, for measuring how the window keeps up.
#[tauri::command]
pub async fn stream_test<R: Runtime>(
    app: AppHandle<R>,
    count: usize,
    per_sec: f64,
    on_event: Channel<ChatEvent>,
) -> Result<StreamReport, CommandError> {
    blocking(&app, move |d| {
        d.synthetic_stream(count, per_sec, &mut forward(on_event))
    })
    .await
}
