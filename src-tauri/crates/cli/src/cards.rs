//! `card import|export|lint`: character cards from the command line.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use dramatis_core::persona::cardfile::{self, CardFile};
use dramatis_core::persona::lint::Severity;
use dramatis_core::{CardFormat, CharacterFilter, Dramatis, ImportOutcome, OnDuplicate};

/// `dramatis-cli card …`.
#[derive(Args)]
pub struct CardArgs {
    #[command(subcommand)]
    cmd: CardCmd,
}

#[derive(Subcommand)]
enum CardCmd {
    /// Import character cards (PNG, JSON V1–V3, CHARX) and world-info JSON.
    Import {
        /// The files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// What to do with a card whose name and creator are already here.
        #[arg(long, value_enum, default_value = "skip")]
        on_duplicate: Duplicate,
    },
    /// Write a character as a card file.
    Export {
        /// The character: its id or its exact name.
        character: String,
        /// The file to write.
        #[arg(long, short)]
        out: PathBuf,
        /// The format (default: from the file's extension; .json is V3).
        #[arg(long, value_enum)]
        format: Option<Format>,
    },
    /// Check a card file: tokens per field, the share of the window it takes, and warnings.
    Lint {
        /// A card file.
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Duplicate {
    Replace,
    KeepBoth,
    Skip,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Png,
    JsonV2,
    JsonV3,
    Charx,
}

fn open() -> Result<Dramatis> {
    Dramatis::open_default().context("cannot open Dramatis's data folder")
}

/// Runs a `card` subcommand.
pub fn run(a: CardArgs) -> Result<()> {
    match a.cmd {
        CardCmd::Import {
            files,
            on_duplicate,
        } => import(&files, on_duplicate),
        CardCmd::Export {
            character,
            out,
            format,
        } => export(&character, &out, format),
        CardCmd::Lint { file, json } => lint(&file, json),
    }
}

fn import(files: &[PathBuf], on_duplicate: Duplicate) -> Result<()> {
    let app = open()?;
    let policy = match on_duplicate {
        Duplicate::Replace => OnDuplicate::Replace,
        Duplicate::KeepBoth => OnDuplicate::KeepBoth,
        Duplicate::Skip => OnDuplicate::Skip,
    };
    let mut failed = 0;
    for outcome in app.import_card_files(files, policy) {
        match outcome {
            ImportOutcome::Imported {
                file,
                character,
                replaced,
                changes,
                adapter,
            } => {
                let verb = if replaced { "replaced" } else { "imported" };
                println!("{file}: {verb} {} (id {})", character.name, character.id);
                if let Some(a) = adapter {
                    println!("  with its adapter \"{a}\", attached");
                }
                for c in changes {
                    println!("  note: {c}");
                }
            }
            ImportOutcome::Lorebook {
                file,
                id,
                name,
                entries,
            } => println!("{file}: lorebook \"{name}\" with {entries} entries (id {id})"),
            ImportOutcome::Duplicate { file, name, .. } | ImportOutcome::Skipped { file, name } => {
                println!(
                    "{file}: skipped, {name} is already here (--on-duplicate replace or keep-both)"
                )
            }
            ImportOutcome::Failed { file, message } => {
                failed += 1;
                eprintln!("{file}: {message}");
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} files could not be imported", files.len());
    }
    Ok(())
}

/// A character named on the command line: its id, or its exact name.
pub(crate) fn character_id(app: &Dramatis, character: &str) -> Result<i64> {
    if let Ok(id) = character.parse::<i64>() {
        return Ok(id);
    }
    let found: Vec<_> = app
        .list_characters(&CharacterFilter::default())?
        .into_iter()
        .filter(|c| c.name == character)
        .collect();
    match found.as_slice() {
        [one] => Ok(one.id),
        [] => bail!("no character is named \"{character}\""),
        _ => bail!(
            "{} characters are named \"{character}\"; give the id",
            found.len()
        ),
    }
}

fn export(character: &str, out: &std::path::Path, format: Option<Format>) -> Result<()> {
    let app = open()?;
    let id = character_id(&app, character)?;
    let ext = out
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let format = match (format, ext.as_deref()) {
        (Some(Format::Png), _) | (None, Some("png")) => CardFormat::Png,
        (Some(Format::JsonV2), _) => CardFormat::JsonV2,
        (Some(Format::JsonV3), _) | (None, Some("json")) => CardFormat::JsonV3,
        (Some(Format::Charx), _) | (None, Some("charx")) => CardFormat::Charx,
        (None, _) => bail!("say --format png|json-v2|json-v3|charx (or end the file name in one)"),
    };
    app.export_character_to(id, format, out)?;
    println!("wrote {}", out.display());
    Ok(())
}

fn lint(file: &std::path::Path, json: bool) -> Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let name = file.display().to_string();
    let card = match cardfile::read(&name, &bytes)? {
        CardFile::Card(c) => c.card,
        CardFile::Lorebook(_) => bail!("{name} is a lorebook, not a character card"),
    };
    let app = open()?;
    let l = app.lint_card(&card)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&l)?);
        return Ok(());
    }
    let r = &l.report;
    println!(
        "{}: {} (counted with {})",
        name,
        card.name,
        l.tokenizer
            .as_deref()
            .unwrap_or("an estimate: no model installed")
    );
    for f in &r.fields {
        if f.tokens > 0 {
            println!(
                "  {:<28} {:>6} tokens{}",
                f.field,
                f.tokens,
                if f.in_prompt {
                    ""
                } else {
                    "  (not in the prompt)"
                }
            );
        }
    }
    println!(
        "  permanent part: {} of {} tokens ({:.0}%), about {} turns of history fit",
        r.permanent_tokens,
        r.window,
        r.share * 100.0,
        r.history_turns_estimate
    );
    for w in &r.lints {
        let tag = match w.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Info => "info",
        };
        println!("{tag} [{}]: {}\n  fix: {}", w.field, w.message, w.fix);
    }
    Ok(())
}
