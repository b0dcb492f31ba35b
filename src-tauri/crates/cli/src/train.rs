//! `train` and `export`: LoRA fine-tuning from the terminal.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use dramatis_core::hub::dataset::read_text_column;
use dramatis_core::llm::{
    Device, DeviceChoice, LoraAdapter, PhiTokenizer, QuantType, load_model, load_model_as,
    merge_to_gguf, write_lora_gguf,
};
use dramatis_train::data::prepare;
use dramatis_train::{
    DataOptions, LossOn, Objective, Outcome, Schedule, TrainConfig, TrainData, TrainingRun,
    export_checkpoint, export_peft, prepare_pairs,
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
    /// Training data: .parquet, .jsonl or .csv; for `--objective dpo`, JSONL of
    /// preference pairs (`prompt`, `chosen`, `rejected`, as TRL's DPOTrainer reads).
    #[arg(long)]
    data: PathBuf,
    /// sft: cross-entropy on the text; dpo: direct preference optimization on pairs.
    #[arg(long, value_enum, default_value = "sft")]
    objective: ObjectiveArg,
    /// DPO: how far the adapter may move from where it started (TRL's default 0.1).
    #[arg(long, default_value_t = 0.1)]
    beta: f64,
    /// DPO: weight of an added cross-entropy term on the chosen replies.
    #[arg(long, default_value_t = 0.0)]
    sft_weight: f64,
    /// Start from this PEFT adapter folder (its rank, alpha and targets);
    /// DPO measures its rewards against it.
    #[arg(long)]
    start_adapter: Option<PathBuf>,
    /// The column holding the text.
    #[arg(long, default_value = "text")]
    column: String,
    /// The run folder: checkpoints, and the adapter at the end. An existing run there is resumed.
    #[arg(long)]
    out: PathBuf,
    /// Also append every step's progress to this file, one JSON object a line (loss, learning
    /// rate, gradient norm, tokens/s, the data rows trained on), for plots and for replaying the
    /// run elsewhere.
    #[arg(long)]
    log: Option<PathBuf>,
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
    /// Recompute blocks in the backward pass: far less activation memory, about a third more time.
    #[arg(long)]
    gradient_checkpointing: bool,
    /// The dtype of the passes: auto (bf16 on CUDA, f32 elsewhere), f32 or bf16.
    /// A safetensors base is loaded in it too.
    #[arg(long, default_value = "auto")]
    precision: String,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, default_value = "best")]
    device: DeviceChoice,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ObjectiveArg {
    Sft,
    Dpo,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ExportFormat {
    /// A PEFT folder (adapter_config.json + adapter_model.safetensors).
    Peft,
    /// A llama.cpp GGUF LoRA file.
    GgufLora,
    /// The base with the adapter merged in, as one GGUF model.
    Merged,
}

/// `dramatis-cli export`.
#[derive(Args)]
pub struct ExportArgs {
    /// A run folder written by `train`.
    #[arg(long)]
    run: PathBuf,
    /// Where to write: a folder for peft, a .gguf file otherwise.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "peft")]
    format: ExportFormat,
    /// The base model (needed for gguf-lora and merged).
    #[arg(long)]
    model: Option<PathBuf>,
    /// tokenizer.json for a merged model's metadata (default: next to the base).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Quantization of a merged model: q4_k, q5_k, q8_0, f16, f32.
    #[arg(long = "type", default_value = "q4_k")]
    quant: QuantType,
    /// GGUF LoRA with separate attn_q/attn_k/attn_v (for bases converted from
    /// today's microsoft/phi-2) instead of one fused attn_qkv (TheBloke's files).
    #[arg(long)]
    split_qkv: bool,
}

/// `dramatis-cli merge`.
#[derive(Args)]
pub struct MergeArgs {
    /// The base: a .gguf file or a Hugging Face folder.
    #[arg(long)]
    model: PathBuf,
    /// A PEFT adapter folder.
    #[arg(long)]
    adapter: PathBuf,
    /// The GGUF file to write.
    #[arg(long)]
    out: PathBuf,
    /// tokenizer.json for the metadata (default: next to the base).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// q4_k, q5_k, q8_0, f16 or f32.
    #[arg(long = "type", default_value = "q4_k")]
    quant: QuantType,
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
    config.gradient_checkpointing |= a.gradient_checkpointing;
    config.precision = dramatis_train::Precision::parse(&a.precision)?;
    if a.assistant_only {
        data_opts.loss_on = LossOn::AssistantOnly;
    }

    // The log first: a path that cannot be written fails before the model loads.
    let mut log = match &a.log {
        Some(path) => Some((
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open the log {}", path.display()))?,
            path,
        )),
        None => None,
    };
    let device = a.device.open().context("cannot open the device")?;
    let tok_path = a
        .tokenizer
        .clone()
        .unwrap_or_else(|| beside(&a.model, "tokenizer.json"));
    let tokenizer = PhiTokenizer::from_file(&tok_path)?;
    let (data, longest): (TrainData, usize) = if a.objective == ObjectiveArg::Dpo {
        config.objective = Objective::Dpo {
            beta: a.beta,
            sft_weight: a.sft_weight,
        };
        let (pairs, read) = dramatis_core::read_preference_file(&a.data)?;
        for c in &read.changed {
            eprintln!("changed: {c}");
        }
        for p in read.skipped.iter().take(5) {
            eprintln!("  line {}: {}", p.line, p.message);
        }
        let prepared = prepare_pairs(&pairs, &tokenizer, &data_opts)?;
        let r = &prepared.report;
        eprintln!(
            "data: {} pairs ({} lines skipped), {} used ({} train, {} eval), {} tokens, longest {}, {} cut to {}, {} with an empty or identical reply",
            r.pairs,
            read.skipped_count,
            r.used,
            r.train_pairs,
            r.eval_pairs,
            r.tokens,
            r.longest,
            r.truncated,
            data_opts.max_len,
            r.empty
        );
        let longest = r.longest;
        (prepared.into(), longest)
    } else {
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
        let longest = r.longest;
        (prepared.into(), longest)
    };
    let dtype = config.precision.dtype(&device);
    let model = Arc::new(load_model_as(&a.model, &device, dtype)?);
    tokenizer.check_fits(model.config().vocab_size)?;
    let start = match &a.start_adapter {
        Some(dir) => {
            let s = LoraAdapter::load_peft(dir, model.config(), &device)?;
            config.take_shape_of(&s)?;
            Some(s)
        }
        None => None,
    };
    let info = dramatis_core::llm::inspect_model(&a.model)?;
    let weight_bytes = if info.format == dramatis_core::llm::ModelFormat::Safetensors {
        info.parameters * dtype.size_in_bytes() as u64
    } else {
        info.bytes
    };
    let est = dramatis_train::estimate(&dramatis_train::EstimateInput {
        config: model.config().clone(),
        weight_bytes,
        r: config.r,
        targets: config.targets.len(),
        seq_len: longest,
        batch: config.batch_size,
        device_memory: None,
        flops_per_sec: dramatis_train::estimate::measure_flops(&device, dtype),
        gradient_checkpointing: config.gradient_checkpointing,
        dtype_bytes: dtype.size_in_bytes(),
        on_gpu: !device.is_cpu(),
        dpo: matches!(config.objective, dramatis_train::Objective::Dpo { .. }),
        flash_attention: dramatis_core::llm::trains_with_flash_attention(
            &device,
            dtype,
            model.config().head_dim(),
        ),
    });
    eprintln!(
        "estimate: peak memory {:.1} MB (activations {:.1} MB), {}",
        est.peak_bytes as f64 / 1e6,
        est.activation_bytes as f64 / 1e6,
        est.tokens_per_sec
            .map(|t| format!("{t:.0} tokens/s"))
            .unwrap_or_default()
    );
    let eos = tokenizer.eos_id().unwrap_or(0);
    let mut run = TrainingRun::new_from(model, data, config, &a.out, eos, start.as_ref())?;
    if run.step() > 0 {
        eprintln!("resuming at step {}", run.step());
    }
    let bar = indicatif::ProgressBar::new(run.total_steps() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} steps  {msg}  ETA {eta}")
            .context("progress bar template")?,
    );
    bar.set_position(run.step() as u64);
    let mut log_error = None;
    let mut last_tps = 0.0;
    // The rate after the first step, which also loads kernels and warms caches.
    let mut after_first: Option<(std::time::Instant, usize)> = None;
    let mut steady = None;
    let outcome = run.run(
        &mut |p| {
            match after_first {
                None => after_first = Some((std::time::Instant::now(), p.tokens)),
                Some((t, n)) => {
                    steady = Some((p.tokens - n) as f64 / t.elapsed().as_secs_f64().max(1e-9));
                }
            }
            bar.set_position(p.step as u64);
            if let Some((file, path)) = &mut log {
                // One write per line, so a killed run leaves whole lines.
                let mut line = serde_json::to_string(p).expect("progress serializes");
                line.push('\n');
                if let Err(e) = file.write_all(line.as_bytes())
                    && log_error.is_none()
                {
                    log_error = Some(format!("cannot write the log {}: {e}", path.display()));
                }
            }
            let eval = p
                .eval_loss
                .map(|e| format!(" eval {e:.3}"))
                .unwrap_or_default();
            let dpo = p
                .margin
                .map(|m| {
                    format!(
                        " margin {m:.3} acc {:.2}{}",
                        p.accuracy.unwrap_or(0.0),
                        p.eval_margin
                            .map(|e| format!(" eval margin {e:.3}"))
                            .unwrap_or_default()
                    )
                })
                .unwrap_or_default();
            bar.set_message(format!(
                "loss {:.3}{eval}{dpo}  {:.0} tok/s",
                p.loss, p.tokens_per_sec
            ));
            last_tps = p.tokens_per_sec;
            if p.eval_loss.is_some() || p.checkpoint {
                bar.println(format!(
                    "step {}: loss {:.4}{eval}{dpo}{}",
                    p.step,
                    p.loss,
                    if p.checkpoint { " (checkpoint)" } else { "" }
                ));
            }
        },
        cancel,
    )?;
    bar.finish_and_clear();
    if let Some(e) = log_error {
        eprintln!("warning: {e}; training went on");
    }
    crate::print_profile();
    if let Some(gpu) = dramatis_core::llm::gpu_memory_peak(&device) {
        let reserved = dramatis_core::llm::gpu_memory_reserved_peak(&device)
            .map(|r| format!(", {:.1} MB held by the allocator", r as f64 / 1e6))
            .unwrap_or_default();
        eprintln!(
            "measured: peak GPU memory {:.1} MB (tensors){reserved}",
            gpu as f64 / 1e6
        );
    }
    if let Some(hwm) = dramatis_train::peak_rss_bytes() {
        eprintln!(
            "measured: peak memory {:.1} MB, {last_tps:.0} tokens/s{}",
            hwm as f64 / 1e6,
            steady
                .map(|s| format!(" ({s:.0} tokens/s after the first step)"))
                .unwrap_or_default()
        );
    }
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

fn beside(model: &std::path::Path, file: &str) -> PathBuf {
    let dir = if model.is_dir() {
        model.to_path_buf()
    } else {
        model.parent().map(PathBuf::from).unwrap_or_default()
    };
    dir.join(file)
}

/// Merges `adapter` into `model` and writes a GGUF file, with a progress bar.
fn merge_files(
    model: &std::path::Path,
    adapter: &std::path::Path,
    tokenizer: Option<PathBuf>,
    out: &std::path::Path,
    quant: QuantType,
    cancel: &AtomicBool,
) -> Result<()> {
    let base = load_model(model, &Device::Cpu)?;
    let lora = LoraAdapter::load_peft(adapter, base.config(), &Device::Cpu)?;
    let tok = tokenizer.unwrap_or_else(|| beside(model, "tokenizer.json"));
    let bar = indicatif::ProgressBar::new(0);
    merge_to_gguf(
        &base,
        Some(&lora),
        tok.is_file().then_some(tok.as_path()),
        out,
        quant,
        cancel,
        |p| {
            bar.set_length(p.total as u64);
            bar.set_position(p.done as u64);
        },
    )?;
    bar.finish_and_clear();
    eprintln!("wrote {} ({}, adapter merged)", out.display(), quant.name());
    Ok(())
}

pub fn export(a: ExportArgs, cancel: &AtomicBool) -> Result<()> {
    if !a.run.join("checkpoint").is_dir() {
        bail!(
            "{} holds no checkpoint: run `dramatis-cli train --out {}` first",
            a.run.display(),
            a.run.display()
        );
    }
    if a.format == ExportFormat::Peft {
        export_checkpoint(&a.run, &a.out)?;
        eprintln!("wrote the PEFT adapter to {}", a.out.display());
        return Ok(());
    }
    let Some(model) = &a.model else {
        bail!("--format gguf-lora and merged need the base: pass --model");
    };
    let peft = tempfile_dir(&a.out)?;
    export_checkpoint(&a.run, &peft)?;
    let result = if a.format == ExportFormat::Merged {
        merge_files(model, &peft, a.tokenizer.clone(), &a.out, a.quant, cancel)
    } else {
        (|| {
            let base = load_model(model, &Device::Cpu)?;
            let lora = LoraAdapter::load_peft(&peft, base.config(), &Device::Cpu)?;
            write_lora_gguf(&lora, base.config(), &a.out, !a.split_qkv)?;
            eprintln!("wrote the GGUF LoRA to {}", a.out.display());
            Ok(())
        })()
    };
    let _ = std::fs::remove_dir_all(&peft);
    result
}

/// A scratch folder beside `out`, removed by the caller.
fn tempfile_dir(out: &std::path::Path) -> Result<PathBuf> {
    let dir = out.with_extension("peft.partial");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

pub fn merge(a: MergeArgs, cancel: &AtomicBool) -> Result<()> {
    merge_files(&a.model, &a.adapter, a.tokenizer, &a.out, a.quant, cancel)
}
