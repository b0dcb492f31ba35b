//! `prefs export`: a character's preference pairs as TRL DPO JSONL.

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
    }
}
