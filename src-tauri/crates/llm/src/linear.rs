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
            #[cfg(feature = "cuda")]
            Weight::Candle(QMatMul::QTensor(q)) if prompt_gemm::takes(q, x) => {
                prompt_gemm::product(q, x)?
            }
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

/// Whether candle's CUDA kernels dequantize (and look rows up in) blocks of
/// `dtype`: the block types of GGUF files, not the dense ones or Q8_K.
pub(crate) fn candle_cuda_block_type(dtype: GgmlDType) -> bool {
    use GgmlDType as T;
    matches!(
        dtype,
        T::Q4_0
            | T::Q4_1
            | T::Q5_0
            | T::Q5_1
            | T::Q8_0
            | T::Q2K
            | T::Q3K
            | T::Q4K
            | T::Q5K
            | T::Q6K
    )
}

/// A prompt's product with a quantized weight on CUDA as one tensor-core
/// GEMM: the weight dequantized to f16 for this call (one weight at a time,
/// 52 MB at most for Phi-2's blocks, freed after; the 262 MB output head
/// and anything past [`prompt_gemm::MAX_WEIGHT`] keep candle's kernels),
/// the activations cast to f16 (values past 65,504 would saturate; a
/// layer norm's or GELU's outputs, what these products read, stay far
/// below), and cuBLAS accumulating and writing f32. candle's
/// int8 MMQ kernels run these products at about 200 TFLOP/s on an H100
/// (BENCHMARKS.md); f16 GEMMs run several times that, and dequantizing
/// costs one pass over the weight. Taken for at least [`prompt_gemm::ROWS`]
/// rows, with `DRAMATIS_GPU_PROMPT_GEMM=1` (off until its test has run on
/// a GPU).
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
pub(crate) mod prompt_gemm {
    use std::sync::LazyLock;
    use std::sync::atomic::{AtomicBool, Ordering};

    use candle_core::cuda_backend::CudaStorage;
    use candle_core::cuda_backend::cudarc::cublas::{result::gemm_ex, sys};
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
    use candle_core::op::BackpropOp;
    use candle_core::quantized::QTensor;
    use candle_core::{DType, Device, Storage, Tensor};
    use half::f16;

    use crate::{Error, Result};

    /// Rows from which a product takes the GEMM (fewer: candle's kernels,
    /// whose vector and small-batch paths suit them).
    pub(crate) const ROWS: usize = 64;

    /// The largest weight (elements) dequantized for one product: Phi-2's
    /// fc1 and fc2 (26.2 million) fit, its output head (131 million) not.
    pub(crate) const MAX_WEIGHT: usize = 1 << 25;

    static ON: LazyLock<AtomicBool> = LazyLock::new(|| {
        std::env::var_os("DRAMATIS_GPU_PROMPT_GEMM")
            .is_some_and(|v| v == "1")
            .into()
    });

    /// Turns the path on or off (tests compare both).
    #[cfg(test)]
    pub(crate) fn set(on: bool) {
        ON.store(on, Ordering::Relaxed);
    }

    /// Whether `x` times `q` takes [`product`].
    pub(crate) fn takes(q: &QTensor, x: &Tensor) -> bool {
        let Ok((out, inp)) = q.shape().dims2() else {
            return false;
        };
        ON.load(Ordering::Relaxed)
            && out * inp <= MAX_WEIGHT
            && x.device().is_cuda()
            && q.device().same_device(x.device())
            && x.dtype() == DType::F32
            && inp > 0
            && x.elem_count() / inp >= ROWS
            && super::candle_cuda_block_type(q.dtype())
    }

    /// `x Wᵀ` in f32 (`x` `[.., in]`, `q` `[out, in]` on the same GPU).
    pub(crate) fn product(q: &QTensor, x: &Tensor) -> Result<Tensor> {
        let Device::Cuda(dev) = x.device() else {
            return Err(Error::Invalid("the prompt GEMM runs on CUDA".into()));
        };
        let (out, inp) = q.shape().dims2()?;
        let m = x.elem_count() / inp;
        if *x.dims().last().unwrap_or(&0) != inp || m * inp != x.elem_count() {
            return Err(Error::Invalid(format!(
                "a {:?} input for a [{out}, {inp}] weight",
                x.dims()
            )));
        }
        let too_big = |n: usize| i32::try_from(n).is_err();
        if too_big(out) || too_big(m) || too_big(inp) {
            return Err(Error::Invalid("a product past cuBLAS's sizes".into()));
        }
        let w = q.dequantize_f16(x.device())?;
        let x16 = x.to_dtype(DType::F16)?.contiguous()?;
        let (ws, wl) = w.storage_and_layout();
        let (xs, xl) = x16.storage_and_layout();
        let (Storage::Cuda(ws), Storage::Cuda(xs)) = (&*ws, &*xs) else {
            return Err(Error::Invalid(
                "the prompt GEMM's operands are not on the GPU".into(),
            ));
        };
        let wv = ws.as_cuda_slice::<f16>()?.slice(wl.start_offset()..);
        let xv = xs.as_cuda_slice::<f16>()?.slice(xl.start_offset()..);
        // SAFETY: the GEMM writes every element (beta 0).
        let mut y = unsafe { dev.alloc::<f32>(m * out)? };
        let stream = dev.cuda_stream();
        let blas = dev.cublas_handle();
        let (alpha, beta) = (1f32, 0f32);
        {
            let (wp, _w) = wv.device_ptr(&stream);
            let (xp, _x) = xv.device_ptr(&stream);
            let (yp, _y) = y.device_ptr_mut(&stream);
            // Row-major y[m, out] = x[m, in] · w[out, in]ᵀ is column-major
            // yᵀ = op(w)·x with w read transposed: (out × in)·(in × m).
            // SAFETY: w holds out·in, x m·in and y m·out elements (checked
            // shapes above), all on this device's stream, which cuBLAS's
            // handle is bound to; the guards keep them until after the call.
            unsafe {
                gemm_ex(
                    *blas.handle(),
                    sys::cublasOperation_t::CUBLAS_OP_T,
                    sys::cublasOperation_t::CUBLAS_OP_N,
                    out as i32,
                    m as i32,
                    inp as i32,
                    (&alpha as *const f32).cast(),
                    wp as *const _,
                    sys::cudaDataType_t::CUDA_R_16F,
                    inp as i32,
                    xp as *const _,
                    sys::cudaDataType_t::CUDA_R_16F,
                    inp as i32,
                    (&beta as *const f32).cast(),
                    yp as *mut _,
                    sys::cudaDataType_t::CUDA_R_32F,
                    out as i32,
                    sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
                )
            }
            .map_err(|e| Error::Invalid(format!("cuBLAS: {e:?}")))?;
        }
        let mut dims = x.dims().to_vec();
        *dims.last_mut().expect("checked") = out;
        Ok(Tensor::from_storage(
            Storage::Cuda(CudaStorage::wrap_cuda_slice(y, dev.clone())),
            dims,
            BackpropOp::none(),
            false,
        ))
    }
}
