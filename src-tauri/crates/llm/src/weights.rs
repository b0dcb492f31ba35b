//! Loading Phi-2 from llama.cpp GGUF (`phi2`, fused or split qkv) or from
//! Hugging Face safetensors (sharded, memory-mapped), with every tensor's
//! presence and shape checked against the configuration.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{DType, Device, Tensor};
use candle_nn::LayerNorm;

use crate::cpu::{Bytes, QMatrix};
use crate::linear::Linear;
use crate::model::{Block, Embedding};
use crate::{Error, Phi, PhiConfig, Result};

/// The two weight formats Dramatis reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelFormat {
    /// A llama.cpp GGUF file.
    Gguf,
    /// A Hugging Face folder: config.json and *.safetensors.
    Safetensors,
}

impl ModelFormat {
    /// Guesses the format from a path: a `.gguf` file, or a folder / `.safetensors` file.
    pub fn detect(path: &Path) -> Result<Self> {
        if path.is_dir() || path.extension().is_some_and(|e| e == "safetensors") {
            Ok(Self::Safetensors)
        } else if path.extension().is_some_and(|e| e == "gguf") || path.is_file() {
            Ok(Self::Gguf)
        } else {
            Err(Error::io(
                path,
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ))
        }
    }
}

/// Loads a model from a GGUF file or a Hugging Face folder onto `device`.
pub fn load_model(path: &Path, device: &Device) -> Result<Phi> {
    load_model_as(path, device, DType::F32)
}

/// [`load_model`], with the dense weights of a Hugging Face folder kept in
/// `dtype` (bf16 halves the memory of a base trained on a GPU; layer norms
/// stay f32). GGUF files keep their own types.
pub fn load_model_as(path: &Path, device: &Device, dtype: DType) -> Result<Phi> {
    match ModelFormat::detect(path)? {
        ModelFormat::Gguf => load_gguf(path, device),
        ModelFormat::Safetensors => {
            let dir = if path.is_dir() {
                path
            } else {
                path.parent().unwrap_or(Path::new("."))
            };
            load_safetensors(dir, device, dtype)
        }
    }
}

// ---- GGUF --------------------------------------------------------------------

struct Gguf {
    path: PathBuf,
    file: File,
    content: gguf_file::Content,
    /// The whole file, mapped: CPU weights are read where they lie.
    map: std::sync::Arc<memmap2::Mmap>,
}

impl Gguf {
    fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| Error::bad(path, format!("not a readable GGUF file: {e}")))?;
        let end = content
            .tensor_infos
            .values()
            .map(|t| {
                let blocks = t.shape.elem_count() / t.ggml_dtype.block_size();
                content.tensor_data_offset + t.offset + (blocks * t.ggml_dtype.type_size()) as u64
            })
            .max()
            .unwrap_or(0);
        if end > len {
            return Err(Error::Truncated {
                path: path.into(),
                expected: end,
                actual: len,
            });
        }
        let map = crate::cpu::map_file(&file).map_err(|e| Error::io(path, e))?;
        Ok(Self {
            path: path.into(),
            file,
            content,
            map: std::sync::Arc::new(map),
        })
    }

    /// A tensor's blocks in the mapped file, checked against `shape`.
    fn mapped(
        &self,
        name: &str,
        shape: &[usize],
    ) -> Result<(Bytes, candle_core::quantized::GgmlDType)> {
        let info = self.info(name, shape)?;
        let t = info.ggml_dtype;
        let len = shape.iter().product::<usize>() / t.block_size() * t.type_size();
        let start = (self.content.tensor_data_offset + info.offset) as usize;
        let bytes = Bytes::mapped(&self.map, start, len).ok_or_else(|| Error::Truncated {
            path: self.path.clone(),
            expected: (start + len) as u64,
            actual: self.map.len() as u64,
        })?;
        Ok((bytes, t))
    }

    /// A tensor as a CPU-kernel matrix, when the device is the CPU and its
    /// type has a kernel here.
    fn cpu_matrix(&self, name: &str, shape: &[usize], device: &Device) -> Result<Option<QMatrix>> {
        if !device.is_cpu() {
            return Ok(None);
        }
        let (bytes, t) = self.mapped(name, shape)?;
        Ok(QMatrix::new(bytes, t, shape[0], shape[1]))
    }

    fn info(&self, name: &str, shape: &[usize]) -> Result<&gguf_file::TensorInfo> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| Error::MissingTensor {
                path: self.path.clone(),
                name: name.into(),
            })?;
        if info.shape.dims() != shape {
            return Err(Error::Shape {
                path: self.path.clone(),
                name: name.into(),
                expected: shape.to_vec(),
                found: info.shape.dims().to_vec(),
            });
        }
        Ok(info)
    }

    fn meta_u32(&self, key: &str) -> Result<usize> {
        let v = self
            .content
            .metadata
            .get(key)
            .ok_or_else(|| Error::bad(&self.path, format!("metadata `{key}` is missing")))?;
        Ok(v.to_u32()
            .map_err(|e| Error::bad(&self.path, format!("metadata `{key}`: {e}")))?
            as usize)
    }

    /// An f32 value widened through its shortest decimal form, so 1e-5
    /// stored as f32 reads back as 1e-5, not 9.99999974e-6.
    fn meta_f64(&self, key: &str) -> Option<f64> {
        let v = self
            .content
            .metadata
            .get(key)
            .and_then(|v| v.to_f32().ok())?;
        v.to_string().parse().ok()
    }

    fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    fn qtensor(&mut self, name: &str, shape: &[usize], device: &Device) -> Result<QTensor> {
        self.info(name, shape)?;
        let path = self.path.clone();
        self.content
            .tensor(&mut self.file, name, device)
            .map_err(|e| Error::bad(&path, format!("tensor `{name}` cannot be read: {e}")))
    }

    fn dense(&mut self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        Ok(self.qtensor(name, shape, device)?.dequantize(device)?)
    }

    fn norm(&mut self, prefix: &str, width: usize, eps: f64, device: &Device) -> Result<LayerNorm> {
        let w = self.dense(&format!("{prefix}.weight"), &[width], device)?;
        let b = self.dense(&format!("{prefix}.bias"), &[width], device)?;
        Ok(LayerNorm::new(w, b, eps))
    }

    fn linear(&mut self, prefix: &str, out: usize, inp: usize, device: &Device) -> Result<Linear> {
        let bias = format!("{prefix}.bias");
        let b = if self.has(&bias) {
            Some(self.dense(&bias, &[out], device)?)
        } else {
            None
        };
        let name = format!("{prefix}.weight");
        if let Some(m) = self.cpu_matrix(&name, &[out, inp], device)? {
            return Linear::cpu(m, out, inp, b);
        }
        let w = self.qtensor(&name, &[out, inp], device)?;
        Linear::quantized(w, b)
    }

    /// q, k and v as one `[3h, h]` projection, from `attn_qkv` or from
    /// separate `attn_q` / `attn_k` / `attn_v` (rows of a quantized matrix are
    /// whole blocks, so the raw bytes concatenate).
    fn qkv(&mut self, prefix: &str, h: usize, device: &Device) -> Result<Linear> {
        if self.has(&format!("{prefix}.attn_qkv.weight")) {
            return self.linear(&format!("{prefix}.attn_qkv"), 3 * h, h, device);
        }
        let mut raw = Vec::new();
        let mut biases = Vec::new();
        let mut dtype = None;
        for part in ["attn_q", "attn_k", "attn_v"] {
            let q = self.qtensor(&format!("{prefix}.{part}.weight"), &[h, h], &Device::Cpu)?;
            if dtype.is_some_and(|d| d != q.dtype()) {
                return Err(Error::bad(
                    &self.path,
                    format!("{prefix}: q, k and v are quantized differently"),
                ));
            }
            dtype = Some(q.dtype());
            raw.extend_from_slice(&q.data()?);
            let bias = format!("{prefix}.{part}.bias");
            if self.has(&bias) {
                biases.push(self.dense(&bias, &[h], device)?);
            }
        }
        let dtype = dtype.expect("three parts read");
        let b = if biases.len() == 3 {
            Some(Tensor::cat(&biases, 0)?)
        } else {
            None
        };
        if device.is_cpu() && QMatrix::supports(dtype) {
            return QMatrix::new(Bytes::Owned(std::sync::Arc::new(raw)), dtype, 3 * h, h)
                .map(|m| Linear::cpu(m, 3 * h, h, b))
                .transpose()?
                .ok_or_else(|| {
                    Error::bad(
                        &self.path,
                        format!("{prefix}: q, k and v do not make one matrix"),
                    )
                });
        }
        let w = candle_core::quantized::ggml_file::qtensor_from_ggml(
            dtype,
            &raw,
            vec![3 * h, h],
            device,
        )?;
        Linear::quantized(w, b)
    }
}

/// Reads and checks a GGUF file's architecture and hyperparameters.
fn gguf_config(g: &Gguf) -> Result<PhiConfig> {
    let path = g.path.as_path();
    let arch = g
        .content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned();
    if arch.as_deref() != Some("phi2") {
        return Err(Error::UnknownArchitecture {
            path: path.into(),
            found: arch.unwrap_or_else(|| "none".into()),
        });
    }
    let h = g.meta_u32("phi2.embedding_length")?;
    let heads = g.meta_u32("phi2.attention.head_count")?;
    let rope_dims = g.meta_u32("phi2.rope.dimension_count")?;
    let vocab = g
        .content
        .tensor_infos
        .get("token_embd.weight")
        .map(|t| t.shape.dims()[0])
        .ok_or_else(|| Error::MissingTensor {
            path: path.into(),
            name: "token_embd.weight".into(),
        })?;
    let cfg = PhiConfig {
        vocab_size: vocab,
        hidden_size: h,
        intermediate_size: g.meta_u32("phi2.feed_forward_length")?,
        num_hidden_layers: g.meta_u32("phi2.block_count")?,
        num_attention_heads: heads,
        partial_rotary_factor: rope_dims as f64 / (h / heads.max(1)) as f64,
        rope_theta: g.meta_f64("phi2.rope.freq_base").unwrap_or(10000.0),
        layer_norm_eps: g
            .meta_f64("phi2.attention.layer_norm_epsilon")
            .unwrap_or(1e-5),
        max_position_embeddings: g.meta_u32("phi2.context_length")?,
    };
    cfg.validate().map_err(|m| Error::bad(path, m))?;
    if cfg.rotary_dim() != rope_dims {
        return Err(Error::bad(
            path,
            format!(
                "rope dimension {rope_dims} does not fit a head of {}",
                cfg.head_dim()
            ),
        ));
    }
    Ok(cfg)
}

/// Every tensor a `phi2` GGUF must hold, with its shape; biases may be absent.
fn gguf_expected(cfg: &PhiConfig, fused_qkv: bool) -> Vec<(String, Vec<usize>, bool)> {
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let mut t = vec![("token_embd.weight".to_owned(), vec![v, h], true)];
    let lin = |t: &mut Vec<_>, name: String, out: usize, inp: usize| {
        t.push((format!("{name}.weight"), vec![out, inp], true));
        t.push((format!("{name}.bias"), vec![out], false));
    };
    for n in 0..cfg.num_hidden_layers {
        let p = format!("blk.{n}");
        t.push((format!("{p}.attn_norm.weight"), vec![h], true));
        t.push((format!("{p}.attn_norm.bias"), vec![h], true));
        if fused_qkv {
            lin(&mut t, format!("{p}.attn_qkv"), 3 * h, h);
        } else {
            for part in ["attn_q", "attn_k", "attn_v"] {
                lin(&mut t, format!("{p}.{part}"), h, h);
            }
        }
        lin(&mut t, format!("{p}.attn_output"), h, h);
        lin(&mut t, format!("{p}.ffn_up"), i, h);
        lin(&mut t, format!("{p}.ffn_down"), h, i);
    }
    t.push(("output_norm.weight".into(), vec![h], true));
    t.push(("output_norm.bias".into(), vec![h], true));
    lin(&mut t, "output".into(), v, h);
    t
}

/// What [`inspect_model`] finds in a model file or folder.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelInfo {
    /// GGUF or safetensors.
    pub format: ModelFormat,
    /// `Q4_K_M`, `Q8_0`, `F16`... (the most common weight type when unnamed).
    pub quantization: String,
    /// The hyperparameters.
    pub config: PhiConfig,
    /// Number of weights.
    pub parameters: u64,
    /// Bytes on disk.
    pub bytes: u64,
}

/// llama.cpp's `general.file_type` names for the types a Phi-2 GGUF comes in.
fn file_type_name(t: u32) -> Option<&'static str> {
    Some(match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        32 => "BF16",
        _ => return None,
    })
}

/// Checks a model without loading its weights: format, architecture,
/// hyperparameters, every tensor's name and shape, and that the file is
/// not truncated. What passes here loads with [`load_model`].
pub fn inspect_model(path: &Path) -> Result<ModelInfo> {
    match ModelFormat::detect(path)? {
        ModelFormat::Gguf => {
            let g = Gguf::open(path)?;
            let cfg = gguf_config(&g)?;
            let fused = g.has("blk.0.attn_qkv.weight");
            let mut parameters = 0u64;
            let mut counts: HashMap<String, u64> = HashMap::new();
            for (name, shape, required) in gguf_expected(&cfg, fused) {
                match g.content.tensor_infos.get(&name) {
                    None if !required => {}
                    None => {
                        return Err(Error::MissingTensor {
                            path: path.into(),
                            name,
                        });
                    }
                    Some(info) if info.shape.dims() != shape.as_slice() => {
                        return Err(Error::Shape {
                            path: path.into(),
                            name,
                            expected: shape,
                            found: info.shape.dims().to_vec(),
                        });
                    }
                    Some(info) => {
                        let n = info.shape.elem_count() as u64;
                        parameters += n;
                        if shape.len() == 2 {
                            *counts.entry(format!("{:?}", info.ggml_dtype)).or_default() += n;
                        }
                    }
                }
            }
            let named = g
                .content
                .metadata
                .get("general.file_type")
                .and_then(|v| v.to_u32().ok())
                .and_then(file_type_name);
            let quantization = named.map(str::to_owned).unwrap_or_else(|| {
                counts
                    .into_iter()
                    .max_by_key(|(_, n)| *n)
                    .map(|(t, _)| t.to_uppercase())
                    .unwrap_or_default()
            });
            let bytes = std::fs::metadata(path)
                .map_err(|e| Error::io(path, e))?
                .len();
            Ok(ModelInfo {
                format: ModelFormat::Gguf,
                quantization,
                config: cfg,
                parameters,
                bytes,
            })
        }
        ModelFormat::Safetensors => {
            let dir = if path.is_dir() {
                path
            } else {
                path.parent().unwrap_or(Path::new("."))
            };
            let cfg = PhiConfig::from_hf_file(&dir.join("config.json"))?;
            let shards = Shards::open(dir, DType::F32)?;
            let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
            let mut want = vec![("model.embed_tokens.weight".to_owned(), vec![v, h])];
            let lin = |w: &mut Vec<(String, Vec<usize>)>, p: String, out: usize, inp: usize| {
                w.push((format!("{p}.weight"), vec![out, inp]));
                w.push((format!("{p}.bias"), vec![out]));
            };
            for n in 0..cfg.num_hidden_layers {
                let p = format!("model.layers.{n}");
                for proj in ["q_proj", "k_proj", "v_proj", "dense"] {
                    lin(&mut want, format!("{p}.self_attn.{proj}"), h, h);
                }
                lin(&mut want, format!("{p}.mlp.fc1"), i, h);
                lin(&mut want, format!("{p}.mlp.fc2"), h, i);
                want.push((format!("{p}.input_layernorm.weight"), vec![h]));
                want.push((format!("{p}.input_layernorm.bias"), vec![h]));
            }
            want.push(("model.final_layernorm.weight".into(), vec![h]));
            want.push(("model.final_layernorm.bias".into(), vec![h]));
            lin(&mut want, "lm_head".into(), v, h);
            let mut parameters = 0u64;
            let mut dtypes: HashMap<String, u64> = HashMap::new();
            for (name, shape) in want {
                let file = shards
                    .names
                    .get(&name)
                    .ok_or_else(|| Error::MissingTensor {
                        path: dir.into(),
                        name: name.clone(),
                    })?;
                let view = shards
                    .st
                    .get(&name)
                    .map_err(|e| Error::bad(file, format!("tensor `{name}`: {e}")))?;
                if view.shape() != shape.as_slice() {
                    return Err(Error::Shape {
                        path: file.clone(),
                        name,
                        expected: shape,
                        found: view.shape().to_vec(),
                    });
                }
                let n: usize = shape.iter().product();
                parameters += n as u64;
                *dtypes.entry(format!("{:?}", view.dtype())).or_default() += n as u64;
            }
            let mut files: Vec<&PathBuf> = shards.names.values().collect();
            files.sort();
            files.dedup();
            let bytes = files
                .iter()
                .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
                .sum();
            Ok(ModelInfo {
                format: ModelFormat::Safetensors,
                quantization: dtypes
                    .into_iter()
                    .max_by_key(|(_, n)| *n)
                    .map(|(t, _)| t.to_uppercase())
                    .unwrap_or_default(),
                config: cfg,
                parameters,
                bytes,
            })
        }
    }
}

fn load_gguf(path: &Path, device: &Device) -> Result<Phi> {
    let mut g = Gguf::open(path)?;
    let cfg = gguf_config(&g)?;
    let (h, vocab) = (cfg.hidden_size, cfg.vocab_size);
    let eps = cfg.layer_norm_eps;
    // The embedding stays on the CPU, quantized where it lies in the file;
    // rows are dequantized on use.
    let embed = match g.mapped("token_embd.weight", &[vocab, h])? {
        (bytes, t) if !matches!(t, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) => {
            Embedding::quantized(bytes, t, vocab, h)
        }
        _ => Embedding::from_qtensor(g.qtensor("token_embd.weight", &[vocab, h], &Device::Cpu)?)?,
    };
    let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let p = format!("blk.{i}");
        blocks.push(Block {
            norm: g.norm(&format!("{p}.attn_norm"), h, eps, device)?,
            qkv: g.qkv(&p, h, device)?,
            dense: g.linear(&format!("{p}.attn_output"), h, h, device)?,
            fc1: g.linear(&format!("{p}.ffn_up"), cfg.intermediate_size, h, device)?,
            fc2: g.linear(&format!("{p}.ffn_down"), h, cfg.intermediate_size, device)?,
        });
    }
    let final_norm = g.norm("output_norm", h, eps, device)?;
    let lm_head = g.linear("output", vocab, h, device)?;
    Phi::assemble(cfg, embed, blocks, final_norm, lm_head, device)
}

// ---- safetensors -------------------------------------------------------------

pub(crate) struct Shards {
    dir: PathBuf,
    st: candle_core::safetensors::MmapedSafetensors,
    /// Which file holds each tensor, for error messages.
    names: HashMap<String, PathBuf>,
    dtype: DType,
}

impl Shards {
    pub(crate) fn open(dir: &Path, dtype: DType) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let bytes = std::fs::read(&index).map_err(|e| Error::io(&index, e))?;
            let v: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| Error::bad(&index, format!("not a readable index: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::bad(&index, "no weight_map"))?;
            let mut files: Vec<PathBuf> = map
                .values()
                .filter_map(|f| f.as_str())
                .map(|f| dir.join(f))
                .collect();
            files.sort();
            files.dedup();
            files
        } else {
            let single = dir.join("model.safetensors");
            if !single.exists() {
                return Err(Error::io(
                    &single,
                    std::io::Error::from(std::io::ErrorKind::NotFound),
                ));
            }
            vec![single]
        };
        let mut names = HashMap::new();
        for f in &files {
            let len = std::fs::metadata(f).map_err(|e| Error::io(f, e))?.len();
            let header = read_safetensors_header(f)?;
            for (name, end) in header {
                if end > len {
                    return Err(Error::Truncated {
                        path: f.clone(),
                        expected: end,
                        actual: len,
                    });
                }
                names.insert(name, f.clone());
            }
        }
        // SAFETY: the files are mapped read-only and Dramatis never writes to a
        // model file while a model is loaded from it; the tensors are copied out
        // before the mapping is dropped.
        #[allow(unsafe_code)]
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
            .map_err(|e| Error::bad(dir, format!("cannot map the safetensors files: {e}")))?;
        Ok(Self {
            dir: dir.into(),
            st,
            names,
            dtype,
        })
    }

    pub(crate) fn get(&self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        let file = self.names.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.dir.clone(),
            name: name.into(),
        })?;
        let t = self
            .st
            .load(name, &Device::Cpu)
            .map_err(|e| Error::bad(file, format!("tensor `{name}` cannot be read: {e}")))?;
        if t.dims() != shape {
            return Err(Error::Shape {
                path: file.clone(),
                name: name.into(),
                expected: shape.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        Ok(t.to_dtype(self.dtype)?.to_device(device)?)
    }

    fn norm(&self, prefix: &str, width: usize, eps: f64, device: &Device) -> Result<LayerNorm> {
        let w = self.get(&format!("{prefix}.weight"), &[width], device)?;
        let b = self.get(&format!("{prefix}.bias"), &[width], device)?;
        Ok(LayerNorm::new(
            w.to_dtype(DType::F32)?,
            b.to_dtype(DType::F32)?,
            eps,
        ))
    }

    fn linear(
        &self,
        prefix: &str,
        out: usize,
        inp: usize,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        Ok((
            self.get(&format!("{prefix}.weight"), &[out, inp], device)?,
            self.get(&format!("{prefix}.bias"), &[out], device)?,
        ))
    }
}

/// Reads a safetensors header and returns each tensor's name and end offset in the file.
fn read_safetensors_header(path: &Path) -> Result<Vec<(String, u64)>> {
    use std::io::Read;
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| Error::bad(path, "not a safetensors file: shorter than its header"))?;
    let n = u64::from_le_bytes(len);
    let file_len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    if n > 100 << 20 || 8 + n > file_len {
        return Err(Error::bad(
            path,
            "not a safetensors file: impossible header length",
        ));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    let v: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| Error::bad(path, format!("not a safetensors file: bad header ({e})")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| Error::bad(path, "not a safetensors file: header is not an object"))?;
    Ok(obj
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .filter_map(|(k, t)| {
            let end = t.get("data_offsets")?.get(1)?.as_u64()?;
            Some((k.clone(), 8 + n + end))
        })
        .collect())
}

fn load_safetensors(dir: &Path, device: &Device, dtype: DType) -> Result<Phi> {
    let cfg = PhiConfig::from_hf_file(&dir.join("config.json"))?;
    let st = Shards::open(dir, dtype)?;
    let (h, i, v, eps) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.vocab_size,
        cfg.layer_norm_eps,
    );
    let embed = Embedding::Dense(st.get("model.embed_tokens.weight", &[v, h], device)?);
    let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
    for n in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{n}");
        let (qw, qb) = st.linear(&format!("{p}.self_attn.q_proj"), h, h, device)?;
        let (kw, kb) = st.linear(&format!("{p}.self_attn.k_proj"), h, h, device)?;
        let (vw, vb) = st.linear(&format!("{p}.self_attn.v_proj"), h, h, device)?;
        let qkv = Linear::dense(
            Tensor::cat(&[qw, kw, vw], 0)?,
            Some(Tensor::cat(&[qb, kb, vb], 0)?),
        )?;
        let (dw, db) = st.linear(&format!("{p}.self_attn.dense"), h, h, device)?;
        let (f1w, f1b) = st.linear(&format!("{p}.mlp.fc1"), i, h, device)?;
        let (f2w, f2b) = st.linear(&format!("{p}.mlp.fc2"), h, i, device)?;
        blocks.push(Block {
            norm: st.norm(&format!("{p}.input_layernorm"), h, eps, device)?,
            qkv,
            dense: Linear::dense(dw, Some(db))?,
            fc1: Linear::dense(f1w, Some(f1b))?,
            fc2: Linear::dense(f2w, Some(f2b))?,
        });
    }
    let final_norm = st.norm("model.final_layernorm", h, eps, device)?;
    let (lw, lb) = st.linear("lm_head", v, h, device)?;
    Phi::assemble(
        cfg,
        embed,
        blocks,
        final_norm,
        Linear::dense(lw, Some(lb))?,
        device,
    )
}
