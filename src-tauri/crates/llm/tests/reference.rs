//! The engine against Hugging Face transformers' own outputs for the tiny
//! fixture (tests/fixtures/make_fixtures.py): logits to 1e-4 in f32, greedy
//! tokens identical, with and without a PEFT adapter, in every weight format.

mod common;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use common::{fixture, max_abs, max_diff, reference};
use dramatis_llm::{
    Device, GenerateParams, Logits, LoraAdapter, Phi, PhiTokenizer, QuantType, SamplerConfig,
    Session, Tensor, load_model, quantize_safetensors,
};

const TOL: f32 = 1e-4;

fn tiny() -> Phi {
    load_model(&fixture(), &Device::Cpu).unwrap()
}

fn ids_tensor(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

fn full_logits(model: &Phi, ids: &[u32], lora: Option<&LoraAdapter>) -> Tensor {
    model
        .forward(&ids_tensor(ids), None, Logits::All, lora)
        .unwrap()
        .squeeze(0)
        .unwrap()
}

/// Greedy decoding step by step through the KV cache: (step logits, tokens).
fn greedy_steps(
    model: &Phi,
    prompt: &[u32],
    n: usize,
    lora: Option<&LoraAdapter>,
) -> (Tensor, Vec<u32>) {
    let mut cache = model.new_cache();
    let mut logits = model
        .forward(&ids_tensor(prompt), Some(&mut cache), Logits::Last, lora)
        .unwrap();
    let mut steps = Vec::new();
    let mut tokens = Vec::new();
    for _ in 0..n {
        let row = logits.squeeze(0).unwrap();
        let next = row.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        steps.push(row);
        tokens.push(next);
        logits = model
            .forward(&ids_tensor(&[next]), Some(&mut cache), Logits::Last, lora)
            .unwrap();
    }
    (Tensor::stack(&steps, 0).unwrap(), tokens)
}

#[test]
fn tokenizer_matches_hugging_face() {
    let r = reference();
    let tok = PhiTokenizer::from_file(&fixture().join("tokenizer.json")).unwrap();
    assert_eq!(tok.encode(&r.prompt).unwrap(), r.prompt_ids);
    assert_eq!(tok.decode(&r.prompt_ids).unwrap(), r.prompt);
}

#[test]
fn full_prompt_logits_match() {
    let r = reference();
    let model = tiny();
    let d = max_diff(
        &full_logits(&model, &r.prompt_ids, None),
        &r.tensors["base_full"],
    );
    assert!(d < TOL, "max |Δ| = {d}");
}

#[test]
fn cached_decoding_matches_step_by_step_and_greedy_for_32_tokens() {
    let r = reference();
    let (steps, tokens) = greedy_steps(&tiny(), &r.prompt_ids, 32, None);
    let d = max_diff(&steps, &r.tensors["base_steps"]);
    assert!(d < TOL, "max |Δ| = {d}");
    assert_eq!(tokens, r.base_greedy);
}

#[test]
fn a_prompt_continued_after_a_cached_prefix_matches() {
    let r = reference();
    let model = tiny();
    let (head, tail) = r.prompt_ids.split_at(11);
    let mut cache = model.new_cache();
    model
        .forward(&ids_tensor(head), Some(&mut cache), Logits::Last, None)
        .unwrap();
    let rest = model
        .forward(&ids_tensor(tail), Some(&mut cache), Logits::All, None)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let want = r.tensors["base_full"]
        .narrow(0, head.len(), tail.len())
        .unwrap();
    let d = max_diff(&rest, &want);
    assert!(d < TOL, "max |Δ| = {d}");
    assert_eq!(cache.len(), r.prompt_ids.len());
}

#[test]
fn peft_adapter_matches_and_switches_without_reloading() {
    let r = reference();
    let model = tiny();
    let adapter =
        LoraAdapter::load_peft(&fixture().join("adapter"), model.config(), &Device::Cpu).unwrap();
    let d = max_diff(
        &full_logits(&model, &r.prompt_ids, Some(&adapter)),
        &r.tensors["lora_full"],
    );
    assert!(d < TOL, "with adapter: max |Δ| = {d}");
    let (steps, tokens) = greedy_steps(&model, &r.prompt_ids, 32, Some(&adapter));
    assert!(max_diff(&steps, &r.tensors["lora_steps"]) < TOL);
    assert_eq!(tokens, r.lora_greedy);
    // The same base, without the adapter again.
    let d = max_diff(
        &full_logits(&model, &r.prompt_ids, None),
        &r.tensors["base_full"],
    );
    assert!(d < TOL, "adapter removed: max |Δ| = {d}");
}

#[test]
fn gguf_at_every_precision_tracks_the_reference() {
    let r = reference();
    let dir = tempfile::tempdir().unwrap();
    let want = &r.tensors["base_full"];
    let scale = max_abs(want);
    // (type, max |Δ| allowed relative to the largest logit). Measured on this
    // fixture: F32/F16 1e-5 abs, Q8_0 0.027, Q5_K 0.107, Q4_K 0.192 (random
    // weights have no redundancy, so quantization shows more than on Phi-2).
    for (qt, rel) in [
        (QuantType::F32, 1e-6),
        (QuantType::F16, 2e-3),
        (QuantType::Q8_0, 4e-2),
        (QuantType::Q5K, 1.6e-1),
        (QuantType::Q4K, 2.8e-1),
    ] {
        let out = dir.path().join(format!("tiny-{qt:?}.gguf"));
        let mut reports = 0;
        quantize_safetensors(&fixture(), &out, qt, &AtomicBool::new(false), |_| {
            reports += 1
        })
        .unwrap();
        assert!(reports > 10, "progress was reported {reports} times");
        let model = load_model(&out, &Device::Cpu).unwrap();
        let got = full_logits(&model, &r.prompt_ids, None);
        let d = max_diff(&got, want);
        eprintln!(
            "{qt:?}: max |Δ| = {d:.5} ({:.4} of max |logit| {scale:.3})",
            d / scale
        );
        assert!(
            d <= (rel * scale).max(TOL),
            "{qt:?}: max |Δ| = {d}, allowed {}",
            rel * scale
        );
    }
}

#[test]
fn session_generates_the_reference_and_reuses_the_prefix() {
    let r = reference();
    let model = Arc::new(tiny());
    let tok = PhiTokenizer::from_file(&fixture().join("tokenizer.json")).unwrap();
    let params = GenerateParams {
        sampler: SamplerConfig::greedy(),
        max_new_tokens: 32,
        stop: vec![],
        ..Default::default()
    };
    let mut session = Session::new(model.clone());
    let mut pieces = Vec::new();
    let g = session
        .generate(&tok, &r.prompt_ids, &params, &AtomicBool::new(false), |p| {
            pieces.push(p.to_owned())
        })
        .unwrap();
    let eos = r
        .base_greedy
        .iter()
        .position(|&t| Some(t) == tok.eos_id())
        .unwrap_or(32);
    assert_eq!(g.token_ids, r.base_greedy[..eos]);
    assert_eq!(pieces.concat(), g.text);
    assert_eq!(g.text, tok.decode(&g.token_ids).unwrap());
    assert_eq!(g.reused_tokens, 0);

    // Second turn: the history grows; only the new tokens are computed.
    let mut second: Vec<u32> = r.prompt_ids.clone();
    second.extend(&g.token_ids);
    second.extend(
        tok.encode("</s>\n<|user|>And then?</s>\n<|assistant|>")
            .unwrap(),
    );
    let again = session
        .generate(&tok, &second, &params, &AtomicBool::new(false), |_| {})
        .unwrap();
    assert!(
        again.reused_tokens >= r.prompt_ids.len(),
        "reused {}",
        again.reused_tokens
    );
    let fresh = Session::new(model)
        .generate(&tok, &second, &params, &AtomicBool::new(false), |_| {})
        .unwrap();
    assert_eq!(
        again.token_ids, fresh.token_ids,
        "prefix reuse changes nothing"
    );
}

#[test]
fn a_gguf_with_separate_q_k_v_loads_like_the_fused_one() {
    use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
    let r = reference();
    let dir = tempfile::tempdir().unwrap();
    let fused = dir.path().join("fused.gguf");
    quantize_safetensors(
        &fixture(),
        &fused,
        QuantType::Q8_0,
        &AtomicBool::new(false),
        |_| {},
    )
    .unwrap();
    // Rewrite it as newer llama.cpp converters do: attn_q, attn_k, attn_v.
    let mut f = std::fs::File::open(&fused).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let mut tensors = Vec::new();
    let mut names: Vec<&String> = ct.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let q = ct.tensor(&mut f, name, &Device::Cpu).unwrap();
        let Some(prefix) = name
            .strip_suffix(".attn_qkv.weight")
            .or_else(|| name.strip_suffix(".attn_qkv.bias"))
        else {
            tensors.push((name.clone(), q));
            continue;
        };
        let kind = if name.ends_with("weight") {
            "weight"
        } else {
            "bias"
        };
        let dense = q.dequantize(&Device::Cpu).unwrap();
        let h = dense.dim(0).unwrap() / 3;
        for (i, part) in ["attn_q", "attn_k", "attn_v"].iter().enumerate() {
            let piece = dense.narrow(0, i * h, h).unwrap();
            let piece = Tensor::from_vec(
                piece.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                piece.shape(),
                &Device::Cpu,
            )
            .unwrap();
            let dtype = if kind == "weight" {
                GgmlDType::Q8_0
            } else {
                GgmlDType::F32
            };
            tensors.push((
                format!("{prefix}.{part}.{kind}"),
                QTensor::quantize(&piece, dtype).unwrap(),
            ));
        }
    }
    let meta: Vec<(String, gguf_file::Value)> = ct
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let split = dir.path().join("split.gguf");
    dramatis_llm::write_gguf(&split, &meta, &tensors).unwrap();
    let a = full_logits(
        &load_model(&fused, &Device::Cpu).unwrap(),
        &r.prompt_ids,
        None,
    );
    let b = full_logits(
        &load_model(&split, &Device::Cpu).unwrap(),
        &r.prompt_ids,
        None,
    );
    assert!(
        max_diff(&a, &b) < 1e-5,
        "split and fused differ by {}",
        max_diff(&a, &b)
    );
}
