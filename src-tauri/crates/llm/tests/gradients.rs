//! The training forward: the same logits as inference, and LoRA gradients
//! that match finite differences, through dense and Q8_0 base layers.

mod common;

use std::sync::atomic::AtomicBool;

use candle_core::Var;
use common::{fixture, max_abs, max_diff, reference};
use dramatis_llm::{
    Device, Logits, LoraAdapter, LoraLayer, LoraSlot, LoraTarget, Phi, QuantType, Tensor,
    load_model, quantize_safetensors,
};

/// A rank-2 adapter on every target of every layer, from Vars with small
/// non-zero values (B non-zero too, so A gets a gradient).
fn trainable(model: &Phi) -> (LoraAdapter, Vec<(String, Var)>) {
    let cfg = model.config();
    let mut vars = Vec::new();
    let mut layers = Vec::new();
    for l in 0..cfg.num_hidden_layers {
        let mut layer = LoraLayer::default();
        for t in LoraTarget::ALL {
            let (fan_in, fan_out) = t.shape(cfg);
            let a =
                Var::from_tensor(&(Tensor::randn(0f32, 0.05, (2, fan_in), &Device::Cpu).unwrap()))
                    .unwrap();
            let b =
                Var::from_tensor(&(Tensor::randn(0f32, 0.05, (fan_out, 2), &Device::Cpu).unwrap()))
                    .unwrap();
            layer.set(
                t,
                LoraSlot {
                    a: a.as_tensor().clone(),
                    b: b.as_tensor().clone(),
                    scale: 2.0,
                    out_offset: match t {
                        LoraTarget::K => cfg.hidden_size,
                        LoraTarget::V => 2 * cfg.hidden_size,
                        _ => 0,
                    },
                    dropout: 0.0,
                    dropout_seed: 0,
                },
            );
            vars.push((format!("{l}.{}.a", t.peft_name()), a));
            vars.push((format!("{l}.{}.b", t.peft_name()), b));
        }
        layers.push(layer);
    }
    (
        LoraAdapter {
            layers,
            id: "test".into(),
        },
        vars,
    )
}

fn loss(model: &Phi, ids: &[u32], lora: &LoraAdapter) -> Tensor {
    let n = ids.len() - 1;
    let input = Tensor::new(&ids[..n], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let target = Tensor::new(&ids[1..], &Device::Cpu).unwrap();
    let logits = model
        .forward_train(&input, Some(lora))
        .unwrap()
        .squeeze(0)
        .unwrap();
    candle_nn::loss::cross_entropy(&logits, &target).unwrap()
}

fn check_gradients(model: &Phi) {
    let ids = &reference().prompt_ids;
    let (lora, vars) = trainable(model);
    let l = loss(model, ids, &lora);
    let grads = l.backward().unwrap();
    let eps = 1e-2f32;
    let mut checked = 0;
    // A few elements of A and B in the first and last layer, every target.
    for (name, var) in vars
        .iter()
        .filter(|(n, _)| n.starts_with("0.") || n.starts_with("1."))
    {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let base = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for &i in &[0usize, base.len() / 2, base.len() - 1] {
            let at = |delta: f32| {
                let mut v = base.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let x = loss(model, ids, &lora).to_scalar::<f32>().unwrap();
                var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                x
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps);
            let tol = 2e-3 + 0.03 * fd.abs().max(g[i].abs());
            assert!(
                (fd - g[i]).abs() <= tol,
                "{name}[{i}]: backward {} vs finite difference {fd}",
                g[i]
            );
            checked += 1;
        }
    }
    assert!(checked >= 30);
}

#[test]
fn the_training_forward_gives_the_inference_logits() {
    let model = load_model(&fixture(), &Device::Cpu).unwrap();
    let ids = &reference().prompt_ids;
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let (lora, _) = trainable(&model);
    let a = model
        .forward(&input, None, Logits::All, Some(&lora))
        .unwrap();
    let b = model.forward_train(&input, Some(&lora)).unwrap();
    assert!(
        max_diff(&a, &b) < 1e-4 * max_abs(&a).max(1.0),
        "{}",
        max_diff(&a, &b)
    );
}

#[test]
fn lora_gradients_match_finite_differences_on_a_dense_base() {
    check_gradients(&load_model(&fixture(), &Device::Cpu).unwrap());
}

#[test]
fn lora_gradients_flow_through_a_quantized_base() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q8.gguf");
    quantize_safetensors(
        &fixture(),
        &out,
        QuantType::Q8_0,
        &AtomicBool::new(false),
        |_| {},
    )
    .unwrap();
    let q8 = load_model(&out, &Device::Cpu).unwrap();
    check_gradients(&q8);
    // The inference path also quantizes the activations to 8 bits (the
    // quantized dot product); the training path multiplies them in f32 by the
    // dequantized weights. They agree within the Q8_0 tolerance of the
    // reference tests (4% of the largest logit).
    let ids = &reference().prompt_ids;
    let (lora, _) = trainable(&q8);
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let a = q8.forward(&input, None, Logits::All, Some(&lora)).unwrap();
    let b = q8.forward_train(&input, Some(&lora)).unwrap();
    let d = max_diff(&a, &b);
    assert!(d < 0.04 * max_abs(&a), "{d}");
}
