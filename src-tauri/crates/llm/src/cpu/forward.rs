//! The forward pass on the CPU kernels: Phi-2's blocks over plain f32
//! buffers, every step on the engine's threads — layer norm, the products
//! (bias and GELU in their epilogue), rotary embedding, the f16 KV cache and
//! the fused attention over it. The same model as [`Phi::forward`]'s
//! tensor path (the reference it is tested against), without its per-op
//! copies and single-threaded element-wise passes, which bounded how far the
//! engine scaled with cores.

use candle_core::{DType, Tensor};

use super::{Avx2, pool};
use crate::cache::{KvCache, rotate_pairs};
use crate::lora::{LoraAdapter, LoraLayer, LoraTarget};
use crate::model::{Block, Phi, slots};
use crate::profile::timed;
use crate::{Logits, Result};

/// What the CPU pass needs beside the weights, in f32 on the host: read
/// once from the model's tensors.
#[derive(Debug, Clone)]
pub(crate) struct HostParts {
    simd: Avx2,
    /// Per block, then the final one: (weight, bias).
    norms: Vec<(Vec<f32>, Vec<f32>)>,
    eps: f32,
    /// `[position, rotary_dim / 2]`.
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl HostParts {
    /// `None` unless the model runs on the CPU with its blocks on this
    /// project's kernels (a dense f32 model, for training and reference
    /// checks, keeps the tensor path).
    pub(crate) fn new(phi: &Phi) -> Result<Option<Self>> {
        let Some(simd) = Avx2::detect() else {
            return Ok(None);
        };
        if !phi.device().is_cpu() || !phi.blocks.iter().all(Block::on_cpu_kernels) {
            return Ok(None);
        }
        let vec = |t: &Tensor| -> Result<Vec<f32>> {
            Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
        };
        let norm = |n: &candle_nn::LayerNorm| -> Result<(Vec<f32>, Vec<f32>)> {
            let w = vec(n.weight())?;
            let b = match n.bias() {
                Some(b) => vec(b)?,
                None => vec![0.0; w.len()],
            };
            Ok((w, b))
        };
        let mut norms = phi
            .blocks
            .iter()
            .map(|b| norm(&b.norm))
            .collect::<Result<Vec<_>>>()?;
        norms.push(norm(&phi.final_norm)?);
        Ok(Some(Self {
            simd,
            norms,
            eps: phi.cfg.layer_norm_eps as f32,
            cos: vec(&phi.cos)?,
            sin: vec(&phi.sin)?,
        }))
    }
}

/// Runs `ids` after what `cache` holds; returns the logits of the last
/// position (`[vocab]`) or of every position (`[seq, vocab]`).
pub(crate) fn forward(
    phi: &Phi,
    parts: &HostParts,
    ids: &[u32],
    cache: &mut KvCache,
    logits: Logits,
    lora: Option<&LoraAdapter>,
) -> Result<Vec<f32>> {
    let cfg = &phi.cfg;
    let (seq, offset) = (ids.len(), cache.len());
    let (hidden, heads, hd) = (cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim());
    let half = cfg.rotary_dim() / 2;
    let scale = 1.0 / (hd as f32).sqrt();
    let simd = parts.simd;
    // Each step's name for DRAMATIS_PROFILE, prompts and single tokens apart.
    macro_rules! step {
        ($name:literal) => {
            if seq > 1 {
                concat!("cpu prompt: ", $name)
            } else {
                concat!("cpu token: ", $name)
            }
        };
    }
    let mut x = timed(step!("embedding"), || phi.embed.rows(ids))?;
    let no_lora = LoraLayer::default();
    for (i, block) in phi.blocks.iter().enumerate() {
        let l = lora.map_or(&no_lora, |a| &a.layers[i]);
        let (w, b) = &parts.norms[i];
        let h = timed(step!("layer norm"), || layer_norm(&x, w, b, parts.eps));
        let qkv = timed(step!("qkv"), || {
            block.qkv.host_forward(
                simd,
                &h,
                seq,
                &slots(l, &[LoraTarget::Q, LoraTarget::K, LoraTarget::V]),
                false,
            )
        })?;
        // Rows of [q | k | v], each [heads, head_dim]; q and k rotated at their positions.
        let mut q = vec![0f32; seq * hidden];
        let mut k = vec![0f32; seq * hidden];
        let mut v = vec![0f32; seq * hidden];
        timed(step!("rotary"), || {
            pool::chunks3(
                (&mut q, &mut k, &mut v),
                (hidden, hidden, hidden),
                |t, q, k, v| {
                    let row = &qkv[t * 3 * hidden..(t + 1) * 3 * hidden];
                    q.copy_from_slice(&row[..hidden]);
                    k.copy_from_slice(&row[hidden..2 * hidden]);
                    v.copy_from_slice(&row[2 * hidden..]);
                    let at = (offset + t) * half;
                    let (cos, sin) = (&parts.cos[at..at + half], &parts.sin[at..at + half]);
                    for head in q.chunks_exact_mut(hd).chain(k.chunks_exact_mut(hd)) {
                        rotate_pairs(head, cos, sin);
                    }
                },
            )
        });
        let kv = timed(step!("cache append"), || {
            cache.append_host(simd, i, &k, &v, heads, hd)
        })?;
        let y = timed(step!("attention"), || {
            super::attention::attend(simd, &q, seq, offset, kv, scale)
        });
        let attn = timed(step!("dense"), || {
            let dense = slots(l, &[LoraTarget::Dense]);
            block.dense.host_forward(simd, &y, seq, &dense, false)
        })?;
        let act = timed(step!("fc1"), || {
            block
                .fc1
                .host_forward(simd, &h, seq, &slots(l, &[LoraTarget::Fc1]), true)
        })?;
        let mlp = timed(step!("fc2"), || {
            block
                .fc2
                .host_forward(simd, &act, seq, &slots(l, &[LoraTarget::Fc2]), false)
        })?;
        timed(step!("residual"), || {
            pool::chunks(&mut x, hidden, |t, x| {
                let at = t * hidden..(t + 1) * hidden;
                for ((x, a), m) in x.iter_mut().zip(&attn[at.clone()]).zip(&mlp[at]) {
                    *x += a + m;
                }
            })
        });
    }
    cache.advance(seq);
    let rows = match logits {
        Logits::All => &x[..],
        Logits::Last => &x[(seq - 1) * hidden..],
    };
    let (w, b) = parts.norms.last().expect("the final norm");
    timed(step!("head"), || {
        let h = layer_norm(rows, w, b, parts.eps);
        phi.lm_head
            .host_forward(simd, &h, rows.len() / hidden, &[], false)
    })
}

/// Layer norm of each `w.len()`-wide row of `x`.
fn layer_norm(x: &[f32], w: &[f32], b: &[f32], eps: f32) -> Vec<f32> {
    let n = w.len();
    let mut out = vec![0f32; x.len()];
    pool::chunks(&mut out, n, |t, o| {
        let x = &x[t * n..(t + 1) * n];
        let mean = x.iter().sum::<f32>() / n as f32;
        let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for (((o, x), w), b) in o.iter_mut().zip(x).zip(w).zip(b) {
            *o = (x - mean) * inv * w + b;
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use candle_core::Device;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::lora::LoraSlot;
    use crate::{PhiConfig, QuantType, write_synthetic_gguf};

    fn model(quant: QuantType, dir: &std::path::Path) -> Phi {
        let cfg = PhiConfig::tiny(320, 128);
        let path = dir.join(format!("{quant:?}.gguf"));
        write_synthetic_gguf(&cfg, quant, 11, &path, |_, _, _| {}).unwrap();
        crate::load_model(&path, &Device::Cpu).unwrap()
    }

    /// Random slots on every target (B non-zero, so the deltas show).
    fn adapter(phi: &Phi) -> LoraAdapter {
        let cfg = phi.config();
        let r = 4;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let random = |rng: &mut rand::rngs::StdRng, n: usize| -> Vec<f32> {
            (0..n).map(|_| rng.random_range(-0.5f32..0.5)).collect()
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| {
                let mut l = LoraLayer::default();
                for t in LoraTarget::ALL {
                    let (inp, out) = t.shape(cfg);
                    let slot = LoraSlot {
                        a: Tensor::from_vec(random(&mut rng, r * inp), (r, inp), &Device::Cpu)
                            .unwrap(),
                        b: Tensor::from_vec(random(&mut rng, out * r), (out, r), &Device::Cpu)
                            .unwrap(),
                        scale: 2.0,
                        out_offset: t.fused_offset(cfg),
                        dropout: 0.0,
                        dropout_seed: 0,
                    };
                    l.set(t, slot);
                }
                l
            })
            .collect();
        LoraAdapter {
            layers,
            id: "test".into(),
        }
    }

    fn ids(n: usize, vocab: u32) -> Vec<u32> {
        (0..n as u32).map(|i| (i * 37 + 11) % vocab).collect()
    }

    fn rows(t: Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Runs a prompt in `chunks`, then `steps` single tokens (the same ids
    /// for every pass, so their logits compare), through `pass` with a
    /// cache; returns every logit vector.
    fn run(
        phi: &Phi,
        chunks: &[usize],
        steps: usize,
        pass: impl Fn(&Tensor, &mut KvCache) -> Tensor,
    ) -> Vec<Vec<f32>> {
        let vocab = phi.config().vocab_size as u32;
        let all = ids(chunks.iter().sum::<usize>() + steps, vocab);
        let mut cache = phi.new_cache();
        let (mut out, mut at) = (Vec::new(), 0);
        for n in chunks.iter().copied().chain(std::iter::repeat_n(1, steps)) {
            let x = Tensor::new(&all[at..at + n], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            out.push(rows(pass(&x, &mut cache)));
            at += n;
        }
        assert_eq!(cache.len(), all.len());
        out
    }

    fn argmax(v: &[f32]) -> usize {
        (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap()
    }

    #[test]
    fn the_cpu_pass_equals_the_tensor_path() {
        if Avx2::detect().is_none() {
            eprintln!("no AVX2 here: the CPU pass is not used on this CPU");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        for quant in [QuantType::Q4K, QuantType::Q5K, QuantType::Q8_0] {
            let phi = model(quant, dir.path());
            assert!(phi.host.is_some(), "{quant:?}: the CPU pass is set up");
            let lora = adapter(&phi);
            for l in [None, Some(&lora)] {
                // Chunks of 9, 16 and 3 tokens: offsets inside the cache, partial query blocks.
                let chunks = [9, 16, 3];
                let fast = run(&phi, &chunks, 12, |x, c| {
                    phi.forward(x, Some(c), Logits::Last, l).unwrap()
                });
                let reference = run(&phi, &chunks, 12, |x, c| {
                    phi.run_tensors(x, Some(c), Logits::Last, l).unwrap()
                });
                let scale = reference.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
                let diff = fast
                    .iter()
                    .flatten()
                    .zip(reference.iter().flatten())
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                let agree = fast
                    .iter()
                    .zip(&reference)
                    .filter(|(a, b)| argmax(a) == argmax(b))
                    .count();
                eprintln!(
                    "{quant:?} lora {}: max |Δ| {diff:.2e} of {scale:.3}, argmax {agree}/{}",
                    l.is_some(),
                    fast.len()
                );
                // Both passes quantize each product's input to 8 bits; the f16
                // cache's rounding moves some of those inputs by one step, so
                // they differ by about the activations' quantization noise
                // (a wrong head, position or offset would differ by the
                // logits' own size).
                assert!(diff <= 3e-2 * scale, "{quant:?}: max |Δ| {diff} of {scale}");
                // Where the greedy pick differs, its two candidates were closer
                // in the reference than that noise.
                for (f, r) in fast.iter().zip(&reference) {
                    let (pf, pr) = (argmax(f), argmax(r));
                    assert!(
                        r[pr] - r[pf] <= 2.0 * diff,
                        "{quant:?}: the pick moved from {pr} to {pf}, {} apart",
                        r[pr] - r[pf]
                    );
                }
                assert!(
                    agree + 2 >= fast.len(),
                    "{quant:?}: argmax agrees at {agree} of {}",
                    fast.len()
                );
            }
            // Every position's logits, after a cached prefix.
            let prompt = ids(20, phi.config().vocab_size as u32);
            let x = |r: std::ops::Range<usize>| {
                Tensor::new(&prompt[r], &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap()
            };
            let (mut a, mut b) = (phi.new_cache(), phi.new_cache());
            phi.forward(&x(0..8), Some(&mut a), Logits::Last, None)
                .unwrap();
            phi.run_tensors(&x(0..8), Some(&mut b), Logits::Last, None)
                .unwrap();
            let fa = phi
                .forward(&x(8..20), Some(&mut a), Logits::All, None)
                .unwrap();
            let fb = phi
                .run_tensors(&x(8..20), Some(&mut b), Logits::All, None)
                .unwrap();
            assert_eq!(fa.dims(), fb.dims());
            let (fa, fb) = (rows(fa), rows(fb));
            let scale = fb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = fa
                .iter()
                .zip(&fb)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                diff <= 3e-2 * scale,
                "{quant:?} all positions: {diff} of {scale}"
            );
            assert_eq!(a.len(), 20);
        }
    }

    #[test]
    fn a_token_outside_the_vocabulary_is_refused_and_the_cache_kept() {
        if Avx2::detect().is_none() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let phi = model(QuantType::Q8_0, dir.path());
        let mut cache = phi.new_cache();
        let ok = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
        phi.forward(&ok, Some(&mut cache), Logits::Last, None)
            .unwrap();
        let bad = Tensor::new(&[[4u32, 99_999]], &Device::Cpu).unwrap();
        let err = phi
            .forward(&bad, Some(&mut cache), Logits::Last, None)
            .unwrap_err();
        assert!(err.to_string().contains("outside the vocabulary"), "{err}");
        assert_eq!(cache.len(), 3);
    }
}
