//! Installed models: downloads from the catalog, local imports, the default
//! model, and what the machine can run them on.
//!
//! A model is registered only after its files are verified (hash for
//! downloads) and inspected (architecture, every tensor's shape, a tokenizer
//! that fits); a refused file leaves no row behind.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use dramatis_hub::{CancelToken, CatalogModel, DownloadProgress, RemoteFile, WeightFormat};
use dramatis_llm::{ModelFormat, PhiTokenizer, QuantType, QuantizeProgress, inspect_model};
use dramatis_store::ModelRow;
use serde::Serialize;

use crate::{Dramatis, Error, Result};

/// The setting naming the model chats use by default.
const DEFAULT_MODEL: &str = "default_model";

/// An installed model, for the UI and the CLI.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Model {
    /// Row id.
    pub id: i64,
    /// Display name.
    pub name: String,
    /// `catalog`, `import` or `quantized`.
    pub source: String,
    /// The catalog entry it came from.
    pub catalog_id: Option<String>,
    /// `gguf` or `safetensors`.
    pub format: String,
    /// `Q4_K_M`, `F16`...
    pub quantization: String,
    /// The .gguf file or the safetensors folder.
    pub path: String,
    /// Its tokenizer.json.
    pub tokenizer_path: String,
    /// Bytes on disk.
    pub size_bytes: u64,
    /// sha256 of a one-file download.
    pub sha256: Option<String>,
    /// Chats use it unless told otherwise.
    pub is_default: bool,
    /// False when its files have gone missing since.
    pub present: bool,
}

/// A catalog model and whether it is here.
#[derive(Debug, Clone, Serialize)]
pub struct CatalogItem {
    /// The catalog's entry.
    #[serde(flatten)]
    pub entry: CatalogModel,
    /// The installed model made from it.
    pub installed_id: Option<i64>,
    /// A download is running now.
    pub downloading: bool,
    /// Bytes already fetched by an unfinished download (resumable).
    pub partial_bytes: u64,
}

/// The compute device models run on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceInfo {
    /// `cuda`, `metal` or `cpu`.
    pub kind: &'static str,
    /// A name for people.
    pub name: String,
    /// Its memory (for the CPU: the machine's RAM), when known.
    pub memory_bytes: Option<u64>,
}

/// Everything the Models view shows.
#[derive(Debug, Clone, Serialize)]
pub struct ModelsOverview {
    /// Installed models.
    pub installed: Vec<Model>,
    /// What can be downloaded.
    pub catalog: Vec<CatalogItem>,
    /// Where downloads go.
    pub cache_dir: String,
    /// Bytes the installed models take.
    pub used_bytes: u64,
    /// Free bytes where downloads go.
    pub free_bytes: Option<u64>,
    /// The compute device.
    pub device: DeviceInfo,
}

/// Downloads in flight, by catalog id.
#[derive(Debug, Default)]
pub(crate) struct Downloads(Mutex<HashMap<String, CancelToken>>);

pub(crate) struct DownloadGuard<'a> {
    downloads: &'a Downloads,
    id: String,
}

impl Drop for DownloadGuard<'_> {
    fn drop(&mut self) {
        self.downloads.0.lock().unwrap().remove(&self.id);
    }
}

impl Downloads {
    fn start(&self, id: &str) -> Result<(DownloadGuard<'_>, CancelToken)> {
        let mut map = self.0.lock().unwrap();
        if map.contains_key(id) {
            return Err(Error::Conflict(format!("`{id}` is already downloading")));
        }
        let token = CancelToken::new();
        map.insert(id.to_owned(), token.clone());
        Ok((
            DownloadGuard {
                downloads: self,
                id: id.to_owned(),
            },
            token,
        ))
    }

    fn running(&self, id: &str) -> bool {
        self.0.lock().unwrap().contains_key(id)
    }

    fn stop(&self, id: &str, discard: bool) -> bool {
        match self.0.lock().unwrap().get(id) {
            Some(t) if discard => {
                t.cancel();
                true
            }
            Some(t) => {
                t.pause();
                true
            }
            None => false,
        }
    }
}

fn format_name(f: ModelFormat) -> &'static str {
    match f {
        ModelFormat::Gguf => "gguf",
        ModelFormat::Safetensors => "safetensors",
    }
}

fn path_string(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// The machine's RAM, where the OS tells it cheaply.
fn system_memory() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        dramatis_train::proc_bytes("/proc/meminfo", "MemTotal")
    }
    #[cfg(target_os = "macos")]
    {
        let out = std::process::Command::new("sysctl")
            .args(["-n", "hw.memsize"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    }
    #[cfg(not(any(target_os = "linux", target_os = "macos")))]
    None
}

/// The first GPU's memory as nvidia-smi reports it.
fn cuda_memory() -> Option<u64> {
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=memory.total", "--format=csv,noheader,nounits"])
        .output()
        .ok()?;
    let mib: u64 = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()?;
    Some(mib << 20)
}

impl Dramatis {
    /// Registers a long job (download, quantizing, training) under `key`.
    pub(crate) fn start_job(&self, key: &str) -> Result<(DownloadGuard<'_>, CancelToken)> {
        self.downloads.start(key)
    }

    /// Whether a job runs under `key`.
    pub(crate) fn jobs_running(&self, key: &str) -> bool {
        self.downloads.running(key)
    }

    /// Asks the job under `key` to stop (keeping what it did).
    pub(crate) fn stop_job(&self, key: &str) -> bool {
        self.downloads.stop(key, false)
    }

    /// The compute device models will run on.
    pub fn device_info(&self) -> DeviceInfo {
        let d = self.device();
        let name = dramatis_llm::device_name(d);
        match d {
            dramatis_llm::Device::Cuda(_) => DeviceInfo {
                kind: "cuda",
                name,
                memory_bytes: cuda_memory(),
            },
            // Apple GPUs share the machine's memory.
            dramatis_llm::Device::Metal(_) => DeviceInfo {
                kind: "metal",
                name,
                memory_bytes: system_memory(),
            },
            dramatis_llm::Device::Cpu => DeviceInfo {
                kind: "cpu",
                name,
                memory_bytes: system_memory(),
            },
        }
    }

    fn to_model(&self, r: ModelRow, default: Option<i64>) -> Model {
        Model {
            present: Path::new(&r.path).exists() && Path::new(&r.tokenizer_path).is_file(),
            is_default: default == Some(r.id),
            id: r.id,
            name: r.name,
            source: r.source,
            catalog_id: r.catalog_id,
            format: r.format,
            quantization: r.quantization,
            path: r.path,
            tokenizer_path: r.tokenizer_path,
            size_bytes: r.size_bytes,
            sha256: r.sha256,
        }
    }

    /// Installed models, oldest first.
    pub fn list_models(&self) -> Result<Vec<Model>> {
        let default = self.default_model_id()?;
        Ok(self
            .store()
            .list_models()?
            .into_iter()
            .map(|r| self.to_model(r, default))
            .collect())
    }

    /// One installed model.
    pub fn model(&self, id: i64) -> Result<Model> {
        let default = self.default_model_id()?;
        Ok(self.to_model(self.store().model(id)?, default))
    }

    fn default_model_id(&self) -> Result<Option<i64>> {
        let id = self.store().setting::<i64>(DEFAULT_MODEL)?;
        // A stale setting (its model deleted) falls back to the first model.
        let rows = self.store().list_models()?;
        Ok(match id {
            Some(id) if rows.iter().any(|r| r.id == id) => Some(id),
            _ => rows.first().map(|r| r.id),
        })
    }

    /// The model chats use unless told otherwise.
    pub fn default_model(&self) -> Result<Option<Model>> {
        match self.default_model_id()? {
            Some(id) => Ok(Some(self.model(id)?)),
            None => Ok(None),
        }
    }

    /// Makes `id` the default model.
    pub fn set_default_model(&self, id: i64) -> Result<Model> {
        self.store().model(id)?;
        self.store().set_setting(DEFAULT_MODEL, &id)?;
        self.model(id)
    }

    /// Everything the Models view shows.
    pub fn models_overview(&self) -> Result<ModelsOverview> {
        let installed = self.list_models()?;
        let cache = self.hub().cache();
        let catalog = self
            .catalog()
            .models
            .iter()
            .map(|m| CatalogItem {
                installed_id: installed
                    .iter()
                    .find(|i| i.catalog_id.as_deref() == Some(&m.id))
                    .map(|i| i.id),
                downloading: self.downloads.running(&m.id),
                partial_bytes: m.files.iter().map(|f| cache.partial_bytes(f)).sum(),
                entry: m.clone(),
            })
            .collect();
        Ok(ModelsOverview {
            used_bytes: installed.iter().map(|m| m.size_bytes).sum(),
            free_bytes: (self.hub().options().free_space)(cache.root()).ok(),
            cache_dir: path_string(cache.root()),
            installed,
            catalog,
            device: self.device_info(),
        })
    }

    /// Downloads a catalog model (resuming an earlier partial download),
    /// verifies and inspects it, and registers it. Blocks; progress about
    /// ten times a second. The first model installed becomes the default.
    pub fn download_model(
        &self,
        catalog_id: &str,
        on_progress: &mut (dyn FnMut(&DownloadProgress) + Send),
    ) -> Result<Model> {
        let entry = self.catalog().model(catalog_id)?.clone();
        let (_guard, cancel) = self.downloads.start(catalog_id)?;
        let fetched = self.hub().fetch(&entry.all_files(), on_progress, &cancel)?;
        let find = |f: &RemoteFile| {
            fetched
                .iter()
                .find(|x| &x.file == f)
                .expect("fetch returns every file asked for")
        };
        let tokenizer = find(&entry.tokenizer).path.clone();
        let weights: Vec<&dramatis_hub::Fetched> = entry.files.iter().map(find).collect();
        let path = match entry.format {
            WeightFormat::Gguf => weights[0].path.clone(),
            WeightFormat::Safetensors => weights[0]
                .path
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
        };
        let (info, _) = check_model(&path, &tokenizer)?;
        let row = ModelRow {
            id: 0,
            name: entry.name.clone(),
            source: "catalog".into(),
            catalog_id: Some(entry.id.clone()),
            format: format_name(info.format).into(),
            quantization: entry.quantization.clone(),
            path: path_string(&path),
            tokenizer_path: path_string(&tokenizer),
            size_bytes: weights.iter().map(|w| w.bytes).sum(),
            sha256: (weights.len() == 1).then(|| weights[0].sha256.clone()),
            files: weights.iter().map(|w| path_string(&w.path)).collect(),
            added_at: 0,
        };
        let id = self.store().upsert_model(&row)?;
        tracing::info!(catalog_id, id, "model installed");
        self.model(id)
    }

    /// Downloads a catalog dataset (resumable, verified) and reads its shape.
    pub fn download_dataset(
        &self,
        dataset_id: &str,
        on_progress: &mut (dyn FnMut(&DownloadProgress) + Send),
    ) -> Result<dramatis_hub::dataset::DatasetInfo> {
        let entry = self.catalog().dataset(dataset_id)?.clone();
        let (_guard, cancel) = self.downloads.start(dataset_id)?;
        let fetched = self.hub().fetch(&entry.files, on_progress, &cancel)?;
        Ok(dramatis_hub::dataset::inspect(&fetched[0].path, 3)?)
    }

    /// Stops a running download: `discard` removes what was fetched,
    /// otherwise it stays for a resume. False when none was running.
    pub fn stop_download(&self, catalog_id: &str, discard: bool) -> bool {
        let stopped = self.downloads.stop(catalog_id, discard);
        if !stopped && discard {
            // Not running (paused earlier, or the app restarted): drop the parts.
            let files = match (
                self.catalog().model(catalog_id),
                self.catalog().dataset(catalog_id),
            ) {
                (Ok(m), _) => m.files.clone(),
                (_, Ok(d)) => d.files.clone(),
                _ => Vec::new(),
            };
            {
                for f in &files {
                    let _ = self.hub().cache().remove_partials(f);
                }
            }
        }
        stopped
    }

    /// Registers a local model: a .gguf file or a Hugging Face folder
    /// (config.json and safetensors). Its tokenizer.json is looked for beside
    /// it, else Phi-2's tokenizer from the cache. Refused files leave nothing.
    pub fn import_model(&self, path: &Path) -> Result<Model> {
        let path = std::fs::canonicalize(path).map_err(|e| Error::Io {
            context: format!("cannot open {}", path.display()),
            source: e,
        })?;
        let tokenizer = self.tokenizer_for(&path)?;
        let (info, _) = check_model(&path, &tokenizer)?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "Imported model".into());
        let files = if path.is_dir() {
            Vec::new()
        } else {
            vec![path_string(&path)]
        };
        let id = self.store().upsert_model(&ModelRow {
            id: 0,
            name,
            source: "import".into(),
            catalog_id: None,
            format: format_name(info.format).into(),
            quantization: info.quantization,
            path: path_string(&path),
            tokenizer_path: path_string(&tokenizer),
            size_bytes: info.bytes,
            sha256: None,
            files,
            added_at: 0,
        })?;
        tracing::info!(id, path = %path.display(), "model imported");
        self.model(id)
    }

    fn tokenizer_for(&self, model: &Path) -> Result<PathBuf> {
        let dir = if model.is_dir() {
            model
        } else {
            model.parent().unwrap_or(Path::new("."))
        };
        let beside = dir.join("tokenizer.json");
        if beside.is_file() {
            return Ok(beside);
        }
        let phi2 = &self.catalog().default_model().tokenizer;
        self.hub().cache().find(phi2).ok_or_else(|| {
            Error::Conflict(format!(
                "no tokenizer.json beside {}: put Phi-2's tokenizer.json there, or download a model from the catalog first (it brings the tokenizer)",
                model.display()
            ))
        })
    }

    /// Forgets a model. Downloaded weights are removed from the cache and
    /// files quantized here are deleted; an imported file is left where it is.
    pub fn delete_model(&self, id: i64) -> Result<()> {
        let row = self.store().model(id)?;
        self.store().delete_model(id)?;
        match row.source.as_str() {
            "catalog" => {
                if let Some(entry) = row
                    .catalog_id
                    .as_deref()
                    .and_then(|c| self.catalog().model(c).ok())
                {
                    for f in &entry.files {
                        self.hub().cache().remove(f).map_err(|e| Error::Io {
                            context: format!("cannot remove {}", f.display()),
                            source: e,
                        })?;
                    }
                }
            }
            "quantized" => {
                for f in &row.files {
                    let _ = std::fs::remove_file(f);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

impl Dramatis {
    /// Quantizes an installed safetensors model into a GGUF file in the data
    /// folder and registers it. Blocks; one progress report per tensor.
    /// Stop it with `stop_download("quantize:<id>", true)`.
    pub fn quantize_model(
        &self,
        id: i64,
        qt: QuantType,
        on_progress: &mut (dyn FnMut(&QuantizeProgress) + Send),
    ) -> Result<Model> {
        let row = self.store().model(id)?;
        if row.format != "safetensors" {
            return Err(Error::Conflict(format!(
                "{} is already a GGUF file; only a safetensors model can be quantized",
                row.name
            )));
        }
        let src = PathBuf::from(&row.path);
        let info = inspect_model(&src)?;
        let dir = self.data_dir().join("models");
        std::fs::create_dir_all(&dir).map_err(|e| Error::Io {
            context: format!("cannot create {}", dir.display()),
            source: e,
        })?;
        let needed = (info.parameters as f64 * qt.bits_per_weight() / 8.0) as u64 + (64 << 20);
        if let Ok(free) = (self.hub().options().free_space)(&dir)
            && free < needed
        {
            return Err(dramatis_hub::Error::DiskFull { dir, needed, free }.into());
        }
        let slug: String = row
            .name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        let out = dir.join(format!(
            "{}-{}-{id}.gguf",
            slug.trim_matches('-'),
            qt.name().to_lowercase()
        ));
        let key = format!("quantize:{id}");
        let (_guard, token) = self.downloads.start(&key)?;
        let flag = AtomicBool::new(false);
        let done = AtomicBool::new(false);
        let result = std::thread::scope(|s| {
            s.spawn(|| {
                while !done.load(Ordering::SeqCst) {
                    if token.is_stopped() {
                        flag.store(true, Ordering::SeqCst);
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            });
            let r = dramatis_llm::quantize_safetensors(&src, &out, qt, &flag, |p| on_progress(&p));
            done.store(true, Ordering::SeqCst);
            r
        });
        result?;
        let tokenizer = PathBuf::from(&row.tokenizer_path);
        let checked = check_model(&out, &tokenizer);
        let (info, _) = match checked {
            Ok(x) => x,
            Err(e) => {
                let _ = std::fs::remove_file(&out);
                return Err(e);
            }
        };
        let id = self.store().upsert_model(&ModelRow {
            id: 0,
            name: format!(
                "{} · {}",
                row.name.split(" · ").next().unwrap_or(&row.name),
                qt.name()
            ),
            source: "quantized".into(),
            catalog_id: None,
            format: "gguf".into(),
            quantization: qt.name().into(),
            path: path_string(&out),
            tokenizer_path: row.tokenizer_path.clone(),
            size_bytes: info.bytes,
            sha256: None,
            files: vec![path_string(&out)],
            added_at: 0,
        })?;
        self.model(id)
    }
}

/// Inspects weights and tokenizer together; what passes loads.
fn check_model(path: &Path, tokenizer: &Path) -> Result<(dramatis_llm::ModelInfo, PhiTokenizer)> {
    let info = inspect_model(path)?;
    let tok = PhiTokenizer::from_file(tokenizer)?;
    tok.check_fits(info.config.vocab_size)?;
    Ok((info, tok))
}
