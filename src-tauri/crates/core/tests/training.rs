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
