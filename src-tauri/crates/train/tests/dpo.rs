//! DPO on the tiny Phi fixture: the gradients of the hand-written passes
//! match finite differences of the DPO loss, and a few steps on pairs that
//! prefer one reply raise the chosen-over-rejected margin on held-out prompts.

use std::path::{Path, PathBuf};

use candle_core::{DType, Var};
use dramatis_llm::{
    Device, LoraAdapter, LoraLayer, LoraSlot, LoraTarget, Phi, PhiTokenizer, Tensor, load_model,
};
use dramatis_train::{DpoBatch, DpoConfig, dpo_loss, dpo_loss_and_grads, sequence_logps};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../llm/tests/fixtures/tiny")
}

/// A rank-2 adapter on every target; B is zero when `fresh` (as training starts).
fn adapter(
    model: &Phi,
    fresh: bool,
    seed: u64,
) -> (LoraAdapter, Vec<(usize, LoraTarget, Var, Var)>) {
    let cfg = model.config();
    let dev = &Device::Cpu;
    let mut layers = Vec::new();
    let mut vars = Vec::new();
    let mut k = seed;
    for l in 0..cfg.num_hidden_layers {
        let mut layer = LoraLayer::default();
        for t in LoraTarget::ALL {
            let (fan_in, fan_out) = t.shape(cfg);
            k += 1;
            let a =
                Var::from_tensor(&Tensor::randn(0f32, 0.05, (2, fan_in), dev).unwrap()).unwrap();
            let b = if fresh {
                Var::zeros((fan_out, 2), DType::F32, dev).unwrap()
            } else {
                Var::from_tensor(&Tensor::randn(0f32, 0.05, (fan_out, 2), dev).unwrap()).unwrap()
            };
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
                    dropout_seed: k,
                },
            );
            vars.push((l, t, a, b));
        }
        layers.push(layer);
    }
    (
        LoraAdapter {
            layers,
            id: format!("dpo-{seed}"),
        },
        vars,
    )
}

/// Pairs: each prompt with a chosen and a rejected reply; rows padded to one
/// length, the mask on the reply's tokens (its targets) only.
fn batch(tok: &PhiTokenizer, pairs: &[(&str, &str, &str)]) -> DpoBatch {
    let mut rows: Vec<(Vec<u32>, usize)> = Vec::new();
    for side in 0..2 {
        for (prompt, chosen, rejected) in pairs {
            let p = tok.encode(prompt).unwrap();
            let r = tok
                .encode(if side == 0 { chosen } else { rejected })
                .unwrap();
            rows.push(([p.clone(), r].concat(), p.len()));
        }
    }
    let seq = rows.iter().map(|(ids, _)| ids.len() - 1).max().unwrap();
    let (mut inp, mut tgt, mut mask) = (Vec::new(), Vec::new(), Vec::new());
    for (ids, plen) in &rows {
        for i in 0..seq {
            let real = i + 1 < ids.len();
            inp.push(if real { ids[i] } else { 0 });
            tgt.push(if real { ids[i + 1] } else { 0 });
            // Position i predicts token i+1: a reply token when i+1 >= plen.
            mask.push(if real && i + 1 >= *plen { 1f32 } else { 0.0 });
        }
    }
    let n = rows.len();
    DpoBatch {
        tokens: Tensor::from_vec(inp, (n, seq), &Device::Cpu).unwrap(),
        targets: Tensor::from_vec(tgt, (n, seq), &Device::Cpu).unwrap(),
        mask: Tensor::from_vec(mask, (n, seq), &Device::Cpu).unwrap(),
    }
}

fn grad_of(step: &dramatis_llm::LossGrads, layer: usize, t: LoraTarget, a: bool) -> Vec<f32> {
    let g = step.grads[layer].iter().find(|g| g.target == t).unwrap();
    (if a { &g.a } else { &g.b })
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn dpo_gradients_match_finite_differences() {
    let model = load_model(&fixture(), &Device::Cpu).unwrap();
    let tok = PhiTokenizer::from_file(&fixture().join("tokenizer.json")).unwrap();
    let b = batch(
        &tok,
        &[
            ("Captain: status?\nKestrel:", " All green.", " I refuse."),
            ("Hi.", " Hello there", " Go away now"),
        ],
    );
    // A trained policy against a different (starting) reference, with the SFT term on.
    let (policy, vars) = adapter(&model, false, 1);
    let (reference, _) = adapter(&model, false, 99);
    let cfg = DpoConfig {
        beta: 0.5,
        sft_weight: 0.3,
    };
    let step =
        dpo_loss_and_grads(&model, &policy, Some(&reference), &b, cfg, DType::F32, true).unwrap();
    let forward = dpo_loss(&model, &policy, Some(&reference), &b, cfg, DType::F32).unwrap();
    assert!(
        (step.metrics.loss - forward).abs() < 1e-5,
        "{} vs {forward}",
        step.metrics.loss
    );
    let eps = 1e-2f32;
    let mut checked = 0;
    for (layer, t, a, bvar) in vars.iter().filter(|v| v.0 < 2) {
        for (is_a, var) in [(true, a), (false, bvar)] {
            let g = grad_of(&step.grads, *layer, *t, is_a);
            let base: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            for &i in &[0usize, base.len() / 2, base.len() - 1] {
                let at = |d: f32| {
                    let mut v = base.clone();
                    v[i] += d;
                    var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                    let l = dpo_loss(&model, &policy, Some(&reference), &b, cfg, DType::F32)
                        .unwrap() as f32;
                    var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                    l
                };
                let fd = (at(eps) - at(-eps)) / (2.0 * eps);
                let tol = 2e-4 + 0.03 * fd.abs().max(g[i].abs());
                assert!(
                    (fd - g[i]).abs() <= tol,
                    "{layer}.{t:?}.{}[{i}]: backward {} vs finite difference {fd}",
                    if is_a { "a" } else { "b" },
                    g[i]
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 30, "{checked}");
}

#[test]
fn a_fresh_adapter_starts_at_log_two_and_learns_the_preferred_reply() {
    let model = load_model(&fixture(), &Device::Cpu).unwrap();
    let tok = PhiTokenizer::from_file(&fixture().join("tokenizer.json")).unwrap();
    let train = batch(
        &tok,
        &[
            ("User: hello\nBot:", " Aye, captain!", " whatever."),
            ("User: report\nBot:", " Aye, captain!", " whatever."),
            ("User: the storm?\nBot:", " Aye, captain!", " whatever."),
        ],
    );
    let held_out = batch(
        &tok,
        &[("User: ready to sail?\nBot:", " Aye, captain!", " whatever.")],
    );
    let (policy, vars) = adapter(&model, true, 7);
    let cfg = DpoConfig::default();
    // A fresh adapter is the base: the reference is the base alone, and z = 0.
    let first = dpo_loss_and_grads(&model, &policy, None, &train, cfg, DType::F32, false).unwrap();
    assert!(
        (first.metrics.loss - std::f64::consts::LN_2).abs() < 1e-4,
        "{}",
        first.metrics.loss
    );
    assert!(first.metrics.margin.abs() < 1e-4);
    let margin = |p: &LoraAdapter| {
        let pol = sequence_logps(&model, &held_out, Some(p), DType::F32).unwrap();
        let base = sequence_logps(&model, &held_out, None, DType::F32).unwrap();
        (pol[0] - base[0]) - (pol[1] - base[1])
    };
    assert!(margin(&policy).abs() < 1e-4);
    // Plain gradient descent on the slots (the trainer's AdamW is tested elsewhere).
    let lr = 0.5f64;
    let mut last = first;
    for _ in 0..12 {
        for (layer, t, a, b) in &vars {
            for (is_a, var) in [(true, a), (false, b)] {
                let g = Tensor::from_vec(
                    grad_of(&last.grads, *layer, *t, is_a),
                    var.shape(),
                    &Device::Cpu,
                )
                .unwrap();
                var.set(&(var.as_tensor() - (g * lr).unwrap()).unwrap())
                    .unwrap();
            }
        }
        last = dpo_loss_and_grads(&model, &policy, None, &train, cfg, DType::F32, false).unwrap();
    }
    assert!(
        last.metrics.loss < std::f64::consts::LN_2 - 0.05,
        "the loss fell: {}",
        last.metrics.loss
    );
    assert!(
        last.metrics.margin > 0.0 && last.metrics.accuracy == 1.0,
        "margin {} accuracy {}",
        last.metrics.margin,
        last.metrics.accuracy
    );
    assert!(
        margin(&policy) > 0.0,
        "the held-out margin rose: {}",
        margin(&policy)
    );
}
