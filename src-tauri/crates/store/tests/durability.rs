//! The database survives a killed writer, and readers never see half a write.
//!
//! The unit of work is one character with `TAGS` tags: one transaction that
//! writes `TAGS + 1` rows. A torn write would show as tags with unequal counts.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dramatis_persona::CharacterCard;
use dramatis_store::{CharacterFilter, Store};

const TAGS: usize = 20;

fn insert_one(store: &Store, n: usize) {
    let card = CharacterCard {
        name: format!("Character {n}"),
        description: "·".repeat(4000),
        tags: (0..TAGS).map(|t| format!("t{t}")).collect(),
        ..Default::default()
    };
    store.insert_character(&card, None, None).unwrap();
}

/// Checks that every tag is on the same number of characters and returns it.
fn consistent_count(store: &Store) -> usize {
    let tags = store.tags().unwrap();
    let counts: Vec<u32> = tags.iter().map(|t| t.count).collect();
    if counts.is_empty() {
        return 0;
    }
    assert_eq!(counts.len(), TAGS, "some tags are missing: {tags:?}");
    assert!(
        counts.iter().all(|&c| c == counts[0]),
        "torn transaction: {counts:?}"
    );
    counts[0] as usize
}

/// Run in a child process: inserts characters for up to a minute, printing
/// each committed count, until the parent kills it.
fn writer_child(path: &str) {
    let store = Store::open(std::path::Path::new(path)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut n = 0;
    while Instant::now() < deadline {
        insert_one(&store, n);
        n += 1;
        println!("committed {n}");
    }
}

#[test]
fn sigkill_mid_write_keeps_committed_rows() {
    if let Ok(path) = std::env::var("DRAMATIS_STORE_WRITER_CHILD") {
        writer_child(&path);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.db");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "sigkill_mid_write_keeps_committed_rows",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("DRAMATIS_STORE_WRITER_CHILD", &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut last = 0usize;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        if let Some(n) = line.unwrap().strip_prefix("committed ") {
            last = n.parse().unwrap();
            if last >= 300 {
                // Child::kill is SIGKILL on Unix: no destructors, no flush.
                child.kill().unwrap();
                break;
            }
        }
    }
    child.wait().unwrap();
    assert!(last >= 300, "the writer stopped early after {last} commits");

    let store = Store::open(&path).unwrap();
    store.integrity_check().unwrap();
    let stored = store
        .list_characters(&CharacterFilter::default())
        .unwrap()
        .len();
    assert!(
        stored >= last,
        "{stored} characters stored, but {last} were committed"
    );
    assert_eq!(consistent_count(&store), stored);
}

#[test]
fn a_reader_sees_consistent_data_while_a_writer_writes() {
    const TOTAL: usize = 60;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let writer = Store::open(&path).unwrap();

    let reader_path = path.clone();
    // The writer starts once the reader has looked once, so the reader's
    // later looks see writes in progress (on a loaded machine its opening
    // could otherwise take as long as all the writes).
    let (looked_once, first_look) = std::sync::mpsc::channel::<()>();
    let reader = std::thread::spawn(move || {
        let reader = Store::open(&reader_path).unwrap();
        let (mut seen, mut checks) = (0usize, 0usize);
        let started = Instant::now();
        while seen < TOTAL && started.elapsed() < Duration::from_secs(30) {
            let now = consistent_count(&reader);
            assert!(now >= seen, "the count went back from {seen} to {now}");
            seen = now;
            checks += 1;
            if checks == 1 {
                looked_once.send(()).unwrap();
            }
        }
        (seen, checks)
    });
    // (A reader that failed before its first look shows at the join below.)
    let _ = first_look.recv_timeout(Duration::from_secs(30));
    for n in 0..TOTAL {
        insert_one(&writer, n);
    }
    let (seen, checks) = reader.join().unwrap();
    assert_eq!(seen, TOTAL);
    assert!(checks > 1, "the reader ran only {checks} time(s)");
}

/// Pairs per imported batch in the preference writer.
const PAIRS: usize = 200;

/// Run in a child process: rewrites one reply and imports a batch of pairs,
/// again and again, printing each committed round, until the parent kills it.
fn pair_writer_child(spec: &str) {
    let mut it = spec.split('|');
    let path = it.next().unwrap();
    let character: i64 = it.next().unwrap().parse().unwrap();
    let reply: i64 = it.next().unwrap().parse().unwrap();
    let store = Store::open(std::path::Path::new(path)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut n = 0;
    while Instant::now() < deadline {
        store
            .edit_message_content(reply, &format!("edit {n}"))
            .unwrap();
        let batch: Vec<(String, String, String)> = (0..PAIRS)
            .map(|j| {
                (
                    format!("<|user|>q {n} {j}</s>\n<|assistant|>"),
                    format!("good {j}"),
                    "bad".repeat(50),
                )
            })
            .collect();
        store
            .insert_imported_pairs(character, &format!("file {n}"), &batch)
            .unwrap();
        n += 1;
        println!("committed {n}");
    }
}

#[test]
fn sigkill_mid_preference_write_leaves_no_half_pair() {
    if let Ok(spec) = std::env::var("DRAMATIS_PAIR_WRITER_CHILD") {
        pair_writer_child(&spec);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pairs.db");
    let (character, reply) = {
        let store = Store::open(&path).unwrap();
        let card = CharacterCard {
            name: "Kestrel".into(),
            ..Default::default()
        };
        let c = store.insert_character(&card, None, None).unwrap();
        let chat = store.create_chat(c, None, "Chat").unwrap();
        let u = store
            .add_message(chat, None, dramatis_store::Role::User, "Status?")
            .unwrap();
        let a = store
            .add_message(chat, Some(u), dramatis_store::Role::Assistant, "original")
            .unwrap();
        (c, a)
    };
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "sigkill_mid_preference_write_leaves_no_half_pair",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            "DRAMATIS_PAIR_WRITER_CHILD",
            format!("{}|{character}|{reply}", path.display()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut last = 0usize;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        if let Some(n) = line.unwrap().strip_prefix("committed ") {
            last = n.parse().unwrap();
            if last >= 60 {
                child.kill().unwrap(); // SIGKILL, mid-round
                break;
            }
        }
    }
    child.wait().unwrap();
    assert!(last >= 60, "the writer stopped early after {last} rounds");

    let store = Store::open(&path).unwrap();
    store.integrity_check().unwrap();
    // Every imported batch is whole or absent, and none committed is lost.
    let imported = store.imported_pairs(character).unwrap();
    let mut per_file = std::collections::HashMap::<String, usize>::new();
    for p in &imported {
        *per_file.entry(p.source.clone()).or_default() += 1;
    }
    assert!(per_file.values().all(|&n| n == PAIRS), "a torn import");
    assert!(
        per_file.len() >= last,
        "{} batches, {last} committed",
        per_file.len()
    );
    // The rewritten reply is one whole edit pair: its first text against the last.
    let pairs = store.preference_pairs(character).unwrap();
    assert_eq!(pairs.len(), 1, "{pairs:?}");
    assert_eq!(pairs[0].kind, dramatis_store::PairKind::Edit);
    assert_eq!(pairs[0].rejected, "original");
    let n: usize = pairs[0]
        .chosen
        .strip_prefix("edit ")
        .and_then(|n| n.parse().ok())
        .expect("the chosen side is a whole edit");
    assert!(n + 1 >= last, "edit {n} kept, {last} rounds committed");
}
