//! Chats longer than the window, on the tiny Phi fixture with its context
//! widened to 2048 positions (rotary positions need no weights), as the
//! end-to-end tests do.

use std::path::Path;

use dramatis_core::llm::PhiTokenizer;
use dramatis_core::persona::prompt::SectionKind;
use dramatis_core::{
    CharacterCard, CharacterDraft, ChatEvent, ChatSettings, ContextMode, Dramatis, PromptReport,
};

fn fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../llm/tests/fixtures/tiny")
}

/// The tiny model with a 2048-token window, imported into a data folder.
fn app(dir: &Path) -> Dramatis {
    let model = dir.join("tiny-2048");
    if !model.exists() {
        std::fs::create_dir_all(&model).unwrap();
        for f in ["model.safetensors", "tokenizer.json"] {
            std::fs::copy(fixture().join(f), model.join(f)).unwrap();
        }
        let mut cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(fixture().join("config.json")).unwrap()).unwrap();
        cfg["max_position_embeddings"] = 2048.into();
        std::fs::write(model.join("config.json"), cfg.to_string()).unwrap();
    }
    let app = Dramatis::open(&dir.join("data")).unwrap();
    if app.list_models().unwrap().is_empty() {
        app.import_model(&model).unwrap();
    }
    app
}

/// A SillyTavern chat file of `turns` messages of uneven length.
fn long_chat(turns: usize) -> String {
    let words = [
        "the", "storm", "ship", "captain", "reactor", "hums", "quietly", "stars", "drift", "north",
        "signal", "lost", "found", "engine", "cold", "warm", "night",
    ];
    let mut out = vec![
        serde_json::json!({"user_name": "You", "character_name": "Kestrel", "chat_metadata": {}})
            .to_string(),
    ];
    for i in 0..turns {
        let n = 12 + (i * 7) % 23;
        let text: Vec<&str> = (0..n)
            .map(|j| words[(i * 3 + j * 5) % words.len()])
            .collect();
        out.push(
            serde_json::json!({
                "name": if i % 2 == 0 { "Kestrel" } else { "You" },
                "is_user": i % 2 == 1,
                "mes": format!("Turn {i}: {}.", text.join(" ")),
            })
            .to_string(),
        );
    }
    out.join("\n")
}

fn character(app: &Dramatis) -> i64 {
    app.create_character(CharacterDraft {
        card: CharacterCard {
            name: "Kestrel".into(),
            description: "{{char}} is the ship's AI.".into(),
            post_history_instructions: "Stay in character.".into(),
            ..Default::default()
        },
        avatar: Default::default(),
    })
    .unwrap()
    .id
}

fn settings(context: ContextMode) -> ChatSettings {
    ChatSettings {
        temperature: 0.0,
        max_new_tokens: 24,
        seed: Some(3),
        context,
        memory: false,
        ..ChatSettings::default()
    }
}

struct Turn {
    report: PromptReport,
    reply_id: i64,
    reply: String,
}

fn send(app: &Dramatis, chat: i64, text: &str) -> Turn {
    let mut finished = None;
    let v = app
        .send_message(chat, text, &mut |e| {
            if let ChatEvent::Finished { reply, .. } = e {
                finished = Some(reply);
            }
        })
        .unwrap();
    let reply = finished.expect("the reply finished");
    assert_eq!(v.messages.last().unwrap().id, reply.id);
    Turn {
        report: app.prompt_report(reply.id).unwrap().expect("a report"),
        reply_id: reply.id,
        reply: reply.content,
    }
}

#[test]
fn past_the_window_a_turn_computes_only_its_new_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(dir.path());
    let c = character(&app);
    let chat = app.import_chat(c, &long_chat(300)).unwrap().chat.id;
    app.set_chat_settings(chat, &settings(ContextMode::Shift))
        .unwrap();
    let tok = PhiTokenizer::from_file(&fixture().join("tokenizer.json")).unwrap();
    let count = |t: &str| tok.count(t).unwrap();

    let first = send(&app, chat, "Where are we?");
    let r = &first.report;
    assert!(
        r.turns_dropped > 250,
        "300 turns cannot fit: {} dropped",
        r.turns_dropped
    );
    assert!(
        r.tokens <= r.budget && r.tokens > r.budget * 3 / 4,
        "{} of {}",
        r.tokens,
        r.budget
    );
    let mut prev_reply = first.reply;
    let mut shifted_turns = 0;
    let mut last_first = r.first_message_id;
    for i in 0..14 {
        let user = format!("Message {i}: tell me about the reactor and the storm.");
        let t = send(&app, chat, &user);
        let counts = t.report.counts.expect("counts");
        // New this turn: the last reply and the user's message as turns, the
        // post-history instructions and the reply's opening that follow them.
        let tail: usize = t
            .report
            .sections
            .iter()
            .filter(|s| matches!(s.kind, SectionKind::PostHistory | SectionKind::Reply))
            .map(|s| s.tokens)
            .sum();
        let new = count(&format!("<|assistant|>{prev_reply}</s>\n"))
            + count(&format!("<|user|>{user}</s>\n"))
            + tail;
        assert!(
            counts.computed <= new + 2,
            "turn {i}: computed {} tokens, the new ones are {new} ({counts:?})",
            counts.computed
        );
        assert_eq!(
            counts.reused + counts.shifted + counts.computed,
            t.report.tokens
        );
        if t.report.first_message_id != last_first {
            // Turns left the window: their keys went, the rest moved up.
            assert!(
                counts.shifted > 0 && counts.discarded > 0,
                "turn {i}: {counts:?}"
            );
            shifted_turns += 1;
        }
        last_first = t.report.first_message_id;
        assert!(t.report.tokens <= t.report.budget);
        prev_reply = t.reply;
        let _ = t.reply_id;
    }
    assert!(
        shifted_turns >= 1,
        "14 turns of ~60 tokens must move a 1/8 window cut"
    );
    // The chat view marks the window's first message.
    let v = app.chat_view(chat).unwrap();
    assert_eq!(v.window_start_id, last_first);
}

#[test]
fn exact_mode_gives_what_a_fresh_session_gives_and_re_reads_rarely() {
    let dir = tempfile::tempdir().unwrap();
    let c;
    let chat;
    let mut replies = Vec::new();
    {
        let app = app(dir.path());
        c = character(&app);
        chat = app.import_chat(c, &long_chat(300)).unwrap().chat.id;
        app.set_chat_settings(chat, &settings(ContextMode::Exact))
            .unwrap();
        let mut rereads = 0;
        for i in 0..10 {
            let t = send(&app, chat, &format!("Message {i}: what next?"));
            let counts = t.report.counts.unwrap();
            assert_eq!(counts.shifted, 0, "exact mode never shifts");
            if i > 0 && counts.computed > 200 {
                rereads += 1;
            }
            replies.push((t.reply_id, t.reply));
        }
        // A quarter-window step of ~500 tokens, ~60 new tokens a turn.
        assert!(rereads <= 3, "{rereads} full re-reads in 9 turns");
    }
    // A fresh engine (a new process's) regenerating the last reply writes the same text.
    let app = app(dir.path());
    let (last_id, last_text) = replies.last().unwrap().clone();
    let mut regenerated = None;
    app.regenerate(last_id, &mut |e| {
        if let ChatEvent::Finished { reply, counts, .. } = e {
            assert_eq!(counts.reused, 0, "a fresh engine has nothing cached");
            regenerated = Some(reply.content);
        }
    })
    .unwrap();
    assert_eq!(regenerated.unwrap(), last_text);
    let _ = (c, chat);
}

#[test]
fn the_inspector_shows_the_exact_prompt_by_section() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(dir.path());
    let c = character(&app);
    let chat = app.import_chat(c, &long_chat(40)).unwrap().chat.id;
    let mut s = settings(ContextMode::Shift);
    s.author_note.text = "Keep the storm in mind.".into();
    s.author_note.depth = 2;
    s.author_note.interval = 1;
    app.set_chat_settings(chat, &s).unwrap();
    let t = send(&app, chat, "Status?");
    let r = t.report;
    let kinds: Vec<SectionKind> = r.sections.iter().map(|s| s.kind).collect();
    assert_eq!(kinds.first(), Some(&SectionKind::SystemPrompt));
    assert!(kinds.contains(&SectionKind::AuthorNote));
    let note = r
        .sections
        .iter()
        .find(|s| s.kind == SectionKind::AuthorNote)
        .unwrap();
    assert!(note.text.contains("Keep the storm in mind."));
    let whole: String = r.sections.iter().map(|s| s.text.as_str()).collect();
    assert!(whole.ends_with("<|assistant|>"));
    assert!(whole.contains("<|user|>Status?</s>"));
    let tok = PhiTokenizer::from_file(&fixture().join("tokenizer.json")).unwrap();
    assert_eq!(tok.count(&whole).unwrap(), r.tokens);
    // A hand-written summary is used from the next reply on, and persists.
    let v = app.set_chat_memory(chat, "They fled the storm.").unwrap();
    assert_eq!(v.memory.as_ref().unwrap().text, "They fled the storm.");
    let mut s2 = s.clone();
    s2.memory = true;
    app.set_chat_settings(chat, &s2).unwrap();
    let t = send(&app, chat, "And now?");
    let mem = t
        .report
        .sections
        .iter()
        .find(|s| s.kind == SectionKind::Memory)
        .unwrap();
    assert!(mem.text.contains("They fled the storm."));
    drop(app);
    let app = self::app(dir.path());
    assert_eq!(
        app.chat_view(chat).unwrap().memory.unwrap().text,
        "They fled the storm."
    );
}
