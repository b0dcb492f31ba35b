use std::path::PathBuf;

use dramatis_core::hub::DownloadProgress;
use dramatis_core::hub::dataset::DatasetInfo;
use dramatis_core::llm::{QuantType, QuantizeProgress};
use dramatis_core::{Model, ModelsOverview};
use tauri::ipc::Channel;
use tauri::{AppHandle, Runtime};

use super::blocking;
use crate::CommandError;

/// Installed models, the catalog, disk usage and the compute device.
#[tauri::command]
pub async fn models_overview<R: Runtime>(
    app: AppHandle<R>,
) -> Result<ModelsOverview, CommandError> {
    blocking(&app, |d| d.models_overview()).await
}

/// Downloads (or resumes) a catalog model; progress streams through
/// `on_progress` about ten times a second. Resolves when it is installed.
#[tauri::command]
pub async fn download_model<R: Runtime>(
    app: AppHandle<R>,
    catalog_id: String,
    on_progress: Channel<DownloadProgress>,
) -> Result<Model, CommandError> {
    blocking(&app, move |d| {
        d.download_model(&catalog_id, &mut |p| {
            // A closed window drops the channel; the download goes on.
            let _ = on_progress.send(p.clone());
        })
    })
    .await
}

/// Downloads (or resumes) a catalog dataset and reads its shape.
#[tauri::command]
pub async fn download_dataset<R: Runtime>(
    app: AppHandle<R>,
    dataset_id: String,
    on_progress: Channel<DownloadProgress>,
) -> Result<DatasetInfo, CommandError> {
    blocking(&app, move |d| {
        d.download_dataset(&dataset_id, &mut |p| {
            let _ = on_progress.send(p.clone());
        })
    })
    .await
}

/// Pauses (keeps the partial file) or cancels (removes it) a download.
#[tauri::command]
pub async fn stop_download<R: Runtime>(
    app: AppHandle<R>,
    catalog_id: String,
    discard: bool,
) -> Result<bool, CommandError> {
    blocking(&app, move |d| Ok(d.stop_download(&catalog_id, discard))).await
}

/// Checks and registers a local .gguf file or Hugging Face folder.
#[tauri::command]
pub async fn import_model<R: Runtime>(
    app: AppHandle<R>,
    path: PathBuf,
) -> Result<Model, CommandError> {
    blocking(&app, move |d| d.import_model(&path)).await
}

/// Forgets a model (removing downloaded files; imports stay on disk).
#[tauri::command]
pub async fn delete_model<R: Runtime>(app: AppHandle<R>, id: i64) -> Result<(), CommandError> {
    blocking(&app, move |d| d.delete_model(id)).await
}

/// Makes a model the one chats use by default.
#[tauri::command]
pub async fn set_default_model<R: Runtime>(
    app: AppHandle<R>,
    id: i64,
) -> Result<Model, CommandError> {
    blocking(&app, move |d| d.set_default_model(id)).await
}

/// Quantizes an installed safetensors model (`quant`: q4_k, q5_k, q8_0, f16)
/// into a GGUF file that is then installed; one progress report per tensor.
/// `stop_download("quantize:<id>", true)` cancels it.
#[tauri::command]
pub async fn quantize_model<R: Runtime>(
    app: AppHandle<R>,
    id: i64,
    quant: String,
    on_progress: Channel<QuantizeProgress>,
) -> Result<Model, CommandError> {
    let qt: QuantType = quant.parse().map_err(|message: String| CommandError {
        kind: dramatis_core::ErrorKind::Validation,
        message,
        fields: Vec::new(),
    })?;
    blocking(&app, move |d| {
        d.quantize_model(id, qt, &mut |p| {
            let _ = on_progress.send(p.clone());
        })
    })
    .await
}
