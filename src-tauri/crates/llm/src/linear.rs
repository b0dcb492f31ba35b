use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Module, Tensor};

use crate::Result;
use crate::lora::LoraSlot;

/// A frozen linear layer `y = x Wᵀ + b` whose weight is dense or quantized;
/// LoRA deltas are added per call, so one base serves every adapter.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: QMatMul,
    bias: Option<Tensor>,
    in_features: usize,
    out_features: usize,
}

impl Linear {
    /// A dense layer from a `[out, in]` weight.
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        Ok(Self {
            weight: QMatMul::Tensor(weight),
            bias,
            in_features,
            out_features,
        })
    }

    /// A layer over a GGUF tensor (quantized, or dense when F32/F16/BF16).
    pub fn quantized(weight: QTensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.shape().dims2()?;
        Ok(Self {
            weight: QMatMul::from_qtensor(weight)?,
            bias,
            in_features,
            out_features,
        })
    }

    /// Input width.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// The quantization of the weight (`None` when dense).
    pub fn quant_type(&self) -> Option<GgmlDType> {
        match &self.weight {
            QMatMul::QTensor(q) => Some(q.dtype()),
            _ => None,
        }
    }

    /// The weight as a dense `[out, in]` tensor (for merging and export).
    pub fn dense_weight(&self) -> Result<Tensor> {
        Ok(match &self.weight {
            QMatMul::QTensor(q) => q.dequantize(&q.device())?,
            QMatMul::Tensor(t) => t.clone(),
            QMatMul::TensorF16(t) => t.to_dtype(candle_core::DType::F32)?,
        })
    }

    /// The weight as a dense `[out, in]` tensor in `dtype`: a quantized one
    /// dequantized for this call (training multiplies by it), a dense one cast
    /// (free when it is already in `dtype`).
    pub(crate) fn weight_as(&self, dtype: DType) -> Result<Tensor> {
        Ok(match &self.weight {
            QMatMul::QTensor(q) => q.dequantize(&q.device())?.to_dtype(dtype)?,
            QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.to_dtype(dtype)?,
        })
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `x Wᵀ + b`, plus each LoRA slot's delta on its slice of the output.
    pub fn forward(&self, x: &Tensor, lora: &[&LoraSlot]) -> Result<Tensor> {
        let y = match &self.weight {
            // Weights kept in bf16/f16 (for training on a GPU) serve f32 inputs too.
            QMatMul::Tensor(w) if w.dtype() != x.dtype() => {
                x.to_dtype(w.dtype())?.broadcast_matmul(&w.t()?)?
            }
            w => w.forward(x)?,
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
            None => y,
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
