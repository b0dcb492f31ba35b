//! `train` and `export`: LoRA fine-tuning from the terminal.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use dramatis_core::hub::dataset::read_text_column;
use dramatis_core::llm::{DeviceChoice, PhiTokenizer, load_model};
use dramatis_train::data::prepare;
use dramatis_train::{
    DataOptions, LossOn, Outcome, Schedule, TrainConfig, TrainingRun, export_checkpoint,
    export_peft,
};

#[derive(Clone, Copy, ValueEnum)]
enum Preset {
    /// r 16, alpha 16, dropout 0.05, q/k/v/dense/fc1/fc2, lr 2e-4, batch 2, 1 epoch, first 1000 rows.
    Seed,
    /// A few steps to check that everything works.
    Quick,
}

/// `dramatis-cli train`.
#[derive(Args)]
pub struct TrainArgs {
    /// The base: a .gguf file (QLoRA on a quantized base) or a Hugging Face folder.
    #[arg(long)]
    model: PathBuf,
    /// tokenizer.json (default: next to the model).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Training data: .parquet, .jsonl or .csv.
    #[arg(long)]
    data: PathBuf,
    /// The column holding the text.
    #[arg(long, default_value = "text")]
    column: String,
    /// The run folder: checkpoints, and the adapter at the end. An existing run there is resumed.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "seed")]
    preset: Preset,
    #[arg(long)]
    rank: Option<usize>,
    #[arg(long)]
    alpha: Option<f64>,
    #[arg(long)]
    dropout: Option<f32>,
    /// Comma-separated: q_proj,k_proj,v_proj,dense,fc1,fc2.
    #[arg(long, value_delimiter = ',')]
    targets: Option<Vec<String>>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    batch: Option<usize>,
    #[arg(long)]
    accum: Option<usize>,
    #[arg(long)]
    epochs: Option<usize>,
    #[arg(long)]
    max_steps: Option<usize>,
    /// Warmup steps for a cosine schedule (omit for a constant rate).
    #[arg(long)]
    warmup: Option<usize>,
    #[arg(long)]
    max_len: Option<usize>,
    /// Use only the first N rows.
    #[arg(long)]
    limit: Option<usize>,
    #[arg(long, default_value_t = 0.05)]
    eval_fraction: f64,
    /// Count the loss on the character's turns only.
    #[arg(long)]
    assistant_only: bool,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, default_value = "best")]
    device: DeviceChoice,
}

/// `dramatis-cli export`.
#[derive(Args)]
pub struct ExportArgs {
    /// A run folder written by `train`.
    #[arg(long)]
    run: PathBuf,
    /// Where to write the PEFT adapter folder.
    #[arg(long)]
    out: PathBuf,
}

pub fn train(a: TrainArgs, cancel: &AtomicBool) -> Result<()> {
    let (mut config, mut data_opts) = match a.preset {
        Preset::Seed => (
            TrainConfig::seed_recipe(),
            DataOptions {
                limit: Some(1000),
                ..DataOptions::default()
            },
        ),
        Preset::Quick => (
            TrainConfig {
                max_steps: Some(10),
                eval_every: 5,
                checkpoint_every: 5,
                ..TrainConfig::seed_recipe()
            },
            DataOptions {
                limit: Some(64),
                max_len: 256,
                ..DataOptions::default()
            },
        ),
    };
    macro_rules! set {
        ($field:expr, $v:expr) => {
            if let Some(v) = $v {
                $field = v;
            }
        };
    }
    set!(config.r, a.rank);
    set!(config.alpha, a.alpha);
    set!(config.dropout, a.dropout);
    set!(config.targets, a.targets);
    set!(config.lr, a.lr);
    set!(config.batch_size, a.batch);
    set!(config.grad_accum, a.accum);
    set!(config.epochs, a.epochs);
    set!(config.seed, a.seed);
    if a.max_steps.is_some() {
        config.max_steps = a.max_steps;
    }
    if let Some(w) = a.warmup {
        config.schedule = Schedule::Cosine { warmup: w };
    }
    set!(data_opts.max_len, a.max_len);
    if a.limit.is_some() {
        data_opts.limit = a.limit;
    }
    data_opts.eval_fraction = a.eval_fraction;
    data_opts.seed = config.seed;
    if a.assistant_only {
        data_opts.loss_on = LossOn::AssistantOnly;
    }

    let device = a.device.open().context("cannot open the device")?;
    let tok_path = match &a.tokenizer {
        Some(t) => t.clone(),
        None => {
            let dir = if a.model.is_dir() {
                a.model.clone()
            } else {
                a.model.parent().map(PathBuf::from).unwrap_or_default()
            };
            dir.join("tokenizer.json")
        }
    };
    let tokenizer = PhiTokenizer::from_file(&tok_path)?;
    let column = read_text_column(&a.data, &a.column)?;
    let prepared = prepare(&column.texts, column.problems.len(), &tokenizer, &data_opts)?;
    let r = &prepared.report;
    eprintln!(
        "data: {} rows, {} used ({} train, {} eval), {} tokens, longest {}, {} truncated to {}, {} empty, {} malformed",
        r.rows,
        r.used,
        r.train_rows,
        r.eval_rows,
        r.tokens,
        r.longest,
        r.truncated,
        data_opts.max_len,
        r.empty,
        r.malformed
    );
    for p in column.problems.iter().take(5) {
        eprintln!("  row {}: {}", p.row, p.message);
    }
    let model = Arc::new(load_model(&a.model, &device)?);
    tokenizer.check_fits(model.config().vocab_size)?;
    let eos = tokenizer.eos_id().unwrap_or(0);
    let mut run = TrainingRun::new(model, prepared, config, &a.out, eos)?;
    if run.step() > 0 {
        eprintln!("resuming at step {}", run.step());
    }
    let bar = indicatif::ProgressBar::new(run.total_steps() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} steps  {msg}  ETA {eta}")
            .context("progress bar template")?,
    );
    bar.set_position(run.step() as u64);
    let outcome = run.run(
        &mut |p| {
            bar.set_position(p.step as u64);
            let eval = p
                .eval_loss
                .map(|e| format!(" eval {e:.3}"))
                .unwrap_or_default();
            bar.set_message(format!(
                "loss {:.3}{eval}  {:.0} tok/s",
                p.loss, p.tokens_per_sec
            ));
            if p.eval_loss.is_some() || p.checkpoint {
                bar.println(format!(
                    "step {}: loss {:.4}{eval}{}",
                    p.step,
                    p.loss,
                    if p.checkpoint { " (checkpoint)" } else { "" }
                ));
            }
        },
        cancel,
    )?;
    bar.finish_and_clear();
    match outcome {
        Outcome::Cancelled => {
            eprintln!("stopped at step {}; the same command resumes", run.step());
            std::process::exit(130);
        }
        Outcome::Finished => {
            let out = a.out.join("adapter");
            export_peft(&run, &out)?;
            eprintln!(
                "done: {} steps; PEFT adapter in {}",
                run.step(),
                out.display()
            );
        }
    }
    Ok(())
}

pub fn export(a: ExportArgs) -> Result<()> {
    if !a.run.join("checkpoint").is_dir() {
        bail!(
            "{} holds no checkpoint: run `dramatis-cli train --out {}` first",
            a.run.display(),
            a.run.display()
        );
    }
    export_checkpoint(&a.run, &a.out)?;
    eprintln!("wrote the PEFT adapter to {}", a.out.display());
    Ok(())
}
