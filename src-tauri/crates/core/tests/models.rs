//! The models service end to end: a fake hub on 127.0.0.1 serves the tiny
//! Phi fixture under the catalog's names; downloads are verified, inspected
//! and registered; imports are checked; deletes clean up.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use dramatis_core::hub::{HubCache, HubOptions, Phase};
use dramatis_core::llm::{QuantType, quantize_safetensors};
use dramatis_core::{Dramatis, ErrorKind};
use dramatis_testkit::{FakeHub, Hosted, sha256_hex};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../llm/tests/fixtures/tiny")
}

fn tiny_gguf(dir: &Path) -> PathBuf {
    let out = dir.join("tiny-q8.gguf");
    quantize_safetensors(
        &fixture(),
        &out,
        QuantType::Q8_0,
        &AtomicBool::new(false),
        |_| {},
    )
    .unwrap();
    out
}

struct World {
    hub: FakeHub,
    app: Dramatis,
    cache: PathBuf,
    _dir: tempfile::TempDir,
}

fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let hub = FakeHub::start();
    let cache = dir.path().join("hf");
    let opts = HubOptions {
        endpoint: hub.endpoint(),
        token: None,
        cache: HubCache::new(&cache),
        chunk_bytes: 64 << 10,
        retries: 1,
        retry_delay: Duration::from_millis(10),
        stall_timeout: Duration::from_secs(10),
        free_space: |_| Ok(1 << 40),
    };
    let app = Dramatis::open_with(&dir.path().join("data"), opts).unwrap();
    World {
        hub,
        app,
        cache,
        _dir: dir,
    }
}

fn host_phi2(w: &World, weights: Vec<u8>) {
    w.hub.host(
        "TheBloke/phi-2-GGUF",
        "phi-2.Q4_K_M.gguf",
        Hosted::lfs(weights),
    );
    w.hub.host(
        "microsoft/phi-2",
        "tokenizer.json",
        Hosted::small(std::fs::read(fixture().join("tokenizer.json")).unwrap()),
    );
}

#[test]
fn the_default_download_is_verified_registered_and_made_default() {
    let w = world();
    assert!(w.app.default_model().unwrap().is_none());
    let src = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(tiny_gguf(src.path())).unwrap();
    host_phi2(&w, bytes.clone());
    let id = w.app.catalog().default_model().id.clone();
    let mut phases = Vec::new();
    let model = w
        .app
        .download_model(&id, &mut |p| phases.push(p.phase))
        .unwrap();
    assert!(phases.contains(&Phase::Downloading) && phases.contains(&Phase::Verifying));
    assert_eq!(model.sha256.as_deref(), Some(sha256_hex(&bytes).as_str()));
    assert_eq!(model.catalog_id.as_deref(), Some("phi-2-q4_k_m"));
    assert_eq!(model.size_bytes, bytes.len() as u64);
    assert!(model.is_default && model.present);
    assert!(Path::new(&model.path).starts_with(&w.cache));
    assert_eq!(std::fs::read(&model.path).unwrap(), bytes);
    let overview = w.app.models_overview().unwrap();
    assert_eq!(overview.installed.len(), 1);
    let item = overview.catalog.iter().find(|c| c.entry.id == id).unwrap();
    assert_eq!(item.installed_id, Some(model.id));
    assert!(!item.downloading);
    assert_eq!(overview.used_bytes, bytes.len() as u64);

    // Deleting it removes the weights from the cache.
    w.app.delete_model(model.id).unwrap();
    assert!(!Path::new(&model.path).exists());
    assert!(w.app.list_models().unwrap().is_empty());
    assert!(w.app.default_model().unwrap().is_none());
}

#[test]
fn a_verified_file_that_is_not_phi2_is_not_registered() {
    let w = world();
    host_phi2(&w, b"GGUF but not really a model, just bytes".to_vec());
    let err = w
        .app
        .download_model("phi-2-q4_k_m", &mut |_| {})
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BadFile, "{err}");
    assert!(w.app.list_models().unwrap().is_empty());
}

#[test]
fn hub_failures_reach_the_caller_with_their_kind() {
    let w = world();
    let err = w
        .app
        .download_model("phi-2-q4_k_m", &mut |_| {})
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Network, "{err}");
    assert!(err.to_string().contains("not found"), "{err}");
    let err = w.app.download_model("phi-9", &mut |_| {}).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
}

#[test]
fn imports_are_checked_before_they_are_registered() {
    let w = world();
    let dir = tempfile::tempdir().unwrap();
    let gguf = tiny_gguf(dir.path());
    // No tokenizer beside it and none in the cache: a clear refusal.
    let err = w.app.import_model(&gguf).unwrap_err();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
    std::fs::copy(
        fixture().join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let m = w.app.import_model(&gguf).unwrap();
    assert_eq!(m.source, "import");
    assert_eq!(m.format, "gguf");
    assert_eq!(m.quantization, "Q8_0");
    assert!(m.is_default);

    // A safetensors folder imports too.
    let st = w.app.import_model(&fixture()).unwrap();
    assert_eq!(st.format, "safetensors");
    assert!(!st.is_default);
    w.app.set_default_model(st.id).unwrap();
    assert_eq!(w.app.default_model().unwrap().unwrap().id, st.id);

    // A truncated file is refused and nothing is added.
    let bytes = std::fs::read(&gguf).unwrap();
    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, &bytes[..bytes.len() / 3]).unwrap();
    let err = w.app.import_model(&bad).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BadFile);
    assert!(err.to_string().contains("bad.gguf"), "{err}");
    assert_eq!(w.app.list_models().unwrap().len(), 2);

    // Deleting an import leaves the user's file alone.
    w.app.delete_model(m.id).unwrap();
    assert!(gguf.exists());
}

#[test]
fn a_safetensors_model_quantizes_into_a_registered_gguf() {
    let w = world();
    let st = w.app.import_model(&fixture()).unwrap();
    let mut reports = Vec::new();
    let q = w
        .app
        .quantize_model(st.id, QuantType::Q8_0, &mut |p| {
            reports.push((p.done, p.total))
        })
        .unwrap();
    assert_eq!(q.source, "quantized");
    assert_eq!(q.format, "gguf");
    assert_eq!(q.quantization, "Q8_0");
    assert!(Path::new(&q.path).starts_with(w.app.data_dir()));
    let (done, total) = *reports.last().unwrap();
    assert_eq!(done, total);
    assert!(reports.windows(2).all(|r| r[0].0 < r[1].0));
    // It loads, and a GGUF is not quantized again.
    dramatis_core::llm::load_model(Path::new(&q.path), &dramatis_core::llm::Device::Cpu).unwrap();
    assert_eq!(
        w.app
            .quantize_model(q.id, QuantType::Q4K, &mut |_| {})
            .unwrap_err()
            .kind(),
        ErrorKind::Conflict
    );
    // Deleting a quantized model deletes its file.
    w.app.delete_model(q.id).unwrap();
    assert!(!Path::new(&q.path).exists());
}
