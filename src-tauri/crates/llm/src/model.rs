use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{D, DType, Device, IndexOp, Module, Tensor};
use candle_nn::LayerNorm;

use crate::cache::KvCache;
use crate::cpu::forward::HostParts;
use crate::linear::Linear;
use crate::lora::{LoraAdapter, LoraLayer, LoraTarget};
use crate::profile::phase;
use crate::{Error, PhiConfig, Result};

/// Which positions' logits [`Phi::forward`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Every position: `[b, seq, vocab]` (training, scoring).
    All,
    /// The last position only: `[b, vocab]` (decoding).
    Last,
}

/// The token embedding: dense, or kept quantized and dequantized row by row
/// (Phi-2's 51200×2560 table would be 0.5 GB in f32).
#[derive(Debug, Clone)]
pub(crate) enum Embedding {
    Dense(Tensor),
    Quantized {
        raw: crate::cpu::Bytes,
        dtype: GgmlDType,
        row_bytes: usize,
        rows: usize,
        width: usize,
        /// The table on the model's GPU, uploaded for the first prompt
        /// there: 74-107 MB for Phi-2. `None`: a type candle's CUDA lookup
        /// lacks, an upload that failed (then the host's rows serve for the
        /// rest of the process, with a warning), or a model that keeps it
        /// on the host (training). Training passes and the decode kernels
        /// read the host's rows.
        on_gpu: std::sync::OnceLock<Option<std::sync::Arc<QTensor>>>,
    },
}

impl Embedding {
    pub(crate) fn from_qtensor(q: QTensor) -> Result<Self> {
        let (rows, width) = q.shape().dims2()?;
        if matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
            return Ok(Self::Dense(q.dequantize(&q.device())?));
        }
        let raw = crate::cpu::Bytes::Owned(std::sync::Arc::new(q.data()?.into_owned()));
        Ok(Self::quantized(raw, q.dtype(), rows, width))
    }

    /// A quantized `[rows, width]` table over its blocks.
    pub(crate) fn quantized(
        raw: crate::cpu::Bytes,
        dtype: GgmlDType,
        rows: usize,
        width: usize,
    ) -> Self {
        let row_bytes = raw.as_slice().len() / rows;
        Self::Quantized {
            raw,
            dtype,
            row_bytes,
            rows,
            width,
            on_gpu: std::sync::OnceLock::new(),
        }
    }

    /// A prompt's rows on `device`: on a GPU, a quantized table is looked
    /// up there (copied over once) instead of rows dequantized on the host
    /// and moved, about 5% of a 512-token prefill.
    pub(crate) fn forward_prompt(&self, ids: &Tensor, device: &Device) -> Result<Tensor> {
        let Self::Quantized {
            raw,
            dtype,
            rows,
            width,
            on_gpu,
            ..
        } = self
        else {
            return self.forward(ids, device);
        };
        if !device.is_cuda() {
            return self.forward(ids, device);
        }
        let table = on_gpu.get_or_init(|| {
            if !crate::linear::candle_cuda_block_type(*dtype) {
                return None;
            }
            let upload = || -> Result<QTensor> {
                let q = quantized_table(raw, *dtype, *rows, *width, device)?;
                // The copy is asynchronous on this thread's stream; another
                // thread's stream may read the table next.
                device.synchronize()?;
                Ok(q)
            };
            upload()
                .inspect_err(|e| tracing::warn!("the embedding stays on the host for prompts: {e}"))
                .ok()
                .map(std::sync::Arc::new)
        });
        let Some(table) = table.as_ref().filter(|t| t.device().same_device(device)) else {
            return self.forward(ids, device);
        };
        let (b, s) = ids.dims2()?;
        let flat: Vec<u32> = ids.flatten_all()?.to_vec1()?;
        // The lookup reads wherever an id points: check them here.
        check_ids(&flat, *rows)?;
        let ids = Tensor::from_vec(flat, b * s, device)?;
        Ok(table.embedding(&ids)?.reshape((b, s, *width))?)
    }

    /// Never copies a quantized table to the GPU (training: its memory is
    /// what the run's estimate counts; a table already there stays).
    pub(crate) fn keep_on_host(&self) {
        if let Self::Quantized { on_gpu, .. } = self {
            let _ = on_gpu.set(None);
        }
    }

    /// Whether the table was copied to a GPU (for tests).
    #[cfg(all(test, feature = "cuda"))]
    pub(crate) fn on_gpu(&self) -> bool {
        matches!(self, Self::Quantized { on_gpu, .. } if matches!(on_gpu.get(), Some(Some(_))))
    }

    /// The rows of `ids`, `[ids.len(), width]` in f32 on the host.
    pub(crate) fn rows(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let ids = Tensor::from_slice(ids, (1, ids.len()), &Device::Cpu)?;
        Ok(self
            .forward(&ids, &Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?)
    }

    fn forward(&self, ids: &Tensor, device: &Device) -> Result<Tensor> {
        match self {
            Self::Dense(t) => {
                // A GGUF's dense table stays on the host while the model
                // runs on a GPU: select there, then move the rows. The
                // selection reads wherever an id points: check them first.
                let (b, s) = ids.dims2()?;
                let host: Vec<u32> = ids.flatten_all()?.to_vec1()?;
                check_ids(&host, t.dim(0)?)?;
                let flat = Tensor::from_vec(host, b * s, t.device())?;
                let rows = t.index_select(&flat, 0)?;
                Ok(rows
                    .reshape((b, s, t.dim(1)?))?
                    .to_dtype(DType::F32)?
                    .to_device(device)?)
            }
            Self::Quantized {
                raw,
                dtype,
                row_bytes,
                rows,
                width,
                ..
            } => {
                let (b, s) = ids.dims2()?;
                let ids: Vec<u32> = ids.flatten_all()?.to_vec1()?;
                check_ids(&ids, *rows)?;
                let mut bytes = Vec::with_capacity(ids.len() * row_bytes);
                for &id in &ids {
                    let id = id as usize;
                    bytes.extend_from_slice(&raw.as_slice()[id * row_bytes..(id + 1) * row_bytes]);
                }
                let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
                    *dtype,
                    &bytes,
                    vec![ids.len(), *width],
                    &Device::Cpu,
                )?;
                Ok(q.dequantize(&Device::Cpu)?
                    .to_device(device)?
                    .reshape((b, s, *width))?)
            }
        }
    }
}

/// A quantized `[rows, width]` table's blocks as candle's tensor on `device`
/// (a copy of them).
pub(crate) fn quantized_table(
    raw: &crate::cpu::Bytes,
    dtype: GgmlDType,
    rows: usize,
    width: usize,
    device: &Device,
) -> Result<QTensor> {
    Ok(candle_core::quantized::ggml_file::qtensor_from_ggml(
        dtype,
        raw.as_slice(),
        vec![rows, width],
        device,
    )?)
}

/// Every id names a row of a `rows`-long table.
fn check_ids(ids: &[u32], rows: usize) -> Result<()> {
    match ids.iter().find(|&&id| id as usize >= rows) {
        Some(id) => Err(Error::Invalid(format!(
            "token id {id} is outside the vocabulary of {rows}"
        ))),
        None => Ok(()),
    }
}

/// One transformer block: a LayerNorm feeding attention and the MLP in parallel.
#[derive(Debug, Clone)]
pub(crate) struct Block {
    pub(crate) norm: LayerNorm,
    /// q, k and v fused: `[3·hidden, hidden]`.
    pub(crate) qkv: Linear,
    pub(crate) dense: Linear,
    pub(crate) fc1: Linear,
    pub(crate) fc2: Linear,
}

impl Block {
    /// Whether every product of the block runs on this project's CPU kernels.
    pub(crate) fn on_cpu_kernels(&self) -> bool {
        [&self.qkv, &self.dense, &self.fc1, &self.fc2]
            .iter()
            .all(|l| l.on_cpu_kernels())
    }
}

/// Phi-2 (Hugging Face `PhiForCausalLM`), frozen; see the crate docs.
#[derive(Debug, Clone)]
pub struct Phi {
    pub(crate) cfg: PhiConfig,
    pub(crate) embed: Embedding,
    pub(crate) blocks: Vec<Block>,
    pub(crate) final_norm: LayerNorm,
    pub(crate) lm_head: Linear,
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    device: Device,
    /// Set where the CPU kernels run the whole pass (see [`crate::cpu::forward`]).
    pub(crate) host: Option<std::sync::Arc<HostParts>>,
    /// Set where the CUDA kernels run the decode step (see [`crate::gpu`]).
    #[cfg(feature = "cuda")]
    pub(crate) gpu: Option<std::sync::Arc<crate::gpu::GpuParts>>,
}

impl Phi {
    pub(crate) fn assemble(
        cfg: PhiConfig,
        embed: Embedding,
        blocks: Vec<Block>,
        final_norm: LayerNorm,
        lm_head: Linear,
        device: &Device,
    ) -> Result<Self> {
        let rd = cfg.rotary_dim();
        let inv: Vec<f32> = (0..rd)
            .step_by(2)
            .map(|i| 1.0 / (cfg.rope_theta as f32).powf(i as f32 / rd as f32))
            .collect();
        let inv = Tensor::from_vec(inv, (1, rd / 2), device)?;
        let t = Tensor::arange(0u32, cfg.max_position_embeddings as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((cfg.max_position_embeddings, 1))?;
        let freqs = t.matmul(&inv)?;
        let mut phi = Self {
            cos: freqs.cos()?,
            sin: freqs.sin()?,
            cfg,
            embed,
            blocks,
            final_norm,
            lm_head,
            device: device.clone(),
            host: None,
            #[cfg(feature = "cuda")]
            gpu: None,
        };
        phi.host = HostParts::new(&phi)?.map(std::sync::Arc::new);
        #[cfg(feature = "cuda")]
        {
            phi.gpu = crate::gpu::GpuParts::new(&phi).map(std::sync::Arc::new);
        }
        Ok(phi)
    }

    /// The model's shape.
    pub fn config(&self) -> &PhiConfig {
        &self.cfg
    }

    /// The device it runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A KV cache sized for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.cfg.num_hidden_layers, self.cfg.max_position_embeddings)
    }

    /// Whether the blocks' products run on this project's CPU kernels.
    pub(crate) fn cpu_kernels(&self) -> bool {
        self.blocks.first().is_some_and(|b| b.fc1.on_cpu_kernels())
    }

    /// The quantization of the block weights (`None` when dense).
    pub fn quant_type(&self) -> Option<GgmlDType> {
        self.blocks.first().and_then(|b| b.fc1.quant_type())
    }

    /// Runs `tokens` (`[b, seq]`, u32) after whatever `cache` holds (or from
    /// position 0 without a cache), with an optional LoRA adapter. The causal
    /// mask covers the cached prefix, so several new tokens may follow it.
    pub fn forward(
        &self,
        tokens: &Tensor,
        cache: Option<&mut KvCache>,
        logits: Logits,
        lora: Option<&LoraAdapter>,
    ) -> Result<Tensor> {
        self.run(tokens, cache, logits, lora)
    }

    /// Keeps a quantized token table on the host for this model's life: a
    /// training run calls it, so that the sample replies at its checkpoints
    /// (prompts through a session) do not leave a 74-107 MB copy on the
    /// GPU that its memory estimate does not count (prompts then
    /// dequantize their rows on the host, as training does).
    pub fn keep_embedding_on_host(&self) {
        self.embed.keep_on_host();
    }

    /// Training: the token embedding (`[b, seq, hidden]`) in `dtype`, the
    /// dtype the training passes then run in (see [`Phi::lora_loss_and_grads`]).
    pub fn train_embed(&self, tokens: &Tensor, dtype: DType) -> Result<Tensor> {
        Ok(self.embed.forward(tokens, &self.device)?.to_dtype(dtype)?)
    }

    /// Transformer blocks.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    fn run(
        &self,
        tokens: &Tensor,
        mut cache: Option<&mut KvCache>,
        logits: Logits,
        lora: Option<&LoraAdapter>,
    ) -> Result<Tensor> {
        let (b, seq) = tokens.dims2()?;
        let offset = cache.as_ref().map_or(0, |c| c.len());
        if seq == 0 {
            return Err(Error::Invalid("no tokens to run".into()));
        }
        if offset + seq > self.cfg.max_position_embeddings {
            return Err(Error::Invalid(format!(
                "the context is full: {} tokens exceed the model's {}",
                offset + seq,
                self.cfg.max_position_embeddings
            )));
        }
        if let Some(a) = lora.filter(|a| a.layers.len() != self.blocks.len()) {
            return Err(Error::Invalid(format!(
                "the adapter has {} layers, the model {}",
                a.layers.len(),
                self.blocks.len()
            )));
        }
        if let (Some(parts), Some(c), 1) = (&self.host, cache.as_deref_mut(), b) {
            let ids: Vec<u32> = tokens.flatten_all()?.to_vec1()?;
            let out = crate::cpu::forward::forward(self, parts, &ids, c, logits, lora)?;
            let vocab = self.cfg.vocab_size;
            return Ok(match logits {
                Logits::Last => Tensor::from_vec(out, (1, vocab), &self.device)?,
                Logits::All => Tensor::from_vec(out, (1, seq, vocab), &self.device)?,
            });
        }
        #[cfg(feature = "cuda")]
        if let (Some(g), Some(c), 1, 1, Logits::Last) =
            (&self.gpu, cache.as_deref_mut(), b, seq, logits)
            && g.layers() == self.blocks.len()
            && crate::gpu::takes(self, lora)
        {
            let id: Vec<u32> = tokens.flatten_all()?.to_vec1()?;
            return crate::gpu::decode(self, g, id[0], c, lora);
        }
        self.run_tensors(tokens, cache, logits, lora)
    }

    /// Which code runs a one-token step without an adapter: this project's
    /// CPU or CUDA kernels (on CUDA, replayed as a graph or launched one by
    /// one), or candle's tensor ops.
    pub fn decode_path(&self) -> &'static str {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            return if g.graphs() {
                "CUDA kernels, replayed as a graph"
            } else {
                "CUDA kernels"
            };
        }
        if self.host.is_some() {
            "CPU kernels"
        } else {
            "tensor ops"
        }
    }

    /// [`Phi::forward`] through candle's tensor ops: every device, batches,
    /// with or without a cache; the reference the CPU pass and the CUDA
    /// decode step are tested against. On a GPU with the prompt kernels
    /// on, one sequence's attention runs on them instead (see crate::gpu;
    /// its tests turn them off for the reference).
    pub(crate) fn run_tensors(
        &self,
        tokens: &Tensor,
        mut cache: Option<&mut KvCache>,
        logits: Logits,
        lora: Option<&LoraAdapter>,
    ) -> Result<Tensor> {
        let (b, seq) = tokens.dims2()?;
        let offset = cache.as_ref().map_or(0, |c| c.len());
        // Built on first use: the prompt kernels need none.
        let mask = std::cell::OnceCell::new();
        let cos = self.cos.narrow(0, offset, seq)?;
        let sin = self.sin.narrow(0, offset, seq)?;
        let dev = &self.device;
        let mut x = phase(dev, "prompt: embedding", || {
            self.embed.forward_prompt(tokens, &self.device)
        })?;
        let no_lora = LoraLayer::default();
        for (i, block) in self.blocks.iter().enumerate() {
            let l = lora.map_or(&no_lora, |a| &a.layers[i]);
            let h = phase(dev, "prompt: layer norm", || Ok(block.norm.forward(&x)?))?;
            let attn = self.attention(block, &h, l, cache.as_deref_mut(), i, &mask, &cos, &sin)?;
            let mlp = phase(dev, "prompt: fc1 + fc2", || self.mlp(block, &h, l))?;
            x = phase(dev, "prompt: residual", || Ok(((attn + mlp)? + &x)?))?;
        }
        if let Some(c) = cache {
            c.advance(seq);
        }
        let x = match logits {
            Logits::All => x,
            Logits::Last => x
                .i((.., seq - 1, ..))?
                .reshape((b, 1, self.cfg.hidden_size))?,
        };
        let out = phase(dev, "prompt: head", || {
            let x = self.final_norm.forward(&x)?;
            self.lm_head.forward(&x, &[])
        })?;
        Ok(match logits {
            Logits::All => out,
            Logits::Last => out.squeeze(1)?,
        })
    }

    fn mlp(&self, block: &Block, h: &Tensor, l: &LoraLayer) -> Result<Tensor> {
        let act = block.fc1.forward_gelu(h, &slots(l, &[LoraTarget::Fc1]))?;
        block.fc2.forward(&act, &slots(l, &[LoraTarget::Fc2]))
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        block: &Block,
        h: &Tensor,
        l: &LoraLayer,
        cache: Option<&mut KvCache>,
        layer: usize,
        mask: &std::cell::OnceCell<Tensor>,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Tensor> {
        let (b, seq, hidden) = h.dims3()?;
        let heads = self.cfg.num_attention_heads;
        let hd = self.cfg.head_dim();
        let dev = &self.device;
        let qkv = phase(dev, "prompt: qkv", || {
            block
                .qkv
                .forward(h, &slots(l, &[LoraTarget::Q, LoraTarget::K, LoraTarget::V]))
        })?;
        #[allow(unused_mut)] // reborrowed only in a CUDA build
        let mut cache = cache;
        #[cfg(feature = "cuda")]
        if let (Some(g), Some(c), 1) = (&self.gpu, cache.as_deref_mut(), b)
            && g.prompt_kernels()
        {
            let y = phase(dev, "prompt: attention kernels", || {
                g.prompt_attention(self, &qkv.reshape((seq, 3 * hidden))?, c, layer)
            })?;
            if let Some(y) = y {
                let y = y.reshape((b, seq, hidden))?;
                return phase(dev, "prompt: dense", || {
                    block.dense.forward(&y, &slots(l, &[LoraTarget::Dense]))
                });
            }
        }
        let (q, k, v) = phase(dev, "prompt: rotary", || {
            let qkv = qkv.reshape((b, seq, 3, heads, hd))?;
            let q = qkv.i((.., .., 0))?.transpose(1, 2)?;
            let k = qkv.i((.., .., 1))?.transpose(1, 2)?;
            let v = qkv.i((.., .., 2))?.transpose(1, 2)?.contiguous()?;
            Ok((self.rope(&q, cos, sin)?, self.rope(&k, cos, sin)?, v))
        })?;
        let (k, v) = phase(dev, "prompt: cache append", || {
            Ok(match cache {
                // On CUDA an f32 model's cache is f16 (half the bytes a decode
                // step reads), shared with the decode kernels (see crate::gpu).
                Some(c) if k.device().is_cuda() && k.dtype() == DType::F32 => {
                    let dt = k.dtype();
                    let (k, v) =
                        c.append(layer, &k.to_dtype(DType::F16)?, &v.to_dtype(DType::F16)?)?;
                    (k.to_dtype(dt)?, v.to_dtype(dt)?)
                }
                Some(c) => c.append(layer, &k, &v)?,
                None => (k, v),
            })
        })?;
        let y = phase(dev, "prompt: attention", || {
            let scale = 1.0 / (hd as f64).sqrt();
            let scores = (q.matmul(&k.t()?)? * scale)?;
            let scores = if seq > 1 {
                let offset = k.dim(2)? - seq;
                let m = match mask.get() {
                    Some(m) => m,
                    None => {
                        let m = causal_mask(seq, offset, dev)?;
                        mask.get_or_init(|| m)
                    }
                };
                scores.broadcast_add(m)?
            } else {
                scores
            };
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let y = probs.matmul(&v)?;
            Ok(y.transpose(1, 2)?.reshape((b, seq, hidden))?)
        })?;
        phase(dev, "prompt: dense", || {
            block.dense.forward(&y, &slots(l, &[LoraTarget::Dense]))
        })
    }

    /// The rotation that moves cached keys (rotated for their old positions)
    /// `delta` positions along: the rotary part turns by `delta`·θ, the rest
    /// of the keys and all values need nothing. Rotations compose additively,
    /// so this equals rotating the keys afresh at the new positions (up to
    /// rounding).
    pub(crate) fn key_rotation(&self, delta: i64) -> crate::cache::KeyRotation {
        let rd = self.cfg.rotary_dim();
        // Angles in f64: Δ·θ for Δ near 2048 loses digits in f32.
        let (cos, sin) = (0..rd)
            .step_by(2)
            .map(|i| {
                let inv = 1.0 / self.cfg.rope_theta.powf(i as f64 / rd as f64);
                let a = delta as f64 * inv;
                (a.cos() as f32, a.sin() as f32)
            })
            .unzip();
        crate::cache::KeyRotation { cos, sin }
    }

    /// Rotates the first `rotary_dim` dimensions of each head (GPT-NeoX style).
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let rd = self.cfg.rotary_dim();
        let hd = self.cfg.head_dim();
        let rot = x.narrow(D::Minus1, 0, rd)?.contiguous()?;
        let rot = candle_nn::rotary_emb::rope(&rot, cos, sin)?;
        if rd == hd {
            return Ok(rot);
        }
        let pass = x.narrow(D::Minus1, rd, hd - rd)?;
        Ok(Tensor::cat(&[&rot, &pass], D::Minus1)?.contiguous()?)
    }
}

/// The adapter slots of `targets` present in layer `l`.
pub(crate) fn slots<'a>(l: &'a LoraLayer, targets: &[LoraTarget]) -> Vec<&'a crate::LoraSlot> {
    targets.iter().filter_map(|t| l.slot(*t)).collect()
}

/// `[seq, offset + seq]`: 0 where query i (at position offset + i) may see key
/// j, -inf where j is in its future.
fn causal_mask(seq: usize, offset: usize, device: &Device) -> Result<Tensor> {
    let total = offset + seq;
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j > offset + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (seq, total), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_sees_the_whole_cached_prefix() {
        let m: Vec<Vec<f32>> = causal_mask(2, 3, &Device::Cpu).unwrap().to_vec2().unwrap();
        let inf = f32::NEG_INFINITY;
        assert_eq!(
            m,
            vec![vec![0.0, 0.0, 0.0, 0.0, inf], vec![0.0, 0.0, 0.0, 0.0, 0.0]]
        );
    }

    /// Dense and quantized tables return the rows asked for and refuse an
    /// id past their end by name, on the prompt path and the decode path.
    #[test]
    fn an_id_past_the_table_is_refused() {
        let (rows, width) = (40, 256);
        let values: Vec<f32> = (0..rows * width).map(|i| (i % 97) as f32 / 97.0).collect();
        let table = Tensor::from_vec(values, (rows, width), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&table, GgmlDType::Q8_0).unwrap();
        let raw = crate::cpu::Bytes::Owned(std::sync::Arc::new(q.data().unwrap().into_owned()));
        for embed in [
            Embedding::Dense(table.clone()),
            Embedding::quantized(raw, GgmlDType::Q8_0, rows, width),
        ] {
            let ids = Tensor::new(&[[0u32, 39, 5]], &Device::Cpu).unwrap();
            let got = embed.forward_prompt(&ids, &Device::Cpu).unwrap();
            assert_eq!(got.dims(), [1, 3, width]);
            let row: Vec<f32> = got.get(0).unwrap().get(1).unwrap().to_vec1().unwrap();
            let want: Vec<f32> = table.get(39).unwrap().to_vec1().unwrap();
            let off = row
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(off < 1e-2, "row 39 off by {off}");
            let past = Tensor::new(&[[3u32, 40]], &Device::Cpu).unwrap();
            let err = embed
                .forward_prompt(&past, &Device::Cpu)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("token id 40 is outside the vocabulary of 40"),
                "{err}"
            );
            let err = embed.rows(&[41]).unwrap_err().to_string();
            assert!(err.contains("token id 41"), "{err}");
        }
    }
}
