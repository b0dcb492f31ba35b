//! The engine shared by chat and API requests: one at a time, in arrival order.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dramatis_core::llm::SamplerConfig;
use dramatis_core::{
    CharacterCard, CharacterDraft, ChatEvent, ChatSettings, CompletionRequest, Dramatis,
    FinishReason, PromptInput,
};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../llm/tests/fixtures/tiny")
}

fn request(max: usize) -> CompletionRequest {
    CompletionRequest {
        model: None,
        input: PromptInput::Text("Once upon a time".into()),
        max_tokens: max,
        sampler: SamplerConfig {
            temperature: 1.0,
            seed: 5,
            ..SamplerConfig::default()
        },
        stop: Vec::new(),
    }
}

#[test]
fn a_chat_reply_waits_for_a_running_api_request_and_stop_works_while_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let app = Arc::new(Dramatis::open(&dir.path().join("data")).unwrap());
    app.import_model(&fixture()).unwrap();
    let id = app
        .create_character(CharacterDraft {
            card: CharacterCard {
                name: "Kestrel".into(),
                ..Default::default()
            },
            avatar: Default::default(),
            book: None,
        })
        .unwrap()
        .id;
    let chat = app.start_chat(id).unwrap().chat.id;
    app.set_chat_settings(
        chat,
        &ChatSettings {
            max_new_tokens: 2,
            temperature: 0.0,
            ..ChatSettings::default()
        },
    )
    .unwrap();

    // When the API request's last token came out: inside the engine's
    // turn, so before anything queued behind it can start (a time taken
    // after `complete` returns would race the reply that starts then).
    let api_done = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let api = {
        let (app, done) = (app.clone(), api_done.clone());
        std::thread::spawn(move || {
            app.complete(&request(200), &AtomicBool::new(false), &mut |_| {
                std::thread::sleep(Duration::from_millis(2));
                *done.lock().unwrap() = Some(Instant::now());
            })
            .unwrap()
        })
    };
    while !app.engine_load().0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut events = Vec::new();
    let mut started_at = None;
    app.send_message(chat, "Hello?", &mut |e| {
        if matches!(e, ChatEvent::Started { .. }) {
            started_at = Some(Instant::now());
        }
        events.push(e);
    })
    .unwrap();
    let c = api.join().unwrap();
    assert_eq!(c.finish_reason, FinishReason::Length);
    assert_eq!(c.completion_tokens, 200);
    assert!(
        matches!(events[0], ChatEvent::Waiting { ahead: 1 }),
        "{:?}",
        events[0]
    );
    assert!(
        started_at.unwrap() >= api_done.lock().unwrap().unwrap(),
        "the reply started only after the API request's last token"
    );

    // A request cancelled while it waits leaves the queue and never runs.
    let busy = {
        let app = app.clone();
        std::thread::spawn(move || {
            app.complete(&request(150), &AtomicBool::new(false), &mut |_| {
                std::thread::sleep(Duration::from_millis(2));
            })
        })
    };
    while !app.engine_load().0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let give_up = Arc::new(AtomicBool::new(false));
    let waiter = {
        let (app, flag) = (app.clone(), give_up.clone());
        std::thread::spawn(move || app.complete(&request(50), &flag, &mut |_| {}))
    };
    while app.engine_load().1 == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    give_up.store(true, Ordering::SeqCst);
    let w = waiter.join().unwrap().unwrap();
    assert_eq!(
        (w.finish_reason, w.completion_tokens),
        (FinishReason::Cancelled, 0)
    );
    assert!(app.engine_load().0, "the running one was not disturbed");
    assert_eq!(busy.join().unwrap().unwrap().completion_tokens, 150);
}
