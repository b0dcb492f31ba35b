//! Random-weight models with real shapes, written as llama.cpp-compatible
//! GGUF (with a GPT-2-style byte-level vocabulary), so speed can be measured
//! against other runtimes with no download.

use std::path::Path;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::quantize::{QuantType, gpt2_tokenizer_metadata, phi2_metadata, quantize, write_gguf};
use crate::{PhiConfig, Result};

fn uniform(rng: &mut StdRng, shape: &[usize], scale: f32) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// GPT-2's map from bytes to printable characters, so every byte is a token.
fn byte_symbols() -> Vec<char> {
    let printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut out = vec!['\0'; 256];
    let mut extra = 0;
    for b in 0..256u32 {
        let c = if printable.contains(&b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        out[b as usize] = char::from_u32(c).unwrap_or('?');
    }
    out
}

/// A byte-level BPE vocabulary of `size` tokens (bytes, pair merges, and
/// `<|endoftext|>` last) in llama.cpp's `gpt2` tokenizer metadata.
fn synthetic_vocab(size: usize) -> Vec<(String, gguf_file::Value)> {
    use gguf_file::Value as V;
    let bytes = byte_symbols();
    let mut tokens: Vec<String> = bytes.iter().map(|c| c.to_string()).collect();
    let mut merges = Vec::new();
    'outer: for a in &bytes {
        for b in &bytes {
            if tokens.len() + 1 >= size {
                break 'outer;
            }
            tokens.push(format!("{a}{b}"));
            merges.push(V::String(format!("{a} {b}")));
        }
    }
    let eos = tokens.len() as u32;
    tokens.push("<|endoftext|>".into());
    let mut types = vec![1; tokens.len()];
    types[eos as usize] = 3;
    gpt2_tokenizer_metadata(
        tokens.into_iter().map(V::String).collect(),
        types,
        merges,
        eos,
    )
}

/// Writes a random model of shape `cfg` at `quant` to `out` (fused qkv, all
/// biases, `phi2` metadata), reporting each tensor's name.
pub fn write_synthetic_gguf(
    cfg: &PhiConfig,
    quant: QuantType,
    seed: u64,
    out: &Path,
    mut progress: impl FnMut(usize, usize, &str),
) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let q = quant.ggml();
    let total = 4 + 10 * cfg.num_hidden_layers;
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(total);
    let mut add = |name: String, t: QTensor, tensors: &mut Vec<(String, QTensor)>| {
        progress(tensors.len() + 1, total, &name);
        tensors.push((name, t));
    };
    let ones = |n: usize| Tensor::ones(n, candle_core::DType::F32, &Device::Cpu);
    let wscale = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
    add(
        "token_embd.weight".into(),
        quantize(&uniform(&mut rng, &[v, h], 0.5)?, q)?,
        &mut tensors,
    );
    for l in 0..cfg.num_hidden_layers {
        let p = format!("blk.{l}");
        add(
            format!("{p}.attn_norm.weight"),
            quantize(&ones(h)?, GgmlDType::F32)?,
            &mut tensors,
        );
        add(
            format!("{p}.attn_norm.bias"),
            quantize(&uniform(&mut rng, &[h], 0.01)?, GgmlDType::F32)?,
            &mut tensors,
        );
        for (name, out_f, in_f) in [
            ("attn_qkv", 3 * h, h),
            ("attn_output", h, h),
            ("ffn_up", i, h),
            ("ffn_down", h, i),
        ] {
            add(
                format!("{p}.{name}.weight"),
                quantize(&uniform(&mut rng, &[out_f, in_f], wscale(in_f))?, q)?,
                &mut tensors,
            );
            add(
                format!("{p}.{name}.bias"),
                quantize(&uniform(&mut rng, &[out_f], 0.01)?, GgmlDType::F32)?,
                &mut tensors,
            );
        }
    }
    add(
        "output_norm.weight".into(),
        quantize(&ones(h)?, GgmlDType::F32)?,
        &mut tensors,
    );
    add(
        "output_norm.bias".into(),
        quantize(&uniform(&mut rng, &[h], 0.01)?, GgmlDType::F32)?,
        &mut tensors,
    );
    add(
        "output.weight".into(),
        quantize(&uniform(&mut rng, &[v, h], wscale(h))?, q)?,
        &mut tensors,
    );
    add(
        "output.bias".into(),
        quantize(&uniform(&mut rng, &[v], 0.01)?, GgmlDType::F32)?,
        &mut tensors,
    );
    let mut meta = phi2_metadata(cfg, quant.file_type(), "synthetic Phi-2 (random weights)");
    meta.extend(synthetic_vocab(v));
    write_gguf(out, &meta, &tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tiny_synthetic_model_loads_and_runs() {
        let cfg = PhiConfig::tiny(300, 128);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.gguf");
        write_synthetic_gguf(&cfg, QuantType::Q4K, 1, &path, |_, _, _| {}).unwrap();
        let model = crate::load_model(&path, &Device::Cpu).unwrap();
        assert_eq!(model.config(), &cfg);
        assert_eq!(model.quant_type(), Some(GgmlDType::Q4K));
        let x = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
        let y = model.forward(&x, None, crate::Logits::Last, None).unwrap();
        assert_eq!(y.dims(), &[1, 300]);
        let vocab = synthetic_vocab(300);
        let gguf_file::Value::Array(tokens) = &vocab[2].1 else {
            panic!()
        };
        assert_eq!(tokens.len(), 300);
    }
}
