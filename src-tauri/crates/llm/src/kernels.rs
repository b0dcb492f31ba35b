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
/// `1 / (1 − p)`, the mask chosen by `seed`: element `i` is kept where
/// [`mix`]`(i, seed)` reaches `p · 2³²`, on every device the same mask (the
/// CUDA kernel in kernels/train.cu hashes alike), so a step replays exactly
/// after a resume without any random state to save.
pub(crate) fn dropout(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return Ok(x.apply_op1_no_bwd(&cuda::Dropout { p, seed })?);
    }
    use rayon::prelude::*;
    // One pass on the host's threads (a mask built from candle's ops was
    // ten passes with a sine: the CPU's largest training cost on small models).
    let threshold = (f64::from(p) * 4_294_967_296.0) as u32;
    let scale = 1.0 / (1.0 - p);
    let mut v = x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    const CHUNK: usize = 1 << 14;
    v.par_chunks_mut(CHUNK).enumerate().for_each(|(c, part)| {
        for (j, e) in part.iter_mut().enumerate() {
            let keep = mix((c * CHUNK + j) as u64, seed) >= threshold;
            *e = if keep { *e * scale } else { 0.0 };
        }
    });
    let out = Tensor::from_vec(v, x.shape(), &candle_core::Device::Cpu)?;
    Ok(out.to_dtype(x.dtype())?.to_device(x.device())?)
}

/// The hash behind [`dropout`]'s mask (splitmix64's finalizer over the
/// index and the seed; the high 32 bits), as kernels/train.cu's `mix`.
fn mix(i: u64, seed: u64) -> u32 {
    let mut z = i.wrapping_add(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 32) as u32
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
pub(crate) fn causal_mask(seq: usize, like: &Tensor) -> Result<Tensor> {
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
pub(crate) mod cuda {
    //! Each op: check shapes, pick the kernel for the dtype, launch it on
    //! contiguous views of its inputs. Kernel parameters are always: the
    //! inputs in the op's dtype, then f32 inputs, then the output, then scalars.
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CpuStorage, CudaStorage, DType, Layout, Shape, bail};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/train.ptx"));
    const MODULE: &str = "dramatis_train";
    const THREADS: u32 = 256;

    pub(crate) type Input<'a> = (&'a CudaStorage, &'a Layout);

    enum Scalar {
        I32(i32),
        U64(u64),
        F32(f32),
    }

    pub(crate) fn contiguous<'a, T: CudaDType + DeviceRepr>(
        (s, l): Input<'a>,
    ) -> candle_core::Result<CudaView<'a, T>> {
        let (a, b) = l.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("the training kernels need contiguous inputs".into())
        })?;
        Ok(s.as_cuda_slice::<T>()?.slice(a..b))
    }

    /// `[rows, cols]` of a layout, by its last dimension.
    fn rows(l: &Layout) -> (usize, usize) {
        let n = l.shape().elem_count();
        let cols = l.dims().last().copied().unwrap_or(1).max(1);
        (n / cols, cols)
    }

    /// One block per row.
    fn per_row(rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// A grid-stride loop over `n` elements.
    fn elementwise(n: usize) -> LaunchConfig {
        per_row(n.div_ceil(THREADS as usize).clamp(1, 65_535))
    }

    fn ensure(ok: bool, what: &str) -> candle_core::Result<()> {
        if ok {
            Ok(())
        } else {
            bail!("{what}: the inputs differ in shape or dtype")
        }
    }

    fn launch_as<T: CudaDType + DeviceRepr>(
        name: &str,
        inputs: &[Input<'_>],
        f32_inputs: &[Input<'_>],
        out_len: usize,
        scalars: &[Scalar],
        cfg: LaunchConfig,
    ) -> candle_core::Result<CudaStorage> {
        let dev = inputs[0].0.device();
        let views = inputs
            .iter()
            .map(|&i| contiguous::<T>(i))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let f32_views = f32_inputs
            .iter()
            .map(|&i| contiguous::<f32>(i))
            .collect::<candle_core::Result<Vec<_>>>()?;
        // SAFETY: the kernel writes every element of the output.
        let out = unsafe { dev.alloc::<T>(out_len)? };
        let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
        let mut b = func.builder();
        for v in &views {
            b.arg(v);
        }
        for v in &f32_views {
            b.arg(v);
        }
        b.arg(&out);
        for s in scalars {
            match s {
                Scalar::I32(v) => b.arg(v),
                Scalar::U64(v) => b.arg(v),
                Scalar::F32(v) => b.arg(v),
            };
        }
        // SAFETY: each op checks its inputs' sizes against the scalars that
        // bound the kernel's indexing before calling this.
        unsafe { b.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }

    /// Launches `kernel` for the dtype of the first input (f32 or bf16).
    fn launch(
        kernel: &str,
        inputs: &[Input<'_>],
        f32_inputs: &[Input<'_>],
        out_len: usize,
        scalars: &[Scalar],
        cfg: LaunchConfig,
    ) -> candle_core::Result<CudaStorage> {
        let dt = inputs[0].0.dtype();
        ensure(inputs.iter().all(|i| i.0.dtype() == dt), kernel)?;
        ensure(f32_inputs.iter().all(|i| i.0.dtype() == DType::F32), kernel)?;
        match dt {
            DType::F32 => launch_as::<f32>(
                &format!("{kernel}_f32"),
                inputs,
                f32_inputs,
                out_len,
                scalars,
                cfg,
            ),
            DType::BF16 => launch_as::<half::bf16>(
                &format!("{kernel}_bf16"),
                inputs,
                f32_inputs,
                out_len,
                scalars,
                cfg,
            ),
            other => bail!("{kernel}: the training kernels take f32 or bf16, not {other:?}"),
        }
    }

    /// The CPU side of a CUDA-only op (callers dispatch on the device).
    macro_rules! cuda_only {
        ($name:literal, $($arg:ident),+) => {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(&self, $($arg: &CpuStorage, _: &Layout),+) -> candle_core::Result<(CpuStorage, Shape)> {
                let _ = ($($arg),+);
                bail!("{} runs on CUDA only", $name)
            }
        };
    }

    pub(super) struct CausalSoftmax;

    impl candle_core::CustomOp1 for CausalSoftmax {
        cuda_only!("causal-softmax", s1);

        fn cuda_fwd(
            &self,
            s: &CudaStorage,
            l: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let (rows, seq) = rows(l);
            let scalars = [Scalar::I32(seq as i32)];
            let out = launch(
                "causal_softmax",
                &[(s, l)],
                &[],
                rows * seq,
                &scalars,
                per_row(rows),
            )?;
            Ok((out, l.shape().clone()))
        }
    }

    pub(super) struct SoftmaxBackward;

    impl candle_core::CustomOp2 for SoftmaxBackward {
        cuda_only!("softmax-backward", s1, s2);

        fn cuda_fwd(
            &self,
            p: &CudaStorage,
            lp: &Layout,
            g: &CudaStorage,
            lg: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            ensure(lp.shape() == lg.shape(), "softmax-backward")?;
            let (rows, n) = rows(lp);
            let scalars = [Scalar::I32(n as i32)];
            let out = launch(
                "softmax_backward",
                &[(p, lp), (g, lg)],
                &[],
                rows * n,
                &scalars,
                per_row(rows),
            )?;
            Ok((out, lp.shape().clone()))
        }
    }

    pub(super) struct BiasAdd;

    impl candle_core::CustomOp2 for BiasAdd {
        cuda_only!("bias-add", s1, s2);

        fn cuda_fwd(
            &self,
            y: &CudaStorage,
            ly: &Layout,
            b: &CudaStorage,
            lb: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let (r, c) = rows(ly);
            ensure(
                lb.shape().elem_count() == c && r < i32::MAX as usize && c < i32::MAX as usize,
                "bias-add",
            )?;
            // A column of blocks per row range: no thread divides.
            let cfg = LaunchConfig {
                grid_dim: (
                    c.div_ceil(THREADS as usize).min(65_535) as u32,
                    r.clamp(1, 65_535) as u32,
                    1,
                ),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let scalars = [Scalar::I32(r as i32), Scalar::I32(c as i32)];
            let out = launch("bias_add", &[(y, ly), (b, lb)], &[], r * c, &scalars, cfg)?;
            Ok((out, ly.shape().clone()))
        }
    }

    pub(super) struct GeluBackward;

    impl candle_core::CustomOp2 for GeluBackward {
        cuda_only!("gelu-backward", s1, s2);

        fn cuda_fwd(
            &self,
            u: &CudaStorage,
            lu: &Layout,
            g: &CudaStorage,
            lg: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            ensure(lu.shape() == lg.shape(), "gelu-backward")?;
            let n = lu.shape().elem_count();
            let scalars = [Scalar::U64(n as u64)];
            let out = launch(
                "gelu_backward",
                &[(u, lu), (g, lg)],
                &[],
                n,
                &scalars,
                elementwise(n),
            )?;
            Ok((out, lu.shape().clone()))
        }
    }

    pub(super) struct LayerNormBackward {
        pub(super) eps: f32,
    }

    impl candle_core::CustomOp3 for LayerNormBackward {
        cuda_only!("layer-norm-backward", s1, s2, s3);

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            lx: &Layout,
            g: &CudaStorage,
            lg: &Layout,
            w: &CudaStorage,
            lw: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let (rows, h) = rows(lx);
            ensure(
                lx.shape() == lg.shape() && lw.shape().elem_count() == h,
                "layer-norm-backward",
            )?;
            let scalars = [Scalar::I32(h as i32), Scalar::F32(self.eps)];
            let out = launch(
                "layer_norm_backward",
                &[(x, lx), (g, lg)],
                &[(w, lw)],
                rows * h,
                &scalars,
                per_row(rows),
            )?;
            Ok((out, lx.shape().clone()))
        }
    }

    pub(super) struct QkvRope {
        pub(super) shape: super::QkvShape,
        pub(super) inverse: bool,
    }

    impl candle_core::CustomOp3 for QkvRope {
        cuda_only!("qkv-rope", s1, s2, s3);

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            lx: &Layout,
            cos: &CudaStorage,
            lc: &Layout,
            sin: &CudaStorage,
            ls: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let s = self.shape;
            let vectors = 3 * s.batch * s.seq * s.heads;
            ensure(
                lx.shape().elem_count() == vectors * s.head_dim
                    && vectors < i32::MAX as usize
                    && lc.shape().elem_count() == s.seq * s.rotary_dim / 2
                    && ls.shape() == lc.shape(),
                "qkv-rope",
            )?;
            // A block row of threads per head vector, eight vectors a block.
            let cfg = LaunchConfig {
                grid_dim: (vectors.div_ceil(8).clamp(1, 65_535) as u32, 1, 1),
                block_dim: (32, 8, 1),
                shared_mem_bytes: 0,
            };
            let mut scalars: Vec<Scalar> = [s.batch, s.seq, s.heads, s.head_dim, s.rotary_dim]
                .into_iter()
                .map(|v| Scalar::I32(v as i32))
                .collect();
            scalars.push(Scalar::F32(s.scale));
            scalars.push(Scalar::I32(i32::from(self.inverse)));
            let n = lx.shape().elem_count();
            let out = launch(
                "qkv_rope",
                &[(x, lx)],
                &[(cos, lc), (sin, ls)],
                n,
                &scalars,
                cfg,
            )?;
            Ok((out, lx.shape().clone()))
        }
    }

    pub(super) struct Dropout {
        pub(super) p: f32,
        pub(super) seed: u64,
    }

    impl candle_core::CustomOp1 for Dropout {
        cuda_only!("lora-dropout", s1);

        fn cuda_fwd(
            &self,
            s: &CudaStorage,
            l: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let n = l.shape().elem_count();
            let scalars = [
                Scalar::U64(n as u64),
                Scalar::U64(self.seed),
                Scalar::F32(self.p),
            ];
            let out = launch("dropout", &[(s, l)], &[], n, &scalars, elementwise(n))?;
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

    /// The hash is splitmix64 (whose first output from state 0 is
    /// 0xE220A8397B1DCDAF), as the CUDA kernel's; dropout keeps exactly the
    /// elements the hash says, scaled, the same for f32 and bf16 inputs and
    /// for the mask alone.
    #[test]
    fn dropout_is_the_hash_mask() {
        assert_eq!(mix(0, 1), 0xE220_A839);
        let (n, p, seed) = (100_000usize, 0.3f32, 42u64);
        let x = Tensor::arange(0f32, n as f32, &Device::Cpu).unwrap();
        let y: Vec<f32> = dropout(&x, p, seed).unwrap().to_vec1().unwrap();
        let threshold = (f64::from(p) * 4_294_967_296.0) as u32;
        let mut kept = 0;
        for (i, &v) in y.iter().enumerate() {
            if mix(i as u64, seed) >= threshold {
                assert_eq!(v, i as f32 * (1.0 / (1.0 - p)), "element {i}");
                kept += 1;
            } else {
                assert_eq!(v, 0.0, "element {i}");
            }
        }
        let share = kept as f64 / n as f64;
        assert!((share - 0.7).abs() < 0.01, "kept {share}");
        let xb = x.to_dtype(DType::BF16).unwrap();
        let yb = dropout(&xb, p, seed).unwrap();
        assert_eq!(yb.dtype(), DType::BF16);
        let want = Tensor::new(y.as_slice(), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let (a, b): (Vec<f32>, Vec<f32>) = (
            yb.to_dtype(DType::F32).unwrap().to_vec1().unwrap(),
            want.to_dtype(DType::F32).unwrap().to_vec1().unwrap(),
        );
        // bf16 inputs round before the scale: equal up to one rounding.
        assert!(
            a.iter()
                .zip(&b)
                .all(|(a, b)| (a - b).abs() <= 0.01 * b.abs())
        );
        let mask: Vec<f32> = crate::lora::dropout_mask(x.shape(), p, seed, &Device::Cpu)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(
            mask.iter()
                .zip(&y)
                .enumerate()
                .all(|(i, (m, v))| m * i as f32 == *v)
        );
    }
}
