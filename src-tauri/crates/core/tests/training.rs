//! Fine-tuning through the service: data preview, a run recorded with its
//! curve, stop and resume, the adapter attached and used by chat, exports.

use std::path::{Path, PathBuf};

use dramatis_core::train::{DataOptions, Schedule, TrainConfig};
use dramatis_core::{
    AdapterExport, CharacterCard, CharacterDraft, ChatEvent, ChatSettings, DataSource, Dramatis,
    ErrorKind, TrainEvent, TrainRequest,
};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../llm/tests/fixtures/tiny")
}

struct World {
    app: Dramatis,
    model: i64,
    character: i64,
    data: PathBuf,
    _dir: tempfile::TempDir,
}

fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let app = Dramatis::open(&dir.path().join("data")).unwrap();
    let model = app.import_model(&fixture()).unwrap().id;
    let character = app
        .create_character(CharacterDraft {
            card: CharacterCard {
                name: "Kit".into(),
                first_mes: "Beep.".into(),
                ..Default::default()
            },
            avatar: Default::default(),
            book: None,
        })
        .unwrap()
        .id;
    let data = dir.path().join("rows.jsonl");
    let mut rows: Vec<String> = (0..16)
        .map(|i| serde_json::json!({"text": format!("<|user|>Hi {i}</s>\n<|assistant|>Beep boop {i}!</s>")}).to_string())
        .collect();
    rows.insert(3, "not json".into());
    std::fs::write(&data, rows.join("\n")).unwrap();
    World {
        app,
        model,
        character,
        data,
        _dir: dir,
    }
}

fn request(w: &World, steps: usize) -> TrainRequest {
    TrainRequest {
        name: "Kit's voice".into(),
        model_id: w.model,
        character_id: Some(w.character),
        source: DataSource::File {
            path: w.data.clone(),
            column: "text".into(),
        },
        config: TrainConfig {
            r: 8,
            alpha: 16.0,
            lr: 5e-3,
            batch_size: 4,
            max_steps: Some(steps),
            schedule: Schedule::Constant,
            eval_every: 2,
            checkpoint_every: 2,
            ..TrainConfig::seed_recipe()
        },
        data: DataOptions {
            eval_fraction: 0.125,
            ..DataOptions::default()
        },
        start_adapter_id: None,
    }
}

#[test]
fn the_preview_reports_rows_tokens_and_problems() {
    let w = world();
    let src = DataSource::File {
        path: w.data.clone(),
        column: "text".into(),
    };
    let p = w
        .app
        .preview_training_data(w.model, &src, &DataOptions::default())
        .unwrap();
    assert_eq!(p.report.used, 16);
    assert_eq!(p.report.malformed, 1);
    assert_eq!(p.problems[0].row, 4);
    assert_eq!(p.samples.len(), 5);
    assert!(p.samples[0].text.contains("Beep boop 0"));
    assert!(p.samples[0].tokens > 5);
    let bad = DataSource::File {
        path: w.data.clone(),
        column: "dialogue".into(),
    };
    let err = w
        .app
        .preview_training_data(w.model, &bad, &DataOptions::default())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BadFile);
    assert!(err.to_string().contains("no column `dialogue`"));
}

fn reply(app: &Dramatis, character: i64) -> String {
    reply_with_events(app, character, &mut |_| {})
}

/// A greedy reply to "Hi 3" in a new chat, its events passed to `on_event`.
fn reply_with_events(
    app: &Dramatis,
    character: i64,
    on_event: &mut (dyn FnMut(ChatEvent) + Send),
) -> String {
    let chat = app.start_chat(character).unwrap().chat.id;
    app.set_chat_settings(
        chat,
        &ChatSettings {
            temperature: 0.0,
            max_new_tokens: 12,
            seed: Some(1),
            ..ChatSettings::default()
        },
    )
    .unwrap();
    let v = app.send_message(chat, "Hi 3", on_event).unwrap();
    v.messages.last().unwrap().content.clone()
}

#[test]
fn a_run_trains_attaches_its_adapter_and_chat_uses_it() {
    let w = world();
    let before = reply(&w.app, w.character);
    let mut steps = Vec::new();
    let mut samples = Vec::new();
    let run = w
        .app
        .train(request(&w, 8), &mut |e| {
            if let TrainEvent::Progress(p) = e {
                steps.push(p.step);
                if p.checkpoint {
                    samples.push(p.samples.clone());
                }
            }
        })
        .unwrap();
    assert_eq!(steps, (1..=8).collect::<Vec<_>>());
    // Every checkpoint (every 2 steps) answered the three sample prompts.
    assert_eq!(samples.len(), 4);
    assert!(samples.iter().all(|s| s.len() == 3));
    assert_eq!(run.status, "finished");
    assert_eq!(run.metrics.len(), 8);
    assert!(run.metrics.iter().filter(|m| m.eval_loss.is_some()).count() >= 3);
    let adapter = run.adapter_id.unwrap();
    let listed = w.app.list_adapters().unwrap();
    assert_eq!(listed[0].characters, [w.character]);
    // Chat now speaks through the adapter: the same greedy settings give another reply,
    // and the base is not loaded again.
    let mut events = Vec::new();
    let after = reply_with_events(&w.app, w.character, &mut |e| events.push(e));
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, ChatEvent::Loading { .. }))
    );
    assert_ne!(before, after, "the adapter changed nothing");
    // Detached, the base speaks again.
    w.app.attach_adapter(w.character, None).unwrap();
    assert_eq!(reply(&w.app, w.character), before);
    // Exports.
    let out = w._dir.path().join("exports");
    w.app
        .export_adapter(adapter, AdapterExport::Peft, &out.join("peft"))
        .unwrap();
    assert!(out.join("peft/adapter_model.safetensors").is_file());
    w.app
        .export_adapter(adapter, AdapterExport::GgufLora, &out.join("lora.gguf"))
        .unwrap();
    w.app
        .export_adapter(adapter, AdapterExport::Merged, &out.join("merged.gguf"))
        .unwrap();
    assert!(dramatis_core::llm::inspect_model(&out.join("merged.gguf")).is_ok());
    w.app.delete_adapter(adapter).unwrap();
    assert!(w.app.list_adapters().unwrap().is_empty());
}

#[test]
fn a_stopped_run_resumes_to_the_end() {
    let w = world();
    let app = &w.app;
    let mut run_id = None;
    let run = app
        .train(request(&w, 6), &mut |e| match e {
            TrainEvent::Started { run_id: id, .. } => run_id = Some(*id),
            TrainEvent::Progress(p) if p.step == 2 => {
                assert!(app.stop_training(run_id.unwrap()));
            }
            _ => {}
        })
        .unwrap();
    assert_eq!(run.status, "stopped");
    assert_eq!(app.list_runs().unwrap()[0].status, "stopped");
    let mut first = None;
    let run = app
        .resume_training(run.id, &mut |e| {
            if let TrainEvent::Started { step, .. } = e {
                first = Some(*step);
            }
        })
        .unwrap();
    assert!(first.unwrap() >= 2);
    assert_eq!(run.status, "finished");
    assert_eq!(run.metrics.len(), 6);
}

#[test]
fn a_characters_own_chats_are_training_data() {
    let w = world();
    let chat = w.app.start_chat(w.character).unwrap().chat.id;
    w.app
        .set_chat_settings(
            chat,
            &ChatSettings {
                max_new_tokens: 4,
                ..ChatSettings::default()
            },
        )
        .unwrap();
    w.app
        .send_message(chat, "Tell me a story", &mut |_| {})
        .unwrap();
    let p = w
        .app
        .preview_training_data(
            w.model,
            &DataSource::Chats {
                character_id: w.character,
            },
            &DataOptions::default(),
        )
        .unwrap();
    assert_eq!(p.report.used, 1);
    assert!(p.samples[0].text.starts_with("<|system|>"));
    assert!(p.samples[0].text.contains("<|user|>Tell me a story</s>"));
    // Bytes that are not UTF-8, and a file that is not there: clear errors.
    let bad = w._dir.path().join("latin1.jsonl");
    std::fs::write(&bad, b"{\"text\": \"caf\xe9\"}\n").unwrap();
    let src = DataSource::File {
        path: bad,
        column: "text".into(),
    };
    let err = w
        .app
        .preview_training_data(w.model, &src, &DataOptions::default())
        .unwrap_err();
    assert!(err.to_string().contains("not UTF-8"), "{err}");
    let gone = DataSource::File {
        path: w._dir.path().join("nope.jsonl"),
        column: "text".into(),
    };
    let err = w
        .app
        .preview_training_data(w.model, &gone, &DataOptions::default())
        .unwrap_err();
    assert!(err.to_string().contains("nope.jsonl"), "{err}");
    // A dataset that is not downloaded is a clear error, and no run is recorded.
    let mut req = request(&w, 2);
    req.source = DataSource::Catalog {
        dataset_id: "roleplay".into(),
    };
    let err = w.app.train(req, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("not downloaded"), "{err}");
    assert!(w.app.list_runs().unwrap().is_empty());
}

/// TRL DPO JSONL: `n` pairs that prefer the captain's answer, a line that is
/// not JSON, and a prompt without chat markers.
fn pair_file(dir: &Path, n: usize) -> PathBuf {
    let mut lines: Vec<String> = (0..n)
        .map(|i| {
            serde_json::json!({
                "prompt": format!("<|user|>Order {i}?</s>\n<|assistant|>"),
                "chosen": "Aye, captain!",
                "rejected": "whatever.",
            })
            .to_string()
        })
        .collect();
    lines.insert(2, "{not json".into());
    lines.push(
        serde_json::json!({"prompt": "Plain question", "chosen": "Aye, captain!", "rejected": "no"})
            .to_string(),
    );
    let path = dir.join("pairs.jsonl");
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

#[test]
fn imported_pairs_train_with_dpo_from_the_characters_adapter() {
    let w = world();
    let app = &w.app;
    // A voice first: the character's adapter, which DPO then starts from.
    let sft = app.train(request(&w, 4), &mut |_| {}).unwrap();
    let voice = sft.adapter_id.unwrap();

    let file = pair_file(w._dir.path(), 12);
    let got = app.import_preferences(w.character, &file).unwrap();
    assert_eq!((got.added, got.duplicates, got.skipped_count), (13, 0, 1));
    assert_eq!(got.skipped[0].line, 3);
    assert!(
        got.changed
            .iter()
            .any(|c| c.contains("1 prompt without chat markers was")),
        "{:?}",
        got.changed
    );
    let again = app.import_preferences(w.character, &file).unwrap();
    assert_eq!((again.added, again.duplicates), (0, 13));
    let bad = w._dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": 1}\nnope\n").unwrap();
    let err = app.import_preferences(w.character, &bad).unwrap_err();
    assert!(
        err.to_string().contains("line 1") && err.to_string().contains("line 2"),
        "{err}"
    );

    let pairs = app.preference_pairs(w.character).unwrap();
    assert_eq!(pairs.len(), 13);
    assert!(
        pairs
            .iter()
            .all(|p| p.kind == dramatis_core::PairKind::Imported)
    );
    assert_eq!(pairs[0].source.as_deref(), Some("pairs.jsonl"));
    app.set_imported_pair_excluded(pairs[12].imported_id.unwrap(), true)
        .unwrap();
    assert_eq!(
        app.export_preferences(w.character).unwrap().lines().count(),
        12
    );

    let opts = DataOptions {
        eval_fraction: 0.25,
        ..DataOptions::default()
    };
    let src = DataSource::Preferences {
        character_id: w.character,
    };
    let preview = app.preview_training_data(w.model, &src, &opts).unwrap();
    let pp = preview.pairs.as_ref().unwrap();
    assert_eq!((pp.report.used, pp.excluded, pp.imported), (12, 1, 12));
    assert_eq!((pp.report.train_pairs, pp.report.eval_pairs), (9, 3));
    assert_eq!(pp.start_adapter.as_ref().map(|a| a.id), Some(voice));
    assert_eq!(preview.report.train_rows, 9);

    let req = TrainRequest {
        name: "Kit's taste".into(),
        source: src,
        data: opts,
        config: TrainConfig {
            // The start adapter's rank and alpha replace these.
            r: 2,
            alpha: 2.0,
            lr: 5e-3,
            batch_size: 3,
            max_steps: Some(6),
            eval_every: 3,
            checkpoint_every: 3,
            objective: dramatis_core::train::Objective::Dpo {
                beta: 0.5,
                sft_weight: 0.0,
            },
            ..request(&w, 6).config
        },
        start_adapter_id: app.default_start_adapter(w.character, w.model).unwrap(),
        ..request(&w, 6)
    };
    let mut margins = Vec::new();
    let run = app
        .train(req, &mut |e| {
            if let TrainEvent::Progress(p) = e {
                margins.push((p.margin.unwrap(), p.eval_margin));
            }
        })
        .unwrap();
    assert_eq!(run.status, "finished");
    let used = run.request.as_ref().unwrap();
    assert_eq!((used.config.r, used.config.alpha), (8, 16.0));
    assert_eq!(used.start_adapter_id, Some(voice));
    // The reference is the voice adapter, where the policy starts: margin 0 at first.
    assert!(margins[0].0.abs() < 1e-4, "{margins:?}");
    let held_out = margins.last().unwrap().1.unwrap();
    assert!(held_out > 0.0, "the held-out margin rose: {margins:?}");
    assert!(run.metrics.iter().all(|m| m.margin.is_some()));
    let adapter = run.adapter_id.unwrap();
    let listed = app.list_adapters().unwrap();
    let a = listed.iter().find(|a| a.id == adapter).unwrap();
    assert_eq!(a.characters, [w.character]);
    assert_eq!(a.metrics["objective"], "dpo");
    assert!(a.metrics["eval_margin"].as_f64().unwrap() > 0.0);
    // The voice adapter is kept, no longer attached.
    assert!(
        listed
            .iter()
            .find(|a| a.id == voice)
            .unwrap()
            .characters
            .is_empty()
    );
}
