//! The chat service with the tiny Phi fixture generating for real.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use dramatis_core::{
    CharacterCard, CharacterDraft, ChatEvent, ChatSettings, ChatView, Dramatis, ErrorKind,
    ExportFormat,
};

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

fn character(app: &Dramatis) -> i64 {
    app.create_character(CharacterDraft {
        card: CharacterCard {
            name: "Kestrel".into(),
            description: "{{char}} is the ship's AI.".into(),
            first_mes: "Good morning, {{user}}.".into(),
            alternate_greetings: vec!["{{user}}, the reactor hums.".into(), "Hello again.".into()],
            ..Default::default()
        },
        avatar: Default::default(),
        book: None,
    })
    .unwrap()
    .id
}

/// Greedy, short replies: reproducible and quick.
fn quick(app: &Dramatis, chat: i64, max: usize) {
    app.set_chat_settings(
        chat,
        &ChatSettings {
            temperature: 0.0,
            max_new_tokens: max,
            seed: Some(7),
            ..ChatSettings::default()
        },
    )
    .unwrap();
}

fn collect(events: &mut Vec<ChatEvent>) -> impl FnMut(ChatEvent) + Send + '_ {
    move |e| events.push(e)
}

fn contents(v: &ChatView) -> Vec<String> {
    v.messages.iter().map(|m| m.content.clone()).collect()
}

#[test]
fn greetings_are_swipes_of_the_first_message_with_macros_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(dir.path());
    let c = character(&app);
    let v = app.start_chat(c).unwrap();
    assert_eq!(v.messages.len(), 1);
    assert_eq!(v.messages[0].content, "Good morning, You.");
    assert_eq!(
        (v.messages[0].swipe_index, v.messages[0].swipe_count),
        (0, 3)
    );
    let v = app.select_swipe(v.messages[0].id, 1).unwrap();
    assert_eq!(v.messages[0].content, "You, the reactor hums.");
    assert_eq!(app.list_chats(c).unwrap().len(), 1);
}

#[test]
fn a_reply_streams_and_is_stored_and_regenerate_adds_a_swipe() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(dir.path());
    let c = character(&app);
    let chat = app.start_chat(c).unwrap().chat.id;
    quick(&app, chat, 24);
    let mut events = Vec::new();
    let v = app
        .send_message(chat, "Status report?", &mut collect(&mut events))
        .unwrap();
    // Loading, started (with the stored user message), pieces, finished.
    assert!(matches!(events[0], ChatEvent::Loading { .. }));
    let ChatEvent::Started {
        user_message: Some(u),
        reply,
        turns_total,
        ..
    } = &events[1]
    else {
        panic!("{:?}", events[1]);
    };
    assert_eq!(u.content, "Status report?");
    assert_eq!(reply.content, "");
    assert_eq!(*turns_total, 2);
    let streamed: String = events
        .iter()
        .filter_map(|e| match e {
            ChatEvent::Text { text } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    let ChatEvent::Finished { reply, tokens, .. } = events.last().unwrap() else {
        panic!()
    };
    assert!(*tokens > 0);
    assert_eq!(reply.content, streamed.trim());
    assert_eq!(v.messages.len(), 3);
    assert_eq!(v.messages[2].content, streamed.trim());

    // Regenerate: a second swipe, the first kept.
    let first = v.messages[2].clone();
    let mut s = app.chat_settings(chat).unwrap();
    s.seed = Some(99);
    s.temperature = 1.0;
    app.set_chat_settings(chat, &s).unwrap();
    let v = app.regenerate(first.id, &mut |_| {}).unwrap();
    assert_eq!(
        (v.messages[2].swipe_index, v.messages[2].swipe_count),
        (1, 2)
    );
    assert_ne!(v.messages[2].id, first.id);
    let v = app.select_swipe(v.messages[2].id, 0).unwrap();
    assert_eq!(v.messages[2].content, first.content);
    // A loaded model is not loaded again.
    let mut events = Vec::new();
    app.continue_reply(chat, &mut collect(&mut events)).unwrap();
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, ChatEvent::Loading { .. }))
    );
}

#[test]
fn editing_an_earlier_message_forks_and_both_branches_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(dir.path());
    let c = character(&app);
    let chat = app.start_chat(c).unwrap().chat.id;
    quick(&app, chat, 6);
    for t in ["One", "Two"] {
        app.send_message(chat, t, &mut |_| {}).unwrap();
    }
    let before = app.chat_view(chat).unwrap();
    assert_eq!(before.messages.len(), 5);
    // Message 2 of 5 (the first user message) is edited: a new branch.
    let v = app
        .edit_message(before.messages[1].id, "One, edited")
        .unwrap();
    assert_eq!(contents(&v), ["Good morning, You.", "One, edited"]);
    assert_eq!(
        (v.messages[1].swipe_index, v.messages[1].swipe_count),
        (1, 2)
    );
    app.send_message(chat, "After the edit", &mut |_| {})
        .unwrap();
    let new_branch = contents(&app.chat_view(chat).unwrap());
    assert_eq!(new_branch.len(), 4);
    // The old branch is intact.
    let v = app.select_swipe(v.messages[1].id, 0).unwrap();
    assert_eq!(contents(&v), contents(&before));
    let v = app.select_swipe(v.messages[1].id, 1).unwrap();
    assert_eq!(contents(&v), new_branch);
    // Editing the last message changes it in place.
    let last = v.messages.last().unwrap().id;
    let v = app.edit_message(last, "Rewritten").unwrap();
    assert_eq!(v.messages.last().unwrap().id, last);
    assert_eq!(v.messages.last().unwrap().content, "Rewritten");
    // Deleting a message removes what follows it.
    let v = app.delete_message(v.messages[2].id).unwrap();
    assert_eq!(v.messages.len(), 2);
}

#[test]
fn continue_appends_and_stop_keeps_the_partial_reply() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(dir.path());
    let c = character(&app);
    let chat = app.start_chat(c).unwrap().chat.id;
    quick(&app, chat, 8);
    let v = app.send_message(chat, "Go on", &mut |_| {}).unwrap();
    let before = v.messages[2].content.clone();
    let v = app.continue_reply(chat, &mut |_| {}).unwrap();
    assert_eq!(v.messages.len(), 3);
    assert!(v.messages[2].content.starts_with(&before));
    assert!(v.messages[2].content.len() >= before.len());

    // Stop after three pieces: the reply keeps exactly what streamed.
    quick(&app, chat, 200);
    let mut streamed = String::new();
    let mut pieces = 0;
    let v = app
        .send_message(chat, "Tell me everything", &mut |e| {
            if let ChatEvent::Text { text } = e {
                streamed.push_str(&text);
                pieces += 1;
                if pieces == 3 {
                    assert!(app.stop_generation());
                }
            }
        })
        .unwrap();
    assert!(!app.is_generating());
    assert_eq!(v.messages.last().unwrap().content, streamed.trim());
    assert!(pieces <= 4, "{pieces} pieces after stop");
}

#[test]
fn without_a_model_the_users_message_is_kept_and_the_error_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let app = Dramatis::open(&dir.path().join("data")).unwrap();
    let c = character(&app);
    let chat = app.start_chat(c).unwrap().chat.id;
    let err = app.send_message(chat, "Hello?", &mut |_| {}).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoModel);
    assert!(err.to_string().contains("Models"));
    let v = app.chat_view(chat).unwrap();
    assert_eq!(contents(&v), ["Good morning, You.", "Hello?"]);
    assert!(!app.is_generating());
}

#[test]
fn search_finds_a_message_on_a_hidden_branch_and_opens_it() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(dir.path());
    let c = character(&app);
    let chat = app.start_chat(c).unwrap().chat.id;
    quick(&app, chat, 4);
    app.send_message(chat, "the zeppelin password is marmalade", &mut |_| {})
        .unwrap();
    let v = app.chat_view(chat).unwrap();
    app.edit_message(v.messages[1].id, "something else entirely")
        .unwrap();
    let hits = app.search_messages("marmalade zeppelin", 10).unwrap();
    assert_eq!(hits.len(), 1);
    let h = &hits[0];
    assert!(!h.on_visible_branch);
    assert_eq!(h.character_name, "Kestrel");
    assert!(h.snippet.contains("[marmalade]"), "{}", h.snippet);
    assert_eq!(h.path.len(), 2);
    let v = app.open_message(h.message_id).unwrap();
    assert_eq!(v.messages[1].content, "the zeppelin password is marmalade");
    assert!(app.search_messages("marmalade", 10).unwrap()[0].on_visible_branch);
}

#[test]
fn export_then_import_round_trips_and_bad_lines_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(dir.path());
    let c = character(&app);
    let chat = app.start_chat(c).unwrap().chat.id;
    quick(&app, chat, 6);
    let v = app
        .send_message(chat, "Line \"one\"\nand ünïcode", &mut |_| {})
        .unwrap();
    app.regenerate(v.messages[2].id, &mut |_| {}).unwrap();
    let original = app.chat_view(chat).unwrap();
    let jsonl = app.export_chat(chat, ExportFormat::Jsonl).unwrap();
    assert!(
        jsonl
            .lines()
            .next()
            .unwrap()
            .contains("\"character_name\":\"Kestrel\"")
    );
    let imported = app.import_chat(c, &jsonl).unwrap();
    assert_ne!(imported.chat.id, chat);
    assert_eq!(contents(&imported), contents(&original));
    let swipes = |v: &ChatView| {
        v.messages
            .iter()
            .map(|m| (m.role, m.swipe_index, m.swipe_count))
            .collect::<Vec<_>>()
    };
    assert_eq!(swipes(&imported), swipes(&original));
    assert_eq!(
        app.export_chat(imported.chat.id, ExportFormat::Jsonl)
            .unwrap()
            .lines()
            .skip(1)
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["send_date"] = serde_json::Value::Null;
                v
            })
            .collect::<Vec<_>>(),
        jsonl
            .lines()
            .skip(1)
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["send_date"] = serde_json::Value::Null;
                v
            })
            .collect::<Vec<_>>()
    );
    let md = app.export_chat(chat, ExportFormat::Markdown).unwrap();
    assert!(md.contains("**You:** Line \"one\""));

    let chats_before = app.list_chats(c).unwrap().len();
    let mut lines: Vec<&str> = jsonl.lines().collect();
    lines.insert(2, "{not json");
    let err = app.import_chat(c, &lines.join("\n")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BadFile);
    assert!(err.to_string().contains("line 3"), "{err}");
    assert_eq!(
        app.list_chats(c).unwrap().len(),
        chats_before,
        "nothing half-imported"
    );
}

#[test]
fn a_killed_process_keeps_the_reply_up_to_the_last_flush() {
    if let Ok(dir) = std::env::var("DRAMATIS_CHAT_CHILD") {
        // The child: stream a long reply, printing each piece as it comes.
        let app = app(Path::new(&dir));
        let c = character(&app);
        let chat = app.start_chat(c).unwrap().chat.id;
        // The tiny model has a 256-token context: a short prompt leaves room.
        app.store()
            .set_setting("global_system_prompt", "Talk.")
            .unwrap();
        app.set_chat_settings(
            chat,
            &ChatSettings {
                temperature: 1.0,
                max_new_tokens: 128,
                seed: Some(1),
                format: dramatis_core::persona::prompt::PromptFormat::Transcript,
                ..ChatSettings::default()
            },
        )
        .unwrap();
        let mut out = std::io::stdout();
        // A random model may end a reply early: keep asking until killed.
        for _ in 0..100 {
            let _ = app.send_message(chat, "Talk for a long time.", &mut |e| {
                match e {
                    ChatEvent::Started { .. } => writeln!(out, "started").unwrap(),
                    ChatEvent::Text { text } => {
                        writeln!(out, "piece {}", serde_json::to_string(&text).unwrap()).unwrap();
                        // A laptop-like pace: the tiny model is far faster than Phi-2.
                        std::thread::sleep(std::time::Duration::from_millis(12));
                    }
                    _ => {}
                }
                out.flush().unwrap();
            });
        }
        writeln!(out, "done").unwrap();
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_killed_process_keeps_the_reply_up_to_the_last_flush",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("DRAMATIS_CHAT_CHILD", dir.path())
        .env_remove("RUST_BACKTRACE")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut streamed = String::new();
    let mut first_piece = None;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if line == "started" {
            streamed.clear();
            first_piece = None;
        } else if let Some(p) = line.strip_prefix("piece ") {
            streamed.push_str(&serde_json::from_str::<String>(p).unwrap());
            let t = *first_piece.get_or_insert_with(std::time::Instant::now);
            if t.elapsed() > dramatis_core::FLUSH_EVERY * 2 {
                child.kill().unwrap(); // SIGKILL: no destructor, no final write
                break;
            }
        } else if line == "done" {
            panic!("no reply lasted long enough to be killed mid-stream");
        }
    }
    child.wait().unwrap();
    let app = Dramatis::open(&dir.path().join("data")).unwrap();
    app.store().integrity_check().unwrap();
    let c = app.list_characters(&Default::default()).unwrap();
    // The built-ins include a Kestrel too: take the one with a chat.
    let chat = c
        .iter()
        .filter(|c| c.name == "Kestrel")
        .flat_map(|c| app.list_chats(c.id).unwrap())
        .next()
        .unwrap()
        .id;
    let v = app.chat_view(chat).unwrap();
    let n = v.messages.len();
    assert_eq!(v.messages[n - 2].content, "Talk for a long time.");
    let stored = &v.messages[n - 1].content;
    assert!(!stored.is_empty(), "nothing was flushed");
    assert!(
        streamed.trim_start().starts_with(stored.as_str()),
        "stored text is not what streamed"
    );
}
