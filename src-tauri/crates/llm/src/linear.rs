use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Module, Tensor};

use crate::Result;
use crate::cpu::QMatrix;
use crate::lora::LoraSlot;

/// A frozen linear layer `y = x Wᵀ + b` whose weight is dense or quantized;
/// LoRA deltas are added per call, so one base serves every adapter.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    in_features: usize,
    out_features: usize,
}

/// A weight as candle holds it, for the CUDA decode step.
#[cfg(feature = "cuda")]
pub(crate) enum GpuWeight<'a> {
    Quantized(&'a std::sync::Arc<QTensor>),
    /// `[out, in]`.
    Dense(&'a Tensor),
}

/// A weight on candle's kernels, or quantized blocks on this project's CPU
/// kernels (read where they lie in the mapped model file).
#[derive(Debug, Clone)]
enum Weight {
    Candle(QMatMul),
    /// Our CPU kernels, with the bias as f32 once (the epilogue adds it).
    Cpu(QMatrix, Option<Vec<f32>>),
}

impl Linear {
    /// A dense layer from a `[out, in]` weight.
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        Ok(Self {
            weight: Weight::Candle(QMatMul::Tensor(weight)),
            bias,
            in_features,
            out_features,
        })
    }

    /// A layer over a GGUF tensor (quantized, or dense when F32/F16/BF16).
    pub fn quantized(weight: QTensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.shape().dims2()?;
        Ok(Self {
            weight: Weight::Candle(QMatMul::from_qtensor(weight)?),
            bias,
            in_features,
            out_features,
        })
    }

    /// A layer on the CPU kernels (a `[out, in]` matrix of blocks).
    pub(crate) fn cpu(
        weight: QMatrix,
        out: usize,
        inp: usize,
        bias: Option<Tensor>,
    ) -> Result<Self> {
        let bias_f32 = match &bias {
            Some(b) => Some(b.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?),
            None => None,
        };
        Ok(Self {
            weight: Weight::Cpu(weight, bias_f32),
            bias,
            in_features: inp,
            out_features: out,
        })
    }

    /// The quantized weight as candle's tensor (a copy of the blocks).
    fn qtensor(&self, q: &QMatrix) -> Result<QTensor> {
        Ok(candle_core::quantized::ggml_file::qtensor_from_ggml(
            q.dtype(),
            q.bytes(),
            vec![self.out_features, self.in_features],
            &candle_core::Device::Cpu,
        )?)
    }

    /// Input width.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// The weight as candle holds it (on the GPU, for the decode step's
    /// kernels) and the bias; `None` for the CPU kernels' weights.
    #[cfg(feature = "cuda")]
    pub(crate) fn gpu_weight(&self) -> Option<(GpuWeight<'_>, Option<&Tensor>)> {
        let w = match &self.weight {
            Weight::Candle(QMatMul::QTensor(q)) => GpuWeight::Quantized(q),
            Weight::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => GpuWeight::Dense(t),
            Weight::Cpu(..) => return None,
        };
        Some((w, self.bias.as_ref()))
    }

    /// Whether the weight runs on this project's CPU kernels.
    pub(crate) fn on_cpu_kernels(&self) -> bool {
        matches!(self.weight, Weight::Cpu(..))
    }

    /// The quantization of the weight (`None` when dense).
    pub fn quant_type(&self) -> Option<GgmlDType> {
        match &self.weight {
            Weight::Candle(QMatMul::QTensor(q)) => Some(q.dtype()),
            Weight::Cpu(q, _) => Some(q.dtype()),
            Weight::Candle(_) => None,
        }
    }

    /// The weight as a dense `[out, in]` tensor (for merging and export).
    pub fn dense_weight(&self) -> Result<Tensor> {
        Ok(match &self.weight {
            Weight::Candle(QMatMul::QTensor(q)) => q.dequantize(&q.device())?,
            Weight::Candle(QMatMul::Tensor(t)) => t.clone(),
            Weight::Candle(QMatMul::TensorF16(t)) => t.to_dtype(candle_core::DType::F32)?,
            Weight::Cpu(q, _) => self.qtensor(q)?.dequantize(&candle_core::Device::Cpu)?,
        })
    }

    /// The weight as a dense `[out, in]` tensor in `dtype`: a quantized one
    /// dequantized for this call (training multiplies by it), a dense one cast
    /// (free when it is already in `dtype`). On CUDA a 16-bit `dtype` comes
    /// from candle's f16 dequantization kernel, with no f32 copy on the way
    /// (for Phi-2's output head in bf16: an f16 and a bf16 copy, 524 MB at
    /// once, instead of an f32 and a bf16 one, 786 MB).
    pub(crate) fn weight_as(&self, dtype: DType) -> Result<Tensor> {
        Ok(match &self.weight {
            Weight::Candle(QMatMul::QTensor(q))
                if q.device().is_cuda() && matches!(dtype, DType::F16 | DType::BF16) =>
            {
                q.dequantize_f16(&q.device())?.to_dtype(dtype)?
            }
            Weight::Candle(QMatMul::QTensor(q)) => q.dequantize(&q.device())?.to_dtype(dtype)?,
            Weight::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => t.to_dtype(dtype)?,
            Weight::Cpu(q, _) => self
                .qtensor(q)?
                .dequantize(&candle_core::Device::Cpu)?
                .to_dtype(dtype)?,
        })
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `gelu(x Wᵀ + b)` (the MLP's first half): on the CPU kernels with no
    /// LoRA delta, the bias and GELU are applied as each output is computed.
    pub(crate) fn forward_gelu(&self, x: &Tensor, lora: &[&LoraSlot]) -> Result<Tensor> {
        if let (Weight::Cpu(q, bias), true) = (&self.weight, lora.is_empty()) {
            let epilogue = crate::cpu::Epilogue {
                bias: bias.as_deref(),
                gelu: true,
            };
            return self.cpu_forward(q, x, epilogue);
        }
        Ok(self.forward(x, lora)?.gelu()?)
    }

    fn cpu_forward(&self, q: &QMatrix, x: &Tensor, e: crate::cpu::Epilogue<'_>) -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        let m = x.elem_count() / self.in_features;
        let flat: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        *dims.last_mut().expect("rank >= 1") = self.out_features;
        Ok(Tensor::from_vec(q.matmul_with(&flat, m, e), dims, x.device())?.to_dtype(x.dtype())?)
    }

    /// The CPU forward pass's product: `x Wᵀ + b` for `m` rows of f32, plus
    /// each LoRA slot's delta on its columns, then GELU when `gelu`. On the
    /// CPU kernels with no delta the bias and GELU are applied as outputs are
    /// computed; a weight on candle's kernels runs through them.
    pub(crate) fn host_forward(
        &self,
        simd: crate::cpu::Avx2,
        x: &[f32],
        m: usize,
        lora: &[&LoraSlot],
        gelu: bool,
    ) -> Result<Vec<f32>> {
        let cpu = candle_core::Device::Cpu;
        let as_rows = |x: &[f32]| Tensor::from_slice(x, (m, self.in_features), &cpu);
        let mut y = match &self.weight {
            Weight::Cpu(q, bias) => {
                let fused = gelu && lora.is_empty();
                let epilogue = crate::cpu::Epilogue {
                    bias: bias.as_deref(),
                    gelu: fused,
                };
                let y = q.matmul_with(x, m, epilogue);
                if fused {
                    return Ok(y);
                }
                y
            }
            Weight::Candle(_) => self
                .forward(&as_rows(x)?, &[])?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?,
        };
        if !lora.is_empty() {
            let xs = as_rows(x)?;
            for slot in lora {
                let d: Vec<f32> = slot
                    .delta(&xs)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1()?;
                let w = d.len() / m;
                for (row, delta) in y.chunks_exact_mut(self.out_features).zip(d.chunks_exact(w)) {
                    for (o, v) in row[slot.out_offset..slot.out_offset + w]
                        .iter_mut()
                        .zip(delta)
                    {
                        *o += v;
                    }
                }
            }
        }
        if gelu {
            crate::cpu::pool::chunks(&mut y, 4096, |_, c| simd.gelu(c));
        }
        Ok(y)
    }

    /// `x Wᵀ + b`, plus each LoRA slot's delta on its slice of the output.
    pub fn forward(&self, x: &Tensor, lora: &[&LoraSlot]) -> Result<Tensor> {
        let y = match &self.weight {
            // Weights kept in bf16/f16 (for training on a GPU) serve f32 inputs too.
            Weight::Candle(QMatMul::Tensor(w)) if w.dtype() != x.dtype() => {
                x.to_dtype(w.dtype())?.broadcast_matmul(&w.t()?)?
            }
            Weight::Candle(w) => w.forward(x)?,
            Weight::Cpu(q, bias) => {
                let epilogue = crate::cpu::Epilogue {
                    bias: bias.as_deref(),
                    gelu: false,
                };
                self.cpu_forward(q, x, epilogue)?
            }
        };
        let y = match (&self.bias, &self.weight) {
            (Some(b), Weight::Candle(_)) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
            _ => y,
        };
        let mut y = y.to_dtype(x.dtype())?;
        if lora.is_empty() {
            return Ok(y);
        }
        let last = y.rank() - 1;
        // Deltas that cover the whole output are added directly; slices (q, k, v
        // of a fused projection) are assembled into one tensor first.
        let mut parts: Vec<(usize, Tensor)> = Vec::with_capacity(lora.len());
        for slot in lora {
            let d = slot.delta(x)?;
            if slot.out_offset == 0 && d.dim(last)? == self.out_features {
                y = (y + d)?;
            } else {
                parts.push((slot.out_offset, d));
            }
        }
        if parts.is_empty() {
            return Ok(y);
        }
        parts.sort_by_key(|(o, _)| *o);
        let mut pieces = Vec::with_capacity(parts.len() * 2 + 1);
        let mut at = 0;
        for (offset, d) in parts {
            if offset > at {
                pieces.push(zeros_like_last(&d, offset - at)?);
            }
            at = offset + d.dim(last)?;
            pieces.push(d);
        }
        if at < self.out_features {
            let like = pieces[0].clone();
            pieces.push(zeros_like_last(&like, self.out_features - at)?);
        }
        let delta = Tensor::cat(&pieces, last)?;
        Ok((y + delta)?)
    }
}

fn zeros_like_last(t: &Tensor, width: usize) -> Result<Tensor> {
    let mut dims = t.dims().to_vec();
    *dims.last_mut().expect("rank >= 1") = width;
    Ok(Tensor::zeros(dims, t.dtype(), t.device())?)
}
