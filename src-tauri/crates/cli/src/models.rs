//! `models`, `download` and `import`: the Models view in a terminal.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use dramatis_core::Dramatis;
use dramatis_core::hub::{DownloadProgress, Phase, human_bytes};

/// `dramatis-cli models`.
#[derive(Args)]
pub struct ModelsArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// `dramatis-cli download <id>`.
#[derive(Args)]
pub struct DownloadArgs {
    /// A catalog id (`dramatis-cli models` lists them), e.g. phi-2-q4_k_m or roleplay.
    id: String,
}

/// `dramatis-cli import <path>`.
#[derive(Args)]
pub struct ImportArgs {
    /// A .gguf file or a Hugging Face folder (config.json + safetensors).
    path: PathBuf,
}

fn open() -> Result<Dramatis> {
    Dramatis::open_default().context("cannot open Dramatis's data folder")
}

/// Lists installed models and the catalog.
pub fn list(a: ModelsArgs) -> Result<()> {
    let app = open()?;
    let o = app.models_overview()?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&o)?);
        return Ok(());
    }
    println!("Installed:");
    if o.installed.is_empty() {
        println!(
            "  none yet: `dramatis-cli download {}`",
            app.catalog().default_model().id
        );
    }
    for m in &o.installed {
        println!(
            "  {}{:>3}  {:<28} {:<8} {:>9}  {}{}",
            if m.is_default { "*" } else { " " },
            m.id,
            m.name,
            m.quantization,
            human_bytes(m.size_bytes),
            m.path,
            if m.present { "" } else { "  (files missing)" }
        );
    }
    println!("\nCatalog:");
    for c in &o.catalog {
        let state = match (c.installed_id, c.partial_bytes) {
            (Some(_), _) => "installed".to_owned(),
            (None, 0) => String::new(),
            (None, p) => format!("{} fetched, resumable", human_bytes(p)),
        };
        println!(
            "  {:<14} {:<28} {:>9}  {state}",
            c.entry.id,
            c.entry.name,
            human_bytes(c.entry.approx_bytes)
        );
    }
    for d in &app.catalog().datasets {
        println!(
            "  {:<14} {:<28} {:>9}  dataset, {} rows",
            d.id,
            d.name,
            human_bytes(d.approx_bytes),
            d.approx_rows
        );
    }
    println!(
        "\nDevice: {}{}",
        o.device.name,
        o.device
            .memory_bytes
            .map(|m| format!(", {}", human_bytes(m)))
            .unwrap_or_default()
    );
    println!(
        "Cache: {}{}",
        o.cache_dir,
        o.free_bytes
            .map(|f| format!(" ({} free)", human_bytes(f)))
            .unwrap_or_default()
    );
    Ok(())
}

/// Downloads a catalog model or dataset with a progress bar. Ctrl-C pauses
/// (run the same command again to resume).
pub fn download(a: DownloadArgs, cancel: &AtomicBool) -> Result<()> {
    let app = open()?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:12} {bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .context("progress bar template")?,
    );
    let mut on_progress = |p: &DownloadProgress| {
        bar.set_length(p.total_bytes);
        bar.set_position(p.done_bytes);
        bar.set_message(match p.phase {
            Phase::Checking => "checking",
            Phase::Downloading => "downloading",
            Phase::Verifying => "verifying",
        });
    };
    let is_dataset = app.catalog().dataset(&a.id).is_ok();
    let done = AtomicBool::new(false);
    let result = std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                if cancel.load(Ordering::SeqCst) {
                    app.stop_download(&a.id, false);
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let r = if is_dataset {
            app.download_dataset(&a.id, &mut on_progress)
                .map(|info| format!("{} ({} rows)", info.path.display(), info.rows))
        } else {
            app.download_model(&a.id, &mut on_progress).map(|m| {
                format!(
                    "{} (model {}, sha256 {})",
                    m.path,
                    m.id,
                    m.sha256.unwrap_or_default()
                )
            })
        };
        done.store(true, Ordering::SeqCst);
        r
    });
    bar.finish_and_clear();
    match result {
        Ok(what) => {
            eprintln!("installed {what}");
            Ok(())
        }
        Err(e) if e.kind() == dramatis_core::ErrorKind::Cancelled => {
            eprintln!("paused; run the same command again to resume");
            std::process::exit(130)
        }
        Err(e) => Err(e.into()),
    }
}

/// Checks and registers a local model.
pub fn import(a: ImportArgs) -> Result<()> {
    let app = open()?;
    let m = app.import_model(&a.path)?;
    eprintln!(
        "imported {} as model {} ({}, {}, {})",
        m.path,
        m.id,
        m.format,
        m.quantization,
        human_bytes(m.size_bytes)
    );
    Ok(())
}
