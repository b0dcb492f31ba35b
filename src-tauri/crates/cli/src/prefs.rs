//! `prefs export|import`: a character's preference pairs as TRL DPO JSONL.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use dramatis_core::Dramatis;

/// `dramatis-cli prefs …`.
#[derive(Args)]
pub struct PrefsArgs {
    #[command(subcommand)]
    cmd: PrefsCmd,
}

#[derive(Subcommand)]
enum PrefsCmd {
    /// Write a character's pairs (swipes and edits, without the ones left out) as
    /// JSONL with `prompt`, `chosen`, `rejected`: what TRL's DPOTrainer reads.
    Export {
        /// The character: its id or its exact name.
        character: String,
        /// The file to write (`-` for standard output).
        #[arg(long, short, default_value = "-")]
        out: PathBuf,
    },
    /// Add pairs from TRL DPO JSONL (`prompt`, `chosen`, `rejected`: text or
    /// lists of messages) to a character; they show in its Preferences and train
    /// with "Learn from my choices".
    Import {
        /// The character: its id or its exact name.
        character: String,
        /// The JSONL file.
        file: PathBuf,
    },
}

/// Runs a `prefs` subcommand.
pub fn run(a: PrefsArgs) -> Result<()> {
    let app = Dramatis::open_default().context("cannot open Dramatis's data folder")?;
    match a.cmd {
        PrefsCmd::Export { character, out } => {
            let id = crate::cards::character_id(&app, &character)?;
            let jsonl = app.export_preferences(id)?;
            let n = jsonl.lines().count();
            if out.as_os_str() == "-" {
                print!("{jsonl}");
            } else {
                dramatis_core::write_atomically(&out, jsonl.as_bytes())?;
                eprintln!("wrote {n} pairs to {}", out.display());
            }
            Ok(())
        }
        PrefsCmd::Import { character, file } => {
            let id = crate::cards::character_id(&app, &character)?;
            let r = app.import_preferences(id, &file)?;
            for c in &r.changed {
                eprintln!("changed: {c}");
            }
            for p in &r.skipped {
                eprintln!("skipped line {}: {}", p.line, p.message);
            }
            if r.skipped_count > r.skipped.len() {
                eprintln!(
                    "…and {} more lines skipped",
                    r.skipped_count - r.skipped.len()
                );
            }
            println!(
                "imported {} pairs ({} already there, {} lines skipped)",
                r.added, r.duplicates, r.skipped_count
            );
            Ok(())
        }
    }
}
