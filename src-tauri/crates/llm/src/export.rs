//! Writing an adapter for other tools: a llama.cpp GGUF LoRA, or a merged
//! model (base + LoRA) as GGUF at a chosen quantization.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{DType, Device, Tensor};

use crate::lora::{LoraAdapter, LoraSlot, LoraTarget};
use crate::model::Embedding;
use crate::quantize::{
    QuantizeProgress, TensorList, phi2_metadata, quantize, quantize_matrix, tokenizer_metadata,
};
use crate::{Error, Phi, PhiConfig, QuantType, Result, write_gguf};

/// The llama.cpp `phi2` tensor a target's delta lands on.
fn gguf_module(t: LoraTarget) -> &'static str {
    match t {
        LoraTarget::Q => "attn_q",
        LoraTarget::K => "attn_k",
        LoraTarget::V => "attn_v",
        LoraTarget::Dense => "attn_output",
        LoraTarget::Fc1 => "ffn_up",
        LoraTarget::Fc2 => "ffn_down",
    }
}

fn f32_tensor(t: &Tensor) -> Result<QTensor> {
    quantize(
        &t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?,
        GgmlDType::F32,
    )
}

/// Writes `adapter` as a llama.cpp GGUF LoRA (`general.type` adapter,
/// `adapter.type` lora). llama.cpp scales each pair by `alpha / rank`; each
/// slot's own scale is folded into its B matrix and `adapter.lora.alpha` is
/// set so that factor is 1 for rank-r pairs.
///
/// With `fused_qkv`, q, k and v become one `attn_qkv` pair of rank 3r (A
/// stacked, B block-diagonal): what a base with a fused `attn_qkv` (the
/// TheBloke/phi-2-GGUF files) needs. Without it, `attn_q`/`attn_k`/`attn_v`
/// pairs for bases converted from today's microsoft/phi-2.
pub fn write_lora_gguf(
    adapter: &LoraAdapter,
    cfg: &PhiConfig,
    out: &Path,
    fused_qkv: bool,
) -> Result<()> {
    let rank = adapter
        .layers
        .iter()
        .flat_map(|l| LoraTarget::ALL.map(|t| l.slot(t)))
        .flatten()
        .map(|s| s.a.dim(0))
        .next()
        .ok_or_else(|| Error::Invalid("the adapter holds no LoRA weights".into()))??;
    let mut tensors = Vec::new();
    // B scaled so that llama.cpp's alpha / rank (alpha = r) gives the slot's scale.
    let scaled_b = |s: &LoraSlot, rank_here: usize| -> Result<Tensor> {
        let llama_scale = rank as f64 / rank_here as f64;
        Ok((s.b.to_device(&Device::Cpu)?.to_dtype(DType::F32)? * (s.scale / llama_scale))?)
    };
    for (i, l) in adapter.layers.iter().enumerate() {
        let qkv: Vec<&LoraSlot> = [LoraTarget::Q, LoraTarget::K, LoraTarget::V]
            .iter()
            .filter_map(|t| l.slot(*t))
            .collect();
        if fused_qkv && !qkv.is_empty() {
            let h = cfg.hidden_size;
            let r = rank;
            // Missing parts are zero blocks, so the pair always covers all of qkv.
            let mut a_rows = Vec::new();
            let mut b = Tensor::zeros((3 * h, 3 * r), DType::F32, &Device::Cpu)?;
            for (k, t) in [LoraTarget::Q, LoraTarget::K, LoraTarget::V]
                .iter()
                .enumerate()
            {
                match l.slot(*t) {
                    Some(s) => {
                        a_rows.push(s.a.to_device(&Device::Cpu)?.to_dtype(DType::F32)?);
                        let bk = scaled_b(s, 3 * r)?;
                        b = b.slice_assign(&[k * h..(k + 1) * h, k * r..(k + 1) * r], &bk)?;
                    }
                    None => a_rows.push(Tensor::zeros((r, h), DType::F32, &Device::Cpu)?),
                }
            }
            let a = Tensor::cat(&a_rows, 0)?;
            tensors.push((format!("blk.{i}.attn_qkv.weight.lora_a"), f32_tensor(&a)?));
            tensors.push((format!("blk.{i}.attn_qkv.weight.lora_b"), f32_tensor(&b)?));
        }
        for t in LoraTarget::ALL {
            let Some(s) = l.slot(t) else { continue };
            if fused_qkv && matches!(t, LoraTarget::Q | LoraTarget::K | LoraTarget::V) {
                continue;
            }
            let m = gguf_module(t);
            tensors.push((format!("blk.{i}.{m}.weight.lora_a"), f32_tensor(&s.a)?));
            tensors.push((
                format!("blk.{i}.{m}.weight.lora_b"),
                f32_tensor(&scaled_b(s, rank)?)?,
            ));
        }
    }
    use gguf_file::Value as V;
    let meta = vec![
        ("general.architecture".to_owned(), V::String("phi2".into())),
        ("general.type".to_owned(), V::String("adapter".into())),
        ("general.name".to_owned(), V::String("Dramatis LoRA".into())),
        ("adapter.type".to_owned(), V::String("lora".into())),
        ("adapter.lora.alpha".to_owned(), V::F32(rank as f32)),
    ];
    write_gguf(out, &meta, &tensors)
}

/// Writes base + adapter as one GGUF model at `qt` (norms and biases in f32),
/// with the tokenizer's metadata when given. A quantized base is dequantized,
/// merged and quantized again. Written to a temporary file and renamed.
pub fn merge_to_gguf(
    model: &Phi,
    adapter: Option<&LoraAdapter>,
    tokenizer: Option<&Path>,
    out: &Path,
    qt: QuantType,
    cancel: &AtomicBool,
    progress: impl FnMut(QuantizeProgress),
) -> Result<()> {
    let cfg = model.config().clone();
    let q = qt.ggml();
    let n = cfg.num_hidden_layers;
    let total = 1 + 10 * n + 4;
    let mut list = TensorList::new(total, cancel, progress);
    let matrix = |w: Tensor| -> Result<QTensor> {
        quantize_matrix(&w.to_device(&Device::Cpu)?.to_dtype(DType::F32)?, q)
    };
    // The embedding keeps its stored type when it is quantized already.
    let embed = match &model.embed {
        Embedding::Dense(t) => matrix(t.clone())?,
        Embedding::Quantized {
            raw,
            dtype,
            rows,
            width,
            ..
        } => crate::model::quantized_table(raw, *dtype, *rows, *width, &Device::Cpu)?,
    };
    list.push("token_embd.weight".into(), embed)?;
    for (i, b) in model.blocks.iter().enumerate() {
        let p = format!("blk.{i}");
        let l = adapter.map(|a| &a.layers[i]);
        list.push(
            format!("{p}.attn_norm.weight"),
            f32_tensor(b.norm.weight())?,
        )?;
        let nb = b
            .norm
            .bias()
            .ok_or_else(|| Error::Invalid("LayerNorm without bias".into()))?;
        list.push(format!("{p}.attn_norm.bias"), f32_tensor(nb)?)?;
        for (name, lin, targets) in [
            (
                "attn_qkv",
                &b.qkv,
                &[LoraTarget::Q, LoraTarget::K, LoraTarget::V][..],
            ),
            ("attn_output", &b.dense, &[LoraTarget::Dense][..]),
            ("ffn_up", &b.fc1, &[LoraTarget::Fc1][..]),
            ("ffn_down", &b.fc2, &[LoraTarget::Fc2][..]),
        ] {
            let mut w = lin.dense_weight()?.to_dtype(DType::F32)?;
            for t in targets {
                if let Some(s) = l.and_then(|l| l.slot(*t)) {
                    let delta = (s.b.matmul(&s.a)? * s.scale)?.to_device(w.device())?;
                    let rows = delta.dim(0)?;
                    let at = s.out_offset;
                    let cur = w.narrow(0, at, rows)?;
                    w = w.slice_assign(&[at..at + rows, 0..w.dim(1)?], &(cur + delta)?)?;
                }
            }
            list.push(format!("{p}.{name}.weight"), matrix(w)?)?;
            if let Some(bias) = lin.bias() {
                list.push(format!("{p}.{name}.bias"), f32_tensor(bias)?)?;
            }
        }
    }
    list.push(
        "output_norm.weight".into(),
        f32_tensor(model.final_norm.weight())?,
    )?;
    let ob = model
        .final_norm
        .bias()
        .ok_or_else(|| Error::Invalid("LayerNorm without bias".into()))?;
    list.push("output_norm.bias".into(), f32_tensor(ob)?)?;
    list.push(
        "output.weight".into(),
        matrix(model.lm_head.dense_weight()?)?,
    )?;
    if let Some(b) = model.lm_head.bias() {
        list.push("output.bias".into(), f32_tensor(b)?)?;
    }
    let name = if adapter.is_some() {
        "Phi-2 + LoRA (merged by Dramatis)"
    } else {
        "Phi-2 (written by Dramatis)"
    };
    let mut meta = phi2_metadata(&cfg, qt.file_type(), name);
    if let Some(t) = tokenizer {
        meta.extend(tokenizer_metadata(t, cfg.vocab_size)?);
    }
    write_gguf(out, &meta, &list.tensors)
}
