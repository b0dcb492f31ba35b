//! Dramatis's services: what the desktop app and the CLI both do, built on
//! the engine crates. Nothing here knows Tauri.
//!
//! Invariants: every input from the UI is validated here before it reaches
//! the store, and a rejected input changes nothing; the built-in characters
//! are installed once, on first start, and can be restored later.

mod builtins;
mod cards;
mod characters;
mod chats;
mod completion;
mod diagnostics;
mod error;
mod lint;
mod lorebooks;
mod memory;
mod models;
mod paths;
mod personas;
mod prefs;
mod queue;
mod training;

use std::path::{Path, PathBuf};

use std::sync::OnceLock;

use dramatis_hub::{Catalog, Hub, HubOptions};
use dramatis_store::Store;

pub use builtins::BUILTINS;
pub use cards::{
    ADAPTER_ASSET, BaseShape, CardFormat, ImportOutcome, MAX_IMPORT_BYTES, OnDuplicate,
};
pub use characters::{AvatarEdit, Character, CharacterDraft, CharacterSummary};
pub use chats::{
    ChatEvent, ChatMessage, ChatSettings, ChatSummary, ChatView, ContextMode, ExportFormat,
    FLUSH_EVERY, MessageHit, PromptReport, PromptSection,
};
pub use completion::{
    ApiModel, ApiServerSettings, ChatTurn, Completion, CompletionRequest, FinishReason,
    PromptInput, chat_prompt,
};
pub use diagnostics::StreamReport;
/// Downloads, the catalog and datasets.
pub use dramatis_hub as hub;
/// The language model engine, for the CLI and the shell.
pub use dramatis_llm as llm;
/// Characters, personas and the prompt format.
pub use dramatis_persona as persona;
pub use dramatis_persona::{CharacterCard, FieldError, LIMITS, PersonaDraft, ValidationErrors};
pub use dramatis_store::LorebookLink;
pub use dramatis_store::PairKind;
pub use dramatis_store::{AdapterRow, CharacterFilter, TagCount};
/// LoRA fine-tuning.
pub use dramatis_train as train;
pub use error::{Error, ErrorKind, Result};
pub use lint::CardLint;
pub use lorebooks::{LorebookFormat, LorebookView};
pub use memory::MemoryUpdate;
pub use models::{CatalogItem, DeviceInfo, Model, ModelsOverview};
pub use paths::{DATA_DIR_ENV, default_data_dir, write_atomically};
pub use personas::Persona;
pub use prefs::{LineProblem, PreferencePair, PrefsImport, read_preference_file};
pub use training::{
    Adapter, AdapterExport, DataPreview, DataSource, MetricPoint, RunView, SampleRow, TrainEvent,
    TrainRequest,
};

/// The setting that records that first-start setup ran.
const FIRST_START_DONE: &str = "first_start_done";

/// The application's backend: one per data directory.
#[derive(Debug)]
pub struct Dramatis {
    store: Store,
    data_dir: PathBuf,
    hub: Hub,
    catalog: Catalog,
    downloads: models::Downloads,
    device: OnceLock<dramatis_llm::Device>,
    chat_runtime: chats::ChatRuntime,
    lint_tokenizer: lint::LintTokenizer,
}

impl Dramatis {
    /// Opens the data directory (creating it), its database, and on the very
    /// first start installs the built-in characters and a default persona.
    pub fn open(data_dir: &Path) -> Result<Self> {
        Self::open_with(data_dir, HubOptions::from_env())
    }

    /// Opens the data directory with these download settings (a mirror, a
    /// test hub, another cache).
    pub fn open_with(data_dir: &Path, hub: HubOptions) -> Result<Self> {
        std::fs::create_dir_all(data_dir).map_err(|e| Error::Io {
            context: format!("cannot create the data folder {}", data_dir.display()),
            source: e,
        })?;
        let store = Store::open(&data_dir.join("dramatis.db"))?;
        let app = Self {
            store,
            data_dir: data_dir.to_owned(),
            hub: Hub::new(hub),
            catalog: Catalog::builtin(),
            downloads: Default::default(),
            device: OnceLock::new(),
            chat_runtime: Default::default(),
            lint_tokenizer: Default::default(),
        };
        app.first_start()?;
        Ok(app)
    }

    /// Opens the data directory the environment or the OS names.
    pub fn open_default() -> Result<Self> {
        Self::open(&default_data_dir()?)
    }

    /// The folder holding the database and the app's files.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The database, for services elsewhere in this crate and for tests.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The downloader.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// What can be downloaded.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The compute device (chosen on first use: CUDA, Metal, else CPU;
    /// `DRAMATIS_DEVICE=cpu|cuda|cuda:N|metal` overrides).
    pub fn device(&self) -> &dramatis_llm::Device {
        self.device.get_or_init(|| {
            let choice = std::env::var("DRAMATIS_DEVICE")
                .ok()
                .and_then(|s| s.parse::<dramatis_llm::DeviceChoice>().ok())
                .unwrap_or_default();
            choice.open().unwrap_or_else(|e| {
                tracing::warn!(error = %e, "device unavailable; using the CPU");
                dramatis_llm::Device::Cpu
            })
        })
    }

    fn first_start(&self) -> Result<()> {
        if self.store.setting::<bool>(FIRST_START_DONE)? == Some(true) {
            return Ok(());
        }
        let installed = self.restore_builtins()?;
        if self.store.list_personas()?.is_empty() {
            self.store.insert_persona(&PersonaDraft {
                name: "You".into(),
                description: String::new(),
            })?;
        }
        self.store.set_setting(FIRST_START_DONE, &true)?;
        tracing::info!(installed, "first start: built-in characters installed");
        Ok(())
    }
}
