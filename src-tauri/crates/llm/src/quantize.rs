//! Hugging Face safetensors → GGUF in llama.cpp's `phi2` layout (fused
//! `attn_qkv`, `phi2.*` metadata, GPT-2 tokenizer metadata), at Q4_K, Q5_K,
//! Q8_0, F16 or F32.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{DType, Device, Tensor};

use crate::{Error, PhiConfig, Result};

/// Target precisions for [`quantize_safetensors`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantType {
    /// 4.5 bits per weight, k-quant.
    Q4K,
    /// 5.5 bits per weight, k-quant.
    Q5K,
    /// 8.5 bits per weight.
    Q8_0,
    /// Half precision.
    F16,
    /// Full precision.
    F32,
}

impl QuantType {
    /// candle's dtype for it.
    pub fn ggml(self) -> GgmlDType {
        match self {
            Self::Q4K => GgmlDType::Q4K,
            Self::Q5K => GgmlDType::Q5K,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::F16 => GgmlDType::F16,
            Self::F32 => GgmlDType::F32,
        }
    }

    /// llama.cpp's `general.file_type` for a file of this type.
    pub(crate) fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q8_0 => 7,
            Self::Q4K => 14, // MOSTLY_Q4_K_S: every matrix Q4_K
            Self::Q5K => 16, // MOSTLY_Q5_K_S
        }
    }
}

impl QuantType {
    /// The name llama.cpp gives the type (`Q4_K`, `Q8_0`, `F16`...).
    pub fn name(self) -> &'static str {
        match self {
            Self::Q4K => "Q4_K",
            Self::Q5K => "Q5_K",
            Self::Q8_0 => "Q8_0",
            Self::F16 => "F16",
            Self::F32 => "F32",
        }
    }

    /// Bits per weight, for size estimates.
    pub fn bits_per_weight(self) -> f64 {
        match self {
            Self::Q4K => 4.5,
            Self::Q5K => 5.5,
            Self::Q8_0 => 8.5,
            Self::F16 => 16.0,
            Self::F32 => 32.0,
        }
    }
}

impl std::str::FromStr for QuantType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "q4_k" | "q4k" | "q4_k_m" | "q4_k_s" => Self::Q4K,
            "q5_k" | "q5k" | "q5_k_m" | "q5_k_s" => Self::Q5K,
            "q8_0" | "q8" => Self::Q8_0,
            "f16" => Self::F16,
            "f32" => Self::F32,
            other => {
                return Err(format!(
                    "unknown quantization `{other}`: use q4_k, q5_k, q8_0, f16 or f32"
                ));
            }
        })
    }
}

/// Progress of a quantization, one report per tensor.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QuantizeProgress {
    /// Tensors written so far.
    pub done: usize,
    /// Tensors in all.
    pub total: usize,
    /// The tensor just written.
    pub tensor: String,
}

/// Tensors on their way into a GGUF file, with a progress report per tensor
/// and the cancel flag checked before each one.
pub(crate) struct TensorList<'a, P: FnMut(QuantizeProgress)> {
    pub(crate) tensors: Vec<(String, QTensor)>,
    total: usize,
    cancel: &'a AtomicBool,
    progress: P,
}

impl<'a, P: FnMut(QuantizeProgress)> TensorList<'a, P> {
    pub(crate) fn new(total: usize, cancel: &'a AtomicBool, progress: P) -> Self {
        Self {
            tensors: Vec::with_capacity(total),
            total,
            cancel,
            progress,
        }
    }

    pub(crate) fn push(&mut self, name: String, t: QTensor) -> Result<()> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        self.tensors.push((name.clone(), t));
        (self.progress)(QuantizeProgress {
            done: self.tensors.len(),
            total: self.total,
            tensor: name,
        });
        Ok(())
    }
}

/// Quantizes a matrix to `dtype` when its rows are whole blocks, else keeps it F16.
pub(crate) fn quantize_matrix(t: &Tensor, dtype: GgmlDType) -> Result<QTensor> {
    let cols = t.dim(1)?;
    let dtype = if cols.is_multiple_of(dtype.block_size()) {
        dtype
    } else {
        GgmlDType::F16
    };
    quantize(t, dtype)
}

/// `QTensor::quantize` reads the whole storage of its input, so a view (a
/// narrowed tensor) is copied into storage of its own first. A large
/// matrix is quantized a slice of rows at a time on every core (candle's
/// quantizer runs on one: 2.7 billion weights took minutes) and the
/// slices' blocks joined, the same bytes in the same order.
pub(crate) fn quantize(t: &Tensor, dtype: GgmlDType) -> Result<QTensor> {
    use rayon::prelude::*;
    let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let (rows, cols) = match t.dims() {
        [rows, cols] => (*rows, *cols),
        _ => (1, values.len()),
    };
    // Slices of whole rows, about a million values each.
    let per = ((1 << 20) / cols.max(1)).max(1);
    if rows < 2 * per || dtype.block_size() == 1 || !cols.is_multiple_of(dtype.block_size()) {
        return Ok(QTensor::quantize(
            &Tensor::from_vec(values, t.shape(), &Device::Cpu)?,
            dtype,
        )?);
    }
    let slices = values
        .par_chunks(per * cols)
        .map(|v| {
            let part = Tensor::from_slice(v, (v.len() / cols, cols), &Device::Cpu)?;
            Ok(QTensor::quantize(&part, dtype)?.data()?.into_owned())
        })
        .collect::<Result<Vec<Vec<u8>>>>()?;
    let storage = candle_core::quantized::QStorage::from_data(
        std::borrow::Cow::Owned(slices.concat()),
        &Device::Cpu,
        dtype,
    )?;
    Ok(QTensor::new(storage, t.shape())?)
}

/// Converts the Hugging Face Phi model in `src_dir` (config.json,
/// *.safetensors, tokenizer.json) into a GGUF file at `out`, written to a
/// temporary file and renamed into place, so a cancelled or failed run leaves
/// nothing behind.
pub fn quantize_safetensors(
    src_dir: &Path,
    out: &Path,
    qt: QuantType,
    cancel: &AtomicBool,
    progress: impl FnMut(QuantizeProgress),
) -> Result<()> {
    let cfg = PhiConfig::from_hf_file(&src_dir.join("config.json"))?;
    // Tensors are read one at a time from the memory-mapped shards, so peak
    // memory is the quantized output plus one f32 tensor, not the model in f32.
    let st = crate::weights::Shards::open(src_dir, DType::F32)?;
    let tokenizer = src_dir.join("tokenizer.json");
    let tok_meta = if tokenizer.exists() {
        tokenizer_metadata(&tokenizer, cfg.vocab_size)?
    } else {
        Vec::new()
    };

    let q = qt.ggml();
    let (h, inter, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let total = 1 + 10 * cfg.num_hidden_layers + 4;
    let mut list = TensorList::new(total, cancel, progress);
    let cpu = Device::Cpu;
    let vector = |name: &str, n: usize| -> Result<QTensor> {
        quantize(&st.get(name, &[n], &cpu)?, GgmlDType::F32)
    };

    let embed = st.get("model.embed_tokens.weight", &[v, h], &cpu)?;
    list.push("token_embd.weight".into(), quantize_matrix(&embed, q)?)?;
    drop(embed);
    for i in 0..cfg.num_hidden_layers {
        let hf = format!("model.layers.{i}");
        let p = format!("blk.{i}");
        for (ours, theirs) in [("weight", "weight"), ("bias", "bias")] {
            list.push(
                format!("{p}.attn_norm.{ours}"),
                vector(&format!("{hf}.input_layernorm.{theirs}"), h)?,
            )?;
        }
        let qkv = ["q_proj", "k_proj", "v_proj"];
        let w = qkv
            .iter()
            .map(|n| st.get(&format!("{hf}.self_attn.{n}.weight"), &[h, h], &cpu))
            .collect::<Result<Vec<_>>>()?;
        list.push(
            format!("{p}.attn_qkv.weight"),
            quantize_matrix(&Tensor::cat(&w, 0)?, q)?,
        )?;
        let b = qkv
            .iter()
            .map(|n| st.get(&format!("{hf}.self_attn.{n}.bias"), &[h], &cpu))
            .collect::<Result<Vec<_>>>()?;
        list.push(
            format!("{p}.attn_qkv.bias"),
            quantize(&Tensor::cat(&b, 0)?, GgmlDType::F32)?,
        )?;
        for (ours, theirs, out, inp) in [
            ("attn_output", "self_attn.dense", h, h),
            ("ffn_up", "mlp.fc1", inter, h),
            ("ffn_down", "mlp.fc2", h, inter),
        ] {
            let w = st.get(&format!("{hf}.{theirs}.weight"), &[out, inp], &cpu)?;
            list.push(format!("{p}.{ours}.weight"), quantize_matrix(&w, q)?)?;
            list.push(
                format!("{p}.{ours}.bias"),
                vector(&format!("{hf}.{theirs}.bias"), out)?,
            )?;
        }
    }
    for part in ["weight", "bias"] {
        list.push(
            format!("output_norm.{part}"),
            vector(&format!("model.final_layernorm.{part}"), h)?,
        )?;
    }
    let head = st.get("lm_head.weight", &[v, h], &cpu)?;
    list.push("output.weight".into(), quantize_matrix(&head, q)?)?;
    drop(head);
    list.push("output.bias".into(), vector("lm_head.bias", v)?)?;
    drop(st);

    let mut meta = phi2_metadata(&cfg, qt.file_type(), "Phi-2 (quantized by Dramatis)");
    meta.extend(tok_meta);
    write_gguf(out, &meta, &list.tensors)
}

/// The `general.*` and `phi2.*` metadata llama.cpp and this loader read.
pub(crate) fn phi2_metadata(
    cfg: &PhiConfig,
    file_type: u32,
    name: &str,
) -> Vec<(String, gguf_file::Value)> {
    use gguf_file::Value as V;
    vec![
        ("general.architecture".into(), V::String("phi2".into())),
        ("general.name".into(), V::String(name.into())),
        ("general.file_type".into(), V::U32(file_type)),
        ("general.quantization_version".into(), V::U32(2)),
        (
            "phi2.context_length".into(),
            V::U32(cfg.max_position_embeddings as u32),
        ),
        (
            "phi2.embedding_length".into(),
            V::U32(cfg.hidden_size as u32),
        ),
        (
            "phi2.feed_forward_length".into(),
            V::U32(cfg.intermediate_size as u32),
        ),
        (
            "phi2.block_count".into(),
            V::U32(cfg.num_hidden_layers as u32),
        ),
        (
            "phi2.attention.head_count".into(),
            V::U32(cfg.num_attention_heads as u32),
        ),
        (
            "phi2.attention.head_count_kv".into(),
            V::U32(cfg.num_attention_heads as u32),
        ),
        (
            "phi2.attention.layer_norm_epsilon".into(),
            V::F32(cfg.layer_norm_eps as f32),
        ),
        (
            "phi2.rope.dimension_count".into(),
            V::U32(cfg.rotary_dim() as u32),
        ),
        ("phi2.rope.freq_base".into(), V::F32(cfg.rope_theta as f32)),
    ]
}

/// llama.cpp's GPT-2 tokenizer metadata from a tokenizer.json, padded to the
/// model's vocabulary size.
pub(crate) fn tokenizer_metadata(
    path: &Path,
    vocab_size: usize,
) -> Result<Vec<(String, gguf_file::Value)>> {
    use gguf_file::Value as V;
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| Error::Tokenizer {
        path: path.into(),
        message: format!("not readable: {e}"),
    })?;
    let bad = |m: &str| Error::Tokenizer {
        path: path.into(),
        message: m.into(),
    };
    let vocab = v
        .pointer("/model/vocab")
        .and_then(|v| v.as_object())
        .ok_or_else(|| bad("no model.vocab"))?;
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut types = vec![1i32; vocab_size];
    let mut put = |tok: &str, id: u64, control: bool| -> Result<()> {
        let slot = tokens
            .get_mut(id as usize)
            .ok_or_else(|| bad("a token id is beyond the model's vocabulary"))?;
        *slot = Some(tok.to_owned());
        if control {
            types[id as usize] = 3;
        }
        Ok(())
    };
    for (tok, id) in vocab {
        put(
            tok,
            id.as_u64()
                .ok_or_else(|| bad("a vocab id is not a number"))?,
            false,
        )?;
    }
    let mut eos = None;
    for t in v
        .get("added_tokens")
        .and_then(|a| a.as_array())
        .into_iter()
        .flatten()
    {
        if let (Some(content), Some(id)) = (
            t.get("content").and_then(|c| c.as_str()),
            t.get("id").and_then(|i| i.as_u64()),
        ) {
            let special = t.get("special").and_then(|s| s.as_bool()).unwrap_or(false);
            put(content, id, special)?;
            if content == crate::tokenizer::END_OF_TEXT {
                eos = Some(id as u32);
            }
        }
    }
    let merges: Vec<V> = v
        .pointer("/model/merges")
        .and_then(|m| m.as_array())
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            serde_json::Value::String(s) => Some(V::String(s.clone())),
            serde_json::Value::Array(p) => Some(V::String(format!(
                "{} {}",
                p.first()?.as_str()?,
                p.get(1)?.as_str()?
            ))),
            _ => None,
        })
        .collect();
    let tokens: Vec<V> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| V::String(t.unwrap_or_else(|| format!("[PAD{i}]"))))
        .collect();
    for (i, t) in tokens.iter().enumerate() {
        if matches!(t, V::String(s) if s.starts_with("[PAD")) {
            types[i] = 5; // unused
        }
    }
    Ok(gpt2_tokenizer_metadata(
        tokens,
        types,
        merges,
        eos.unwrap_or(0),
    ))
}

/// llama.cpp's metadata for a GPT-2 byte-level BPE tokenizer (what Phi-2 uses).
pub(crate) fn gpt2_tokenizer_metadata(
    tokens: Vec<gguf_file::Value>,
    types: Vec<i32>,
    merges: Vec<gguf_file::Value>,
    eos: u32,
) -> Vec<(String, gguf_file::Value)> {
    use gguf_file::Value as V;
    vec![
        ("tokenizer.ggml.model".into(), V::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), V::String("phi-2".into())),
        ("tokenizer.ggml.tokens".into(), V::Array(tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            V::Array(types.into_iter().map(V::I32).collect()),
        ),
        ("tokenizer.ggml.merges".into(), V::Array(merges)),
        ("tokenizer.ggml.bos_token_id".into(), V::U32(eos)),
        ("tokenizer.ggml.eos_token_id".into(), V::U32(eos)),
        ("tokenizer.ggml.unknown_token_id".into(), V::U32(eos)),
    ]
}

/// Writes a GGUF file atomically: to `<out>.partial`, synced, then renamed.
pub fn write_gguf(
    out: &Path,
    meta: &[(String, gguf_file::Value)],
    tensors: &[(String, QTensor)],
) -> Result<()> {
    let tmp = out.with_extension("gguf.partial");
    let result = (|| -> Result<()> {
        let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut w = std::io::BufWriter::new(file);
        let meta_refs: Vec<(&str, &gguf_file::Value)> =
            meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> =
            tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut w, &meta_refs, &tensor_refs)
            .map_err(|e| Error::bad(&tmp, format!("cannot write GGUF: {e}")))?;
        let file = w
            .into_inner()
            .map_err(|e| Error::io(&tmp, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Quantized slice by slice on many threads, a matrix has the bytes
    /// candle's one-thread quantizer gives it.
    #[test]
    fn slices_quantize_to_the_bytes_of_the_whole() {
        // 4,100 rows of 512: two slices of 2,048 rows and a short third.
        let (rows, cols) = (4100, 512);
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i as f32 * 0.618).fract() - 0.5) * (1.0 + (i % 7) as f32))
            .collect();
        let t = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
        for dtype in [
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
            GgmlDType::Q8_0,
        ] {
            let ours = quantize(&t, dtype).unwrap();
            let whole = QTensor::quantize(&t, dtype).unwrap();
            assert_eq!(ours.shape(), whole.shape());
            assert_eq!(ours.dtype(), dtype);
            assert!(
                ours.data().unwrap() == whole.data().unwrap(),
                "{dtype:?}: the bytes differ"
            );
        }
    }
}
