//! The card linter with the chat model's tokenizer: what the editor shows
//! live and `dramatis-cli card lint` prints.

use std::sync::{Arc, Mutex};

use dramatis_persona::lint::{LintInput, LintReport, lint};
use dramatis_persona::lorebook::Lorebook;
use serde::Serialize;

use crate::{CharacterCard, Dramatis, Result};

/// A lint report and how its counts were made.
#[derive(Debug, Clone, Serialize)]
pub struct CardLint {
    /// The report.
    pub report: LintReport,
    /// The model whose tokenizer counted; `None` when no model is installed
    /// and counts are estimated from the text's length.
    pub tokenizer: Option<String>,
}

/// The tokenizer the linter last loaded, by tokenizer file.
#[derive(Debug, Default)]
pub(crate) struct LintTokenizer(Mutex<Option<(String, Arc<dramatis_llm::PhiTokenizer>)>>);

/// Phi-2's window, when no model says otherwise.
const DEFAULT_WINDOW: usize = 2048;

impl Dramatis {
    /// Lints a card (as typed, saved or not) against the chat model's window.
    pub fn lint_card(&self, card: &CharacterCard) -> Result<CardLint> {
        let model = self.list_models()?.into_iter().next();
        let tokenizer = match &model {
            Some(m) => self.cached_tokenizer(&m.tokenizer_path).ok(),
            None => None,
        };
        let book = card
            .character_book
            .as_ref()
            .and_then(|b| Lorebook::from_character_book(b).ok());
        let constants: Vec<&str> = book
            .iter()
            .flat_map(|b| b.entries.iter())
            .filter(|e| e.enabled && e.constant)
            .map(|e| e.content.as_str())
            .collect();
        let persona = self
            .personas()?
            .into_iter()
            .find(|p| p.is_default)
            .map(|p| p.description)
            .unwrap_or_default();
        let global: String = self
            .store()
            .setting(crate::chats::GLOBAL_SYSTEM_PROMPT)?
            .unwrap_or_default();
        let settings = crate::ChatSettings::default();
        let input = LintInput {
            card,
            constant_entries: &constants,
            window: DEFAULT_WINDOW,
            reply_tokens: settings.max_new_tokens,
            user_persona: &persona,
            global_system_prompt: &global,
        };
        let report = match &tokenizer {
            Some(t) => lint(&input, |s| t.count(s).unwrap_or(s.len() / 4)),
            // About four characters a token in English text.
            None => lint(&input, |s| s.len().div_ceil(4)),
        };
        Ok(CardLint {
            report,
            tokenizer: tokenizer.and(model.map(|m| m.name)),
        })
    }

    /// A tokenizer file, loaded once and kept (the linter and token counts ask often).
    pub(crate) fn cached_tokenizer(&self, path: &str) -> Result<Arc<dramatis_llm::PhiTokenizer>> {
        let mut slot = self
            .lint_tokenizer
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some((p, t)) = slot.as_ref()
            && p == path
        {
            return Ok(t.clone());
        }
        let t = Arc::new(dramatis_llm::PhiTokenizer::from_file(
            std::path::Path::new(path),
        )?);
        *slot = Some((path.to_owned(), t.clone()));
        Ok(t)
    }
}
