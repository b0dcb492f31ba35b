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
    let reader = std::thread::spawn(move || {
        let reader = Store::open(&reader_path).unwrap();
        let (mut seen, mut checks) = (0usize, 0usize);
        let started = Instant::now();
        while seen < TOTAL && started.elapsed() < Duration::from_secs(30) {
            let now = consistent_count(&reader);
            assert!(now >= seen, "the count went back from {seen} to {now}");
            seen = now;
            checks += 1;
        }
        (seen, checks)
    });
    for n in 0..TOTAL {
        insert_one(&writer, n);
    }
    let (seen, checks) = reader.join().unwrap();
    assert_eq!(seen, TOTAL);
    assert!(checks > 1, "the reader ran only {checks} time(s)");
}
