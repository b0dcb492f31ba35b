//! Chats longer than the window, on the tiny Phi fixture with its context
//! widened to 2048 positions (rotary positions need no weights), as the
//! end-to-end tests do.

use std::path::Path;

use dramatis_core::llm::PhiTokenizer;
use dramatis_core::persona::prompt::SectionKind;
use dramatis_core::{
    CharacterCard, CharacterDraft, ChatEvent, ChatSettings, ContextMode, Dramatis, MemoryUpdate,
    PromptReport,
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
        book: None,
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

/// A 300-turn chat with one reply sent, summaries on.
fn full_chat(app: &Dramatis) -> i64 {
    let c = character(app);
    let chat = app.import_chat(c, &long_chat(300)).unwrap().chat.id;
    let mut s = settings(ContextMode::Shift);
    s.memory = true;
    s.memory_budget = 48;
    app.set_chat_settings(chat, &s).unwrap();
    send(app, chat, "Where are we?");
    chat
}

#[test]
fn a_summary_covers_what_left_the_window_and_enters_the_prompt_within_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(dir.path());
    let chat = full_chat(&app);
    let before = app.chat_view(chat).unwrap();
    assert!(before.memory.is_none());
    let start = before.window_start_id.unwrap();
    let up_to = match app.update_memory(chat).unwrap() {
        MemoryUpdate::Written { memory, messages } => {
            assert!(messages > 250, "{messages} messages summarized");
            memory.up_to_id
        }
        other => panic!("{other:?}"),
    };
    // It covers exactly the messages before the window.
    let ids: Vec<i64> = before.messages.iter().map(|m| m.id).collect();
    let at = ids.iter().position(|&i| i == start).unwrap();
    assert_eq!(up_to, ids[at - 1]);
    assert_eq!(app.update_memory(chat).unwrap(), MemoryUpdate::UpToDate);
    // The next prompt holds it within its budget, after the character's definition.
    let t = send(&app, chat, "And then?");
    let m = t
        .report
        .sections
        .iter()
        .find(|s| s.kind == SectionKind::Memory)
        .unwrap();
    assert!(m.tokens <= 48, "{} tokens", m.tokens);
    assert_eq!(t.report.memory_up_to_id, Some(up_to));
    // No message was touched.
    let after = app.chat_view(chat).unwrap();
    assert_eq!(after.messages.len(), before.messages.len() + 2);
}

#[test]
fn a_reply_stops_a_running_summary_which_resumes_later() {
    let dir = tempfile::tempdir().unwrap();
    let app = std::sync::Arc::new(app(dir.path()));
    let chat = full_chat(&app);
    let bg = {
        let app = app.clone();
        std::thread::spawn(move || app.update_memory(chat).unwrap())
    };
    // Wait until it runs, then send: the reply goes first.
    while !app.is_summarizing() {
        std::thread::yield_now();
    }
    send(&app, chat, "Quick, a reply!");
    let r = bg.join().unwrap();
    assert!(
        matches!(r, MemoryUpdate::Stopped | MemoryUpdate::Written { .. }),
        "{r:?}"
    );
    // While a reply runs, a summary does not start.
    drop(app);
    let app = self::app(dir.path());
    let v = app.chat_view(chat).unwrap();
    let first_window = v.window_start_id.unwrap();
    // After a restart, it picks up where it stopped and covers the rest.
    loop {
        match app.update_memory(chat).unwrap() {
            MemoryUpdate::UpToDate => break,
            MemoryUpdate::Written { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    let v = app.chat_view(chat).unwrap();
    let ids: Vec<i64> = v.messages.iter().map(|m| m.id).collect();
    let m = v.memory.unwrap();
    let covered = ids.iter().position(|&i| i == m.up_to_id).unwrap();
    let window = ids.iter().position(|&i| i == first_window).unwrap();
    assert_eq!(covered + 1, window);
}

#[test]
fn summaries_stay_on_their_branch() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(dir.path());
    let chat = full_chat(&app);
    assert!(matches!(
        app.update_memory(chat).unwrap(),
        MemoryUpdate::Written { .. }
    ));
    let v = app.chat_view(chat).unwrap();
    let m = v.memory.clone().unwrap();
    // Fork before the summary's last message: the new branch has no summary of the old one.
    let pos = v.messages.iter().position(|x| x.id == m.up_to_id).unwrap();
    let earlier = &v.messages[pos - 3];
    let forked = app.edit_message(earlier.id, "A different turn.").unwrap();
    // It has at most a summary of what both branches share.
    if let Some(f) = &forked.memory {
        assert_ne!(f.id, m.id);
        assert!(forked.messages.iter().any(|x| x.id == f.up_to_id));
    }
    // Back on the old branch, its summary is there again.
    let back = app.select_swipe(forked.messages[pos - 3].id, 0).unwrap();
    assert_eq!(back.memory.unwrap().id, m.id);
}

#[test]
fn a_killed_summary_loses_no_message() {
    if let Ok(dir) = std::env::var("DRAMATIS_MEMORY_CHILD") {
        let app = app(Path::new(&dir));
        let chat = app.list_characters(&Default::default()).unwrap();
        let _ = chat;
        let id: i64 = std::env::var("DRAMATIS_MEMORY_CHAT")
            .unwrap()
            .parse()
            .unwrap();
        println!("started");
        let _ = app.update_memory(id);
        println!("done");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (chat, count) = {
        let app = app(dir.path());
        let chat = full_chat(&app);
        (chat, app.chat_view(chat).unwrap().messages.len())
    };
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_killed_summary_loses_no_message",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("DRAMATIS_MEMORY_CHILD", dir.path())
        .env("DRAMATIS_MEMORY_CHAT", chat.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    while let Some(Ok(l)) = lines.next() {
        if l == "started" {
            break;
        }
    }
    // Mid-summary: the model loads and the first round runs for a while.
    std::thread::sleep(std::time::Duration::from_millis(300));
    child.kill().unwrap();
    child.wait().unwrap();
    let app = app(dir.path());
    app.store().integrity_check().unwrap();
    let v = app.chat_view(chat).unwrap();
    assert_eq!(v.messages.len(), count);
    for m in app.store().memories(chat).unwrap() {
        assert!(!m.text.trim().is_empty(), "no half summary");
    }
}

#[test]
fn the_author_note_travels_in_sillytavern_chat_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(dir.path());
    let c = character(&app);
    let mut lines: Vec<String> = long_chat(6).lines().map(str::to_owned).collect();
    lines[0] = serde_json::json!({
        "user_name": "You", "character_name": "Kestrel",
        "chat_metadata": {"note_prompt": "The hull is breached.", "note_interval": 2, "note_depth": 3, "note_position": 1, "note_role": 0}
    })
    .to_string();
    let v = app.import_chat(c, &lines.join("\n")).unwrap();
    let n = &v.settings.author_note;
    assert_eq!(
        (n.text.as_str(), n.depth, n.interval),
        ("The hull is breached.", 3, 2)
    );
    let out = app
        .export_chat(v.chat.id, dramatis_core::ExportFormat::Jsonl)
        .unwrap();
    let header: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    let meta = &header["chat_metadata"];
    assert_eq!(meta["note_prompt"], "The hull is breached.");
    assert_eq!(
        (meta["note_depth"].as_u64(), meta["note_interval"].as_u64()),
        (Some(3), Some(2))
    );
    // A chat without a note exports none, and imports with the note off.
    let plain = app.import_chat(c, &long_chat(4)).unwrap();
    assert!(plain.settings.author_note.text.is_empty());
    let out = app
        .export_chat(plain.chat.id, dramatis_core::ExportFormat::Jsonl)
        .unwrap();
    assert!(!out.lines().next().unwrap().contains("note_prompt"));
}
