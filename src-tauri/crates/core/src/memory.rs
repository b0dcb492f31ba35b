//! The memory of a long chat: when turns leave the window, the chat's own
//! model (and adapter) folds them into a summary, in the background.
//!
//! Invariants: a summary is written only between replies and stops the
//! moment a reply starts (nothing is written then); it is stored in one
//! transaction, so a killed process loses no message and leaves no half
//! summary; a summary covers messages of one branch only (see
//! `dramatis_store::MemoryRow`); a summary the user wrote is never replaced
//! by the model's, only built on.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use dramatis_llm::{GenerateParams, SamplerConfig, Session, StopReason};
use dramatis_persona::prompt::{Speaker, stop_strings, summary_prompt};
use dramatis_store::{MemoryRow, Role};
use serde::Serialize;

use crate::chats::Running;
use crate::{Dramatis, Result};

/// What [`Dramatis::update_memory`] did.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum MemoryUpdate {
    /// Every message outside the window is covered (or summaries are off).
    UpToDate,
    /// A reply or another summary is running; try again after it.
    Busy,
    /// Stopped before it was written (a reply started, or stop was asked).
    Stopped,
    /// Written.
    Written {
        /// The new summary.
        memory: MemoryRow,
        /// Messages it newly covers.
        messages: usize,
    },
}

/// Room left in the window for the summary's instructions.
const INSTRUCTIONS: usize = 160;

impl Dramatis {
    /// Folds the messages that left the window of the chat's visible branch
    /// (and no summary covers yet) into its summary, as many rounds as it
    /// takes, each round stored when done. Returns at once when a reply runs.
    pub fn update_memory(&self, chat_id: i64) -> Result<MemoryUpdate> {
        let settings = self.chat_settings(chat_id)?;
        if !settings.memory {
            return Ok(MemoryUpdate::UpToDate);
        }
        let cancel = {
            // A reply or an API request has the engine: the summary waits for a quiet moment.
            if self.is_generating() || self.engine_load() != (false, 0) {
                return Ok(MemoryUpdate::Busy);
            }
            let mut g = self.chat_runtime.summarizing.lock().unwrap();
            if g.is_some() {
                return Ok(MemoryUpdate::Busy);
            }
            let flag = Arc::new(AtomicBool::new(false));
            *g = Some(flag.clone());
            flag
        };
        let _running = Running(&self.chat_runtime.summarizing);
        let chat = self.store().chat(chat_id)?;
        let character = self.character(chat.character_id)?;
        let persona = self.chat_persona(chat.persona_id)?;
        let mut last = None;
        let mut covered = 0;
        loop {
            let path = self.store().selected_path(chat_id)?;
            let ids: Vec<i64> = path.iter().map(|m| m.id).collect();
            let memory = self.store().memory_on_path(&ids)?;
            let from = memory
                .as_ref()
                .and_then(|m| ids.iter().position(|&id| id == m.up_to_id))
                .map_or(0, |i| i + 1);
            let Some(until) = self
                .window_start(&ids)?
                .and_then(|w| ids.iter().position(|&id| id == w))
            else {
                break;
            };
            if until <= from {
                break;
            }
            // The engine (the chat's model and adapter) is borrowed, not held:
            // the summary runs on its own cache while chat keeps its own.
            let (model, tokenizer, adapter) = {
                let mut slot = self
                    .chat_runtime
                    .engine
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if cancel.load(Ordering::SeqCst) {
                    return Ok(MemoryUpdate::Stopped);
                }
                let engine = self.ensure_engine(&mut slot, &mut |_| {})?;
                self.use_adapter(engine, crate::training::attached_adapter(&character.card))?;
                (
                    engine.session.model().clone(),
                    engine.tokenizer.clone(),
                    engine.adapter.as_ref().map(|a| a.1.clone()),
                )
            };
            let ctx = model.config().max_position_embeddings;
            let reply = settings.memory_budget.clamp(32, ctx / 4);
            let room = ctx.saturating_sub(reply + INSTRUCTIONS);
            let previous = memory.as_ref().map_or("", |m| m.text.as_str());
            let turn = |m: &dramatis_store::MessageRow| {
                let s = match m.role {
                    Role::User => Speaker::User,
                    Role::Assistant => Speaker::Assistant,
                    Role::System => Speaker::System,
                };
                (s, m.content.clone())
            };
            // As many of the uncovered messages as fit, at least one (cut to fit).
            let mut turns = Vec::new();
            let mut end = from;
            while end < until {
                let mut next = turns.clone();
                next.push(turn(&path[end]));
                let text = summary_prompt(&character.card.name, &persona.name, previous, &next);
                if tokenizer.count(&text)? > room {
                    if turns.is_empty() {
                        let (s, t) = turn(&path[end]);
                        let keep: String = t.chars().take(room * 2).collect();
                        turns.push((s, keep));
                        end += 1;
                    }
                    break;
                }
                turns = next;
                end += 1;
            }
            let mut ids_prompt = tokenizer.encode(&summary_prompt(
                &character.card.name,
                &persona.name,
                previous,
                &turns,
            ))?;
            ids_prompt.truncate(room + INSTRUCTIONS);
            let mut session = Session::new(model);
            session.set_adapter(adapter);
            let params = GenerateParams {
                sampler: SamplerConfig {
                    temperature: 0.3,
                    top_p: 0.9,
                    seed: path[end - 1].id as u64,
                    ..SamplerConfig::default()
                },
                max_new_tokens: reply,
                stop: stop_strings(),
                ..Default::default()
            };
            let g = session.generate(&tokenizer, &ids_prompt, &params, &cancel, |_| {})?;
            if g.stop_reason == StopReason::Cancelled {
                return Ok(MemoryUpdate::Stopped);
            }
            let text = g.text.trim();
            // A model that wrote nothing keeps the old summary (and is not asked again
            // about these messages: they stay covered by what was there).
            let text = if text.is_empty() { previous } else { text };
            if text.is_empty() {
                break;
            }
            let m = self.store().put_memory(path[end - 1].id, text, false)?;
            covered += end - from;
            last = Some(m);
        }
        Ok(match last {
            Some(memory) => MemoryUpdate::Written {
                memory,
                messages: covered,
            },
            None => MemoryUpdate::UpToDate,
        })
    }

    /// Whether a summary is being written.
    pub fn is_summarizing(&self) -> bool {
        self.chat_runtime.summarizing.lock().unwrap().is_some()
    }

    /// Stops a running summary; false when none runs.
    pub fn stop_memory_update(&self) -> bool {
        match &*self.chat_runtime.summarizing.lock().unwrap() {
            Some(f) => {
                f.store(true, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }
}
