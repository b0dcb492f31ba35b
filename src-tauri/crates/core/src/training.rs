//! Fine-tuning from the app: data sources (the role-play dataset, a local
//! file, this character's chats), a preview with the validation report,
//! runs recorded in SQLite with their loss curve, resume after a restart,
//! adapters registered, attached to characters and exported.
//!
//! Invariants: a run's checkpoints live in `<data>/training/<run id>`, its
//! adapter in `<data>/adapters/<run id>`; an adapter is attached to a
//! character through the card's `extensions.dramatis.adapter_id`, so chat
//! switches to it without reloading the base.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use dramatis_hub::dataset::{RowProblem, TextColumn, read_text_column};
use dramatis_llm::{LoraAdapter, Phi, PhiTokenizer, QuantType};
use dramatis_persona::prompt::{PromptParts, Speaker};
use dramatis_store::{AdapterRow, Role, RunRow};
use dramatis_train::data::prepare;
use dramatis_train::{
    DataOptions, DataReport, Objective, Outcome, PairReport, PairText, TrainConfig, TrainData,
    TrainProgress, TrainingRun, prepare_pairs,
};
use serde::{Deserialize, Serialize};

use crate::{Character, CharacterDraft, Dramatis, Error, Result};

/// Where training text comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DataSource {
    /// A catalog dataset (downloaded first).
    Catalog {
        /// `roleplay`.
        dataset_id: String,
    },
    /// A local parquet, JSONL or CSV file.
    File {
        /// The file.
        path: PathBuf,
        /// The text column.
        column: String,
    },
    /// This character's chats, rendered in the role-play format.
    Chats {
        /// The character.
        character_id: i64,
    },
    /// This character's preference pairs (those not left out), for DPO.
    Preferences {
        /// The character.
        character_id: i64,
    },
}

/// What a source gives: text rows, or preference pairs.
enum TrainInput {
    Text(TextColumn),
    Pairs(Vec<PairText>),
}

/// Everything a run needs; stored with it so it can resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainRequest {
    /// Display name.
    pub name: String,
    /// The base model.
    pub model_id: i64,
    /// The character to attach the adapter to when done.
    pub character_id: Option<i64>,
    /// The text.
    pub source: DataSource,
    /// LoRA and optimizer settings.
    pub config: TrainConfig,
    /// Tokenizing, truncation, split.
    pub data: DataOptions,
    /// Start from this adapter's weights instead of a fresh adapter (its
    /// rank, alpha and targets replace the configuration's); DPO measures
    /// its rewards against it.
    #[serde(default)]
    pub start_adapter_id: Option<i64>,
}

/// One row as the model will see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SampleRow {
    /// Row number in the source.
    pub row: usize,
    /// The text.
    pub text: String,
    /// Its length in tokens.
    pub tokens: usize,
}

/// What the data step shows before training.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DataPreview {
    /// Counts.
    pub report: DataReport,
    /// The first rows.
    pub samples: Vec<SampleRow>,
    /// The first unreadable rows and why.
    pub problems: Vec<RowProblem>,
    /// For preference pairs: what DPO will see.
    pub pairs: Option<PairPreview>,
}

/// The validation report of a character's preference pairs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PairPreview {
    /// Counts after tokenizing and cutting to the maximum length.
    pub report: PairReport,
    /// Pairs the user left out (not counted in `report`).
    pub excluded: usize,
    /// Pairs with a reply written by another base model than this run's.
    pub other_models: usize,
    /// Pairs whose prompt was rebuilt from the chat (imported chats), not recorded.
    pub rebuilt_prompts: usize,
    /// Pairs imported from files.
    pub imported: usize,
    /// The first pairs as text.
    pub samples: Vec<PairText>,
    /// The adapter the run starts from and measures against, if any.
    pub start_adapter: Option<Adapter>,
}

/// A run for the UI.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunView {
    /// Id.
    pub id: i64,
    /// Name.
    pub name: String,
    /// `running`, `stopped`, `finished` or `failed`.
    pub status: String,
    /// Steps done.
    pub step: i64,
    /// Steps in all.
    pub total_steps: i64,
    /// The loss curve.
    pub metrics: Vec<MetricPoint>,
    /// Why it failed.
    pub error: Option<String>,
    /// The request it was started with.
    pub request: Option<TrainRequest>,
    /// The adapter it produced.
    pub adapter_id: Option<i64>,
    /// ms since the epoch.
    pub updated_at: i64,
}

/// One point of the loss curve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricPoint {
    /// Step.
    pub step: usize,
    /// Training loss.
    pub loss: f64,
    /// Eval loss, where measured.
    pub eval_loss: Option<f64>,
    /// DPO: chosen reward minus rejected reward.
    #[serde(default)]
    pub margin: Option<f64>,
    /// DPO: share of pairs whose chosen reward is higher.
    #[serde(default)]
    pub accuracy: Option<f64>,
    /// DPO: the margin on held-out pairs, where measured.
    #[serde(default)]
    pub eval_margin: Option<f64>,
}

/// An adapter for the UI.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Adapter {
    /// Id.
    pub id: i64,
    /// Name.
    pub name: String,
    /// The run that made it.
    pub run_id: Option<i64>,
    /// The base model.
    pub base_model_id: Option<i64>,
    /// The PEFT folder.
    pub path: String,
    /// The settings, JSON.
    pub recipe: serde_json::Value,
    /// Final losses, JSON.
    pub metrics: serde_json::Value,
    /// Characters it is attached to.
    pub characters: Vec<i64>,
    /// ms since the epoch.
    pub created_at: i64,
}

/// Export formats for an adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdapterExport {
    /// A PEFT folder.
    Peft,
    /// A llama.cpp GGUF LoRA (fused qkv, for the catalog's GGUF bases).
    GgufLora,
    /// Base + adapter as one Q4_K GGUF.
    Merged,
}

/// What a training call reports: first the run, then each step.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TrainEvent {
    /// The run exists (its id, for stop and resume) and its data report.
    Started {
        /// The run.
        run_id: i64,
        /// The data.
        report: DataReport,
        /// Steps in all.
        total_steps: usize,
        /// The step it starts from (above 0 when resuming).
        step: usize,
    },
    /// One optimizer step.
    Progress(TrainProgress),
}

/// What every run is asked at its checkpoints (and the wizard's comparison).
pub const SAMPLE_PROMPTS: [&str; 3] = [
    "Hello! Who are you?",
    "Tell me about your day.",
    "What do you want most?",
];

/// A pair report in the text report's terms (a pair counts as a row), for
/// the step counts and the estimate.
fn pair_counts(r: &PairReport) -> DataReport {
    DataReport {
        rows: r.pairs,
        used: r.used,
        truncated: r.truncated,
        empty: r.empty,
        malformed: 0,
        tokens: r.tokens,
        longest: r.longest,
        train_rows: r.train_pairs,
        eval_rows: r.eval_pairs,
    }
}

/// The card extension key for Dramatis's own data.
pub(crate) const EXT: &str = "dramatis";

/// The adapter attached to a card, if any.
pub(crate) fn attached_adapter(card: &crate::CharacterCard) -> Option<i64> {
    card.extensions.get(EXT)?.get("adapter_id")?.as_i64()
}

/// The role-play rendering of a conversation with `card` as `persona`, the
/// template training text and sample prompts share (no global system prompt).
fn roleplay<'a>(
    card: &'a crate::CharacterCard,
    persona: &'a crate::Persona,
    history: &'a [(Speaker, String)],
) -> PromptParts<'a> {
    PromptParts::new(card, &persona.name, &persona.description, history)
}

impl Dramatis {
    fn training_input(&self, source: &DataSource) -> Result<TrainInput> {
        if let DataSource::Preferences { character_id } = source {
            return Ok(TrainInput::Pairs(
                self.training_pairs(*character_id)?
                    .into_iter()
                    .map(|p| PairText {
                        prompt: p.prompt,
                        chosen: p.chosen,
                        rejected: p.rejected,
                    })
                    .collect(),
            ));
        }
        self.training_texts(source).map(TrainInput::Text)
    }

    fn training_texts(&self, source: &DataSource) -> Result<TextColumn> {
        match source {
            DataSource::Preferences { .. } => Err(Error::Conflict(
                "preference pairs train with DPO, not as text".into(),
            )),
            DataSource::Catalog { dataset_id } => {
                let entry = self.catalog().dataset(dataset_id)?;
                let path = self.hub().cache().find(&entry.files[0]).ok_or_else(|| {
                    Error::Conflict(format!("{} is not downloaded yet", entry.name))
                })?;
                Ok(read_text_column(&path, &entry.text_column)?)
            }
            DataSource::File { path, column } => Ok(read_text_column(path, column)?),
            DataSource::Chats { character_id } => {
                let card = self.character(*character_id)?.card;
                let mut out = Vec::new();
                for (i, chat) in self.store().list_chats(*character_id)?.iter().enumerate() {
                    let persona = self.chat_persona(chat.persona_id)?;
                    let history: Vec<(Speaker, String)> = self
                        .store()
                        .selected_path(chat.id)?
                        .into_iter()
                        .filter(|m| !m.content.trim().is_empty())
                        .map(|m| {
                            let s = match m.role {
                                Role::User => Speaker::User,
                                Role::Assistant => Speaker::Assistant,
                                Role::System => Speaker::System,
                            };
                            (s, m.content)
                        })
                        .collect();
                    if history.iter().any(|(s, _)| *s == Speaker::User) {
                        out.push((i + 1, roleplay(&card, &persona, &history).render_full()));
                    }
                }
                Ok(TextColumn {
                    texts: out,
                    problems: Vec::new(),
                })
            }
        }
    }

    fn model_and_tokenizer(&self, model_id: i64) -> Result<(Arc<Phi>, PhiTokenizer)> {
        let m = self.model(model_id)?;
        let tokenizer = PhiTokenizer::from_file(Path::new(&m.tokenizer_path))?;
        // The chat engine may hold this model already: share it.
        if let Some(phi) = self.loaded_model(model_id) {
            return Ok((phi, tokenizer));
        }
        // A dense base is kept in the dtype training computes in (bf16 on CUDA).
        let dtype = dramatis_train::Precision::Auto.dtype(self.device());
        let phi = Arc::new(dramatis_llm::load_model_as(
            Path::new(&m.path),
            self.device(),
            dtype,
        )?);
        tokenizer.check_fits(phi.config().vocab_size)?;
        Ok((phi, tokenizer))
    }

    /// Reads and checks the data, without training: the report and the first rows.
    pub fn preview_training_data(
        &self,
        model_id: i64,
        source: &DataSource,
        opts: &DataOptions,
    ) -> Result<DataPreview> {
        let m = self.model(model_id)?;
        let tokenizer = PhiTokenizer::from_file(Path::new(&m.tokenizer_path))?;
        if let DataSource::Preferences { character_id } = source {
            return self.preview_pairs(model_id, *character_id, &tokenizer, opts);
        }
        let TextColumn { texts, problems } = self.training_texts(source)?;
        let prepared = prepare(&texts, problems.len(), &tokenizer, opts)?;
        let samples = texts
            .iter()
            .filter(|(_, t)| !t.trim().is_empty())
            .take(5)
            .map(|(row, text)| {
                Ok(SampleRow {
                    row: *row,
                    tokens: tokenizer.count(text)? + 1,
                    text: text.clone(),
                })
            })
            .collect::<Result<_>>()?;
        Ok(DataPreview {
            report: prepared.report,
            samples,
            problems: problems.into_iter().take(20).collect(),
            pairs: None,
        })
    }

    /// The adapter a DPO run for `character_id` on `model_id` starts from by
    /// default: the character's, where it was trained on that base.
    pub fn default_start_adapter(&self, character_id: i64, model_id: i64) -> Result<Option<i64>> {
        let Some(a) = attached_adapter(&self.character(character_id)?.card) else {
            return Ok(None);
        };
        Ok(self
            .store()
            .adapter(a)
            .ok()
            .filter(|row| row.base_model_id == Some(model_id))
            .map(|row| row.id))
    }

    fn preview_pairs(
        &self,
        model_id: i64,
        character_id: i64,
        tokenizer: &PhiTokenizer,
        opts: &DataOptions,
    ) -> Result<DataPreview> {
        let all = self.preference_pairs(character_id)?;
        let excluded = all.iter().filter(|p| p.excluded).count();
        let used: Vec<_> = all.into_iter().filter(|p| !p.excluded).collect();
        // Replies recorded with a model label from another base than this one.
        let ours: Vec<String> = self
            .api_model_list(false)?
            .into_iter()
            .filter(|m| m.model_id == model_id)
            .map(|m| m.id)
            .collect();
        let other = |m: &Option<String>| m.as_ref().is_some_and(|m| !ours.contains(m));
        let other_models = used
            .iter()
            .filter(|p| other(&p.chosen_model) || other(&p.rejected_model))
            .count();
        let rebuilt_prompts = used.iter().filter(|p| !p.exact_prompt).count();
        let imported = used.iter().filter(|p| p.imported_id.is_some()).count();
        let texts: Vec<PairText> = used
            .into_iter()
            .map(|p| PairText {
                prompt: p.prompt,
                chosen: p.chosen,
                rejected: p.rejected,
            })
            .collect();
        let prepared = prepare_pairs(&texts, tokenizer, opts)?;
        let r = &prepared.report;
        let start_adapter = match self.default_start_adapter(character_id, model_id)? {
            Some(id) => self.list_adapters()?.into_iter().find(|a| a.id == id),
            None => None,
        };
        Ok(DataPreview {
            report: pair_counts(r),
            samples: Vec::new(),
            problems: Vec::new(),
            pairs: Some(PairPreview {
                report: prepared.report,
                excluded,
                other_models,
                rebuilt_prompts,
                imported,
                samples: texts.into_iter().take(5).collect(),
                start_adapter,
            }),
        })
    }

    /// The adapter a run starts from, on `device`, checked against the run's base.
    fn start_adapter(
        &self,
        req: &TrainRequest,
        config: &dramatis_llm::PhiConfig,
        device: &dramatis_llm::Device,
    ) -> Result<Option<LoraAdapter>> {
        let Some(id) = req.start_adapter_id else {
            return Ok(None);
        };
        let row = self.store().adapter(id)?;
        if row.base_model_id != Some(req.model_id) {
            return Err(Error::Conflict(format!(
                "the adapter {} was trained on another base model; choose that model, or start fresh",
                row.name
            )));
        }
        Ok(Some(LoraAdapter::load_peft(
            Path::new(&row.path),
            config,
            device,
        )?))
    }

    fn run_view(&self, r: RunRow, adapters: &[AdapterRow]) -> Result<RunView> {
        let adapter_id = adapters
            .iter()
            .find(|a| a.run_id == Some(r.id))
            .map(|a| a.id);
        Ok(RunView {
            id: r.id,
            name: r.name,
            status: r.status,
            step: r.step,
            total_steps: r.total_steps,
            metrics: serde_json::from_str(&r.metrics).unwrap_or_default(),
            error: r.error,
            request: serde_json::from_str(&r.request).ok(),
            adapter_id,
            updated_at: r.updated_at,
        })
    }

    /// Every run, newest first. A run marked running that no job drives (the
    /// app was closed mid-run) shows as stopped, ready to resume.
    pub fn list_runs(&self) -> Result<Vec<RunView>> {
        let adapters = self.store().list_adapters()?;
        self.store()
            .list_runs()?
            .into_iter()
            .map(|mut r| {
                if r.status == "running" && !self.jobs_running(&format!("train:{}", r.id)) {
                    r.status = "stopped".into();
                }
                self.run_view(r, &adapters)
            })
            .collect()
    }

    /// Starts a new run and trains to the end (or until stopped). Blocks.
    pub fn train(
        &self,
        mut req: TrainRequest,
        on_event: &mut (dyn FnMut(&TrainEvent) + Send),
    ) -> Result<RunView> {
        let m = self.model(req.model_id)?;
        if matches!(req.source, DataSource::Preferences { .. })
            && req.config.objective == Objective::Sft
        {
            req.config.objective = Objective::dpo();
        }
        // A start adapter's shape is the run's: its rank, alpha and targets.
        let info = dramatis_llm::inspect_model(Path::new(&m.path))?;
        if let Some(a) = self.start_adapter(&req, &info.config, &dramatis_llm::Device::Cpu)? {
            req.config.take_shape_of(&a)?;
        }
        // Check the data before anything is recorded.
        let input = self.training_input(&req.source)?;
        let dir = self.data_dir().join("training").join("{id}");
        let id = self.store().insert_run(
            &req.name,
            req.model_id,
            req.character_id,
            &serde_json::to_string(&req).expect("request serializes"),
            &dir.to_string_lossy(),
        )?;
        self.drive(id, req, input, on_event)
    }

    /// Continues a stopped run from its last checkpoint. Blocks.
    pub fn resume_training(
        &self,
        run_id: i64,
        on_event: &mut (dyn FnMut(&TrainEvent) + Send),
    ) -> Result<RunView> {
        let row = self.store().run(run_id)?;
        let req: TrainRequest = serde_json::from_str(&row.request)
            .map_err(|e| Error::Conflict(format!("the run's settings are unreadable: {e}")))?;
        let input = self.training_input(&req.source)?;
        self.drive(run_id, req, input, on_event)
    }

    /// Stops a running run at the next step (a checkpoint is written).
    pub fn stop_training(&self, run_id: i64) -> bool {
        self.stop_job(&format!("train:{run_id}"))
    }

    fn drive(
        &self,
        id: i64,
        req: TrainRequest,
        input: TrainInput,
        on_event: &mut (dyn FnMut(&TrainEvent) + Send),
    ) -> Result<RunView> {
        let (_guard, cancel) = self.start_job(&format!("train:{id}"))?;
        let row = self.store().run(id)?;
        let fail = |e: Error| {
            let _ = self.store().update_run(
                id,
                "failed",
                row.step as usize,
                row.total_steps as usize,
                &row.metrics,
                Some(&e.to_string()),
            );
            e
        };
        let (model, tokenizer) = self.model_and_tokenizer(req.model_id).map_err(fail)?;
        let (data, report): (TrainData, DataReport) = match input {
            TrainInput::Text(TextColumn { texts, problems }) => {
                let p = prepare(&texts, problems.len(), &tokenizer, &req.data)
                    .map_err(|e| fail(e.into()))?;
                let r = p.report.clone();
                (p.into(), r)
            }
            TrainInput::Pairs(pairs) => {
                let p = prepare_pairs(&pairs, &tokenizer, &req.data).map_err(|e| fail(e.into()))?;
                let r = &p.report;
                let report = pair_counts(r);
                (p.into(), report)
            }
        };
        let pad = tokenizer.eos_id().unwrap_or(0);
        let start = self
            .start_adapter(&req, model.config(), model.device())
            .map_err(fail)?;
        let mut run = TrainingRun::new_from(
            model,
            data,
            req.config.clone(),
            Path::new(&row.dir),
            pad,
            start.as_ref(),
        )
        .map_err(|e| fail(e.into()))?;
        run.set_sample_prompts(tokenizer, &self.sample_prompts(req.character_id)?)?;
        let total = run.total_steps();
        let mut metrics: Vec<MetricPoint> = serde_json::from_str(&row.metrics).unwrap_or_default();
        metrics.retain(|m| m.step <= run.step());
        on_event(&TrainEvent::Started {
            run_id: id,
            report,
            total_steps: total,
            step: run.step(),
        });
        self.store().update_run(
            id,
            "running",
            run.step(),
            total,
            &serde_json::to_string(&metrics).expect("json"),
            None,
        )?;
        let flag = AtomicBool::new(false);
        let done = AtomicBool::new(false);
        let outcome = std::thread::scope(|s| {
            s.spawn(|| {
                while !done.load(Ordering::SeqCst) {
                    if cancel.is_stopped() {
                        flag.store(true, Ordering::SeqCst);
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            });
            let r = run.run(
                &mut |p| {
                    metrics.push(MetricPoint {
                        step: p.step,
                        loss: p.loss,
                        eval_loss: p.eval_loss,
                        margin: p.margin,
                        accuracy: p.accuracy,
                        eval_margin: p.eval_margin,
                    });
                    let _ = self.store().update_run(
                        id,
                        "running",
                        p.step,
                        p.total_steps,
                        &serde_json::to_string(&metrics).expect("json"),
                        None,
                    );
                    on_event(&TrainEvent::Progress(p.clone()));
                },
                &flag,
            );
            done.store(true, Ordering::SeqCst);
            r
        });
        let metrics_json = serde_json::to_string(&metrics).expect("json");
        match outcome {
            Ok(Outcome::Cancelled) => {
                self.store()
                    .update_run(id, "stopped", run.step(), total, &metrics_json, None)?;
            }
            Ok(Outcome::Finished) => {
                let dir = self.data_dir().join("adapters").join(id.to_string());
                dramatis_train::export_peft(&run, &dir)?;
                let model = self.model(req.model_id)?;
                let adapter_id = self.store().insert_adapter(&AdapterRow {
                    id: 0,
                    name: req.name.clone(),
                    run_id: Some(id),
                    base_model_id: Some(req.model_id),
                    base_sha256: model.sha256.clone(),
                    path: dir.to_string_lossy().into_owned(),
                    recipe: serde_json::to_string(&req).expect("json"),
                    metrics: serde_json::json!({
                        "final_loss": run.losses().last(),
                        "eval_losses": run.eval_losses(),
                        "steps": run.step(),
                        "objective": if run.dpo_metrics().is_empty() { "sft" } else { "dpo" },
                        "final_margin": run.dpo_metrics().last().map(|m| m.margin),
                        "eval_margin": run.eval_dpo_metrics().last().map(|m| m.1.margin),
                        "eval_accuracy": run.eval_dpo_metrics().last().map(|m| m.1.accuracy),
                    })
                    .to_string(),
                    created_at: 0,
                })?;
                self.store()
                    .update_run(id, "finished", run.step(), total, &metrics_json, None)?;
                if let Some(c) = req.character_id {
                    self.attach_adapter(c, Some(adapter_id))?;
                }
            }
            Err(e) => {
                let e: Error = e.into();
                self.store().update_run(
                    id,
                    "failed",
                    run.step(),
                    total,
                    &metrics_json,
                    Some(&e.to_string()),
                )?;
                return Err(e);
            }
        }
        self.run_view(self.store().run(id)?, &self.store().list_adapters()?)
    }

    /// Every adapter, newest first, with the characters using it.
    pub fn list_adapters(&self) -> Result<Vec<Adapter>> {
        let chars = self.list_characters(&Default::default())?;
        let mut using: Vec<(i64, i64)> = Vec::new();
        for c in chars {
            if let Some(a) = attached_adapter(&self.character(c.id)?.card) {
                using.push((a, c.id));
            }
        }
        Ok(self
            .store()
            .list_adapters()?
            .into_iter()
            .map(|a| Adapter {
                characters: using
                    .iter()
                    .filter(|(x, _)| *x == a.id)
                    .map(|(_, c)| *c)
                    .collect(),
                id: a.id,
                name: a.name,
                run_id: a.run_id,
                base_model_id: a.base_model_id,
                path: a.path,
                recipe: serde_json::from_str(&a.recipe).unwrap_or_default(),
                metrics: serde_json::from_str(&a.metrics).unwrap_or_default(),
                created_at: a.created_at,
            })
            .collect())
    }

    /// Attaches an adapter to a character (or detaches with `None`); kept in
    /// the card's `extensions.dramatis`, so it travels with the card.
    pub fn attach_adapter(&self, character_id: i64, adapter_id: Option<i64>) -> Result<Character> {
        if let Some(a) = adapter_id {
            self.store().adapter(a)?;
        }
        let c = self.character(character_id)?;
        let mut card = c.card;
        let ext = card
            .extensions
            .entry(EXT.to_owned())
            .or_insert_with(|| serde_json::json!({}));
        if !ext.is_object() {
            *ext = serde_json::json!({});
        }
        let obj = ext.as_object_mut().expect("made an object above");
        match adapter_id {
            Some(a) => {
                obj.insert("adapter_id".into(), a.into());
            }
            None => {
                obj.remove("adapter_id");
            }
        }
        self.update_character(
            character_id,
            CharacterDraft {
                card,
                avatar: Default::default(),
                book: None,
            },
        )
    }

    /// Deletes an adapter, its files, and its attachments.
    pub fn delete_adapter(&self, adapter_id: i64) -> Result<()> {
        let a = self.store().adapter(adapter_id)?;
        for c in self
            .list_adapters()?
            .into_iter()
            .find(|x| x.id == adapter_id)
            .map(|x| x.characters)
            .unwrap_or_default()
        {
            self.attach_adapter(c, None)?;
        }
        self.store().delete_adapter(adapter_id)?;
        let _ = std::fs::remove_dir_all(&a.path);
        Ok(())
    }

    /// Writes an adapter for other tools.
    pub fn export_adapter(&self, adapter_id: i64, format: AdapterExport, out: &Path) -> Result<()> {
        let a = self.store().adapter(adapter_id)?;
        if format == AdapterExport::Peft {
            std::fs::create_dir_all(out).map_err(|e| Error::Io {
                context: format!("cannot create {}", out.display()),
                source: e,
            })?;
            for f in ["adapter_config.json", "adapter_model.safetensors"] {
                std::fs::copy(Path::new(&a.path).join(f), out.join(f)).map_err(|e| Error::Io {
                    context: format!("cannot write {}", out.join(f).display()),
                    source: e,
                })?;
            }
            return Ok(());
        }
        let model_id = a
            .base_model_id
            .ok_or_else(|| Error::Conflict("the adapter's base model was deleted".into()))?;
        let m = self.model(model_id)?;
        let base = dramatis_llm::load_model(Path::new(&m.path), &dramatis_llm::Device::Cpu)?;
        let lora = LoraAdapter::load_peft(
            Path::new(&a.path),
            base.config(),
            &dramatis_llm::Device::Cpu,
        )?;
        match format {
            AdapterExport::GgufLora => {
                dramatis_llm::write_lora_gguf(&lora, base.config(), out, true)?
            }
            _ => dramatis_llm::merge_to_gguf(
                &base,
                Some(&lora),
                Some(Path::new(&m.tokenizer_path)),
                out,
                QuantType::Q4K,
                &AtomicBool::new(false),
                |_| {},
            )?,
        }
        Ok(())
    }
}

impl Dramatis {
    /// Predicts a run's peak memory and speed on this device.
    pub fn estimate_training(
        &self,
        model_id: i64,
        config: &TrainConfig,
        seq_len: usize,
        batch: usize,
    ) -> Result<dramatis_train::Estimate> {
        let m = self.model(model_id)?;
        let info = dramatis_llm::inspect_model(Path::new(&m.path))?;
        let dtype = config.precision.dtype(self.device());
        let weight_bytes = if info.format == dramatis_llm::ModelFormat::Safetensors {
            info.parameters * dtype.size_in_bytes() as u64
        } else {
            info.bytes
        };
        static FLOPS: std::sync::OnceLock<Option<f64>> = std::sync::OnceLock::new();
        let flops =
            *FLOPS.get_or_init(|| dramatis_train::estimate::measure_flops(self.device(), dtype));
        let flash_attention =
            dramatis_llm::trains_with_flash_attention(self.device(), dtype, info.config.head_dim());
        Ok(dramatis_train::estimate(&dramatis_train::EstimateInput {
            config: info.config,
            weight_bytes,
            r: config.r,
            targets: config.targets.len(),
            seq_len: seq_len.max(8),
            batch: batch.max(1),
            device_memory: self.device_info().memory_bytes,
            flops_per_sec: flops,
            gradient_checkpointing: config.gradient_checkpointing,
            dtype_bytes: dtype.size_in_bytes(),
            on_gpu: !self.device().is_cpu(),
            dpo: matches!(config.objective, Objective::Dpo { .. }),
            flash_attention,
        }))
    }

    /// Greedy replies to `prompts` from a character (or a plain assistant),
    /// with an adapter or the base alone: the wizard's side-by-side.
    pub fn sample_replies(
        &self,
        model_id: i64,
        adapter_id: Option<i64>,
        character_id: Option<i64>,
        prompts: &[String],
        max_tokens: usize,
    ) -> Result<Vec<String>> {
        let (model, tokenizer) = self.model_and_tokenizer(model_id)?;
        let mut session = dramatis_llm::Session::new(model.clone());
        if let Some(a) = adapter_id {
            let row = self.store().adapter(a)?;
            let lora =
                LoraAdapter::load_peft(Path::new(&row.path), model.config(), model.device())?;
            session.set_adapter(Some(Arc::new(lora)));
        }
        let texts = self.one_turn_prompts(character_id, prompts)?;
        let mut out = Vec::new();
        for text in texts {
            let ids = tokenizer.encode(&text)?;
            let g = session.generate(
                &tokenizer,
                &ids,
                &dramatis_llm::GenerateParams {
                    sampler: dramatis_llm::SamplerConfig {
                        temperature: 0.0,
                        ..Default::default()
                    },
                    max_new_tokens: max_tokens,
                    stop: dramatis_persona::prompt::stop_strings(),
                    ..Default::default()
                },
                &AtomicBool::new(false),
                |_| {},
            )?;
            out.push(g.text.trim().to_owned());
        }
        Ok(out)
    }

    /// The fixed prompts a run answers at each checkpoint.
    fn sample_prompts(&self, character_id: Option<i64>) -> Result<Vec<String>> {
        let prompts: Vec<String> = SAMPLE_PROMPTS.iter().map(|p| (*p).to_owned()).collect();
        self.one_turn_prompts(character_id, &prompts)
    }

    /// Each text as the user's one turn to a character (or a plain
    /// assistant), in the role-play format, ready for the reply.
    fn one_turn_prompts(&self, character_id: Option<i64>, texts: &[String]) -> Result<Vec<String>> {
        let card = match character_id {
            Some(c) => self.character(c)?.card,
            None => crate::CharacterCard {
                name: "Assistant".into(),
                ..Default::default()
            },
        };
        let persona = self.chat_persona(None)?;
        Ok(texts
            .iter()
            .map(|t| {
                let history = vec![(Speaker::User, t.clone())];
                roleplay(&card, &persona, &history)
                    .build(usize::MAX, |t| t.len())
                    .text
            })
            .collect())
    }

    /// Deletes a run's record and checkpoints (its adapter stays).
    pub fn delete_run(&self, run_id: i64) -> Result<()> {
        if self.jobs_running(&format!("train:{run_id}")) {
            return Err(Error::Conflict("stop the run before deleting it".into()));
        }
        let r = self.store().run(run_id)?;
        self.store().delete_run(run_id)?;
        let _ = std::fs::remove_dir_all(&r.dir);
        Ok(())
    }
}
