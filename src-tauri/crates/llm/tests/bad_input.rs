//! Bad model files get a typed error that names the file and the problem,
//! never a panic.

mod common;

use std::path::Path;
use std::sync::atomic::AtomicBool;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use common::fixture;
use dramatis_llm::{
    Device, Error, LoraAdapter, ModelFormat, PhiConfig, PhiTokenizer, QuantType, inspect_model,
    load_model, quantize_safetensors, write_gguf,
};

fn gguf_copy(dir: &Path) -> std::path::PathBuf {
    let out = dir.join("tiny.gguf");
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

fn copy_fixture(dir: &Path) -> std::path::PathBuf {
    let dst = dir.join("hf");
    std::fs::create_dir_all(&dst).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture().join(f), dst.join(f)).unwrap();
    }
    dst
}

#[test]
fn a_missing_file_is_named() {
    let err = load_model(Path::new("/nonexistent/phi-2.gguf"), &Device::Cpu).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/phi-2.gguf"));
}

#[test]
fn a_truncated_gguf_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let path = gguf_copy(dir.path());
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let err = load_model(&path, &Device::Cpu).unwrap_err();
    assert!(matches!(err, Error::Truncated { .. }), "{err}");
    assert!(err.to_string().contains("truncated") && err.to_string().contains("tiny.gguf"));
}

#[test]
fn a_corrupted_gguf_is_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk.gguf");
    std::fs::write(&path, b"GGUF\x03\x00\x00\x00this is not a model at all").unwrap();
    let err = load_model(&path, &Device::Cpu).unwrap_err();
    assert!(
        matches!(err, Error::BadFile { .. } | Error::Truncated { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("junk.gguf"));
    std::fs::write(&path, vec![0u8; 4096]).unwrap();
    let err = load_model(&path, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("not a readable GGUF"), "{err}");
}

#[test]
fn another_architecture_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("llama.gguf");
    let t = QTensor::quantize(
        &candle_core::Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    let meta = vec![(
        "general.architecture".to_string(),
        gguf_file::Value::String("llama".into()),
    )];
    write_gguf(&path, &meta, &[("token_embd.weight".to_string(), t)]).unwrap();
    let err = load_model(&path, &Device::Cpu).unwrap_err();
    assert!(
        matches!(err, Error::UnknownArchitecture { ref found, .. } if found == "llama"),
        "{err}"
    );
}

#[test]
fn wrong_tensor_shapes_name_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let hf = copy_fixture(dir.path());
    let cfg = std::fs::read_to_string(hf.join("config.json")).unwrap();
    std::fs::write(
        hf.join("config.json"),
        cfg.replace("\"intermediate_size\": 512", "\"intermediate_size\": 768"),
    )
    .unwrap();
    let err = load_model(&hf, &Device::Cpu).unwrap_err();
    match &err {
        Error::Shape {
            name,
            expected,
            found,
            ..
        } => {
            assert_eq!(name, "model.layers.0.mlp.fc1.weight");
            assert_eq!(expected, &[768, 256]);
            assert_eq!(found, &[512, 256]);
        }
        other => panic!("expected a shape error, got {other}"),
    }
}

#[test]
fn a_truncated_safetensors_file_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let hf = copy_fixture(dir.path());
    let st = hf.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_model(&hf, &Device::Cpu).unwrap_err();
    assert!(matches!(err, Error::Truncated { .. }), "{err}");
    std::fs::write(&st, b"garbage").unwrap();
    let err = load_model(&hf, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("not a safetensors file"), "{err}");
}

#[test]
fn a_tokenizer_that_does_not_fit_the_model_is_refused() {
    let tok = PhiTokenizer::from_file(&fixture().join("tokenizer.json")).unwrap();
    tok.check_fits(512).unwrap();
    let err = tok.check_fits(100).unwrap_err().to_string();
    assert!(
        err.contains("do not belong together") && err.contains("tokenizer.json"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("tokenizer.json");
    std::fs::write(&bad, "{\"not\": \"a tokenizer\"}").unwrap();
    assert!(
        PhiTokenizer::from_file(&bad)
            .unwrap_err()
            .to_string()
            .contains("not a readable tokenizer.json")
    );
}

#[test]
fn an_adapter_for_another_base_is_refused() {
    let tiny = PhiConfig::from_hf_file(&fixture().join("config.json")).unwrap();
    let other = PhiConfig {
        hidden_size: 128,
        ..tiny.clone()
    };
    let err = LoraAdapter::load_peft(&fixture().join("adapter"), &other, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("another base") && err.contains("adapter_model.safetensors"),
        "{err}"
    );
    let fewer_layers = PhiConfig {
        num_hidden_layers: 1,
        ..tiny.clone()
    };
    let err = LoraAdapter::load_peft(&fixture().join("adapter"), &fewer_layers, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("another base"), "{err}");
    let err = LoraAdapter::load_peft(Path::new("/nonexistent"), &tiny, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/adapter_config.json"), "{err}");
}

#[test]
fn a_cancelled_quantization_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("never.gguf");
    let err = quantize_safetensors(
        &fixture(),
        &out,
        QuantType::Q4K,
        &AtomicBool::new(true),
        |_| {},
    )
    .unwrap_err();
    assert!(matches!(err, Error::Cancelled));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn inspect_reads_headers_only_and_refuses_what_load_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = gguf_copy(dir.path());
    let info = inspect_model(&gguf).unwrap();
    assert_eq!(info.format, ModelFormat::Gguf);
    assert_eq!(info.quantization, "Q8_0");
    assert_eq!(
        info.config,
        load_model(&gguf, &Device::Cpu).unwrap().config().clone()
    );
    let hf = copy_fixture(dir.path());
    let st = inspect_model(&hf).unwrap();
    assert_eq!(st.format, ModelFormat::Safetensors);
    assert_eq!(st.parameters, info.parameters);
    assert_eq!(
        st.bytes,
        std::fs::metadata(hf.join("model.safetensors"))
            .unwrap()
            .len()
    );

    let bytes = std::fs::read(&gguf).unwrap();
    std::fs::write(&gguf, &bytes[..bytes.len() / 2]).unwrap();
    assert!(matches!(inspect_model(&gguf), Err(Error::Truncated { .. })));
    std::fs::write(&gguf, vec![0u8; 100]).unwrap();
    assert!(matches!(inspect_model(&gguf), Err(Error::BadFile { .. })));

    let cfg = std::fs::read_to_string(hf.join("config.json")).unwrap();
    std::fs::write(
        hf.join("config.json"),
        cfg.replace("\"intermediate_size\": 512", "\"intermediate_size\": 768"),
    )
    .unwrap();
    let err = inspect_model(&hf).unwrap_err();
    assert!(
        matches!(&err, Error::Shape { name, .. } if name == "model.layers.0.mlp.fc1.weight"),
        "{err}"
    );
}
