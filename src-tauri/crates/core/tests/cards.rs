//! Card files through the real service: import (PNG, JSON, CHARX, world
//! info), duplicates, export and re-import, carried adapters, bad files, and
//! world info firing in a real chat with the tiny Phi fixture.

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use dramatis_core::persona::lorebook::{Entry, Lorebook};
use dramatis_core::persona::worldinfo::Reason;
use dramatis_core::{
    CardFormat, CharacterCard, CharacterFilter, ChatSettings, Dramatis, ImportOutcome,
    LorebookLink, OnDuplicate,
};
use serde_json::json;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../llm/tests/fixtures/tiny")
}

fn app(dir: &Path) -> Dramatis {
    let app = Dramatis::open(&dir.join("data")).unwrap();
    if app.list_models().unwrap().is_empty() {
        app.import_model(&fixture()).unwrap();
    }
    app
}

fn count(app: &Dramatis) -> usize {
    app.list_characters(&CharacterFilter::default())
        .unwrap()
        .len()
}

/// A small real PNG with `chunks` (keyword, text) as tEXt chunks.
fn png_with(chunks: &[(&str, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, 4, 4);
        enc.set_color(png::ColorType::Rgba);
        enc.set_depth(png::BitDepth::Eight);
        for (k, v) in chunks {
            enc.add_text_chunk((*k).to_owned(), v.clone()).unwrap();
        }
        let mut w = enc.write_header().unwrap();
        w.write_image_data(&[200u8; 4 * 4 * 4]).unwrap();
    }
    out
}

fn b64(v: &serde_json::Value) -> String {
    base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(v).unwrap())
}

/// A card with a bit of everything real cards carry.
fn rich_card() -> serde_json::Value {
    json!({
        "spec": "chara_card_v3", "spec_version": "3.0",
        "data": {
            "name": "Captain Ysolde Marr", "nickname": "Ysolde",
            "description": "{{char}} commands the airship <b>Kestrel</b>. <script>alert(1)</script>",
            "personality": "bold", "scenario": "A storm over the sea.",
            "first_mes": "Hold fast, {{user}}!", "mes_example": "<START>\n{{user}}: Hi\n{{char}}: Aye.",
            "creator_notes": "Pirate captain.", "system_prompt": "", "post_history_instructions": "",
            "alternate_greetings": ["Another storm."], "group_only_greetings": ["Crew, listen."],
            "tags": ["Fantasy", "a-tag-that-is-way-too-long-for-the-editor-but-real-cards-have-them-anyway-and-more-text-here"],
            "creator": "someone", "character_version": "2",
            "creation_date": 1_700_000_000, "modification_date": 1_700_000_100,
            "source": ["https://example.invalid/card"],
            "extensions": {"talkativeness": "0.5", "depth_prompt": {"prompt": "x", "depth": 4}, "zzz": [1, {"a": null}]},
            "character_book": {"name": "Marr's world", "entries": [
                {"keys": ["reactor", "engine"], "content": "The engine is named Old Sol.", "enabled": true,
                 "insertion_order": 10, "id": 1, "comment": "engine", "use_regex": false,
                 "extensions": {"position": 1, "depth": 4, "probability": 100}},
                {"keys": ["kraken"], "content": "@@depth 1\nKrakens fear fire.", "enabled": true,
                 "insertion_order": 20, "id": 2, "comment": "kraken", "use_regex": false, "extensions": {}}
            ]},
            "x_unknown_key": {"kept": true}
        }
    })
}

fn only_imported(outcomes: Vec<ImportOutcome>) -> (i64, Vec<String>) {
    assert_eq!(outcomes.len(), 1, "{outcomes:?}");
    match outcomes.into_iter().next().unwrap() {
        ImportOutcome::Imported {
            character, changes, ..
        } => (character.id, changes),
        other => panic!("not imported: {other:?}"),
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
    p
}

#[test]
fn every_format_round_trips_through_import_and_export() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(dir.path());
    let v3 = rich_card();
    let mut v2 = v3.clone();
    v2["spec"] = json!("chara_card_v2");
    v2["spec_version"] = json!("2.0");
    let png = png_with(&[("chara", b64(&v2)), ("ccv3", b64(&v3))]);
    let file = write(dir.path(), "ysolde.png", &png);
    let (id, _) = only_imported(app.import_card_files(&[file], OnDuplicate::Ask));
    let first = app.character(id).unwrap();
    assert_eq!(first.card.name, "Captain Ysolde Marr");
    assert_eq!(first.card.other["nickname"], "Ysolde", "V3 keys are kept");
    assert_eq!(first.card.other["x_unknown_key"], json!({"kept": true}));
    assert!(
        first.card.description.contains("<script>"),
        "hostile text is kept as text"
    );
    assert!(first.avatar_version.is_some(), "the PNG became the avatar");
    assert_eq!(first.book.as_ref().unwrap().entries.len(), 2);
    let avatar = app.avatar(id).unwrap().unwrap();
    assert!(
        !avatar.bytes().windows(4).any(|w| w == b"ccv3"),
        "the avatar is the picture without the card chunks"
    );
    for format in [
        CardFormat::Png,
        CardFormat::JsonV2,
        CardFormat::JsonV3,
        CardFormat::Charx,
    ] {
        let (name, bytes) = app.export_character(id, format).unwrap();
        let again = only_imported(vec![app.import_card_bytes(
            &name,
            &bytes,
            OnDuplicate::KeepBoth,
        )])
        .0;
        let c = app.character(again).unwrap();
        assert_eq!(c.card, first.card, "{format:?} round trip");
        assert_eq!(
            c.avatar_version.is_some(),
            format != CardFormat::JsonV2 && format != CardFormat::JsonV3,
            "{format:?}: pictures travel in PNG and CHARX"
        );
        if format == CardFormat::Png {
            // Export → import → export again gives the same card JSON.
            let (_, twice) = app.export_character(again, CardFormat::JsonV3).unwrap();
            let (_, once) = app.export_character(id, CardFormat::JsonV3).unwrap();
            assert_eq!(
                serde_json::from_slice::<serde_json::Value>(&twice).unwrap(),
                serde_json::from_slice::<serde_json::Value>(&once).unwrap()
            );
        }
    }
}

#[test]
fn a_duplicate_asks_then_replaces_keeps_both_or_skips() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(dir.path());
    let card = |desc: &str| {
        serde_json::to_vec(&json!({"spec": "chara_card_v2", "spec_version": "2.0",
            "data": {"name": "Wren", "creator": "me", "description": desc}}))
        .unwrap()
    };
    let (id, _) = only_imported(vec![app.import_card_bytes(
        "wren.json",
        &card("one"),
        OnDuplicate::Ask,
    )]);
    let before = count(&app);
    let asked = app.import_card_bytes("wren2.json", &card("two"), OnDuplicate::Ask);
    assert_eq!(
        asked,
        ImportOutcome::Duplicate {
            file: "wren2.json".into(),
            name: "Wren".into(),
            existing_id: id
        }
    );
    assert!(matches!(
        app.import_card_bytes("wren2.json", &card("two"), OnDuplicate::Skip),
        ImportOutcome::Skipped { .. }
    ));
    assert_eq!(count(&app), before, "ask and skip store nothing");
    let chat = app.start_chat(id).unwrap().chat.id;
    let model = app.list_models().unwrap()[0].id;
    let adapter = app
        .register_adapter(&fixture().join("adapter"), model)
        .unwrap();
    app.attach_adapter(id, Some(adapter)).unwrap();
    let replaced = app.import_card_bytes("wren2.json", &card("two"), OnDuplicate::Replace);
    assert!(matches!(
        replaced,
        ImportOutcome::Imported { replaced: true, .. }
    ));
    assert_eq!(app.character(id).unwrap().card.description, "two");
    assert!(app.chat_view(chat).is_ok(), "replacing keeps the chats");
    assert_eq!(
        app.list_adapters().unwrap()[0].characters,
        [id],
        "replacing the card keeps the character's own adapter"
    );
    assert_eq!(count(&app), before);
    app.import_card_bytes("wren3.json", &card("three"), OnDuplicate::KeepBoth);
    assert_eq!(count(&app), before + 1);
    // Another creator is another character.
    let other = serde_json::to_vec(&json!({"name": "Wren", "creator": "you"})).unwrap();
    assert!(matches!(
        app.import_card_bytes("v1.json", &other, OnDuplicate::Ask),
        ImportOutcome::Imported { .. }
    ));
}

#[test]
fn bad_files_are_refused_by_name_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(dir.path());
    let before = count(&app);
    let good = png_with(&[("chara", b64(&rich_card()))]);
    let mut truncated = good.clone();
    truncated.truncate(good.len() - 20);
    let zip_with = |entries: &[(&str, &[u8])]| {
        let mut buf = std::io::Cursor::new(Vec::new());
        {
            let mut z = zip::ZipWriter::new(&mut buf);
            for (name, bytes) in entries {
                z.start_file(*name, zip::write::SimpleFileOptions::default())
                    .unwrap();
                z.write_all(bytes).unwrap();
            }
            z.finish().unwrap();
        }
        buf.into_inner()
    };
    let card_json = serde_json::to_vec(&rich_card()).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("notes.txt", b"just some text".to_vec()),
        ("plain.png", png_with(&[])),
        ("cut.png", truncated),
        (
            "garbage.png",
            png_with(&[("chara", "%%%not base64{{".into())]),
        ),
        ("not-a-card.json", br#"[1, 2, 3]"#.to_vec()),
        (
            "settings.json",
            br#"{"theme": "dark", "volume": 3}"#.to_vec(),
        ),
        ("no-card.charx", zip_with(&[("readme.txt", b"hi")])),
        (
            "escape.charx",
            zip_with(&[("card.json", &card_json), ("../evil.png", b"x")]),
        ),
    ];
    let mut files = Vec::new();
    for (name, bytes) in &cases {
        files.push(write(dir.path(), name, bytes));
    }
    let outcomes = app.import_card_files(&files, OnDuplicate::KeepBoth);
    for ((name, _), o) in cases.iter().zip(&outcomes) {
        match o {
            ImportOutcome::Failed { file, message } => {
                assert_eq!(file, name);
                assert!(
                    message.len() > 10 && !message.contains("Error("),
                    "{name}: {message}"
                );
            }
            other => panic!("{name} was not refused: {other:?}"),
        }
    }
    assert_eq!(count(&app), before, "nothing was stored");
    assert!(app.list_lorebooks().unwrap().is_empty());
}

#[test]
fn a_charx_carries_the_adapter_to_another_installation() {
    let dir = tempfile::tempdir().unwrap();
    let home = app(dir.path());
    let model = home.list_models().unwrap()[0].id;
    // The fixture's PEFT adapter, registered as if trained here.
    let adapter_dir = dir.path().join("trained");
    std::fs::create_dir_all(&adapter_dir).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixture().join("adapter").join(f), adapter_dir.join(f)).unwrap();
    }
    let adapter = home
        .store()
        .insert_adapter(&dramatis_core::AdapterRow {
            id: 0,
            name: "Kestrel voice".into(),
            run_id: None,
            base_model_id: Some(model),
            base_sha256: None,
            path: adapter_dir.to_string_lossy().into_owned(),
            recipe: "{}".into(),
            metrics: "{}".into(),
            created_at: 0,
        })
        .unwrap();
    let (id, _) = only_imported(vec![home.import_card_bytes(
        "k.json",
        br#"{"name": "Kestrel", "description": "The ship's AI."}"#,
        OnDuplicate::Ask,
    )]);
    home.attach_adapter(id, Some(adapter)).unwrap();
    let (_, charx) = home.export_character(id, CardFormat::Charx).unwrap();
    let (_, json_v3) = home.export_character(id, CardFormat::JsonV3).unwrap();
    assert!(
        !String::from_utf8_lossy(&json_v3).contains("adapter_id"),
        "a local adapter id never leaves"
    );

    let away_dir = tempfile::tempdir().unwrap();
    let away = app(away_dir.path());
    let o = away.import_card_bytes("Kestrel.charx", &charx, OnDuplicate::Ask);
    let ImportOutcome::Imported {
        character, adapter, ..
    } = o
    else {
        panic!("{o:?}")
    };
    assert_eq!(adapter.as_deref(), Some("Kestrel voice"));
    let adapters = away.list_adapters().unwrap();
    assert_eq!(adapters.len(), 1);
    assert_eq!(
        adapters[0].characters,
        [character.id],
        "installed and attached"
    );
    let installed = Path::new(&adapters[0].path);
    assert_eq!(
        std::fs::read(installed.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(adapter_dir.join("adapter_model.safetensors")).unwrap()
    );

    // The same file claiming another base is refused whole.
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(charx.clone())).unwrap();
    let mut card: serde_json::Value =
        serde_json::from_reader(z.by_name("card.json").unwrap()).unwrap();
    card["data"]["extensions"]["dramatis"]["adapter"]["base"]["hidden_size"] = json!(2560);
    card["data"]["name"] = json!("Other Kestrel");
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut w = zip::ZipWriter::new(&mut buf);
        for i in 0..z.len() {
            let mut f = z.by_index(i).unwrap();
            let name = f.name().unwrap().into_owned();
            w.start_file(&name, zip::write::SimpleFileOptions::default())
                .unwrap();
            if name == "card.json" {
                w.write_all(&serde_json::to_vec(&card).unwrap()).unwrap();
            } else {
                std::io::copy(&mut f, &mut w).unwrap();
            }
        }
        w.finish().unwrap();
    }
    let before = count(&away);
    match away.import_card_bytes("other.charx", &buf.into_inner(), OnDuplicate::Ask) {
        ImportOutcome::Failed { message, .. } => {
            assert!(
                message.contains("2560") || message.contains("width"),
                "{message}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(count(&away), before);
    assert_eq!(
        away.list_adapters().unwrap().len(),
        1,
        "no adapter row added"
    );
    let dirs = std::fs::read_dir(away_dir.path().join("data/adapters"))
        .unwrap()
        .count();
    assert_eq!(dirs, 1, "no adapter files left behind");
}

#[test]
fn world_info_json_imports_as_a_lorebook() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(dir.path());
    let wi = json!({"entries": {
        "0": {"uid": 0, "key": ["castle"], "keysecondary": [], "content": "The castle is old.",
              "comment": "castle", "order": 100, "position": 0, "disable": false},
        "7": {"uid": 7, "key": ["moat"], "content": "The moat is dry.", "constant": true}
    }});
    let o = app.import_card_bytes(
        "Realm.json",
        &serde_json::to_vec(&wi).unwrap(),
        OnDuplicate::Ask,
    );
    let ImportOutcome::Lorebook {
        id, name, entries, ..
    } = o
    else {
        panic!("{o:?}")
    };
    assert_eq!((name.as_str(), entries), ("Realm", 2));
    assert_eq!(app.lorebook(id).unwrap().book.entries[1].id, 7);
}

#[test]
fn lorebook_entries_fire_in_a_real_chat_and_the_report_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(dir.path());
    // The tiny model's window is 256 tokens: a short card.
    let mut small = rich_card();
    let data = small["data"].as_object_mut().unwrap();
    data.insert(
        "description".into(),
        json!("{{char}} commands the airship."),
    );
    data.insert("mes_example".into(), json!(""));
    data.insert("first_mes".into(), json!("Hold fast!"));
    let (id, _) = only_imported(vec![app.import_card_bytes(
        "y.json",
        &serde_json::to_vec(&small).unwrap(),
        OnDuplicate::Ask,
    )]);
    app.store()
        .set_setting("global_system_prompt", &"Be {{char}}.")
        .unwrap();
    let global = Lorebook {
        name: "Weather".into(),
        entries: vec![Entry {
            id: 3,
            keys: vec!["storm".into()],
            content: "Storms here are green.".into(),
            comment: "storm".into(),
            ..Entry::default()
        }],
        ..Lorebook::default()
    };
    app.create_lorebook(global, vec![LorebookLink::Global])
        .unwrap();
    let view = app.start_chat(id).unwrap();
    let chat = view.chat.id;
    app.set_chat_settings(
        chat,
        &ChatSettings {
            temperature: 0.0,
            max_new_tokens: 3,
            seed: Some(1),
            ..ChatSettings::default()
        },
    )
    .unwrap();
    let v = app
        .send_message(chat, "Is the engine ready?", &mut |_| {})
        .unwrap();
    let reply = v.messages.last().unwrap();
    let report = app.prompt_report(reply.id).unwrap().unwrap();
    let fired: Vec<&str> = report
        .world_info
        .iter()
        .map(|e| e.comment.as_str())
        .collect();
    // Only messages are scanned (the scenario's "storm" is not), so only the
    // engine entry's key is in the chat.
    assert_eq!(fired, ["engine"], "{report:?}");
    match &report.world_info[0].reason {
        Reason::Key {
            key,
            message,
            recursion,
            ..
        } => assert_eq!((key.as_str(), *message, *recursion), ("engine", 0, false)),
        other => panic!("{other:?}"),
    }
    let text: String = report.sections.iter().map(|s| s.text.as_str()).collect();
    assert!(text.contains("The engine is named Old Sol."));
    assert!(!text.contains("Krakens"));
    assert!(
        text.contains("Ysolde commands"),
        "the nickname stands for {{char}}"
    );
    assert_eq!(reply.world_info, 1, "the chat view counts the entries");
    let v = app
        .send_message(chat, "A storm! And a kraken!", &mut |_| {})
        .unwrap();
    let report = app
        .prompt_report(v.messages.last().unwrap().id)
        .unwrap()
        .unwrap();
    let mut fired: Vec<&str> = report
        .world_info
        .iter()
        .map(|e| e.comment.as_str())
        .collect();
    fired.sort();
    assert_eq!(
        fired,
        ["kraken", "storm"],
        "scan depth 2: the message naming the engine is three back now"
    );
    let text: String = report.sections.iter().map(|s| s.text.as_str()).collect();
    assert!(text.contains("Krakens fear fire."));
    assert!(
        !text.contains("@@depth"),
        "decorators never reach the prompt"
    );
}

#[test]
fn the_linter_counts_with_the_models_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(dir.path());
    let card = CharacterCard {
        name: "Big".into(),
        description: "word ".repeat(3000),
        ..Default::default()
    };
    let l = app.lint_card(&card).unwrap();
    assert!(l.tokenizer.is_some());
    assert!(
        l.report.permanent_tokens > 2000,
        "{}",
        l.report.permanent_tokens
    );
    assert!(
        l.report
            .lints
            .iter()
            .any(|w| w.field == "description" || w.message.contains('%')),
        "{:?}",
        l.report.lints
    );
}

#[test]
fn a_regenerate_rolls_an_entrys_chance_again_and_a_continue_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(dir.path());
    let card = json!({"name": "Dice", "first_mes": "Roll?", "character_book": {"entries": [
        {"keys": ["luck"], "content": "Fortune smiles.", "enabled": true, "insertion_order": 1,
         "id": 1, "comment": "luck", "extensions": {"probability": 50, "useProbability": true}}
    ]}});
    let (id, _) = only_imported(vec![app.import_card_bytes(
        "dice.json",
        &serde_json::to_vec(&card).unwrap(),
        OnDuplicate::Ask,
    )]);
    let chat = app.start_chat(id).unwrap().chat.id;
    app.set_chat_settings(
        chat,
        &ChatSettings {
            temperature: 0.0,
            max_new_tokens: 4,
            seed: Some(1),
            ..ChatSettings::default()
        },
    )
    .unwrap();
    let fired = |message_id: i64| -> bool {
        !app.prompt_report(message_id)
            .unwrap()
            .unwrap()
            .world_info
            .is_empty()
    };
    let v = app
        .send_message(chat, "Test my luck.", &mut |_| {})
        .unwrap();
    let mut reply = v.messages.last().unwrap().id;
    let mut rolls = vec![fired(reply)];
    for _ in 0..15 {
        let v = app.regenerate(reply, &mut |_| {}).unwrap();
        reply = v.messages.last().unwrap().id;
        rolls.push(fired(reply));
    }
    let hits = rolls.iter().filter(|&&f| f).count();
    assert!(
        (2..=14).contains(&hits),
        "a 50% entry over 16 swipes: {rolls:?}"
    );
    // Continuing a reply rebuilds its prompt with the same roll.
    let before = fired(reply);
    app.continue_reply(chat, &mut |_| {}).unwrap();
    assert_eq!(fired(reply), before);
}
