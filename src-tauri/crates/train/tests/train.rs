//! Training the tiny Phi fixture for real: it learns, it resumes exactly,
//! its export loads back, and bad input is refused before training starts.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use dramatis_llm::{Device, Logits, LoraAdapter, Phi, PhiTokenizer, Tensor, load_model};
use dramatis_train::data::prepare;
use dramatis_train::{
    DataOptions, Error, Outcome, Schedule, TrainConfig, TrainingRun, export_peft,
};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../llm/tests/fixtures/tiny")
}

fn model() -> Arc<Phi> {
    Arc::new(load_model(&fixture(), &Device::Cpu).unwrap())
}

fn tokenizer() -> PhiTokenizer {
    PhiTokenizer::from_file(&fixture().join("tokenizer.json")).unwrap()
}

fn rows(n: usize) -> Vec<(usize, String)> {
    (0..n)
        .map(|i| {
            (
                i + 1,
                format!("<|system|>You are Kit, a cheerful robot.</s>\n<|user|>Say hello to number {i}.</s>\n<|assistant|>Hello, number {i}! Beep boop.</s>"),
            )
        })
        .collect()
}

fn small_config(steps: usize) -> TrainConfig {
    TrainConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.05,
        lr: 5e-3,
        batch_size: 4,
        grad_accum: 1,
        max_steps: Some(steps),
        schedule: Schedule::Constant,
        eval_every: 10,
        checkpoint_every: 10,
        seed: 3,
        ..TrainConfig::seed_recipe()
    }
}

fn data(n: usize) -> dramatis_train::Prepared {
    let opts = DataOptions {
        eval_fraction: 0.125,
        ..DataOptions::default()
    };
    prepare(&rows(n), 0, &tokenizer(), &opts).unwrap()
}

fn start(dir: &Path, steps: usize) -> TrainingRun {
    let tok = tokenizer();
    TrainingRun::new(
        model(),
        data(16),
        small_config(steps),
        dir,
        tok.eos_id().unwrap(),
    )
    .unwrap()
}

#[test]
fn the_tiny_model_learns_a_small_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let mut run = start(dir.path(), 40);
    let before = run.eval_loss().unwrap().unwrap();
    let mut reports = Vec::new();
    let out = run
        .run(&mut |p| reports.push(p.clone()), &AtomicBool::new(false))
        .unwrap();
    assert_eq!(out, Outcome::Finished);
    assert_eq!(reports.len(), 40);
    let first = reports[0].loss;
    let last = reports.last().unwrap().loss;
    // The stated factor: training loss falls at least 4× in 40 steps.
    assert!(last < first / 4.0, "loss {first} -> {last}");
    let evals: Vec<f64> = reports.iter().filter_map(|r| r.eval_loss).collect();
    assert_eq!(evals.len(), 4);
    assert!(
        evals.last().unwrap() < &before,
        "eval {before} -> {evals:?}"
    );
    assert!(
        reports
            .iter()
            .all(|r| r.tokens_per_sec > 0.0 && r.lr == 5e-3)
    );
    assert!(dir.path().join("checkpoint/lora.safetensors").is_file());
}

/// The eval loss is the weighted cross-entropy of the held-out rows, mean
/// over rows: before the first step (LoRA's B is zero, so the adapter adds
/// nothing) it equals the base model's, from its inference pass's logits
/// (the chunked training passes and the full logits agree to f32 rounding).
#[test]
fn the_eval_loss_is_the_held_out_cross_entropy() {
    let dir = tempfile::tempdir().unwrap();
    let run = start(dir.path(), 1);
    let got = run.eval_loss().unwrap().unwrap();
    let (phi, prepared) = (model(), data(16));
    assert!(!prepared.eval.is_empty());
    let mut sum = 0.0;
    for e in &prepared.eval {
        let n = e.ids.len();
        let inp = Tensor::new(&e.ids[..n - 1], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = phi.forward(&inp, None, Logits::All, None).unwrap();
        let logits: Vec<Vec<f32>> = logits.squeeze(0).unwrap().to_vec2().unwrap();
        let (mut nll, mut w) = (0.0f64, 0.0f64);
        for (t, row) in logits.iter().enumerate() {
            let top = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
            let lse = top
                + row
                    .iter()
                    .map(|&v| (v as f64 - top).exp())
                    .sum::<f64>()
                    .ln();
            let wt = f64::from(e.weights[t]);
            nll += wt * (lse - row[e.ids[t + 1] as usize] as f64);
            w += wt;
        }
        sum += nll / w.max(1.0);
    }
    let want = sum / prepared.eval.len() as f64;
    assert!(
        (got - want).abs() <= 1e-4 * want.abs().max(1.0),
        "eval loss {got}, cross-entropy {want}"
    );
}

fn lora_values(run: &TrainingRun) -> Vec<(String, Vec<f32>)> {
    let mut t: Vec<(String, Vec<f32>)> = run
        .tensors()
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1().unwrap()))
        .collect();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

#[test]
fn a_run_killed_after_a_checkpoint_resumes_to_the_same_weights() {
    if let Ok(dir) = std::env::var("DRAMATIS_TRAIN_CHILD") {
        let mut run = start(Path::new(&dir), 20);
        run.run(
            &mut |p| println!("step {} checkpoint {}", p.step, p.checkpoint),
            &AtomicBool::new(false),
        )
        .unwrap();
        return;
    }
    let straight_dir = tempfile::tempdir().unwrap();
    let mut straight = start(straight_dir.path(), 20);
    straight.run(&mut |_| {}, &AtomicBool::new(false)).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_run_killed_after_a_checkpoint_resumes_to_the_same_weights",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("DRAMATIS_TRAIN_CHILD", dir.path())
        .env_remove("RUST_BACKTRACE")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        if line.unwrap().starts_with("step 12 ") {
            child.kill().unwrap(); // SIGKILL between checkpoints
            break;
        }
    }
    child.wait().unwrap();
    let mut resumed = start(dir.path(), 20);
    assert_eq!(resumed.step(), 10, "resumes from the step-10 checkpoint");
    let mut steps = Vec::new();
    resumed
        .run(&mut |p| steps.push(p.step), &AtomicBool::new(false))
        .unwrap();
    assert_eq!(steps, (11..=20).collect::<Vec<_>>());
    let a = lora_values(&straight);
    let b = lora_values(&resumed);
    assert_eq!(a.len(), b.len());
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        let d = va
            .iter()
            .zip(vb)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        // Stated tolerance: 1e-6 absolute (the same operations in the same order).
        assert!(d <= 1e-6, "{na}: differs by {d}");
    }
    // The loss history went through the checkpoint's JSON: equal to rounding.
    assert_eq!(straight.losses().len(), resumed.losses().len());
    for (x, y) in straight.losses().iter().zip(resumed.losses()) {
        assert!((x - y).abs() < 1e-12, "{x} vs {y}");
    }
}

#[test]
fn cancel_checkpoints_and_a_resume_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let mut run = start(dir.path(), 12);
    let cancel = AtomicBool::new(false);
    let out = run
        .run(
            &mut |p| {
                if p.step == 3 {
                    cancel.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            },
            &cancel,
        )
        .unwrap();
    assert_eq!(out, Outcome::Cancelled);
    let mut again = start(dir.path(), 12);
    assert_eq!(again.step(), 3);
    assert_eq!(
        again.run(&mut |_| {}, &AtomicBool::new(false)).unwrap(),
        Outcome::Finished
    );
    // Other settings are refused rather than mixed in.
    let tok = tokenizer();
    let mut other = small_config(12);
    other.lr = 1e-3;
    let err =
        TrainingRun::new(model(), data(16), other, dir.path(), tok.eos_id().unwrap()).unwrap_err();
    assert!(matches!(err, Error::Checkpoint { .. }), "{err}");
}

/// Logits of a fixed prompt, with an adapter or without.
fn logits(model: &Phi, lora: Option<&LoraAdapter>) -> Tensor {
    let ids = tokenizer()
        .encode("<|user|>Say hello to number 3.</s>\n<|assistant|>")
        .unwrap();
    let t = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model.forward(&t, None, Logits::All, lora).unwrap()
}

/// The largest absolute element.
fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn a_peft_export_loads_back_with_the_same_logits() {
    let dir = tempfile::tempdir().unwrap();
    let mut run = start(dir.path(), 5);
    run.run(&mut |_| {}, &AtomicBool::new(false)).unwrap();
    let out = dir.path().join("peft");
    export_peft(&run, &out).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 8);
    assert_eq!(cfg["target_modules"].as_array().unwrap().len(), 6);
    let m = model();
    let loaded = LoraAdapter::load_peft(&out, m.config(), &Device::Cpu).unwrap();
    let a = logits(&m, Some(&run.inference_adapter().unwrap()));
    let b = logits(&m, Some(&loaded));
    let d = max_abs(&(a - b).unwrap());
    assert!(d < 1e-5, "{d}");
    // And the adapter changed the model.
    let moved = max_abs(&(logits(&m, Some(&loaded)) - logits(&m, None)).unwrap());
    assert!(moved > 1e-3);
}

#[test]
fn bad_data_and_settings_are_refused_before_training() {
    let tok = tokenizer();
    let err = prepare(
        &[(1, "   ".into()), (2, String::new())],
        3,
        &tok,
        &DataOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::EmptyDataset(_)), "{err}");
    assert!(err.to_string().contains("2 empty, 3 malformed"), "{err}");
    let long = vec![(1, "word ".repeat(500))];
    let p = prepare(
        &long,
        0,
        &tok,
        &DataOptions {
            max_len: 64,
            eval_fraction: 0.0,
            ..DataOptions::default()
        },
    )
    .unwrap();
    assert_eq!(p.report.truncated, 1);
    assert_eq!(p.train[0].ids.len(), 64);
    let mut bad = small_config(5);
    bad.targets = vec!["lm_head".into()];
    let dir = tempfile::tempdir().unwrap();
    let err = TrainingRun::new(model(), data(16), bad, dir.path(), 0).unwrap_err();
    assert!(err.to_string().contains("lm_head"), "{err}");
}

#[test]
fn a_failed_checkpoint_write_leaves_the_previous_one_usable() {
    let dir = tempfile::tempdir().unwrap();
    let mut run = start(dir.path(), 10);
    run.run(&mut |_| {}, &AtomicBool::new(false)).unwrap();
    let good = std::fs::read(dir.path().join("checkpoint/lora.safetensors")).unwrap();
    // Block the temporary folder: the next checkpoint cannot be written.
    std::fs::write(dir.path().join("checkpoint.partial"), b"in the way").unwrap();
    let blocked = std::fs::metadata(dir.path()).unwrap().permissions();
    let mut ro = blocked.clone();
    std::os::unix::fs::PermissionsExt::set_mode(&mut ro, 0o555);
    std::fs::set_permissions(dir.path(), ro).unwrap();
    let result = run.checkpoint();
    std::fs::set_permissions(dir.path(), blocked).unwrap();
    if result.is_ok() {
        // Running as root ignores the read-only folder; nothing to observe.
        return;
    }
    assert_eq!(
        std::fs::read(dir.path().join("checkpoint/lora.safetensors")).unwrap(),
        good
    );
    let again = start(dir.path(), 10);
    assert_eq!(again.step(), 10);
}

/// Writes a trained adapter (PEFT) and this engine's logits with it, for
/// tests/device/peft_check.py to compare against Python peft + transformers:
/// `DRAMATIS_PEFT_CHECK=dir cargo test -p dramatis-train --test train -- --ignored write_peft_check`
#[test]
#[ignore]
fn write_peft_check() {
    let out = PathBuf::from(std::env::var("DRAMATIS_PEFT_CHECK").unwrap());
    let mut run = start(&out.join("run"), 10);
    run.run(&mut |_| {}, &AtomicBool::new(false)).unwrap();
    export_peft(&run, &out.join("adapter")).unwrap();
    let ids = tokenizer()
        .encode("<|user|>Say hello to number 3.</s>\n<|assistant|>")
        .unwrap();
    let m = model();
    let with = logits(&m, Some(&run.inference_adapter().unwrap()))
        .squeeze(0)
        .unwrap();
    let t = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap();
    let mut map = std::collections::HashMap::new();
    map.insert(
        "ids".to_owned(),
        t.to_dtype(dramatis_llm::DType::I64).unwrap(),
    );
    map.insert("logits".to_owned(), with);
    candle_core::safetensors::save(&map, out.join("reference.safetensors")).unwrap();
}

#[test]
fn the_gguf_lora_has_llama_cpp_names_and_the_same_deltas() {
    use candle_core::quantized::gguf_file;
    let dir = tempfile::tempdir().unwrap();
    let mut run = start(dir.path(), 4);
    run.run(&mut |_| {}, &AtomicBool::new(false)).unwrap();
    let adapter = run.inference_adapter().unwrap();
    let m = model();
    let cfg = m.config().clone();
    let (h, r) = (cfg.hidden_size, 8);
    for fused in [true, false] {
        let out = dir.path().join(format!("lora-{fused}.gguf"));
        dramatis_llm::write_lora_gguf(&adapter, &cfg, &out, fused).unwrap();
        let mut f = std::fs::File::open(&out).unwrap();
        let c = gguf_file::Content::read(&mut f).unwrap();
        let s = |k: &str| c.metadata[k].to_string().unwrap().clone();
        assert_eq!(s("general.type"), "adapter");
        assert_eq!(s("adapter.type"), "lora");
        assert_eq!(s("general.architecture"), "phi2");
        let alpha = c.metadata["adapter.lora.alpha"].to_f32().unwrap();
        assert_eq!(alpha, r as f32);
        let get = |name: &str| {
            let mut f = std::fs::File::open(&out).unwrap();
            c.tensor(&mut f, name, &Device::Cpu)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap()
        };
        // llama.cpp's delta: (alpha / rank) · B · A, against ours: scale · B · A.
        let theirs = |m: &str| {
            let a = get(&format!("blk.1.{m}.weight.lora_a"));
            let b = get(&format!("blk.1.{m}.weight.lora_b"));
            let rank = a.dim(0).unwrap() as f64;
            (b.matmul(&a).unwrap() * (f64::from(alpha) / rank)).unwrap()
        };
        let ours = |t: dramatis_llm::LoraTarget| {
            let s = adapter.layers[1].slot(t).unwrap();
            (s.b.matmul(&s.a).unwrap() * s.scale).unwrap()
        };
        let close = |a: &Tensor, b: &Tensor| {
            let d = max_abs(&(a - b).unwrap());
            assert!(d < 1e-6, "{d}");
        };
        use dramatis_llm::LoraTarget as T;
        if fused {
            let qkv = theirs("attn_qkv");
            assert_eq!(qkv.dims(), [3 * h, h]);
            assert_eq!(get("blk.0.attn_qkv.weight.lora_a").dims(), [3 * r, h]);
            for (k, t) in [T::Q, T::K, T::V].into_iter().enumerate() {
                close(&qkv.narrow(0, k * h, h).unwrap(), &ours(t));
            }
        } else {
            assert_eq!(get("blk.0.attn_q.weight.lora_a").dims(), [r, h]);
            close(&theirs("attn_k"), &ours(T::K));
        }
        assert_eq!(
            get("blk.0.ffn_up.weight.lora_b").dims(),
            [cfg.intermediate_size, r]
        );
        close(&theirs("ffn_down"), &ours(T::Fc2));
        close(&theirs("attn_output"), &ours(T::Dense));
    }
}

#[test]
fn a_merged_model_gives_the_logits_of_base_plus_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let mut run = start(dir.path(), 4);
    run.run(&mut |_| {}, &AtomicBool::new(false)).unwrap();
    let adapter = run.inference_adapter().unwrap();
    let m = model();
    let want = logits(&m, Some(&adapter));
    let biggest = max_abs(&want);
    // Tolerances by type, as a share of the largest logit.
    for (qt, tol) in [
        (dramatis_llm::QuantType::F32, 1e-5),
        (dramatis_llm::QuantType::Q8_0, 0.04),
    ] {
        let out = dir.path().join(format!("merged-{}.gguf", qt.name()));
        dramatis_llm::merge_to_gguf(
            &m,
            Some(&adapter),
            Some(&fixture().join("tokenizer.json")),
            &out,
            qt,
            &AtomicBool::new(false),
            |_| {},
        )
        .unwrap();
        let merged = load_model(&out, &Device::Cpu).unwrap();
        let d = max_abs(&(logits(&merged, None) - &want).unwrap());
        assert!(d <= tol * biggest, "{}: {d} of {biggest}", qt.name());
    }
}

#[test]
fn gradient_checkpointing_trains_to_the_same_weights() {
    let tok = tokenizer();
    let mut runs = Vec::new();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    for (i, dir) in dirs.iter().enumerate() {
        let mut c = small_config(5);
        c.gradient_checkpointing = i == 1;
        let mut run =
            TrainingRun::new(model(), data(16), c, dir.path(), tok.eos_id().unwrap()).unwrap();
        run.run(&mut |_| {}, &AtomicBool::new(false)).unwrap();
        runs.push(run);
    }
    let (a, b) = (lora_values(&runs[0]), lora_values(&runs[1]));
    for ((n, x), (_, y)) in a.iter().zip(&b) {
        let d = x
            .iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        // The same sums in another order: equal to float rounding.
        assert!(d < 1e-5, "{n}: {d}");
    }
    for (x, y) in runs[0].losses().iter().zip(runs[1].losses()) {
        assert!((x - y).abs() < 1e-5, "{x} vs {y}");
    }
}
