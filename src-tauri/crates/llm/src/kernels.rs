//! The training passes' row-wise steps: a causal softmax, its backward pass
//! and LoRA dropout. On CUDA each is one fused kernel (kernels/train.cu); on
//! other devices the same maths from candle's ops. Built from candle's ops on
//! a GPU, the causal mask alone (a broadcast add over every score) took as
//! long as the attention matmuls, and dropout a tenth of a step.
//!
//! Dropout masks depend only on the shape, the probability and the seed, so
//! the backward pass applies the forward pass's mask to the gradient without
//! keeping it. CUDA and the CPU hash differently: a mask is the same on
//! replay on one kind of device, not across kinds.

use candle_core::{D, DType, Tensor};

use crate::Result;
use crate::lora::dropout_mask;

/// Softmax over the last dimension of attention scores `[.., seq, seq]`
/// (queries from position 0) with the causal mask applied: query `i` sees
/// keys `0..=i`, later keys get probability 0.
pub(crate) fn causal_softmax(scores: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if scores.device().is_cuda() {
        return Ok(scores.apply_op1_no_bwd(&cuda::CausalSoftmax)?);
    }
    let seq = scores.dim(D::Minus1)?;
    let masked = scores.broadcast_add(&causal_mask(seq, scores)?)?;
    Ok(candle_nn::ops::softmax_last_dim(&masked)?)
}

/// The gradient of softmax's input, from its output `p` and the gradient
/// `g` of that output: `p · (g − Σ g·p)` along the last dimension.
pub(crate) fn softmax_backward(p: &Tensor, g: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if p.device().is_cuda() {
        return Ok(p.apply_op2_no_bwd(g, &cuda::SoftmaxBackward)?);
    }
    let row = (g * p)?.sum_keepdim(D::Minus1)?;
    Ok((g.broadcast_sub(&row)? * p)?)
}

/// `x` with elements zeroed with probability `p` and the rest scaled by
/// `1 / (1 − p)`, the mask chosen by `seed`.
pub(crate) fn dropout(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return Ok(x.apply_op1_no_bwd(&cuda::Dropout { p, seed })?);
    }
    let mask = dropout_mask(x.shape(), p, seed, x.device())?.to_dtype(x.dtype())?;
    Ok((x * mask)?)
}

/// `y + b` for `y` `[rows, cols]` and a bias `b` `[cols]` (candle's
/// broadcast add takes its slow strided path for this).
pub(crate) fn bias_add(y: &Tensor, b: &Tensor) -> Result<Tensor> {
    let b = b.to_dtype(y.dtype())?;
    #[cfg(feature = "cuda")]
    if y.device().is_cuda() {
        return Ok(y.apply_op2_no_bwd(&b, &cuda::BiasAdd)?);
    }
    Ok(y.broadcast_add(&b)?)
}

/// `g · gelu'(u)` for the tanh approximation of GELU (Phi-2's `gelu_new`).
pub(crate) fn gelu_backward(u: &Tensor, g: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if u.device().is_cuda() {
        return Ok(u.apply_op2_no_bwd(g, &cuda::GeluBackward)?);
    }
    const C: f64 = 0.797_884_560_802_865_4; // √(2/π)
    const K: f64 = 0.044_715;
    let u2 = u.sqr()?;
    let t = (u * (u2.affine(K, 1.0)? * C)?)?.tanh()?;
    let left = t.affine(0.5, 0.5)?;
    let right = (((u * 0.5)? * t.sqr()?.affine(-1.0, 1.0)?)? * u2.affine(3.0 * K * C, C)?)?;
    Ok((g * (left + right)?)?)
}

/// Layer norm's input gradient for `x` `[rows, h]`, weight `weight` and
/// output gradient `g`, the statistics recomputed in f32.
pub(crate) fn layer_norm_backward(
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
    g: &Tensor,
) -> Result<Tensor> {
    let dt = g.dtype();
    let w = weight.to_dtype(DType::F32)?;
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return Ok(x.apply_op3_no_bwd(g, &w, &cuda::LayerNormBackward { eps: eps as f32 })?);
    }
    let x = x.to_dtype(DType::F32)?;
    let h = x.dim(D::Minus1)? as f64;
    let mean = (x.sum_keepdim(D::Minus1)? / h)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = (xc.sqr()?.sum_keepdim(D::Minus1)? / h)?;
    let rstd = (var + eps)?.sqrt()?.recip()?;
    let xhat = xc.broadcast_mul(&rstd)?;
    let gxhat = g.to_dtype(DType::F32)?.broadcast_mul(&w)?;
    let m1 = (gxhat.sum_keepdim(D::Minus1)? / h)?;
    let m2 = ((&gxhat * &xhat)?.sum_keepdim(D::Minus1)? / h)?;
    let gx = gxhat
        .broadcast_sub(&m1)?
        .sub(&xhat.broadcast_mul(&m2)?)?
        .broadcast_mul(&rstd)?;
    Ok(gx.to_dtype(dt)?)
}

/// The shape of a fused projection for [`qkv_rope`].
#[cfg(feature = "cuda")]
#[derive(Debug, Clone, Copy)]
pub(crate) struct QkvShape {
    pub(crate) batch: usize,
    pub(crate) seq: usize,
    pub(crate) heads: usize,
    pub(crate) head_dim: usize,
    pub(crate) rotary_dim: usize,
    /// Applied to q (attention's 1/√head_dim).
    pub(crate) scale: f32,
}

/// CUDA only. Forward: `qkv` `[b·seq, 3·hidden]` → `[3, b, heads, seq,
/// head_dim]` (q rotated and scaled, k rotated, v). Inverse: the gradients
/// in that layout → the gradient of `qkv`, `[b·seq, 3·hidden]`. `cos`/`sin`
/// are `[≥ seq, rotary_dim / 2]`.
#[cfg(feature = "cuda")]
pub(crate) fn qkv_rope(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    shape: QkvShape,
    inverse: bool,
) -> Result<Tensor> {
    let QkvShape {
        batch,
        seq,
        heads,
        head_dim,
        ..
    } = shape;
    let cos = cos.narrow(0, 0, seq)?.to_dtype(DType::F32)?.contiguous()?;
    let sin = sin.narrow(0, 0, seq)?.to_dtype(DType::F32)?.contiguous()?;
    let out = x.apply_op3_no_bwd(&cos, &sin, &cuda::QkvRope { shape, inverse })?;
    Ok(if inverse {
        out.reshape((batch * seq, 3 * heads * head_dim))?
    } else {
        out.reshape((3, batch, heads, seq, head_dim))?
    })
}

/// `[seq, seq]` in `like`'s dtype on its device: 0 where query `i` may see
/// key `j` (`j ≤ i`), −∞ elsewhere.
fn causal_mask(seq: usize, like: &Tensor) -> Result<Tensor> {
    let dev = like.device();
    let i = Tensor::arange(0u32, seq as u32, dev)?;
    let future = i.unsqueeze(0)?.broadcast_gt(&i.unsqueeze(1)?)?;
    let neg = Tensor::new(f32::NEG_INFINITY, dev)?
        .to_dtype(like.dtype())?
        .broadcast_as((seq, seq))?;
    let zero = Tensor::zeros((seq, seq), like.dtype(), dev)?;
    Ok(future.where_cond(&neg, &zero)?)
}

#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CpuStorage, CudaDevice, CudaStorage, DType, Layout, Shape, bail};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/train.ptx"));
    const MODULE: &str = "dramatis_train";
    const THREADS: u32 = 256;

    fn suffix(dt: DType) -> candle_core::Result<&'static str> {
        match dt {
            DType::F32 => Ok("f32"),
            DType::BF16 => Ok("bf16"),
            other => bail!("the training kernels take f32 or bf16, not {other:?}"),
        }
    }

    /// The contiguous part of `s` that `l` covers.
    fn contiguous<'a, T: CudaDType + DeviceRepr>(
        s: &'a CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
        let (a, b) = l.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("the training kernels need contiguous inputs".into())
        })?;
        Ok(s.as_cuda_slice::<T>()?.slice(a..b))
    }

    fn rows(l: &Layout) -> (usize, usize) {
        let n = l.shape().elem_count();
        let cols = l.dims().last().copied().unwrap_or(1).max(1);
        (n / cols, cols)
    }

    fn cfg(blocks: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn wrap<T: CudaDType>(out: CudaSlice<T>, dev: &CudaDevice) -> CudaStorage {
        CudaStorage::wrap_cuda_slice(out, dev.clone())
    }

    pub(super) struct CausalSoftmax;

    impl candle_core::CustomOp1 for CausalSoftmax {
        fn name(&self) -> &'static str {
            "causal-softmax"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            bail!("causal-softmax runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            s: &CudaStorage,
            l: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            fn run<T: CudaDType + DeviceRepr>(
                s: &CudaStorage,
                l: &Layout,
                name: &str,
            ) -> candle_core::Result<CudaStorage> {
                let dev = s.device();
                let src = contiguous::<T>(s, l)?;
                let (rows, seq) = rows(l);
                let out = unsafe { dev.alloc::<T>(rows * seq)? };
                let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
                let mut b = func.builder();
                b.arg(&src);
                b.arg(&out);
                let seq = seq as i32;
                b.arg(&seq);
                // SAFETY: the kernel reads `rows · seq` inputs and writes as many outputs.
                unsafe { b.launch(cfg(rows)) }.w()?;
                Ok(wrap(out, dev))
            }
            let name = format!("causal_softmax_{}", suffix(s.dtype())?);
            let out = match s.dtype() {
                DType::F32 => run::<f32>(s, l, &name)?,
                _ => run::<half::bf16>(s, l, &name)?,
            };
            Ok((out, l.shape().clone()))
        }
    }

    pub(super) struct SoftmaxBackward;

    impl candle_core::CustomOp2 for SoftmaxBackward {
        fn name(&self) -> &'static str {
            "softmax-backward"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            bail!("softmax-backward runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            p: &CudaStorage,
            lp: &Layout,
            g: &CudaStorage,
            lg: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            fn run<T: CudaDType + DeviceRepr>(
                p: &CudaStorage,
                lp: &Layout,
                g: &CudaStorage,
                lg: &Layout,
                name: &str,
            ) -> candle_core::Result<CudaStorage> {
                let dev = p.device();
                let (sp, sg) = (contiguous::<T>(p, lp)?, contiguous::<T>(g, lg)?);
                let (rows, n) = rows(lp);
                let out = unsafe { dev.alloc::<T>(rows * n)? };
                let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
                let mut b = func.builder();
                b.arg(&sp);
                b.arg(&sg);
                b.arg(&out);
                let n = n as i32;
                b.arg(&n);
                // SAFETY: both inputs hold `rows · n` elements, as does the output.
                unsafe { b.launch(cfg(rows)) }.w()?;
                Ok(wrap(out, dev))
            }
            if lp.shape() != lg.shape() || p.dtype() != g.dtype() {
                bail!("softmax-backward: the output and its gradient differ in shape or dtype");
            }
            let name = format!("softmax_backward_{}", suffix(p.dtype())?);
            let out = match p.dtype() {
                DType::F32 => run::<f32>(p, lp, g, lg, &name)?,
                _ => run::<half::bf16>(p, lp, g, lg, &name)?,
            };
            Ok((out, lp.shape().clone()))
        }
    }

    fn ensure(same: bool, what: &str) -> candle_core::Result<()> {
        if same {
            Ok(())
        } else {
            bail!("{what}: the inputs differ in shape or dtype")
        }
    }

    /// Elementwise kernels run a grid-stride loop over `n` elements.
    fn elementwise_cfg(n: usize) -> LaunchConfig {
        cfg(n.div_ceil(THREADS as usize).clamp(1, 65_535))
    }

    pub(super) struct BiasAdd;

    impl candle_core::CustomOp2 for BiasAdd {
        fn name(&self) -> &'static str {
            "bias-add"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            bail!("bias-add runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            y: &CudaStorage,
            ly: &Layout,
            b: &CudaStorage,
            lb: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            fn run<T: CudaDType + DeviceRepr>(
                y: &CudaStorage,
                ly: &Layout,
                b: &CudaStorage,
                lb: &Layout,
                name: &str,
            ) -> candle_core::Result<CudaStorage> {
                let dev = y.device();
                let (sy, sb) = (contiguous::<T>(y, ly)?, contiguous::<T>(b, lb)?);
                let (rows, cols) = rows(ly);
                let out = unsafe { dev.alloc::<T>(rows * cols)? };
                let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
                let mut bld = func.builder();
                bld.arg(&sy);
                bld.arg(&sb);
                bld.arg(&out);
                let (r, c) = (rows as i32, cols as i32);
                bld.arg(&r);
                bld.arg(&c);
                let launch = LaunchConfig {
                    grid_dim: (
                        cols.div_ceil(THREADS as usize).min(65_535) as u32,
                        rows.clamp(1, 65_535) as u32,
                        1,
                    ),
                    block_dim: (THREADS, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: y and the output hold `rows · cols` elements, b `cols`.
                unsafe { bld.launch(launch) }.w()?;
                Ok(wrap(out, dev))
            }
            let (r, c) = rows(ly);
            ensure(
                lb.shape().elem_count() == c
                    && y.dtype() == b.dtype()
                    && r < i32::MAX as usize
                    && c < i32::MAX as usize,
                "bias-add",
            )?;
            let name = format!("bias_add_{}", suffix(y.dtype())?);
            let out = match y.dtype() {
                DType::F32 => run::<f32>(y, ly, b, lb, &name)?,
                _ => run::<half::bf16>(y, ly, b, lb, &name)?,
            };
            Ok((out, ly.shape().clone()))
        }
    }

    pub(super) struct GeluBackward;

    impl candle_core::CustomOp2 for GeluBackward {
        fn name(&self) -> &'static str {
            "gelu-backward"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            bail!("gelu-backward runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            u: &CudaStorage,
            lu: &Layout,
            g: &CudaStorage,
            lg: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            fn run<T: CudaDType + DeviceRepr>(
                u: &CudaStorage,
                lu: &Layout,
                g: &CudaStorage,
                lg: &Layout,
                name: &str,
            ) -> candle_core::Result<CudaStorage> {
                let dev = u.device();
                let (su, sg) = (contiguous::<T>(u, lu)?, contiguous::<T>(g, lg)?);
                let n = lu.shape().elem_count();
                let out = unsafe { dev.alloc::<T>(n)? };
                let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
                let mut b = func.builder();
                b.arg(&su);
                b.arg(&sg);
                b.arg(&out);
                let n64 = n as u64;
                b.arg(&n64);
                // SAFETY: all three hold `n` elements.
                unsafe { b.launch(elementwise_cfg(n)) }.w()?;
                Ok(wrap(out, dev))
            }
            ensure(
                lu.shape() == lg.shape() && u.dtype() == g.dtype(),
                "gelu-backward",
            )?;
            let name = format!("gelu_backward_{}", suffix(u.dtype())?);
            let out = match u.dtype() {
                DType::F32 => run::<f32>(u, lu, g, lg, &name)?,
                _ => run::<half::bf16>(u, lu, g, lg, &name)?,
            };
            Ok((out, lu.shape().clone()))
        }
    }

    pub(super) struct LayerNormBackward {
        pub(super) eps: f32,
    }

    impl candle_core::CustomOp3 for LayerNormBackward {
        fn name(&self) -> &'static str {
            "layer-norm-backward"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            bail!("layer-norm-backward runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            lx: &Layout,
            g: &CudaStorage,
            lg: &Layout,
            w: &CudaStorage,
            lw: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            fn run<T: CudaDType + DeviceRepr>(
                x: &CudaStorage,
                lx: &Layout,
                g: &CudaStorage,
                lg: &Layout,
                w: &CudaStorage,
                lw: &Layout,
                name: &str,
                eps: f32,
            ) -> candle_core::Result<CudaStorage> {
                let dev = x.device();
                let (sx, sg) = (contiguous::<T>(x, lx)?, contiguous::<T>(g, lg)?);
                let sw = contiguous::<f32>(w, lw)?;
                let (rows, h) = rows(lx);
                let out = unsafe { dev.alloc::<T>(rows * h)? };
                let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
                let mut b = func.builder();
                b.arg(&sx);
                b.arg(&sg);
                b.arg(&sw);
                b.arg(&out);
                let h32 = h as i32;
                b.arg(&h32);
                b.arg(&eps);
                // SAFETY: x, g and the output hold `rows · h` elements, w `h`.
                unsafe { b.launch(cfg(rows)) }.w()?;
                Ok(wrap(out, dev))
            }
            ensure(
                lx.shape() == lg.shape()
                    && x.dtype() == g.dtype()
                    && w.dtype() == DType::F32
                    && lw.shape().elem_count() == rows(lx).1,
                "layer-norm-backward",
            )?;
            let name = format!("layer_norm_backward_{}", suffix(x.dtype())?);
            let out = match x.dtype() {
                DType::F32 => run::<f32>(x, lx, g, lg, w, lw, &name, self.eps)?,
                _ => run::<half::bf16>(x, lx, g, lg, w, lw, &name, self.eps)?,
            };
            Ok((out, lx.shape().clone()))
        }
    }

    pub(super) struct QkvRope {
        pub(super) shape: super::QkvShape,
        pub(super) inverse: bool,
    }

    impl candle_core::CustomOp3 for QkvRope {
        fn name(&self) -> &'static str {
            "qkv-rope"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            bail!("qkv-rope runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            lx: &Layout,
            cos: &CudaStorage,
            lc: &Layout,
            sin: &CudaStorage,
            ls: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            fn run<T: CudaDType + DeviceRepr>(
                op: &QkvRope,
                x: &CudaStorage,
                lx: &Layout,
                cos: &CudaStorage,
                lc: &Layout,
                sin: &CudaStorage,
                ls: &Layout,
                name: &str,
            ) -> candle_core::Result<CudaStorage> {
                let dev = x.device();
                let sx = contiguous::<T>(x, lx)?;
                let (sc, ss) = (contiguous::<f32>(cos, lc)?, contiguous::<f32>(sin, ls)?);
                let n = lx.shape().elem_count();
                let out = unsafe { dev.alloc::<T>(n)? };
                let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
                let s = op.shape;
                let ints = [s.batch, s.seq, s.heads, s.head_dim, s.rotary_dim].map(|v| v as i32);
                let inverse = i32::from(op.inverse);
                let mut b = func.builder();
                b.arg(&sx);
                b.arg(&out);
                b.arg(&sc);
                b.arg(&ss);
                for v in &ints {
                    b.arg(v);
                }
                b.arg(&s.scale);
                b.arg(&inverse);
                let vectors = n / s.head_dim;
                let launch = LaunchConfig {
                    grid_dim: (vectors.div_ceil(8).clamp(1, 65_535) as u32, 1, 1),
                    block_dim: (32, 8, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: input and output hold 3 · b · seq · heads · head_dim
                // elements (checked below), cos and sin seq · rotary_dim / 2.
                unsafe { b.launch(launch) }.w()?;
                Ok(wrap(out, dev))
            }
            let s = self.shape;
            ensure(
                lx.shape().elem_count() == 3 * s.batch * s.seq * s.heads * s.head_dim
                    && 3 * s.batch * s.seq * s.heads < i32::MAX as usize
                    && lc.shape().elem_count() == s.seq * s.rotary_dim / 2
                    && ls.shape() == lc.shape()
                    && cos.dtype() == DType::F32
                    && sin.dtype() == DType::F32,
                "qkv-rope",
            )?;
            let name = format!("qkv_rope_{}", suffix(x.dtype())?);
            let out = match x.dtype() {
                DType::F32 => run::<f32>(self, x, lx, cos, lc, sin, ls, &name)?,
                _ => run::<half::bf16>(self, x, lx, cos, lc, sin, ls, &name)?,
            };
            Ok((out, lx.shape().clone()))
        }
    }

    pub(super) struct Dropout {
        pub(super) p: f32,
        pub(super) seed: u64,
    }

    impl candle_core::CustomOp1 for Dropout {
        fn name(&self) -> &'static str {
            "lora-dropout"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            bail!("lora-dropout runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            s: &CudaStorage,
            l: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            fn run<T: CudaDType + DeviceRepr>(
                s: &CudaStorage,
                l: &Layout,
                name: &str,
                p: f32,
                seed: u64,
            ) -> candle_core::Result<CudaStorage> {
                let dev = s.device();
                let src = contiguous::<T>(s, l)?;
                let n = l.shape().elem_count();
                let out = unsafe { dev.alloc::<T>(n)? };
                let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
                let mut b = func.builder();
                b.arg(&src);
                b.arg(&out);
                let n64 = n as u64;
                b.arg(&n64);
                b.arg(&seed);
                b.arg(&p);
                let blocks = n.div_ceil(THREADS as usize).clamp(1, 65_535);
                // SAFETY: the kernel's grid-stride loop stays below `n`.
                unsafe { b.launch(cfg(blocks)) }.w()?;
                Ok(wrap(out, dev))
            }
            let name = format!("dropout_{}", suffix(s.dtype())?);
            let out = match s.dtype() {
                DType::F32 => run::<f32>(s, l, &name, self.p, self.seed)?,
                _ => run::<half::bf16>(s, l, &name, self.p, self.seed)?,
            };
            Ok((out, l.shape().clone()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn mask_hides_the_future_only() {
        let like = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
        let m: Vec<Vec<f32>> = causal_mask(3, &like).unwrap().to_vec2().unwrap();
        let inf = f32::NEG_INFINITY;
        assert_eq!(
            m,
            vec![
                vec![0.0, inf, inf],
                vec![0.0, 0.0, inf],
                vec![0.0, 0.0, 0.0]
            ]
        );
    }
}
