//! Downloads against a fake hub on 127.0.0.1: the real HTTP path, the real
//! cache layout, real failures.

use std::path::Path;
use std::time::Duration;

use dramatis_hub::{CancelToken, Error, Hub, HubCache, HubOptions, Phase, RemoteFile};
use dramatis_testkit::{COMMIT, FakeHub, Faults, Hosted, payload, sha256_hex};

const REPO: &str = "TheBloke/phi-2-GGUF";
const CHUNK: usize = 64 << 10;

fn options(hub: &FakeHub, cache: &Path) -> HubOptions {
    HubOptions {
        endpoint: hub.endpoint(),
        token: None,
        cache: HubCache::new(cache),
        chunk_bytes: CHUNK,
        retries: 2,
        retry_delay: Duration::from_millis(10),
        stall_timeout: Duration::from_secs(10),
        free_space: |_| Ok(u64::MAX),
    }
}

fn weights() -> RemoteFile {
    RemoteFile::model(REPO, "phi-2.Q4_K_M.gguf")
}

fn tokenizer() -> RemoteFile {
    RemoteFile::model("microsoft/phi-2", "tokenizer.json")
}

fn fetch(
    opts: HubOptions,
    files: &[RemoteFile],
) -> dramatis_hub::Result<Vec<dramatis_hub::Fetched>> {
    Hub::new(opts).fetch(files, &mut |_| {}, &CancelToken::new())
}

/// Body bytes requested from the blob "CDN", per request, as (start, end).
fn cdn_ranges(hub: &FakeHub) -> Vec<(u64, Option<u64>)> {
    hub.seen()
        .into_iter()
        .filter(|s| s.path.starts_with("/cdn/") && s.range != Some((0, Some(0))))
        .filter_map(|s| s.range)
        .collect()
}

#[test]
fn a_full_download_lands_in_the_cache_layout_verified() {
    let hub = FakeHub::start();
    let body = payload(300_000, 1);
    let tok = br#"{"model":{"type":"BPE"}}"#.to_vec();
    hub.host(REPO, "phi-2.Q4_K_M.gguf", Hosted::lfs(body.clone()));
    hub.host(
        "microsoft/phi-2",
        "tokenizer.json",
        Hosted::small(tok.clone()),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut reports = Vec::new();
    let got = Hub::new(options(&hub, dir.path()))
        .fetch(
            &[weights(), tokenizer()],
            &mut |p| reports.push(p.clone()),
            &CancelToken::new(),
        )
        .unwrap();
    let sha = sha256_hex(&body);
    let repo = dir.path().join("models--TheBloke--phi-2-GGUF");
    assert_eq!(
        got[0].path,
        repo.join("snapshots")
            .join(COMMIT)
            .join("phi-2.Q4_K_M.gguf")
    );
    assert_eq!(std::fs::read(&got[0].path).unwrap(), body);
    assert_eq!(
        std::fs::canonicalize(&got[0].path).unwrap(),
        std::fs::canonicalize(repo.join("blobs").join(&sha)).unwrap()
    );
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main")).unwrap(),
        COMMIT
    );
    assert_eq!(got[0].sha256, sha);
    assert_eq!(got[0].bytes, body.len() as u64);
    assert!(got[0].downloaded && got[1].downloaded);
    assert_eq!(std::fs::read(&got[1].path).unwrap(), tok);
    assert_eq!(got[1].sha256, sha256_hex(&tok));
    // Progress went up to the total and ended verifying.
    let total = (body.len() + tok.len()) as u64;
    assert!(
        reports
            .iter()
            .all(|r| r.total_bytes == total || r.phase == Phase::Checking)
    );
    assert!(
        reports
            .iter()
            .any(|r| r.phase == Phase::Downloading && r.done_bytes == body.len() as u64)
    );
    assert!(
        reports
            .windows(2)
            .all(|w| w[0].done_bytes <= w[1].done_bytes
                || w[1].phase != w[0].phase
                || w[0].file != w[1].file)
    );

    // A second fetch finds everything in the cache without a request.
    hub.clear_seen();
    let again = fetch(options(&hub, dir.path()), &[weights(), tokenizer()]).unwrap();
    assert!(hub.seen().is_empty(), "{:?}", hub.seen());
    assert!(!again[0].downloaded);
    assert_eq!(again[0].sha256, sha);
}

#[test]
fn a_cache_filled_by_python_tools_is_used_without_any_request() {
    // The layout huggingface_hub writes: refs/main, blobs/<sha256>, a relative link.
    let dir = tempfile::tempdir().unwrap();
    let body = payload(5000, 2);
    let sha = sha256_hex(&body);
    let repo = dir.path().join("models--TheBloke--phi-2-GGUF");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("snapshots").join(COMMIT)).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
    std::fs::write(repo.join("blobs").join(&sha), &body).unwrap();
    std::os::unix::fs::symlink(
        format!("../../blobs/{sha}"),
        repo.join("snapshots")
            .join(COMMIT)
            .join("phi-2.Q4_K_M.gguf"),
    )
    .unwrap();
    let hub = FakeHub::start(); // hosts nothing: any request would fail
    let got = fetch(options(&hub, dir.path()), &[weights()]).unwrap();
    assert!(hub.seen().is_empty());
    assert_eq!(got[0].sha256, sha);
    assert!(!got[0].downloaded);
}

#[test]
fn an_interrupted_download_resumes_where_it_stopped() {
    let hub = FakeHub::start();
    let body = payload(1 << 20, 3);
    hub.host(REPO, "phi-2.Q4_K_M.gguf", Hosted::lfs(body.clone()));
    let cut = 600_000u64;
    hub.set_faults(Faults {
        drop_after: Some(cut),
        ..Faults::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let got = fetch(options(&hub, dir.path()), &[weights()]).unwrap();
    assert_eq!(std::fs::read(&got[0].path).unwrap(), body);
    let ranges = cdn_ranges(&hub);
    // The chunk that broke, and those after it, are asked for again; nothing before it.
    let committed = cut / CHUNK as u64 * CHUNK as u64;
    let broken = ranges.iter().position(|r| r.0 == committed).unwrap();
    let after: Vec<_> = ranges[broken + 1..].to_vec();
    assert!(!after.is_empty());
    assert!(after.iter().all(|r| r.0 >= committed), "{ranges:?}");
    let requested: u64 = ranges
        .iter()
        .map(|(a, b)| b.map_or(body.len() as u64, |b| (b + 1).min(body.len() as u64)) - a)
        .sum();
    assert!(requested <= body.len() as u64 + CHUNK as u64, "{requested}");
}

#[test]
fn a_checksum_mismatch_removes_the_file_and_says_so() {
    let hub = FakeHub::start();
    let mut lying = Hosted::lfs(payload(70_000, 4));
    lying.etag = sha256_hex(b"something else");
    hub.host(REPO, "phi-2.Q4_K_M.gguf", lying);
    let dir = tempfile::tempdir().unwrap();
    let err = fetch(options(&hub, dir.path()), &[weights()]).unwrap_err();
    assert!(matches!(err, Error::Checksum { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("checksum mismatch") && msg.contains("removed"),
        "{msg}"
    );
    let cache = HubCache::new(dir.path());
    assert!(cache.find(&weights()).is_none());
    let blobs = dir.path().join("models--TheBloke--phi-2-GGUF/blobs");
    let left: Vec<_> = std::fs::read_dir(blobs)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| !n.to_string_lossy().ends_with(".lock"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn not_found_fails_at_once_and_server_errors_after_bounded_retries() {
    let hub = FakeHub::start();
    let dir = tempfile::tempdir().unwrap();
    let err = fetch(options(&hub, dir.path()), &[weights()]).unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    assert!(err.to_string().contains("phi-2.Q4_K_M.gguf"));
    assert_eq!(hub.seen().len(), 1);

    hub.host(REPO, "phi-2.Q4_K_M.gguf", Hosted::lfs(payload(1000, 5)));
    hub.set_faults(Faults {
        status: Some(500),
        ..Faults::default()
    });
    hub.clear_seen();
    let err = fetch(options(&hub, dir.path()), &[weights()]).unwrap_err();
    assert!(matches!(err, Error::Http { status: 500, .. }), "{err}");
    assert_eq!(hub.seen().len(), 3, "one try and two retries");
    assert!(HubCache::new(dir.path()).find(&weights()).is_none());
}

#[test]
fn a_stalled_server_is_detected_and_the_retry_resumes() {
    let hub = FakeHub::start();
    let body = payload(400_000, 6);
    hub.host(REPO, "phi-2.Q4_K_M.gguf", Hosted::lfs(body.clone()));
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(&hub, dir.path());
    opts.stall_timeout = Duration::from_millis(700);
    opts.retries = 0;
    hub.set_faults(Faults {
        stall_after: Some(200_000),
        ..Faults::default()
    });
    let t = std::time::Instant::now();
    let err = fetch(opts.clone(), &[weights()]).unwrap_err();
    assert!(matches!(err, Error::Stalled { .. }), "{err}");
    assert!(t.elapsed() < Duration::from_secs(10));
    assert!(HubCache::new(dir.path()).find(&weights()).is_none());
    // The stall was one-shot: a retry completes from the committed chunks.
    opts.retries = 1;
    let got = fetch(opts, &[weights()]).unwrap();
    assert_eq!(std::fs::read(&got[0].path).unwrap(), body);
}

#[test]
fn too_little_disk_space_is_refused_before_any_byte_is_fetched() {
    let hub = FakeHub::start();
    hub.host(REPO, "phi-2.Q4_K_M.gguf", Hosted::lfs(payload(100_000, 7)));
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(&hub, dir.path());
    opts.free_space = |_| Ok(50_000);
    let err = fetch(opts, &[weights()]).unwrap_err();
    assert!(matches!(err, Error::DiskFull { .. }), "{err}");
    assert!(err.to_string().contains("not enough disk space"), "{err}");
    assert!(cdn_ranges(&hub).is_empty());
    assert!(
        !dir.path()
            .join("models--TheBloke--phi-2-GGUF/blobs")
            .exists()
    );
}

#[test]
fn pause_keeps_the_part_for_a_later_resume_and_cancel_removes_it() {
    let hub = FakeHub::start();
    let body = payload(800_000, 8);
    hub.host(REPO, "phi-2.Q4_K_M.gguf", Hosted::lfs(body.clone()));
    hub.set_faults(Faults {
        bytes_per_sec: Some(1_500_000),
        ..Faults::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let part = dir
        .path()
        .join("models--TheBloke--phi-2-GGUF/blobs")
        .join(format!("{}.sync.part", sha256_hex(&body)));

    let pause = CancelToken::new();
    let p2 = pause.clone();
    let err = Hub::new(options(&hub, dir.path()))
        .fetch(
            &[weights()],
            &mut |p| {
                if p.done_bytes > 300_000 {
                    p2.pause();
                }
            },
            &pause,
        )
        .unwrap_err();
    assert!(matches!(err, Error::Cancelled));
    assert!(part.exists(), "a paused download keeps its part");
    let cache = HubCache::new(dir.path());
    assert!(cache.partial_bytes(&weights()) > 0);

    // "After a restart": a new Hub picks the part up.
    hub.clear_seen();
    let got = fetch(options(&hub, dir.path()), &[weights()]).unwrap();
    assert_eq!(std::fs::read(&got[0].path).unwrap(), body);
    let first = cdn_ranges(&hub)[0].0;
    assert!(first >= 4 * CHUNK as u64, "resumed at {first}");
    assert!(!part.exists());

    // Cancel (not pause) throws the part away.
    cache.remove(&weights()).unwrap();
    let cancel = CancelToken::new();
    let c2 = cancel.clone();
    let err = Hub::new(options(&hub, dir.path()))
        .fetch(
            &[weights()],
            &mut |p| {
                if p.done_bytes > 200_000 {
                    c2.cancel();
                }
            },
            &cancel,
        )
        .unwrap_err();
    assert!(matches!(err, Error::Cancelled));
    assert!(!part.exists());
    assert!(cache.find(&weights()).is_none());
}

#[test]
fn the_token_is_sent_but_never_shown() {
    let hub = FakeHub::start();
    hub.set_faults(Faults {
        status: Some(401),
        ..Faults::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(&hub, dir.path());
    opts.token = Some("hf_SeCrEt123".into());
    assert!(!format!("{opts:?}").contains("SeCrEt"));
    let err = fetch(opts, &[weights()]).unwrap_err();
    assert!(
        matches!(err, Error::Unauthorized { status: 401, .. }),
        "{err}"
    );
    assert!(!err.to_string().contains("SeCrEt") && !format!("{err:?}").contains("SeCrEt"));
    assert_eq!(hub.seen()[0].auth.as_deref(), Some("Bearer hf_SeCrEt123"));
}

#[test]
fn datasets_download_from_the_dataset_url() {
    let hub = FakeHub::start();
    let body = payload(10_000, 9);
    hub.host(
        "datasets/hieunguyenminh/roleplay",
        "data/train-00000-of-00001.parquet",
        Hosted::lfs(body.clone()),
    );
    let dir = tempfile::tempdir().unwrap();
    let cat = dramatis_hub::Catalog::builtin();
    let files = &cat.dataset("roleplay").unwrap().files;
    let got = fetch(options(&hub, dir.path()), files).unwrap();
    assert!(
        got[0]
            .path
            .starts_with(dir.path().join("datasets--hieunguyenminh--roleplay"))
    );
    assert_eq!(std::fs::read(&got[0].path).unwrap(), body);
}
