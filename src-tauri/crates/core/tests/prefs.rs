//! Preference pairs from a real chat tree with the tiny Phi model: swipes,
//! edits in place and as forks, deletes, exclusions, and the TRL JSONL.

use std::path::{Path, PathBuf};

use dramatis_core::{
    CharacterCard, CharacterDraft, ChatSettings, Dramatis, PairKind, PreferencePair,
};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../llm/tests/fixtures/tiny")
}

fn pairs(app: &Dramatis, character: i64) -> Vec<(PairKind, i64, i64)> {
    let mut v: Vec<_> = app
        .preference_pairs(character)
        .unwrap()
        .into_iter()
        .map(|p| (p.kind, p.chosen_id, p.rejected_id))
        .collect();
    v.sort_by_key(|&(_, c, r)| (c, r));
    v
}

#[test]
fn swipes_and_edits_become_pairs_that_go_with_their_messages() {
    let dir = tempfile::tempdir().unwrap();
    let app = Dramatis::open(&dir.path().join("data")).unwrap();
    app.import_model(&fixture()).unwrap();
    let id = app
        .create_character(CharacterDraft {
            card: CharacterCard {
                name: "Kestrel".into(),
                first_mes: "Good morning.".into(),
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
            temperature: 1.0,
            max_new_tokens: 4,
            seed: None,
            ..ChatSettings::default()
        },
    )
    .unwrap();
    let last = |v: &dramatis_core::ChatView| v.messages.last().unwrap().id;
    let v = app.send_message(chat, "Status?", &mut |_| {}).unwrap();
    let r1 = last(&v);
    let v = app.regenerate(r1, &mut |_| {}).unwrap();
    let r2 = last(&v);
    assert!(pairs(&app, id).is_empty(), "a swipe alone is no choice yet");

    // Going on from the second swipe chooses it over the first.
    let v = app.send_message(chat, "Go on.", &mut |_| {}).unwrap();
    let r3 = last(&v);
    assert_eq!(pairs(&app, id), [(PairKind::Swipe, r2, r1)]);
    let p: PreferencePair = app.preference_pairs(id).unwrap().remove(0);
    assert!(p.exact_prompt, "the reply's own prompt");
    assert_eq!(p.prompt, app.store().reply_prompt(r2).unwrap().unwrap().0);
    assert!(p.prompt.ends_with("<|assistant|>"));
    assert_eq!(p.chosen_model.as_deref(), Some("tiny"));
    assert_eq!(p.rejected_model.as_deref(), Some("tiny"));

    // Rewriting the last reply in place: the new text over the old.
    let before = app.store().message(r3).unwrap().content;
    app.edit_message(r3, "All systems nominal, Captain.")
        .unwrap();
    let all = app.preference_pairs(id).unwrap();
    let edit = all.iter().find(|p| p.kind == PairKind::Edit).unwrap();
    assert_eq!(
        (edit.chosen.as_str(), edit.rejected.as_str()),
        ("All systems nominal, Captain.", before.as_str())
    );
    // A second edit keeps the first original.
    app.edit_message(r3, "Nominal.").unwrap();
    let edit = app
        .preference_pairs(id)
        .unwrap()
        .into_iter()
        .find(|p| p.kind == PairKind::Edit)
        .unwrap();
    assert_eq!(
        (edit.chosen.as_str(), edit.rejected.as_str()),
        ("Nominal.", before.as_str())
    );

    // Rewriting an earlier reply forks: the rewrite over the reply it replaced.
    let v = app.edit_message(r2, "Reactor at ninety percent.").unwrap();
    let r2b = v.messages.last().unwrap().id;
    assert_ne!(r2b, r2);
    let got = pairs(&app, id);
    assert!(got.contains(&(PairKind::Edit, r2b, r2)), "{got:?}");
    assert!(
        got.contains(&(PairKind::Swipe, r2, r1)),
        "the old branch's choice stays"
    );
    assert!(
        !got.iter().any(|&(_, c, r)| c == r2 && r == r2b),
        "no pair against one's own rewrite"
    );

    // Leaving out a pair, then a chat; the JSONL has what is left.
    app.set_pair_excluded(r2, r1, true).unwrap();
    let jsonl = app.export_preferences(id).unwrap();
    let lines: Vec<serde_json::Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), pairs(&app, id).len() - 1);
    for l in &lines {
        let keys: Vec<&str> = l.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["prompt", "chosen", "rejected"], "TRL's DPO columns");
    }
    app.set_chat_prefs_excluded(chat, true).unwrap();
    assert!(app.export_preferences(id).unwrap().is_empty());
    assert!(app.preference_pairs(id).unwrap().iter().all(|p| p.excluded));
    app.set_chat_prefs_excluded(chat, false).unwrap();

    // Deleting a message takes its pairs with it.
    app.delete_message(r1).unwrap();
    let got = pairs(&app, id);
    assert!(!got.iter().any(|&(_, c, r)| c == r1 || r == r1), "{got:?}");
    app.delete_message(r2b).unwrap();
    assert!(
        !pairs(&app, id)
            .iter()
            .any(|&(_, c, r)| c == r2b || r == r2b)
    );
}
