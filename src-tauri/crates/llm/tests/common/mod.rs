//! Shared by the integration tests: the tiny Phi fixture and its references.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use dramatis_llm::{Device, Tensor};

pub fn fixture() -> PathBuf {
    // At run time first: a test binary carried to the GPU machine runs from
    // another checkout.
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("tests/fixtures/tiny")
}

/// The devices to test on: the CPU, and the GPU when the build has CUDA and
/// the machine a GPU.
pub fn devices() -> Vec<Device> {
    let mut v = vec![Device::Cpu];
    if let Ok(d) = dramatis_llm::DeviceChoice::Cuda(0).open() {
        v.push(d);
    }
    v
}

pub struct Reference {
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
    pub base_greedy: Vec<u32>,
    pub lora_greedy: Vec<u32>,
    pub tensors: HashMap<String, Tensor>,
}

pub fn reference() -> Reference {
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture().join("reference.json")).unwrap()).unwrap();
    let ids = |k: &str| -> Vec<u32> {
        json[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    };
    Reference {
        prompt: json["prompt"].as_str().unwrap().to_owned(),
        prompt_ids: ids("prompt_ids"),
        base_greedy: ids("base_greedy"),
        lora_greedy: ids("lora_greedy"),
        tensors: candle_core::safetensors::load(
            fixture().join("reference.safetensors"),
            &Device::Cpu,
        )
        .unwrap(),
    }
}

/// The largest absolute difference between two tensors of the same shape.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The largest absolute value in a tensor.
pub fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
