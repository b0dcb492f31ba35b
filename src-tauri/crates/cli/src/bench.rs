//! `dramatis-cli bench`: prefill and decode speed, time to first token on a
//! first and a second chat turn, and peak memory, as a table and as JSON.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use dramatis_core::llm::{
    DeviceChoice, Logits, PhiConfig, QuantType, Session, Tensor, device_name, load_model,
    write_synthetic_gguf,
};
use serde::Serialize;

#[derive(Args)]
pub struct BenchArgs {
    /// A GGUF file to measure.
    #[arg(long, conflicts_with = "synthetic")]
    model: Option<PathBuf>,
    /// Measure a random-weight model with these exact shapes instead (phi-2).
    #[arg(long)]
    synthetic: Option<String>,
    /// Quantization of the synthetic model: q4_k, q5_k, q8_0, f16.
    #[arg(long, default_value = "q4_k")]
    quant: QuantType,
    /// Where the synthetic GGUF is written and reused (default: the temp folder).
    #[arg(long)]
    synthetic_path: Option<PathBuf>,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Tokens for the decode measurement.
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    /// New tokens in the second chat turn.
    #[arg(long, default_value_t = 32)]
    turn_tokens: usize,
    /// best, cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "best")]
    device: DeviceChoice,
    /// Print JSON only.
    #[arg(long)]
    json: bool,
    /// Measure a chat at the window's edge instead: turns past a full window
    /// with the cache shifted and with prefix reuse only, side by side.
    #[arg(long)]
    window_edge: bool,
    /// Turns measured past the window's edge (with --window-edge).
    #[arg(long, default_value_t = 6)]
    edge_turns: usize,
}

#[derive(Serialize)]
struct Report {
    model: String,
    device: String,
    quant: String,
    weight_bytes: u64,
    load_s: f64,
    prompt_tokens: usize,
    prefill_s: f64,
    prefill_tok_s: f64,
    ttft_s: f64,
    gen_tokens: usize,
    decode_s: f64,
    decode_tok_s: f64,
    decode_empty_tok_s: f64,
    /// What ran the one-token steps (after them: a refused CUDA graph shows).
    decode_path: &'static str,
    turn_tokens: usize,
    second_turn_ttft_s: f64,
    new_tokens_prefill_s: f64,
    second_turn_ratio: f64,
    kv_cache_bytes: usize,
    peak_rss_bytes: Option<u64>,
    peak_rss_ratio: Option<f64>,
}

/// The peak resident memory of this process (Linux), in bytes.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

pub fn run(a: BenchArgs, cancel: &AtomicBool) -> Result<()> {
    let path = match (&a.model, &a.synthetic) {
        (Some(m), _) => m.clone(),
        (None, Some(preset)) => {
            let cfg = match preset.as_str() {
                "phi-2" | "phi2" => PhiConfig::phi2(),
                other => bail!("unknown synthetic preset `{other}` (use phi-2)"),
            };
            let path = a.synthetic_path.clone().unwrap_or_else(|| {
                std::env::temp_dir()
                    .join(format!("dramatis-synthetic-{preset}-{:?}.gguf", a.quant).to_lowercase())
            });
            if !path.exists() {
                eprintln!(
                    "writing a synthetic {preset} ({:?}) to {} …",
                    a.quant,
                    path.display()
                );
                write_synthetic_gguf(&cfg, a.quant, 42, &path, |done, total, _| {
                    if done % 40 == 0 || done == total {
                        eprintln!("  {done}/{total} tensors");
                    }
                })?;
            }
            path
        }
        (None, None) => bail!("pass --model FILE.gguf or --synthetic phi-2"),
    };
    let device = a.device.open().context("cannot open the device")?;
    let weight_bytes = std::fs::metadata(&path)
        .with_context(|| path.display().to_string())?
        .len();
    let t = Instant::now();
    let model = Arc::new(load_model(&path, &device)?);
    let load_s = t.elapsed().as_secs_f64();
    let vocab = model.config().vocab_size as u32;
    // Deterministic pseudo-random token ids, away from the special tokens at the end.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut token = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % u64::from(vocab - 300)) as u32
    };
    if a.window_edge {
        return window_edge(&a, &model, &mut token, cancel);
    }
    let prompt: Vec<u32> = (0..a.prompt_tokens).map(|_| token()).collect();

    let mut session = Session::new(model.clone());
    // Warm-up: first-use allocations and kernel loading are not what we measure.
    session.prefill(&prompt[..prompt.len().min(8)])?;
    session.reset();

    let t = Instant::now();
    let (logits, _) = session.prefill(&prompt)?;
    let prefill_s = t.elapsed().as_secs_f64();
    let mut next = argmax(&logits);
    let ttft_s = t.elapsed().as_secs_f64();

    let mut generated = vec![next];
    let t = Instant::now();
    for _ in 1..a.gen_tokens {
        if cancel.load(Ordering::Relaxed) {
            bail!("cancelled");
        }
        next = argmax(&session.push(next)?);
        generated.push(next);
    }
    let decode_s = t.elapsed().as_secs_f64();

    // Second turn: the whole history again plus a new user message.
    let mut history: Vec<u32> = prompt.clone();
    history.extend(&generated[..generated.len() - 1]);
    let prefix = history.len();
    history.extend((0..a.turn_tokens).map(|_| token()));
    let t = Instant::now();
    let (logits, reused) = session.prefill(&history)?;
    let _ = argmax(&logits);
    let second_turn_ttft_s = t.elapsed().as_secs_f64();
    if reused != prefix {
        bail!("the second turn reused {reused} tokens, expected {prefix}");
    }
    let kv_cache_bytes = session.cache_bytes();
    let peak = peak_rss();

    // The ideal: only the new tokens through the model, on a cache that holds the prefix.
    let mut cache = model.new_cache();
    for chunk in history[..prefix].chunks(512) {
        model.forward(
            &Tensor::new(chunk, model.device())?.unsqueeze(0)?,
            Some(&mut cache),
            Logits::Last,
            None,
        )?;
    }
    let new = Tensor::new(&history[prefix..], model.device())?.unsqueeze(0)?;
    let t = Instant::now();
    let out = model.forward(&new, Some(&mut cache), Logits::Last, None)?;
    let _ = out.to_vec2::<f32>()?;
    let new_tokens_prefill_s = t.elapsed().as_secs_f64();

    // Decode from an empty context, as llama-bench's tg test does.
    drop(cache);
    session.reset();
    let mut next = argmax(&session.prefill(&prompt[..1])?.0);
    let t = Instant::now();
    for _ in 1..a.gen_tokens {
        next = argmax(&session.push(next)?);
    }
    let decode_empty_tok_s = (a.gen_tokens - 1) as f64 / t.elapsed().as_secs_f64();

    let r = Report {
        model: path.display().to_string(),
        device: device_name(&device),
        quant: model
            .quant_type()
            .map_or("f32".into(), |q| format!("{q:?}")),
        weight_bytes,
        load_s,
        prompt_tokens: a.prompt_tokens,
        prefill_s,
        prefill_tok_s: a.prompt_tokens as f64 / prefill_s,
        ttft_s,
        gen_tokens: a.gen_tokens,
        decode_s,
        decode_tok_s: (a.gen_tokens - 1) as f64 / decode_s,
        decode_empty_tok_s,
        decode_path: model.decode_path(),
        turn_tokens: a.turn_tokens,
        second_turn_ttft_s,
        new_tokens_prefill_s,
        second_turn_ratio: second_turn_ttft_s / new_tokens_prefill_s,
        kv_cache_bytes,
        peak_rss_bytes: peak,
        peak_rss_ratio: peak.map(|p| p as f64 / (weight_bytes as f64 + kv_cache_bytes as f64)),
    };
    crate::print_profile();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let gb = |b: f64| b / 1e9;
    println!(
        "model      {} ({}, {:.2} GB) on {}",
        r.model,
        r.quant,
        gb(weight_bytes as f64),
        r.device
    );
    println!("load       {:.2} s", r.load_s);
    println!(
        "prefill    {:>5} tokens  {:>8.1} tok/s  ({:.2} s)",
        r.prompt_tokens, r.prefill_tok_s, r.prefill_s
    );
    println!(
        "decode     {:>5} tokens  {:>8.1} tok/s  ({:.2} s)",
        r.gen_tokens, r.decode_tok_s, r.decode_s
    );
    println!(
        "decode     {:>5} tokens  {:>8.1} tok/s  (from an empty context)",
        r.gen_tokens, r.decode_empty_tok_s
    );
    println!("decode on  {}", r.decode_path);
    println!("first token after the prompt        {:.3} s", r.ttft_s);
    println!(
        "second turn, {} new tokens: first token {:.3} s; those tokens alone {:.3} s ({:.2}×)",
        r.turn_tokens, r.second_turn_ttft_s, r.new_tokens_prefill_s, r.second_turn_ratio
    );
    if let (Some(p), Some(ratio)) = (r.peak_rss_bytes, r.peak_rss_ratio) {
        println!(
            "peak RSS   {:.2} GB = {:.2} × (weights {:.2} GB + KV cache {:.2} GB)",
            gb(p as f64),
            ratio,
            gb(weight_bytes as f64),
            gb(kv_cache_bytes as f64)
        );
    }
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

/// One turn at the window's edge, as measured.
#[derive(Serialize)]
struct EdgeTurn {
    mode: &'static str,
    prompt_tokens: usize,
    reused: usize,
    shifted: usize,
    computed: usize,
    ttft_s: f64,
    /// The time the same new tokens take alone on a cache holding the rest.
    new_alone_s: f64,
    ratio: f64,
}

#[derive(Serialize)]
struct EdgeReport {
    model: String,
    device: String,
    turns: Vec<EdgeTurn>,
    /// Logits after the first shift against a fresh prefill of the same tokens.
    shift_max_abs_logit_diff: Option<f32>,
    shift_max_abs_logit: Option<f32>,
    /// Greedy tokens, teacher-forced on the fresh session's: positions that agree, of 64.
    shift_greedy_agreement: Option<usize>,
}

/// A chat that has filled the window: each turn adds a reply and a user
/// message; the prompt keeps the system part and as many turns as fit,
/// dropping in steps of 1/8 of the budget (shift) or the fewest turns
/// (prefix reuse, what a turn cost before shifting).
fn window_edge(
    a: &BenchArgs,
    model: &Arc<dramatis_core::llm::Phi>,
    token: &mut impl FnMut() -> u32,
    cancel: &AtomicBool,
) -> Result<()> {
    use dramatis_core::llm::Reuse;
    use dramatis_core::persona::prompt::{Window, window_start};
    let ctx = model.config().max_position_embeddings;
    let budget = ctx - 300.min(ctx / 4);
    let system: Vec<u32> = (0..150).map(|_| token()).collect();
    let opening: Vec<u32> = (0..4).map(|_| token()).collect();
    let fixed = system.len() + opening.len();
    // Enough history to fill the window twice, turns of 40–80 tokens.
    let mut turns: Vec<Vec<u32>> = Vec::new();
    while turns.iter().map(Vec::len).sum::<usize>() < 2 * ctx {
        let n = 40 + (token() % 41) as usize;
        turns.push((0..n).map(|_| token()).collect());
    }
    let prompt_of = |turns: &[Vec<u32>], window: Window| -> Vec<u32> {
        let sizes: Vec<usize> = turns.iter().map(Vec::len).collect();
        let first = window_start(&sizes, fixed, budget, window);
        let mut p = system.clone();
        for t in &turns[first..] {
            p.extend(t);
        }
        p.extend(&opening);
        p
    };
    let mut report = EdgeReport {
        model: a
            .model
            .as_ref()
            .map_or("synthetic".into(), |p| p.display().to_string()),
        device: device_name(model.device()),
        turns: Vec::new(),
        shift_max_abs_logit_diff: None,
        shift_max_abs_logit: None,
        shift_greedy_agreement: None,
    };
    for (mode, reuse, window) in [
        ("shift", Reuse::Shift, Window { step: budget / 8 }),
        ("prefix", Reuse::Prefix, Window { step: 0 }),
    ] {
        let mut turns = turns.clone();
        let mut session = Session::new(model.clone());
        // The window is full before the first measured turn.
        session.prefill_with(&prompt_of(&turns, window), reuse)?;
        for _ in 0..a.edge_turns {
            if cancel.load(Ordering::Relaxed) {
                bail!("cancelled");
            }
            // The last reply (16 tokens) and a new user message (32 tokens).
            turns.push((0..16).map(|_| token()).collect());
            turns.push((0..a.turn_tokens).map(|_| token()).collect());
            let prompt = prompt_of(&turns, window);
            let t = Instant::now();
            let (logits, c) = session.prefill_with(&prompt, reuse)?;
            let _ = argmax(&logits);
            let ttft_s = t.elapsed().as_secs_f64();
            if reuse == Reuse::Shift && c.shifted > 0 && report.shift_max_abs_logit_diff.is_none() {
                divergence(model, &mut session, &prompt, &logits, &mut report)?;
            }
            // The ideal: the tokens that were new this turn, after a cache of the rest.
            let new = 16 + a.turn_tokens + opening.len();
            session.truncate(prompt.len() - new);
            let t = Instant::now();
            let _ = argmax(&session.prefill(&prompt)?.0);
            let new_alone_s = t.elapsed().as_secs_f64();
            let turn = EdgeTurn {
                mode,
                prompt_tokens: prompt.len(),
                reused: c.reused,
                shifted: c.shifted,
                computed: c.computed,
                ttft_s,
                new_alone_s,
                ratio: ttft_s / new_alone_s,
            };
            if !a.json {
                println!(
                    "{mode:>6}  prompt {:>4}  reused {:>4}  shifted {:>4}  computed {:>4}  first token {:>7.3} s  new tokens alone {:>6.3} s  ({:.2}×)",
                    turn.prompt_tokens,
                    turn.reused,
                    turn.shifted,
                    turn.computed,
                    turn.ttft_s,
                    turn.new_alone_s,
                    turn.ratio
                );
            }
            report.turns.push(turn);
        }
    }
    if !a.json
        && let (Some(d), Some(m), Some(g)) = (
            report.shift_max_abs_logit_diff,
            report.shift_max_abs_logit,
            report.shift_greedy_agreement,
        )
    {
        println!(
            "after the first shift: max |Δlogit| {d:.4} (largest logit {m:.2}); greedy agreement {g}/64"
        );
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// Compares a shifted session's logits with a fresh prefill of `prompt`, and
/// their greedy choices over 64 tokens fed from the fresh one.
fn divergence(
    model: &Arc<dramatis_core::llm::Phi>,
    shifted: &mut Session,
    prompt: &[u32],
    logits: &[f32],
    report: &mut EdgeReport,
) -> Result<()> {
    let mut fresh = Session::new(model.clone());
    let (f, _) = fresh.prefill(prompt)?;
    let diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    let mut max_d = diff(logits, &f);
    let max_abs = f.iter().fold(0f32, |m, x| m.max(x.abs()));
    let (mut s_l, mut f_l) = (logits.to_vec(), f);
    let mut agree = 0;
    let len = shifted.cached_tokens();
    for _ in 0..64 {
        let next = argmax(&f_l);
        agree += usize::from(argmax(&s_l) == next);
        s_l = shifted.push(next)?;
        f_l = fresh.push(next)?;
        max_d = max_d.max(diff(&s_l, &f_l));
    }
    // Leave the measured session as the turn left it.
    shifted.truncate(len);
    report.shift_max_abs_logit_diff = Some(max_d);
    report.shift_max_abs_logit = Some(max_abs);
    report.shift_greedy_agreement = Some(agree);
    Ok(())
}
