//! Training's causal attention on CUDA without the score matrix
//! (kernels/flash.cu): the forward pass keeps each query's log-sum-exp
//! instead of its `seq` probabilities, and the backward pass recomputes them
//! tile by tile. For bf16 and head sizes 16, 32, 64 and 80 (Phi-2's); other
//! cases take the materialized path in [`crate::grad`], which is also the
//! reference the tests hold these kernels to.
//!
//! On by default (its tests, in this file with the `cuda` feature, passed on
//! an H200 on 2026-12-05); `DRAMATIS_FLASH_ATTENTION=0` turns it off, to
//! compare.
#![allow(unsafe_code)]

use std::sync::LazyLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{DType, Layout, Result, Storage, Tensor, bail};
use half::bf16;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash.ptx"));
const MODULE: &str = "dramatis_flash";
const THREADS: u32 = 128;
/// Query (forward, dQ) or key (dK/dV) rows a block.
const ROWS: usize = 64;

/// The pipelined kernels (`flash_fwd2`, `flash_bwd_dkdv2`,
/// `flash_bwd_dq2`: the next tile copied while this one is multiplied,
/// operands read with ldmatrix), with `DRAMATIS_FLASH_PIPELINED=1`: off
/// until their test (below) has passed on a GPU.
static PIPELINED: LazyLock<std::sync::atomic::AtomicBool> = LazyLock::new(|| {
    std::env::var_os("DRAMATIS_FLASH_PIPELINED")
        .is_some_and(|v| v == "1")
        .into()
});

/// Turns the pipelined kernels on or off (the tests run both).
#[cfg(test)]
fn set_pipelined(on: bool) {
    PIPELINED.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether the pipelined kernels take these buffers: they copy rows 16
/// bytes at a time, so each must start 16-byte aligned (rows are: head
/// sizes are multiples of 8).
fn pipelined(held: &[&Held<'_>]) -> bool {
    PIPELINED.load(std::sync::atomic::Ordering::Relaxed)
        && held
            .iter()
            .all(|h| (h.layout.start_offset() * 2).is_multiple_of(16))
}

/// Not turned off with `DRAMATIS_FLASH_ATTENTION=0`; read once (every block asks).
static ASKED: LazyLock<bool> =
    LazyLock::new(|| std::env::var_os("DRAMATIS_FLASH_ATTENTION").is_none_or(|v| v != "0"));

/// Whether the kernels take attention over `q` (`[b, heads, seq, head_dim]`).
pub(crate) fn takes(q: &Tensor) -> bool {
    matches!(q.dims(), [b, h, s, hd] if b * h * s > 0 && enabled(q.device(), q.dtype(), *hd))
}

/// Whether training's attention in `dtype` with heads of `head_dim` runs on
/// the kernels on `device`: bf16 on a GPU with bf16 tensor cores (compute
/// capability 8.0 or later), a head size with kernels, and not turned off
/// with `DRAMATIS_FLASH_ATTENTION=0`.
pub(crate) fn enabled(device: &candle_core::Device, dtype: DType, head_dim: usize) -> bool {
    let candle_core::Device::Cuda(dev) = device else {
        return false;
    };
    *ASKED && dtype == DType::BF16 && matches!(head_dim, 16 | 32 | 64 | 80) && tensor_cores(dev)
}

/// Whether `dev` runs the kernels' 16-bit `mma.sync` products (compute
/// capability 8.0 or later; kernels/tensor_core.cuh).
pub(crate) fn tensor_cores(dev: &CudaDevice) -> bool {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute as A;
    dev.cuda_stream()
        .context()
        .attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
        .is_ok_and(|major| major >= 8)
}

/// A contiguous tensor's device buffer, held for a launch.
struct Held<'a> {
    guard: candle_core::StorageRef<'a>,
    layout: &'a Layout,
}

impl<'a> Held<'a> {
    /// `t`, which must be `dtype` and start 4-byte aligned (the kernels
    /// read and write bf16 pairs as 32-bit words).
    fn new(t: &'a Tensor, what: &str, dtype: DType) -> Result<Self> {
        let (guard, layout) = t.storage_and_layout();
        if t.dtype() != dtype {
            bail!("flash attention: {what} is {:?}, not {dtype:?}", t.dtype());
        }
        if !(layout.start_offset() * dtype.size_in_bytes()).is_multiple_of(4) {
            bail!("flash attention: {what} is not 4-byte aligned");
        }
        Ok(Self { guard, layout })
    }

    fn cuda(&self) -> Result<&CudaStorage> {
        match &*self.guard {
            Storage::Cuda(s) => Ok(s),
            _ => bail!("flash attention: a tensor is not on the GPU"),
        }
    }

    fn view<T: CudaDType + DeviceRepr>(&self) -> Result<CudaView<'_, T>> {
        crate::kernels::cuda::contiguous::<T>((self.cuda()?, self.layout))
    }
}

/// An output buffer of a launch, wrapped as a tensor afterwards.
fn alloc<T: CudaDType + DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every kernel here writes each element of its outputs (rows
    // past `seq` are never part of an output).
    Ok(unsafe { dev.alloc::<T>(n)? })
}

fn tensor<T: CudaDType + DeviceRepr>(s: CudaSlice<T>, dev: &CudaDevice, shape: &[usize]) -> Tensor {
    Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone())),
        shape,
        BackpropOp::none(),
        false,
    )
}

fn grid(blocks: usize, bh: usize) -> Result<LaunchConfig> {
    if blocks > i32::MAX as usize || bh > 65_535 {
        bail!("flash attention: {blocks} × {bh} blocks is more than a grid holds");
    }
    Ok(LaunchConfig {
        grid_dim: (blocks as u32, bh as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// `(b, heads, seq, head_dim)` of q, k and v, which must agree.
fn dims(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(usize, usize, usize, usize)> {
    let d = q.dims4()?;
    if k.dims4()? != d || v.dims4()? != d {
        bail!("flash attention: q, k and v differ in shape");
    }
    // The kernels index rows of a head, and (head, position) pairs, in `int`.
    if d.1.checked_mul(d.2).is_none_or(|n| n >= i32::MAX as usize) {
        bail!("flash attention: sequence too long");
    }
    Ok(d)
}

/// q, k and v held for a launch (bf16).
fn qkv<'a>(q: &'a Tensor, k: &'a Tensor, v: &'a Tensor) -> Result<[Held<'a>; 3]> {
    Ok([
        Held::new(q, "q", DType::BF16)?,
        Held::new(k, "k", DType::BF16)?,
        Held::new(v, "v", DType::BF16)?,
    ])
}

/// Attention's output `[b·seq, heads·head_dim]` (the dense projection's
/// input) and each query's log-sum-exp in log2 units, `[b, heads, seq]` f32.
pub(crate) fn forward(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
    let (b, heads, seq, hd) = dims(q, k, v)?;
    let [hq, hk, hv] = qkv(q, k, v)?;
    let dev = hq.cuda()?.device().clone();
    let mut o = alloc::<bf16>(&dev, b * seq * heads * hd)?;
    let mut lse = alloc::<f32>(&dev, b * heads * seq)?;
    let name = if pipelined(&[&hk, &hv]) {
        "flash_fwd2"
    } else {
        "flash_fwd"
    };
    let func = dev.get_or_load_custom_func(&format!("{name}_bf16_hd{hd}"), MODULE, PTX)?;
    let (qv, kv, vv) = (hq.view::<bf16>()?, hk.view::<bf16>()?, hv.view::<bf16>()?);
    let (h32, s32) = (heads as i32, seq as i32);
    let mut l = func.builder();
    l.arg(&qv).arg(&kv).arg(&vv).arg(&mut o).arg(&mut lse);
    l.arg(&h32).arg(&s32);
    // SAFETY: q, k and v hold b·heads·seq·hd values each (checked by
    // `dims`); o and lse are sized for the grid's rows, which the kernel
    // bounds by `seq`.
    unsafe { l.launch(grid(seq.div_ceil(ROWS), b * heads)?) }.w()?;
    Ok((
        tensor(o, &dev, &[b * seq, heads * hd]),
        tensor(lse, &dev, &[b, heads, seq]),
    ))
}

/// The gradients of q, k and v (`[b, heads, seq, head_dim]` each) from the
/// output `o` and its gradient `g_o` (both `[b·seq, heads·head_dim]`) and
/// the forward pass's `lse`.
pub(crate) fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    g_o: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, heads, seq, hd) = dims(q, k, v)?;
    if o.dims2()? != (b * seq, heads * hd) || g_o.dims2()? != (b * seq, heads * hd) {
        bail!("flash attention: o or its gradient is not [b·seq, hidden]");
    }
    if lse.dims3()? != (b, heads, seq) {
        bail!("flash attention: the log-sum-exp is not [b, heads, seq]");
    }
    let (g_o, lse) = (g_o.contiguous()?, lse.contiguous()?);
    let [hq, hk, hv] = qkv(q, k, v)?;
    let ho = Held::new(o, "o", DType::BF16)?;
    let hg = Held::new(&g_o, "the output's gradient", DType::BF16)?;
    let hl = Held::new(&lse, "the log-sum-exp", DType::F32)?;
    let dev = hq.cuda()?.device().clone();
    let n = b * heads * seq * hd;
    let (h32, s32, d32) = (heads as i32, seq as i32, hd as i32);
    let (qv, kv, vv) = (hq.view::<bf16>()?, hk.view::<bf16>()?, hv.view::<bf16>()?);
    let (ov, gv, lv) = (ho.view::<bf16>()?, hg.view::<bf16>()?, hl.view::<f32>()?);

    let mut delta = alloc::<f32>(&dev, b * heads * seq)?;
    let f = dev.get_or_load_custom_func("flash_delta_bf16", MODULE, PTX)?;
    let mut l = f.builder();
    l.arg(&ov).arg(&gv).arg(&mut delta);
    l.arg(&h32).arg(&s32).arg(&d32);
    let warps = THREADS as usize / 32;
    // SAFETY: one warp per (head, position) of each batch row, bounded by
    // heads·seq in the kernel; o and g_o hold b·seq·heads·hd values.
    unsafe { l.launch(grid((heads * seq).div_ceil(warps), b)?) }.w()?;

    let (mut dq, mut dk, mut dv) = (
        alloc::<bf16>(&dev, n)?,
        alloc::<bf16>(&dev, n)?,
        alloc::<bf16>(&dev, n)?,
    );
    let name = if pipelined(&[&hq, &hk, &hv, &hg]) {
        "flash_dkdv2"
    } else {
        "flash_dkdv"
    };
    let f = dev.get_or_load_custom_func(&format!("{name}_bf16_hd{hd}"), MODULE, PTX)?;
    let mut l = f.builder();
    l.arg(&qv).arg(&kv).arg(&vv).arg(&gv).arg(&lv).arg(&delta);
    l.arg(&mut dk).arg(&mut dv).arg(&h32).arg(&s32);
    // SAFETY: as the forward pass; dk and dv are [b, heads, seq, hd].
    unsafe { l.launch(grid(seq.div_ceil(ROWS), b * heads)?) }.w()?;
    let name = if pipelined(&[&hk, &hv]) {
        "flash_dq2"
    } else {
        "flash_dq"
    };
    let f = dev.get_or_load_custom_func(&format!("{name}_bf16_hd{hd}"), MODULE, PTX)?;
    let mut l = f.builder();
    l.arg(&qv).arg(&kv).arg(&vv).arg(&gv).arg(&lv).arg(&delta);
    l.arg(&mut dq).arg(&h32).arg(&s32);
    // SAFETY: as above; dq is [b, heads, seq, hd].
    unsafe { l.launch(grid(seq.div_ceil(ROWS), b * heads)?) }.w()?;
    let shape = [b, heads, seq, hd];
    Ok((
        tensor(dq, &dev, &shape),
        tensor(dk, &dev, &shape),
        tensor(dv, &dev, &shape),
    ))
}

#[cfg(test)]
mod tests {
    //! The kernels against the materialized path on the GPU: candle's
    //! matmuls, the causal softmax and its backward pass, in f32 from the
    //! same bf16 inputs.
    use super::*;
    use candle_core::{D, Device};

    fn reference(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        g_o: &Tensor,
    ) -> (Tensor, Tensor, Tensor, Tensor, Tensor) {
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let (q, k, v) = (f(q), f(k), f(v));
        let (b, heads, seq, hd) = q.dims4().unwrap();
        let s = q.matmul(&k.t().unwrap()).unwrap();
        let p = crate::kernels::causal_softmax(&s).unwrap();
        let lse = {
            // log2 Σ_j e^(s_ij) over the visible keys.
            let mask = crate::kernels::causal_mask(seq, &s).unwrap();
            let masked = s.broadcast_add(&mask).unwrap();
            let m = masked.max_keepdim(D::Minus1).unwrap();
            let e = masked
                .broadcast_sub(&m)
                .unwrap()
                .exp()
                .unwrap()
                .sum_keepdim(D::Minus1)
                .unwrap();
            ((e.log().unwrap() + m).unwrap() * std::f64::consts::LOG2_E)
                .unwrap()
                .squeeze(D::Minus1)
                .unwrap()
        };
        let o = p.matmul(&v).unwrap();
        let g_o4 = f(g_o)
            .reshape((b, seq, heads, hd))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap();
        let g_v = p.t().unwrap().matmul(&g_o4).unwrap();
        let g_p = g_o4.matmul(&v.t().unwrap()).unwrap();
        let g_s = crate::kernels::softmax_backward(&p, &g_p).unwrap();
        let g_q = g_s.matmul(&k).unwrap();
        let g_k = g_s.t().unwrap().matmul(&q).unwrap();
        let o = o
            .transpose(1, 2)
            .unwrap()
            .reshape((b * seq, heads * hd))
            .unwrap();
        (o, lse, g_q, g_k, g_v)
    }

    /// max |t|.
    fn max_abs(t: &Tensor) -> f32 {
        let t = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        t.abs().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    /// max |a − b| ÷ max |b|, the divisor at least 0.01: with one key the
    /// reference's dq and dk are exactly 0 (p = 1, dS = g − g) where the
    /// kernels' dP − delta leaves f32 rounding (two sums in different orders).
    fn rel(a: &Tensor, b: &Tensor) -> f32 {
        let a = a.to_dtype(DType::F32).unwrap();
        let b = b.to_dtype(DType::F32).unwrap();
        max_abs(&(&a - &b).unwrap()) / max_abs(&b).max(1e-2)
    }

    /// The first kernels, then the pipelined ones (copies overlapped with
    /// the products, ldmatrix reads).
    #[test]
    fn kernels_equal_the_materialized_path() {
        let _lock = crate::GPU_TESTS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for on in [false, true] {
            set_pipelined(on);
            eprintln!("kernels: {}", if on { "pipelined" } else { "first" });
            compare_with_the_materialized_path(on);
        }
        set_pipelined(false);
    }

    fn compare_with_the_materialized_path(pipelined_on: bool) {
        let Ok(dev) = Device::new_cuda(0) else {
            eprintln!("no CUDA device: skipped");
            return;
        };
        // Lengths around the tiles (32 and 64 rows), a padded batch (two
        // sequences, the second's tail of random rows is still attended
        // causally, as right padding is), every head size the kernels take.
        for (b, heads, seq, hd) in [
            (1, 2, 1, 80),
            (1, 2, 7, 80),
            (2, 3, 64, 80),
            (2, 2, 100, 80),
            (1, 2, 2048, 80),
            (1, 1, 33, 16),
            (1, 2, 65, 32),
            (1, 2, 129, 64),
        ] {
            let r = |s: f32, seed: u64| {
                dev.set_seed(seed).unwrap();
                Tensor::randn(0f32, s, (b, heads, seq, hd), &dev)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap()
            };
            // q pre-scaled by 1/√hd as split_rotate does; a scale of 2 on
            // q·k makes sharp and flat rows both.
            let q = (r(1.0, 1) * (2.0 / (hd as f64).sqrt())).unwrap();
            let (k, v) = (r(1.0, 2), r(1.0, 3));
            let g_o = r(1.0, 4)
                .transpose(1, 2)
                .unwrap()
                .reshape((b * seq, heads * hd))
                .unwrap()
                .contiguous()
                .unwrap();
            // The pipelined pass must not fall back to the first kernels.
            let held = [&q, &k, &v, &g_o].map(|t| Held::new(t, "an input", DType::BF16).unwrap());
            assert_eq!(pipelined(&held.each_ref()), pipelined_on);
            drop(held);
            let (o, lse) = forward(&q, &k, &v).unwrap();
            let (g_q, g_k, g_v) = backward(&q, &k, &v, &o, &lse, &g_o).unwrap();
            let (ro, rlse, rq, rk, rv) = reference(&q, &k, &v, &g_o);
            let what = format!("b {b}, heads {heads}, seq {seq}, head {hd}");
            // bf16 operands and outputs (8 bits of mantissa: 4e-3 a
            // rounding) over sums of up to 2048 terms in f32.
            let lse_err = max_abs(&(&lse - &rlse).unwrap());
            assert!(lse_err < 2e-2, "{what}: log-sum-exp off by {lse_err}");
            for (name, got, want, bound) in [
                ("output", &o, &ro, 1.5e-2),
                ("dq", &g_q, &rq, 3e-2),
                ("dk", &g_k, &rk, 3e-2),
                ("dv", &g_v, &rv, 2e-2),
            ] {
                let e = rel(got, want);
                assert!(e < bound, "{what}: {name} off by {e} of its largest value");
                eprintln!("{what}: {name} {e:.2e}");
            }
        }
    }
}
