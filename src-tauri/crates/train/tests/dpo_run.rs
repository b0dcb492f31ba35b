//! DPO as a training run on the tiny fixture: pairs prepared and cut to
//! length, the held-out margin rising, an exact resume, a start from an
//! existing adapter (which is then the reference), and the fixture for the
//! comparison with a torch DPO loss (tests/device/dpo_check.py).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use dramatis_llm::{Device, LoraAdapter, Phi, PhiTokenizer, Tensor, load_model};
use dramatis_train::data::prepare;
use dramatis_train::{
    DataOptions, DpoBatch, DpoConfig, Error, Objective, Outcome, PairText, Schedule, TrainConfig,
    TrainProgress, TrainingRun, dpo_step, export_peft, prepare_pairs, sequence_logps,
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

/// Pairs that always prefer the captain's answer over a shrug.
fn pairs(n: usize) -> Vec<PairText> {
    (0..n)
        .map(|i| PairText {
            prompt: format!(
                "<|system|>You are Kestrel, a ship's AI.</s>\n<|user|>Order number {i}.</s>\n<|assistant|>"
            ),
            chosen: "Aye, captain!".into(),
            rejected: "whatever.".into(),
        })
        .collect()
}

fn dpo_config(steps: usize) -> TrainConfig {
    TrainConfig {
        r: 4,
        alpha: 8.0,
        lr: 5e-3,
        batch_size: 2,
        max_steps: Some(steps),
        schedule: Schedule::Constant,
        eval_every: 4,
        checkpoint_every: 4,
        seed: 5,
        objective: Objective::Dpo {
            beta: 0.5,
            sft_weight: 0.0,
        },
        ..TrainConfig::seed_recipe()
    }
}

fn prepared(n: usize) -> dramatis_train::PreparedPairs {
    let opts = DataOptions {
        eval_fraction: 0.25,
        ..DataOptions::default()
    };
    prepare_pairs(&pairs(n), &tokenizer(), &opts).unwrap()
}

fn run_in(dir: &Path, steps: usize, start: Option<&LoraAdapter>) -> TrainingRun {
    TrainingRun::new_from(
        model(),
        prepared(12),
        dpo_config(steps),
        dir,
        tokenizer().eos_id().unwrap(),
        start,
    )
    .unwrap()
}

#[test]
fn pairs_too_long_keep_the_prompts_end_and_the_replies_start() {
    let tok = tokenizer();
    let long = PairText {
        prompt: format!("{}<|assistant|>", "word ".repeat(200)),
        chosen: "yes ".repeat(40),
        rejected: "no".into(),
    };
    let same = PairText {
        prompt: "Hi".into(),
        chosen: "same".into(),
        rejected: "same".into(),
    };
    let opts = DataOptions {
        max_len: 64,
        eval_fraction: 0.0,
        ..DataOptions::default()
    };
    let p = prepare_pairs(&[long.clone(), same, pairs(1)[0].clone()], &tok, &opts).unwrap();
    assert_eq!((p.report.pairs, p.report.used), (3, 2));
    assert_eq!((p.report.truncated, p.report.empty), (1, 1));
    assert!(p.report.longest <= 64, "{:?}", p.report);
    let cut = p
        .train
        .iter()
        .find(|e| e.len() == 64)
        .expect("the long pair");
    let full = tok.encode(&long.prompt).unwrap();
    // The prompt keeps its end, so the reply still follows `<|assistant|>`.
    assert_eq!(cut.prompt[..], full[full.len() - cut.prompt.len()..]);
    assert!(cut.prompt.len() >= 64 / 4);
    let chosen = tok.encode(&format!("{}</s>", long.chosen)).unwrap();
    assert_eq!(cut.chosen[..], chosen[..cut.chosen.len()]);
    assert!(cut.chosen.len() < chosen.len());
    // Replies end with `</s>`, where chat stops.
    let short = p.train.iter().find(|e| e.len() < 64).unwrap();
    assert_eq!(
        tok.decode(&short.rejected).unwrap(),
        "whatever.</s>",
        "{:?}",
        short
    );
    let err = prepare_pairs(&pairs(0), &tok, &opts).unwrap_err();
    assert!(matches!(err, Error::EmptyDataset(_)), "{err}");
}

#[test]
fn the_objective_must_match_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let pad = tokenizer().eos_id().unwrap();
    let err = TrainingRun::new(
        model(),
        prepared(4),
        TrainConfig {
            objective: Objective::Sft,
            ..dpo_config(2)
        },
        dir.path(),
        pad,
    )
    .unwrap_err();
    assert!(err.to_string().contains("DPO"), "{err}");
    let text = prepare(
        &[(1, "<|user|>hi</s>".to_owned())],
        0,
        &tokenizer(),
        &DataOptions::default(),
    )
    .unwrap();
    let err = TrainingRun::new(model(), text, dpo_config(2), dir.path(), pad).unwrap_err();
    assert!(err.to_string().contains("preference pairs"), "{err}");
    let err = TrainingRun::new(
        model(),
        prepared(4),
        TrainConfig {
            objective: Objective::Dpo {
                beta: 0.0,
                sft_weight: 0.0,
            },
            ..dpo_config(2)
        },
        dir.path(),
        pad,
    )
    .unwrap_err();
    assert!(err.to_string().contains("beta"), "{err}");
}

#[test]
fn a_dpo_run_raises_the_held_out_margin_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let mut run = run_in(dir.path(), 12, None);
    // A fresh adapter is the base, which is the reference: z = 0 everywhere.
    let before = run.eval_dpo().unwrap().unwrap();
    assert!(before.margin.abs() < 1e-5 && (before.loss - std::f64::consts::LN_2).abs() < 1e-5);
    let mut seen: Vec<TrainProgress> = Vec::new();
    let out = run
        .run(&mut |p| seen.push(p.clone()), &AtomicBool::new(false))
        .unwrap();
    assert_eq!(out, Outcome::Finished);
    assert_eq!(seen.len(), 12);
    assert!(
        seen.iter()
            .all(|p| p.margin.is_some() && p.accuracy.is_some())
    );
    assert!(
        (seen[0].loss - std::f64::consts::LN_2).abs() < 1e-4,
        "{}",
        seen[0].loss
    );
    let last = seen.last().unwrap();
    let after = run.eval_dpo().unwrap().unwrap();
    assert_eq!(last.eval_margin, Some(after.margin));
    assert!(after.margin > 0.5, "the held-out margin rose: {after:?}");
    assert_eq!(after.accuracy, 1.0);
    assert!(last.loss < 0.5 * std::f64::consts::LN_2, "{}", last.loss);
    assert_eq!(run.eval_dpo_metrics().len(), 3);

    // Stopped after 4 steps and resumed: the same weights as without a stop.
    let dir2 = tempfile::tempdir().unwrap();
    let mut part = run_in(dir2.path(), 12, None);
    let stop = AtomicBool::new(false);
    let out = part
        .run(
            &mut |p| {
                if p.step == 6 {
                    stop.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            },
            &stop,
        )
        .unwrap();
    assert_eq!(out, Outcome::Cancelled);
    drop(part);
    let mut resumed = run_in(dir2.path(), 12, None);
    assert_eq!(resumed.step(), 6);
    assert_eq!(resumed.dpo_metrics().len(), 6);
    resumed.run(&mut |_| {}, &AtomicBool::new(false)).unwrap();
    let (a, b) = (run.tensors().unwrap(), resumed.tensors().unwrap());
    for (k, t) in &a {
        let d = (t - &b[k])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-5, "{k}: {d}");
    }
    assert_eq!(run.losses().len(), resumed.losses().len());
    for (x, y) in run.losses().iter().zip(resumed.losses()) {
        assert!((x - y).abs() <= 1e-9 * x.abs().max(1e-12), "{x} vs {y}");
    }
}

/// A short SFT-free start: a DPO run on the opposite preference, exported,
/// so the next run starts from weights that are not the base's.
fn trained_adapter(dir: &Path) -> LoraAdapter {
    let mut run = TrainingRun::new(
        model(),
        prepare_pairs(
            &pairs(8)
                .into_iter()
                .map(|p| PairText {
                    chosen: p.rejected,
                    rejected: p.chosen,
                    ..p
                })
                .collect::<Vec<_>>(),
            &tokenizer(),
            &DataOptions::default(),
        )
        .unwrap(),
        dpo_config(6),
        &dir.join("run"),
        tokenizer().eos_id().unwrap(),
    )
    .unwrap();
    run.run(&mut |_| {}, &AtomicBool::new(false)).unwrap();
    export_peft(&run, &dir.join("adapter")).unwrap();
    LoraAdapter::load_peft(&dir.join("adapter"), model().config(), &Device::Cpu).unwrap()
}

#[test]
fn a_run_from_an_adapter_starts_at_it_and_uses_it_as_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let start = trained_adapter(dir.path());
    let mut run = run_in(&dir.path().join("second"), 8, Some(&start));
    // The starting weights are the adapter's...
    let t = run.tensors().unwrap();
    let key = "base_model.model.model.layers.1.mlp.fc1.lora_B.weight";
    let slot = start.layers[1].slot(dramatis_llm::LoraTarget::Fc1).unwrap();
    let d = (&t[key] - &slot.b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        d == 0.0
            && slot
                .b
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
    );
    // ...and the reference is the adapter, not the base: the margin starts at 0
    // although the adapter prefers the shrug over the base.
    let m = run.eval_dpo().unwrap().unwrap();
    assert!(m.margin.abs() < 1e-5, "{m:?}");
    run.run(&mut |_| {}, &AtomicBool::new(false)).unwrap();
    assert!(run.eval_dpo().unwrap().unwrap().margin > 0.0);

    // An adapter of another rank is refused with a reason.
    let err = TrainingRun::new_from(
        model(),
        prepared(4),
        TrainConfig {
            r: 8,
            alpha: 16.0,
            ..dpo_config(2)
        },
        &dir.path().join("third"),
        tokenizer().eos_id().unwrap(),
        Some(&start),
    )
    .unwrap_err();
    assert!(err.to_string().contains("rank"), "{err}");
}

/// Writes what tests/device/dpo_check.py compares with a DPO loss written in
/// torch on transformers + peft: the pairs' token rows and reply masks, a
/// starting adapter (PEFT), and this engine's DPO loss and LoRA gradients in
/// three cases (reference = the base; = the adapter itself; the base with
/// the SFT term).
/// `DRAMATIS_DPO_CHECK=dir cargo test -p dramatis-train --test dpo_run -- --ignored write_dpo_check`
#[test]
#[ignore]
fn write_dpo_check() {
    let out = PathBuf::from(std::env::var("DRAMATIS_DPO_CHECK").unwrap());
    let start = trained_adapter(&out);
    let tok = tokenizer();
    let m = model();
    let texts = [
        (
            "<|user|>Status?</s>\n<|assistant|>",
            "All green, captain.</s>",
            "No.</s>",
        ),
        (
            "<|user|>Sing.</s>\n<|assistant|>",
            "La la la!</s>",
            "I would rather not sing today.</s>",
        ),
    ];
    let mut rows: Vec<(Vec<u32>, usize)> = Vec::new();
    for side in 0..2 {
        for (p, c, r) in texts {
            let p = tok.encode(p).unwrap();
            let reply = tok.encode(if side == 0 { c } else { r }).unwrap();
            rows.push(([p.clone(), reply].concat(), p.len()));
        }
    }
    let seq = rows.iter().map(|r| r.0.len()).max().unwrap() - 1;
    let (mut inp, mut tgt, mut mask) = (Vec::new(), Vec::new(), Vec::new());
    for (ids, plen) in &rows {
        for t in 0..seq {
            let real = t + 1 < ids.len();
            inp.push(if t < ids.len() { ids[t] } else { 0 });
            tgt.push(if real { ids[t + 1] } else { 0 });
            mask.push(f32::from(u8::from(real && t + 1 >= *plen)));
        }
    }
    let n = rows.len();
    let b = DpoBatch {
        tokens: Tensor::from_vec(inp, (n, seq), &Device::Cpu).unwrap(),
        targets: Tensor::from_vec(tgt, (n, seq), &Device::Cpu).unwrap(),
        mask: Tensor::from_vec(mask, (n, seq), &Device::Cpu).unwrap(),
    };
    let mut map = std::collections::HashMap::new();
    map.insert(
        "tokens".to_owned(),
        b.tokens.to_dtype(dramatis_llm::DType::I64).unwrap(),
    );
    map.insert(
        "targets".to_owned(),
        b.targets.to_dtype(dramatis_llm::DType::I64).unwrap(),
    );
    map.insert("mask".to_owned(), b.mask.clone());
    // The adapter's logits on the first row: the export must load in peft as is.
    let logits = m
        .forward(
            &b.tokens.narrow(0, 0, 1).unwrap(),
            None,
            dramatis_llm::Logits::All,
            Some(&start),
        )
        .unwrap();
    map.insert("logits".to_owned(), logits.squeeze(0).unwrap());
    let mut cases = serde_json::Map::new();
    for (name, reference, sft) in [
        ("base_reference", None, 0.0),
        ("adapter_reference", Some(&start), 0.0),
        ("base_reference_sft", None, 0.5),
    ] {
        let cfg = DpoConfig {
            beta: 0.1,
            sft_weight: sft,
        };
        let r = sequence_logps(&m, &b, reference, dramatis_llm::DType::F32).unwrap();
        let step = dpo_step(&m, &start, &r, &b, cfg, dramatis_llm::DType::F32, false).unwrap();
        for (layer, grads) in step.grads.grads.iter().enumerate() {
            for g in grads {
                let path = g.target.module_path();
                let key = |w: &str| {
                    format!("{name}.base_model.model.model.layers.{layer}.{path}.lora_{w}.weight")
                };
                map.insert(key("A"), g.a.clone());
                map.insert(key("B"), g.b.clone());
            }
        }
        cases.insert(
            name.into(),
            serde_json::json!({
                "beta": cfg.beta,
                "sft_weight": sft,
                "reference": if reference.is_some() { "adapter" } else { "base" },
                "loss": step.metrics.loss,
                "margin": step.metrics.margin,
            }),
        );
    }
    candle_core::safetensors::save(&map, out.join("dpo_reference.safetensors")).unwrap();
    std::fs::write(
        out.join("dpo_reference.json"),
        serde_json::to_string_pretty(&cases).unwrap(),
    )
    .unwrap();
}
