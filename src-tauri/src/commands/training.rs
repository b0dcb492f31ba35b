use std::path::PathBuf;

use dramatis_core::hub::dataset::DatasetInfo;
use dramatis_core::train::{DataOptions, Estimate, TrainConfig};
use dramatis_core::{
    Adapter, AdapterExport, Character, DataPreview, DataSource, RunView, TrainEvent, TrainRequest,
};
use tauri::ipc::Channel;
use tauri::{AppHandle, Runtime};

use super::blocking;
use crate::CommandError;

fn forward(channel: Channel<TrainEvent>) -> impl FnMut(&TrainEvent) + Send {
    move |e| {
        // A closed window drops the channel; the run goes on and is recorded.
        let _ = channel.send(e.clone());
    }
}

/// A data file's columns, row count and first rows (for the column picker).
#[tauri::command]
pub async fn inspect_dataset<R: Runtime>(
    app: AppHandle<R>,
    path: PathBuf,
) -> Result<DatasetInfo, CommandError> {
    blocking(&app, move |_| {
        Ok(dramatis_core::hub::dataset::inspect(&path, 3)?)
    })
    .await
}

/// Whether a catalog dataset is in the cache.
#[tauri::command]
pub async fn dataset_downloaded<R: Runtime>(
    app: AppHandle<R>,
    dataset_id: String,
) -> Result<bool, CommandError> {
    blocking(&app, move |d| {
        let entry = d.catalog().dataset(&dataset_id)?;
        Ok(entry
            .files
            .iter()
            .all(|f| d.hub().cache().find(f).is_some()))
    })
    .await
}

/// The validation report and the first rows as the model will see them.
#[tauri::command]
pub async fn preview_training_data<R: Runtime>(
    app: AppHandle<R>,
    model_id: i64,
    source: DataSource,
    data: DataOptions,
) -> Result<DataPreview, CommandError> {
    blocking(&app, move |d| {
        d.preview_training_data(model_id, &source, &data)
    })
    .await
}

/// Predicted peak memory and speed, with advice when it will not fit.
#[tauri::command]
pub async fn estimate_training<R: Runtime>(
    app: AppHandle<R>,
    model_id: i64,
    config: TrainConfig,
    seq_len: usize,
) -> Result<Estimate, CommandError> {
    blocking(&app, move |d| {
        d.estimate_training(model_id, &config, seq_len, config.batch_size)
    })
    .await
}

/// Starts a run; events stream through `on_event`. Resolves when it ends or stops.
#[tauri::command]
pub async fn start_training<R: Runtime>(
    app: AppHandle<R>,
    request: TrainRequest,
    on_event: Channel<TrainEvent>,
) -> Result<RunView, CommandError> {
    blocking(&app, move |d| d.train(request, &mut forward(on_event))).await
}

/// Resumes a stopped run from its last checkpoint.
#[tauri::command]
pub async fn resume_training<R: Runtime>(
    app: AppHandle<R>,
    run_id: i64,
    on_event: Channel<TrainEvent>,
) -> Result<RunView, CommandError> {
    blocking(&app, move |d| {
        d.resume_training(run_id, &mut forward(on_event))
    })
    .await
}

/// Stops a run at its next step (a checkpoint is written).
#[tauri::command]
pub async fn stop_training<R: Runtime>(
    app: AppHandle<R>,
    run_id: i64,
) -> Result<bool, CommandError> {
    blocking(&app, move |d| Ok(d.stop_training(run_id))).await
}

/// Every run, newest first.
#[tauri::command]
pub async fn list_runs<R: Runtime>(app: AppHandle<R>) -> Result<Vec<RunView>, CommandError> {
    blocking(&app, |d| d.list_runs()).await
}

/// Deletes a run and its checkpoints.
#[tauri::command]
pub async fn delete_run<R: Runtime>(app: AppHandle<R>, run_id: i64) -> Result<(), CommandError> {
    blocking(&app, move |d| d.delete_run(run_id)).await
}

/// Every adapter, newest first.
#[tauri::command]
pub async fn list_adapters<R: Runtime>(app: AppHandle<R>) -> Result<Vec<Adapter>, CommandError> {
    blocking(&app, |d| d.list_adapters()).await
}

/// Attaches an adapter to a character (or detaches it with `null`).
#[tauri::command]
pub async fn attach_adapter<R: Runtime>(
    app: AppHandle<R>,
    character_id: i64,
    adapter_id: Option<i64>,
) -> Result<Character, CommandError> {
    blocking(&app, move |d| d.attach_adapter(character_id, adapter_id)).await
}

/// Deletes an adapter and its files.
#[tauri::command]
pub async fn delete_adapter<R: Runtime>(
    app: AppHandle<R>,
    adapter_id: i64,
) -> Result<(), CommandError> {
    blocking(&app, move |d| d.delete_adapter(adapter_id)).await
}

/// Writes an adapter as a PEFT folder, a GGUF LoRA, or merged into its base.
#[tauri::command]
pub async fn export_adapter<R: Runtime>(
    app: AppHandle<R>,
    adapter_id: i64,
    format: AdapterExport,
    path: PathBuf,
) -> Result<(), CommandError> {
    blocking(&app, move |d| d.export_adapter(adapter_id, format, &path)).await
}

/// Greedy replies to prompts with an adapter or the base alone.
#[tauri::command]
pub async fn sample_replies<R: Runtime>(
    app: AppHandle<R>,
    model_id: i64,
    adapter_id: Option<i64>,
    character_id: Option<i64>,
    prompts: Vec<String>,
) -> Result<Vec<String>, CommandError> {
    blocking(&app, move |d| {
        d.sample_replies(model_id, adapter_id, character_id, &prompts, 60)
    })
    .await
}
