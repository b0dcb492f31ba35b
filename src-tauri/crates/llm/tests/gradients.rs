//! The hand-written training passes: the loss of the inference forward, and
//! LoRA gradients that match finite differences through dense and Q8_0 base
//! layers, with dropout, with and without recomputation, in f32 and bf16;
//! on the CPU, and on the GPU too in a CUDA build (its fused kernels checked
//! the same way).

mod common;

use std::sync::atomic::AtomicBool;

use candle_core::{D, DType, Var};
use common::{devices, fixture, reference};
use dramatis_llm::{
    Device, Logits, LoraAdapter, LoraLayer, LoraSlot, LoraTarget, Phi, QuantType, Tensor,
    load_model, quantize_safetensors,
};

/// An adapter on every target of every layer, from Vars with small non-zero
/// values (B non-zero too, so A gets a gradient); ranks 2 and 3 and the
/// scales differ between targets (q, k and v are multiplied together, each
/// with its own).
fn trainable(model: &Phi, dropout: f32) -> (LoraAdapter, Vec<(String, Var)>) {
    let cfg = model.config();
    let mut vars = Vec::new();
    let mut layers = Vec::new();
    for l in 0..cfg.num_hidden_layers {
        let mut layer = LoraLayer::default();
        for t in LoraTarget::ALL {
            let (fan_in, fan_out) = t.shape(cfg);
            let r = 2 + t as usize % 2;
            let a = Var::from_tensor(
                &(Tensor::randn(0f32, 0.05, (r, fan_in), &Device::Cpu).unwrap())
                    .to_device(model.device())
                    .unwrap(),
            )
            .unwrap();
            let b = Var::from_tensor(
                &(Tensor::randn(0f32, 0.05, (fan_out, r), &Device::Cpu).unwrap())
                    .to_device(model.device())
                    .unwrap(),
            )
            .unwrap();
            layer.set(
                t,
                LoraSlot {
                    a: a.as_tensor().clone(),
                    b: b.as_tensor().clone(),
                    scale: 1.5 + 0.25 * t as usize as f64,
                    out_offset: match t {
                        LoraTarget::K => cfg.hidden_size,
                        LoraTarget::V => 2 * cfg.hidden_size,
                        _ => 0,
                    },
                    dropout,
                    dropout_seed: l as u64 * 31 + t as u64,
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

/// Inputs, targets and weights of the reference prompt (two rows: the
/// prompt and the prompt shifted by one, the second weighted half, so the
/// weights and the batch dimension are exercised).
fn batch(ids: &[u32], dev: &Device) -> (Tensor, Tensor, Tensor) {
    let n = ids.len() - 2;
    let rows = |off: usize| ids[off..off + n].to_vec();
    let inp = [rows(0), rows(1)].concat();
    let tgt = [rows(1), rows(2)].concat();
    let w: Vec<f32> = (0..2 * n).map(|i| if i < n { 1.0 } else { 0.5 }).collect();
    (
        Tensor::from_vec(inp, (2, n), dev).unwrap(),
        Tensor::from_vec(tgt, (2, n), dev).unwrap(),
        Tensor::from_vec(w, (2, n), dev).unwrap(),
    )
}

fn train_loss(
    model: &Phi,
    lora: &LoraAdapter,
    dtype: DType,
    ckpt: bool,
) -> dramatis_llm::LossGrads {
    let (inp, tgt, w) = batch(&reference().prompt_ids, model.device());
    model
        .lora_loss_and_grads(&inp, &tgt, &w, lora, dtype, ckpt)
        .unwrap()
}

/// The gradient of each var, in order, from the per-block slot gradients.
fn flat_grads(out: &dramatis_llm::LossGrads, vars: &[(String, Var)]) -> Vec<(String, Vec<f32>)> {
    vars.iter()
        .map(|(name, _)| {
            let (layer, rest) = name.split_once('.').unwrap();
            let (module, which) = rest.rsplit_once('.').unwrap();
            let g = out.grads[layer.parse::<usize>().unwrap()]
                .iter()
                .find(|g| g.target.peft_name() == module)
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            let t = if which == "a" { &g.a } else { &g.b };
            (
                name.clone(),
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            )
        })
        .collect()
}

fn check_gradients(model: &Phi, dropout: f32) {
    let (lora, vars) = trainable(model, dropout);
    let grads = flat_grads(&train_loss(model, &lora, DType::F32, true), &vars);
    let eps = 1e-2f32;
    let mut checked = 0;
    // A few elements of A and B in the first two layers, every target.
    for ((name, var), (_, g)) in vars.iter().zip(&grads) {
        if !(name.starts_with("0.") || name.starts_with("1.")) {
            continue;
        }
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
                var.set(&Tensor::from_vec(v, var.shape(), model.device()).unwrap())
                    .unwrap();
                let x = train_loss(model, &lora, DType::F32, true).loss as f32;
                var.set(&Tensor::from_vec(base.clone(), var.shape(), model.device()).unwrap())
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

/// The loss through the inference forward (the fused, cached path).
fn inference_loss(model: &Phi, lora: &LoraAdapter) -> f64 {
    let (inp, tgt, w) = batch(&reference().prompt_ids, model.device());
    let logits = model.forward(&inp, None, Logits::All, Some(lora)).unwrap();
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
    let picked = logp
        .gather(&tgt.unsqueeze(D::Minus1).unwrap(), D::Minus1)
        .unwrap()
        .squeeze(D::Minus1)
        .unwrap();
    let total = w.sum_all().unwrap().to_scalar::<f32>().unwrap();
    -f64::from(
        (picked * w)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            / total,
    )
}

#[test]
fn the_training_passes_give_the_inference_loss() {
    for dev in devices() {
        let model = load_model(&fixture(), &dev).unwrap();
        let (lora, _) = trainable(&model, 0.0);
        let a = inference_loss(&model, &lora);
        for ckpt in [false, true] {
            let b = train_loss(&model, &lora, DType::F32, ckpt).loss;
            assert!((a - b).abs() < 1e-4 * a.abs(), "{dev:?}: {a} vs {b}");
        }
    }
}

#[test]
fn lora_gradients_match_finite_differences_on_a_dense_base() {
    for dev in devices() {
        check_gradients(&load_model(&fixture(), &dev).unwrap(), 0.0);
    }
}

#[test]
fn lora_gradients_match_finite_differences_with_dropout() {
    for dev in devices() {
        check_gradients(&load_model(&fixture(), &dev).unwrap(), 0.2);
    }
}

#[test]
fn kept_and_recomputed_activations_give_the_same_gradients() {
    for dev in devices() {
        let model = load_model(&fixture(), &dev).unwrap();
        let (lora, vars) = trainable(&model, 0.1);
        let a = flat_grads(&train_loss(&model, &lora, DType::F32, false), &vars);
        let b = flat_grads(&train_loss(&model, &lora, DType::F32, true), &vars);
        assert_eq!(a, b, "{dev:?}");
    }
}

#[test]
fn bf16_passes_agree_with_f32() {
    for dev in devices() {
        bf16_agrees_with_f32(&dev);
    }
}

fn bf16_agrees_with_f32(dev: &Device) {
    let model = load_model(&fixture(), dev).unwrap();
    let (lora, vars) = trainable(&model, 0.0);
    let full = train_loss(&model, &lora, DType::F32, true);
    let half = train_loss(&model, &lora, DType::BF16, true);
    assert!(
        (full.loss - half.loss).abs() < 0.02 * full.loss.abs(),
        "{} vs {}",
        full.loss,
        half.loss
    );
    // bf16 keeps 8 bits of mantissa: compare each whole gradient by direction.
    for ((name, a), (_, b)) in flat_grads(&full, &vars)
        .iter()
        .zip(&flat_grads(&half, &vars))
    {
        let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x * y)).sum();
        let na: f64 = a.iter().map(|x| f64::from(x * x)).sum::<f64>().sqrt();
        let nb: f64 = b.iter().map(|x| f64::from(x * x)).sum::<f64>().sqrt();
        assert!(
            dot / (na * nb).max(1e-30) > 0.98,
            "{name}: cosine {}",
            dot / (na * nb)
        );
    }
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
    check_gradients(&q8, 0.0);
    // The inference path also quantizes the activations to 8 bits (the
    // quantized dot product); the training path multiplies them in f32 by the
    // dequantized weights. Their losses agree within 1%.
    let (lora, _) = trainable(&q8, 0.0);
    let a = inference_loss(&q8, &lora);
    let b = train_loss(&q8, &lora, DType::F32, false).loss;
    assert!((a - b).abs() < 0.01 * a, "{a} vs {b}");
}

/// A dense base kept in bf16 for training also serves inference (eval loss,
/// sample replies): f32 activations meet bf16 weights in every projection.
#[test]
fn a_base_kept_in_bf16_serves_inference() {
    for dev in devices() {
        let full = load_model(&fixture(), &dev).unwrap();
        let half = dramatis_llm::load_model_as(&fixture(), &dev, DType::BF16).unwrap();
        let (lora, _) = trainable(&full, 0.0);
        let ids = &reference().prompt_ids;
        let input = Tensor::new(ids.as_slice(), &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let a = full
            .forward(&input, None, Logits::All, Some(&lora))
            .unwrap();
        let b = half
            .forward(&input, None, Logits::All, Some(&lora))
            .unwrap();
        assert_eq!(b.dtype(), DType::F32);
        let d = common::max_diff(&a, &b);
        assert!(d < 0.05 * common::max_abs(&a), "{dev:?}: {d}");
    }
}
