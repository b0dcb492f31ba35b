//! The CLI as a user runs it: real processes on the tiny fixture model.

use std::path::PathBuf;
use std::process::Command;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../llm/tests/fixtures/tiny")
}

fn cli() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dramatis-cli"));
    c.env_remove("RUST_BACKTRACE");
    c
}

/// Runs a command that must succeed (its stderr in the failure message).
trait RunOk {
    fn run_ok(&mut self) -> std::process::Output;
}

impl RunOk for Command {
    fn run_ok(&mut self) -> std::process::Output {
        let out = self.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}

fn reference() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixture().join("reference.json")).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

/// `generate --json` greedy on the reference prompt, with optional extra flags.
fn greedy_json(extra: &[&std::ffi::OsStr]) -> serde_json::Value {
    let out = cli()
        .args([
            "generate",
            "--device",
            "cpu",
            "--temperature",
            "0",
            "--max-tokens",
            "32",
            "--json",
            "--prompt",
        ])
        .arg(reference()["prompt"].as_str().unwrap())
        .arg("--model")
        .arg(fixture())
        .args(extra)
        .run_ok();
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn generate_json_gives_the_reference_greedy_tokens() {
    let v = greedy_json(&[]);
    assert_eq!(ids(&v["token_ids"]), ids(&reference()["base_greedy"]));
    assert!(v["timings"]["decode_tok_s"].as_f64().unwrap() > 0.0);
    let adapter = fixture().join("adapter");
    let v = greedy_json(&["--adapter".as_ref(), adapter.as_os_str()]);
    assert_eq!(ids(&v["token_ids"]), ids(&reference()["lora_greedy"]));
}

#[test]
fn generate_streams_only_text_on_stdout() {
    let out = cli()
        .args([
            "generate",
            "--device",
            "cpu",
            "--temperature",
            "0",
            "--max-tokens",
            "5",
            "--prompt",
            "Hello",
            "--model",
        ])
        .arg(fixture())
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("new tokens"), "{stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("tok/s"));
}

#[test]
fn quantize_then_generate_and_bench_from_the_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny-q8.gguf");
    cli()
        .args(["quantize", "--type", "q8_0", "--input"])
        .arg(fixture())
        .arg("--output")
        .arg(&gguf)
        .run_ok();
    assert!(gguf.exists());
    cli()
        .args([
            "generate",
            "--device",
            "cpu",
            "--temperature",
            "0",
            "--max-tokens",
            "4",
            "--prompt",
            "Hi",
            "--tokenizer",
        ])
        .arg(fixture().join("tokenizer.json"))
        .arg("--model")
        .arg(&gguf)
        .run_ok();
    let out = cli()
        .args([
            "bench",
            "--device",
            "cpu",
            "--json",
            "--prompt-tokens",
            "40",
            "--gen-tokens",
            "8",
            "--turn-tokens",
            "4",
            "--model",
        ])
        .arg(&gguf)
        .run_ok();
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in [
        "prefill_tok_s",
        "decode_tok_s",
        "ttft_s",
        "second_turn_ttft_s",
        "new_tokens_prefill_s",
    ] {
        assert!(r[key].as_f64().unwrap() > 0.0, "{key}: {r}");
    }
    assert_eq!(r["quant"], "Q8_0");
}

#[test]
fn a_bad_model_is_a_clear_error_and_a_failing_exit() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("broken.gguf");
    std::fs::write(&bad, b"not a model").unwrap();
    let out = cli()
        .args(["generate", "--prompt", "x", "--tokenizer"])
        .arg(fixture().join("tokenizer.json"))
        .arg("--model")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("broken.gguf") && err.contains("GGUF"), "{err}");
}

/// `quantize` the fixture to a small GGUF file.
fn tiny_gguf(dir: &std::path::Path) -> PathBuf {
    let out = dir.join("tiny.gguf");
    let st = cli()
        .args(["quantize", "--type", "q8_0", "--input"])
        .arg(fixture())
        .arg("--output")
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    out
}

#[test]
fn download_models_and_import_against_a_local_hub() {
    use dramatis_testkit::{FakeHub, Hosted};
    let dir = tempfile::tempdir().unwrap();
    let gguf = tiny_gguf(dir.path());
    let hub = FakeHub::start();
    hub.host(
        "TheBloke/phi-2-GGUF",
        "phi-2.Q8_0.gguf",
        Hosted::lfs(std::fs::read(&gguf).unwrap()),
    );
    hub.host(
        "microsoft/phi-2",
        "tokenizer.json",
        Hosted::small(std::fs::read(fixture().join("tokenizer.json")).unwrap()),
    );
    let env = |c: &mut Command| {
        c.env("HF_ENDPOINT", hub.endpoint())
            .env("HF_HOME", dir.path().join("hf"))
            .env_remove("HF_HUB_CACHE")
            .env_remove("HF_TOKEN")
            .env("DRAMATIS_DATA_DIR", dir.path().join("data"));
    };
    let mut c = cli();
    env(&mut c);
    let out = c.args(["download", "phi-2-q8_0"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("installed") && err.contains("sha256"), "{err}");

    let mut c = cli();
    env(&mut c);
    let out = c.args(["download", "phi-2-q4_k_m"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));

    let mut c = cli();
    env(&mut c);
    // tokenizer.json is not beside it, but the download above put Phi-2's in the cache.
    c.args(["import"]).arg(&gguf).run_ok();

    let mut c = cli();
    env(&mut c);
    let out = c.args(["models", "--json"]).output().unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let installed = v["installed"].as_array().unwrap();
    assert_eq!(installed.len(), 2);
    assert_eq!(installed[0]["catalog_id"], "phi-2-q8_0");
    assert_eq!(installed[0]["is_default"], true);
    assert_eq!(installed[1]["source"], "import");
    assert!(v["device"]["kind"].is_string());

    let mut c = cli();
    env(&mut c);
    let out = c.arg("models").output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("phi-2-q4_k_m") && table.contains("roleplay"),
        "{table}"
    );
}

#[test]
fn train_then_generate_with_the_adapter_and_export() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("rows.jsonl");
    let rows: Vec<String> = (0..16)
        .map(|i| {
            serde_json::json!({"text": format!("<|user|>Hi {i}</s>\n<|assistant|>Hello {i}!</s>")})
                .to_string()
        })
        .chain(["{broken".to_owned()])
        .collect();
    std::fs::write(&data, rows.join("\n")).unwrap();
    let run = dir.path().join("run");
    let log = dir.path().join("log.jsonl");
    let train_logging = |log: &std::path::Path| {
        let mut c = cli();
        c.args([
            "train",
            "--preset",
            "quick",
            "--device",
            "cpu",
            "--max-steps",
            "6",
        ])
        .args(["--batch", "4", "--lr", "0.005", "--model"])
        .arg(fixture())
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&run)
        .arg("--log")
        .arg(log);
        c
    };
    let train = || train_logging(&log);
    // A log that cannot be written is refused before any step, by name.
    let bad = train_logging(&dir.path().join("no-such-folder").join("log.jsonl"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success(), "{err}");
    assert!(
        err.contains("cannot open the log") && err.contains("no-such-folder"),
        "{err}"
    );
    assert!(!run.join("checkpoint").exists(), "no step ran");
    let out = train().output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("16 used") && err.contains("1 malformed") && err.contains("row 17"),
        "{err}"
    );
    assert!(err.contains("done: 6 steps"), "{err}");
    // The log: one line a step, with the rows each step trained on. Of the
    // 16 good rows (lines 1-16; line 17 is the broken one) one is held out
    // for eval; the first epoch (steps 1-4: batches of 4, 4, 4 and 3) takes
    // each of the other 15 exactly once.
    let steps: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(steps.len(), 6);
    let mut epoch: Vec<u64> = Vec::new();
    for (i, s) in steps.iter().enumerate() {
        assert_eq!(s["step"], i + 1);
        assert!(s["loss"].as_f64().unwrap().is_finite(), "{s}");
        let rows = s["rows"].as_array().unwrap();
        assert!((3..=4).contains(&rows.len()), "{s}");
        if i < 4 {
            epoch.extend(rows.iter().map(|r| r.as_u64().unwrap()));
        }
    }
    epoch.sort_unstable();
    epoch.dedup();
    assert_eq!(epoch.len(), 15, "{epoch:?}");
    assert!(epoch.iter().all(|r| (1..=16).contains(r)), "{epoch:?}");
    let adapter = run.join("adapter");
    assert!(adapter.join("adapter_model.safetensors").is_file());
    // The adapter loads in generate.
    cli()
        .args([
            "generate",
            "--device",
            "cpu",
            "--temperature",
            "0",
            "--max-tokens",
            "4",
            "--prompt",
            "<|user|>Hi 3</s>\n<|assistant|>",
            "--model",
        ])
        .arg(fixture())
        .arg("--adapter")
        .arg(&adapter)
        .run_ok();
    // Export from the checkpoint gives the same weights.
    let peft = dir.path().join("peft");
    cli()
        .args(["export", "--run"])
        .arg(&run)
        .arg("--out")
        .arg(&peft)
        .run_ok();
    assert_eq!(
        std::fs::read(peft.join("adapter_model.safetensors"))
            .unwrap()
            .len(),
        std::fs::read(adapter.join("adapter_model.safetensors"))
            .unwrap()
            .len()
    );
    // A llama.cpp GGUF LoRA and a merged model from the same run.
    let lora = dir.path().join("lora.gguf");
    cli()
        .args(["export", "--format", "gguf-lora", "--run"])
        .arg(&run)
        .arg("--out")
        .arg(&lora)
        .arg("--model")
        .arg(fixture())
        .run_ok();
    assert!(std::fs::metadata(&lora).unwrap().len() > 0);
    let merged = dir.path().join("merged.gguf");
    cli()
        .args(["merge", "--type", "q8_0", "--model"])
        .arg(fixture())
        .arg("--adapter")
        .arg(&adapter)
        .arg("--out")
        .arg(&merged)
        .run_ok();
    cli()
        .args([
            "generate",
            "--device",
            "cpu",
            "--max-tokens",
            "4",
            "--prompt",
            "Hi",
            "--model",
        ])
        .arg(&merged)
        .arg("--tokenizer")
        .arg(fixture().join("tokenizer.json"))
        .run_ok();
    // Running the same command again finds the finished run and does no step.
    let out = train().output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming at step 6"));
}

#[test]
fn card_import_export_and_lint_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let card = serde_json::json!({"spec": "chara_card_v2", "spec_version": "2.0", "data": {
        "name": "Quill", "creator": "cli-test", "description": "An archivist. ".repeat(400),
        "first_mes": "Shh.", "tags": ["x".repeat(200)],
        "character_book": {"entries": [{"keys": ["ink"], "content": "Ink is rare.", "enabled": true, "insertion_order": 1, "extensions": {}}]}
    }});
    let src = dir.path().join("quill.json");
    std::fs::write(&src, serde_json::to_vec(&card).unwrap()).unwrap();
    let junk = dir.path().join("junk.png");
    std::fs::write(&junk, b"\x89PNG\r\n\x1a\nnot really").unwrap();

    let out = cli()
        .args(["card", "import"])
        .arg(&src)
        .env("DRAMATIS_DATA_DIR", &data)
        .run_ok();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("quill.json: imported Quill"), "{text}");
    assert!(text.contains("note:"), "the long tag is reported: {text}");

    // A duplicate is skipped by default; a broken file fails the command, naming it.
    let out = cli()
        .args(["card", "import"])
        .arg(&src)
        .arg(&junk)
        .env("DRAMATIS_DATA_DIR", &data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("skipped, Quill is already here"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("junk.png: "), "{err}");

    for (name, fmt) in [
        ("q.png", None),
        ("q.charx", None),
        ("q.json", Some("json-v2")),
    ] {
        let path = dir.path().join(name);
        let mut c = cli();
        c.args(["card", "export", "Quill", "--out"])
            .arg(&path)
            .env("DRAMATIS_DATA_DIR", &data);
        if let Some(f) = fmt {
            c.args(["--format", f]);
        }
        c.run_ok();
        assert!(std::fs::metadata(&path).unwrap().len() > 100, "{name}");
    }
    let v2: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("q.json")).unwrap()).unwrap();
    assert_eq!(v2["spec"], "chara_card_v2");
    assert_eq!(v2["data"]["description"], card["data"]["description"]);

    let out = cli()
        .args(["card", "lint"])
        .arg(dir.path().join("q.png"))
        .env("DRAMATIS_DATA_DIR", &data)
        .run_ok();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("permanent part:"), "{text}");
    assert!(text.contains("an estimate: no model installed"), "{text}");
    assert!(
        text.contains("warning [") || text.contains("error ["),
        "a 1,600-word description draws a warning: {text}"
    );
    let out = cli()
        .args(["card", "lint", "--json"])
        .arg(&src)
        .env("DRAMATIS_DATA_DIR", &data)
        .run_ok();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["report"]["permanent_tokens"].as_u64().unwrap() > 1000);
}
