//! `dramatis-cli`: Dramatis's engine without a window — generate, chat,
//! quantize and benchmark, on a laptop or a server GPU.

mod bench;
mod cards;
mod models;
mod prefs;
mod serve;
mod train;

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use dramatis_core::llm::{
    DeviceChoice, GenerateParams, LoraAdapter, Phi, PhiTokenizer, QuantType, SamplerConfig,
    Session, device_name, load_model, quantize_safetensors,
};
use dramatis_core::persona::prompt::{self, Speaker};

#[derive(Parser)]
#[command(
    name = "dramatis-cli",
    version,
    about = "Dramatis's Phi-2 engine from the command line"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// CPU threads for the engine (default: one per physical core this process may use).
    #[arg(long, global = true)]
    threads: Option<usize>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Continue a prompt; the generated text streams to stdout, statistics to stderr.
    Generate(GenerateArgs),
    /// Chat in the terminal with the role-play prompt format.
    Chat(ChatArgs),
    /// Turn a Hugging Face Phi-2 folder (safetensors) into a GGUF file.
    Quantize(QuantizeArgs),
    /// Measure prefill and decode speed, time to first token, and peak memory.
    Bench(bench::BenchArgs),
    /// List installed models, the catalog, the device and the download cache.
    Models(models::ModelsArgs),
    /// Download a catalog model or dataset into the Hugging Face cache (resumable).
    Download(models::DownloadArgs),
    /// Check and register a local .gguf file or Hugging Face folder.
    Import(models::ImportArgs),
    /// Fine-tune a LoRA adapter (resumable; Ctrl-C stops at a checkpoint).
    Train(Box<train::TrainArgs>),
    /// Write a training run's adapter: PEFT folder, llama.cpp GGUF LoRA, or merged model.
    Export(train::ExportArgs),
    /// Merge a PEFT adapter into a base model and write GGUF.
    Merge(train::MergeArgs),
    /// Character cards: import (PNG, JSON, CHARX, world info), export, lint.
    Card(cards::CardArgs),
    /// Serve the engine to other front-ends: OpenAI-compatible and KoboldCpp APIs.
    Serve(serve::ServeArgs),
    /// Preference pairs from swipes and edits: export as TRL DPO JSONL.
    Prefs(prefs::PrefsArgs),
}

/// Which model to load and where to run it.
#[derive(Args)]
struct ModelArgs {
    /// A .gguf file or a Hugging Face model folder.
    #[arg(long)]
    model: PathBuf,
    /// tokenizer.json (default: next to the model).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// A PEFT LoRA adapter folder to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// best, cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "best")]
    device: DeviceChoice,
}

/// Sampling flags; `--temperature 0` is greedy.
#[derive(Args)]
struct SamplingArgs {
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    #[arg(long, default_value_t = 50)]
    top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    /// Recent tokens the penalties look at.
    #[arg(long, default_value_t = 64)]
    penalty_window: usize,
    #[arg(long, default_value_t = 299_792_458)]
    seed: u64,
}

impl SamplingArgs {
    fn config(&self) -> SamplerConfig {
        SamplerConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repeat_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            penalty_window: self.penalty_window,
            seed: self.seed,
        }
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// The text to continue.
    #[arg(long)]
    prompt: String,
    /// Most new tokens.
    #[arg(long, default_value_t = 300)]
    max_tokens: usize,
    /// Stop where this appears (repeatable); `<|endoftext|>` always stops.
    #[arg(long)]
    stop: Vec<String>,
    /// Print one JSON object (text, token_ids, timings) instead of streaming.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// The system prompt: who the model plays.
    #[arg(
        long,
        default_value = "You are a helpful, creative role-play partner. Stay in character."
    )]
    system: String,
    #[arg(long, default_value_t = 300)]
    max_tokens: usize,
}

#[derive(Args)]
struct QuantizeArgs {
    /// The Hugging Face folder (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    input: PathBuf,
    /// The GGUF file to write.
    #[arg(long)]
    output: PathBuf,
    /// q4_k, q5_k, q8_0, f16 or f32.
    #[arg(long = "type", default_value = "q4_k")]
    quant: QuantType,
}

#[allow(unsafe_code)]
fn main() -> Result<()> {
    let cli = Cli::parse();
    // SAFETY: first thing in main: no other thread exists yet.
    unsafe { dramatis_core::llm::threads::init_process(cli.threads) };
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    // The first Ctrl-C stops the work in progress cleanly; a second one quits.
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
    })
    .context("cannot install the Ctrl-C handler")?;
    match cli.cmd {
        Cmd::Generate(a) => generate(a, &cancel),
        Cmd::Chat(a) => chat(a, &cancel),
        Cmd::Quantize(a) => quantize(a, &cancel),
        Cmd::Bench(a) => bench::run(a, &cancel),
        Cmd::Models(a) => models::list(a),
        Cmd::Download(a) => models::download(a, &cancel),
        Cmd::Import(a) => models::import(a),
        Cmd::Train(a) => train::train(*a, &cancel),
        Cmd::Export(a) => train::export(a, &cancel),
        Cmd::Merge(a) => train::merge(a, &cancel),
        Cmd::Card(a) => cards::run(a),
        Cmd::Serve(a) => serve::run(a, &cancel),
        Cmd::Prefs(a) => prefs::run(a),
    }
}

/// The loaded model, tokenizer and adapter.
struct Loaded {
    model: Arc<Phi>,
    tokenizer: PhiTokenizer,
    adapter: Option<Arc<LoraAdapter>>,
}

fn tokenizer_path(args: &ModelArgs) -> Result<PathBuf> {
    if let Some(t) = &args.tokenizer {
        return Ok(t.clone());
    }
    let dir = if args.model.is_dir() {
        args.model.as_path()
    } else {
        args.model.parent().unwrap_or(Path::new("."))
    };
    let guess = dir.join("tokenizer.json");
    if !guess.exists() {
        bail!(
            "no tokenizer.json next to {}; pass --tokenizer",
            args.model.display()
        );
    }
    Ok(guess)
}

fn load(args: &ModelArgs) -> Result<Loaded> {
    let device = args.device.open().context("cannot open the device")?;
    let started = std::time::Instant::now();
    let model = Arc::new(load_model(&args.model, &device)?);
    let tokenizer = PhiTokenizer::from_file(&tokenizer_path(args)?)?;
    tokenizer.check_fits(model.config().vocab_size)?;
    let adapter = match &args.adapter {
        Some(dir) => Some(Arc::new(LoraAdapter::load_peft(
            dir,
            model.config(),
            &device,
        )?)),
        None => None,
    };
    eprintln!(
        "loaded {} on {} in {:.1} s",
        args.model.display(),
        device_name(&device),
        started.elapsed().as_secs_f64()
    );
    Ok(Loaded {
        model,
        tokenizer,
        adapter,
    })
}

fn generate(a: GenerateArgs, cancel: &AtomicBool) -> Result<()> {
    let l = load(&a.model)?;
    let ids = l.tokenizer.encode(&a.prompt)?;
    let params = GenerateParams {
        sampler: a.sampling.config(),
        max_new_tokens: a.max_tokens,
        stop: a.stop.clone(),
        ..Default::default()
    };
    let mut session = Session::new(l.model.clone());
    session.set_adapter(l.adapter.clone());
    let mut out = std::io::stdout().lock();
    let g = session.generate(&l.tokenizer, &ids, &params, cancel, |piece| {
        if !a.json {
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        }
    })?;
    if a.json {
        let v = serde_json::json!({
            "text": g.text,
            "token_ids": g.token_ids,
            "stop_reason": g.stop_reason,
            "prompt_tokens": g.prompt_tokens,
            "timings": {
                "prefill_s": g.prefill.as_secs_f64(),
                "decode_s": g.decode.as_secs_f64(),
                "prefill_tok_s": g.prompt_tokens as f64 / g.prefill.as_secs_f64().max(1e-9),
                "decode_tok_s": g.token_ids.len().saturating_sub(1) as f64 / g.decode.as_secs_f64().max(1e-9),
            },
        });
        writeln!(out, "{v}")?;
    } else {
        writeln!(out)?;
    }
    eprintln!(
        "{} prompt tokens in {:.2} s ({:.1} tok/s) · {} new tokens in {:.2} s ({:.1} tok/s) · stopped: {:?}",
        g.prompt_tokens,
        g.prefill.as_secs_f64(),
        g.prompt_tokens as f64 / g.prefill.as_secs_f64().max(1e-9),
        g.token_ids.len(),
        g.decode.as_secs_f64(),
        g.token_ids.len().saturating_sub(1) as f64 / g.decode.as_secs_f64().max(1e-9),
        g.stop_reason
    );
    Ok(())
}

fn chat(a: ChatArgs, cancel: &AtomicBool) -> Result<()> {
    let l = load(&a.model)?;
    let mut session = Session::new(l.model.clone());
    session.set_adapter(l.adapter.clone());
    let params = GenerateParams {
        sampler: a.sampling.config(),
        max_new_tokens: a.max_tokens,
        stop: prompt::stop_strings(),
        ..Default::default()
    };
    let mut history = prompt::turn(Speaker::System, &a.system);
    eprintln!(
        "Type a message and press Enter. /reset starts over, /quit leaves. Ctrl-C stops a reply."
    );
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        match line.trim() {
            "" => continue,
            "/quit" => break,
            "/reset" => {
                history = prompt::turn(Speaker::System, &a.system);
                continue;
            }
            msg => history.push_str(&prompt::turn(Speaker::User, msg)),
        }
        let text = format!("{history}{}", prompt::reply_opening());
        let ids = l.tokenizer.encode(&text)?;
        cancel.store(false, Ordering::SeqCst);
        let mut out = std::io::stdout().lock();
        let g = session.generate(&l.tokenizer, &ids, &params, cancel, |piece| {
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        })?;
        writeln!(out)?;
        history.push_str(&prompt::turn(Speaker::Assistant, &g.text));
    }
    Ok(())
}

fn quantize(a: QuantizeArgs, cancel: &AtomicBool) -> Result<()> {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} tensors  {msg}")
            .context("progress bar template")?,
    );
    quantize_safetensors(&a.input, &a.output, a.quant, cancel, |p| {
        bar.set_length(p.total as u64);
        bar.set_position(p.done as u64);
        bar.set_message(p.tensor);
    })?;
    bar.finish_and_clear();
    let size = std::fs::metadata(&a.output)?.len();
    eprintln!("wrote {} ({:.1} MB)", a.output.display(), size as f64 / 1e6);
    Ok(())
}

/// The time per phase (`DRAMATIS_PROFILE` set), on stderr: nothing otherwise.
fn print_profile() {
    for (name, secs, calls) in dramatis_core::llm::profile_report() {
        eprintln!("profile: {name:<22} {secs:9.3} s  {calls} calls");
    }
}
