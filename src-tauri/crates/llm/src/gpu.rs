//! The decode step on CUDA: one token through the model in about nine
//! kernel launches a layer (kernels/infer.cu), reading the quantized weights
//! where candle uploaded them and the KV cache the tensor path fills.
//!
//! Through candle's ops a decode step was ≈800 launches, each waiting on the
//! host, with the GPU idle half the time. Here: layer norm and the 8-bit
//! quantization of its output are one kernel; each product (Q4_K, Q5_K,
//! Q6_K, Q8_0) is one dp4a mat-vec with its bias, GELU or residual add in the
//! epilogue (dense f16/f32 weights: the same over the f32 input); the rotary embedding and the cache append are one; attention is
//! split along the cache, and the merge quantizes for the dense product.
//!
//! An adapter's slots add `scale · B (A x)` through two small f32 kernels
//! each (fc1's before GELU).
//!
//! It runs where the model is on CUDA, for one sequence, one new token
//! after a cache, the last position's logits, an adapter (if any) that
//! `takes` admits, hidden and intermediate sizes multiples of 32, a head
//! size that is a multiple of 8 and at most 256, and every block weight and
//! the output head is one of those types
//! in whole blocks (otherwise [`Phi::forward`] takes the tensor path, which
//! stays the reference it is tested against). Prompts (several tokens) take
//! the tensor path, which writes the same f16 cache, with their attention
//! on the prompt kernels below. `DRAMATIS_NO_GPU_DECODE=1` turns the
//! decode step off, to compare the two.
//!
//! A prompt's attention on such a model runs on two kernels instead of
//! candle's ops: the rotary embedding with the keys and values written to
//! the f16 cache (and q to f16), then a flash-attention pass over the cache
//! in f16 on the tensor cores that never holds the scores
//! ([`GpuParts::prompt_attention`]; compute capability 8.0 and up). An
//! H100 prefills 512 tokens 1.37-1.56x faster on them (BENCHMARKS.md);
//! `DRAMATIS_GPU_PROMPT=0` turns them off, to compare.
//!
//! A step without an adapter is captured once as
//! a CUDA graph and replayed: the kernels read the position and each
//! layer's cache buffers from device memory, written before each replay, so
//! one graph serves every position and every cache (growth, the summary's
//! cache beside the chat's); the attention grid covers the whole window
//! (splits past the cache weigh nothing). `DRAMATIS_GPU_GRAPH=0` launches
//! the kernels one by one instead, to compare (an H200 decodes 1.11-1.14x
//! faster replaying, BENCHMARKS.md); a capture the driver refuses turns
//! replay off with a warning.

use std::sync::{Arc, Mutex};

use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg, sys,
};
use candle_core::op::BackpropOp;
use candle_core::quantized::GgmlDType;
use candle_core::{CudaDevice, CudaStorage, DType, Device, Storage, Tensor};

use crate::cache::KvCache;
use crate::linear::{GpuWeight, Linear};
use crate::lora::{LoraAdapter, LoraLayer, LoraSlot, LoraTarget};
use crate::model::Phi;
use crate::{Error, Result};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/infer.ptx"));
const MODULE: &str = "dramatis_infer";
/// Keys per attention block (`CHUNK` in infer.cu).
const CHUNK: usize = 128;
/// Warps per block of the mat-vec kernels (a warp per row).
const ROWS_PER_BLOCK: usize = 4;
/// The largest adapter rank the decode step takes (larger ones take the
/// tensor path).
const MAX_RANK: usize = 1024;

/// A weight on the kernels: quantized blocks or a dense f16/f32 matrix in
/// device memory (kept alive by `_keep`).
struct Mat {
    _keep: Box<dyn std::any::Any + Send + Sync>,
    ptr: u64,
    /// Its mat-vec kernel per [`Mode`], looked up once at load.
    kernels: [CudaFunction; 3],
    row_bytes: u64,
    rows: usize,
    /// Units of the quantized mat-vec's inner loop per row; a dense
    /// weight's columns.
    units: usize,
    dense: bool,
    bias: Option<CudaSlice<f32>>,
}

/// What a mat-vec does with its output: store it, store it through GELU,
/// or add it to the residual.
#[derive(Clone, Copy)]
enum Mode {
    Store = 0,
    Gelu = 1,
    Add = 2,
}

/// The step's other kernels, looked up once at load (not by name per
/// launch, on the token's path).
struct Kernels {
    ln_q8: CudaFunction,
    quant_q8: CudaFunction,
    rope_append: CudaFunction,
    attn_part: CudaFunction,
    attn_merge_q8: CudaFunction,
    lora_down: CudaFunction,
    lora_up: CudaFunction,
}

/// An activation quantized to 8 bits in blocks of 32.
struct Q8 {
    q: CudaSlice<i8>,
    d: CudaSlice<f32>,
    s: CudaSlice<f32>,
}

struct Layer {
    norm: (CudaSlice<f32>, CudaSlice<f32>),
    qkv: Mat,
    dense: Mat,
    fc1: Mat,
    fc2: Mat,
}

/// One step's buffers, reused by every step.
struct Scratch {
    x: CudaSlice<f32>,
    qkv: CudaSlice<f32>,
    q: CudaSlice<f32>,
    act: CudaSlice<f32>,
    h: Q8,
    y: Q8,
    a: Q8,
    /// The normalized input and the attention output in f32 (the input of
    /// adapters and of dense f16/f32 weights), and a slot's down projection.
    hf: CudaSlice<f32>,
    yf: CudaSlice<f32>,
    t: CudaSlice<f32>,
    /// The position a captured step reads, the logits it writes, and the
    /// step itself once captured.
    step: CudaSlice<i32>,
    /// Per layer {k, v, capacity} of the cache the step runs on.
    table: CudaSlice<u64>,
    logits: CudaSlice<f32>,
    graph: Option<StepGraph>,
    /// Per head and split: maximum score, sum, weighted values.
    pm: CudaSlice<f32>,
    pl: CudaSlice<f32>,
    po: CudaSlice<f32>,
}

/// What the decode step needs beside the model's tensors, on the device.
pub(crate) struct GpuParts {
    dev: CudaDevice,
    stream: Arc<CudaStream>,
    kernels: Kernels,
    layers: Vec<Layer>,
    final_norm: (CudaSlice<f32>, CudaSlice<f32>),
    lm_head: Mat,
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
    eps: f32,
    /// Whether steps without an adapter replay a captured graph
    /// (unless `DRAMATIS_GPU_GRAPH=0`), and the attention splits its grid covers.
    graphs: std::sync::atomic::AtomicBool,
    max_splits: usize,
    /// Graphs captured, and why replay was last turned off (for tests and
    /// diagnostics).
    captures: std::sync::atomic::AtomicUsize,
    graph_error: Mutex<Option<String>>,
    scratch: Mutex<Scratch>,
    /// Whether prompts' attention runs on the kernels (unless
    /// `DRAMATIS_GPU_PROMPT=0`; a GPU with the tensor cores they need).
    prompt: std::sync::atomic::AtomicBool,
}

/// The head sizes `prompt_attn` is built for (kernels/infer.cu).
const PROMPT_HEAD_SIZES: [usize; 4] = [32, 64, 80, 128];

impl std::fmt::Debug for GpuParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuParts({} layers)", self.layers.len())
    }
}

/// The kernels' name for a weight type, and its bytes and units (of the
/// mat-vec's inner loop) per block of values.
fn kind(dtype: GgmlDType) -> Option<(&'static str, usize, usize, usize)> {
    Some(match dtype {
        GgmlDType::Q4K => ("q4k", 256, 144, 16),
        GgmlDType::Q5K => ("q5k", 256, 176, 16),
        GgmlDType::Q6K => ("q6k", 256, 210, 16),
        GgmlDType::Q8_0 => ("q80", 32, 34, 4),
        _ => return None,
    })
}

fn ptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    s.device_ptr(stream).0
}

impl GpuParts {
    /// `None` unless the decode step can run this model (see the module docs).
    /// A GPU that cannot take the kernels (their PTX, or memory for the
    /// buffers) leaves the model on the tensor path, with a warning.
    pub(crate) fn new(phi: &Phi) -> Option<Self> {
        let Device::Cuda(dev) = phi.device() else {
            return None;
        };
        if std::env::var_os("DRAMATIS_NO_GPU_DECODE").is_some_and(|v| v == "1") {
            return None;
        }
        Self::build(phi, dev).unwrap_or_else(|e| {
            tracing::warn!("the CUDA decode kernels are off: {e}");
            None
        })
    }

    fn build(phi: &Phi, dev: &CudaDevice) -> Result<Option<Self>> {
        let cfg = &phi.cfg;
        let (hidden, heads, hd) = (cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim());
        let inter = cfg.intermediate_size;
        if !hidden.is_multiple_of(32)
            || !inter.is_multiple_of(32)
            || !hd.is_multiple_of(8)
            || hd > 256
            || heads * hd != hidden
        {
            return Ok(None);
        }
        let stream = dev.cuda_stream();
        let upload = |t: &Tensor| -> Result<CudaSlice<f32>> {
            let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            Ok(dev.clone_htod(&v)?)
        };
        let norm = |n: &candle_nn::LayerNorm| -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
            let w = upload(n.weight())?;
            let b = match n.bias() {
                Some(b) => upload(b)?,
                None => dev.alloc_zeros::<f32>(w.len())?,
            };
            Ok((w, b))
        };
        let load = |name: &str| -> Result<CudaFunction> {
            Ok(dev
                .get_or_load_custom_func(name, MODULE, PTX)?
                .into_cuda_function())
        };
        let products = |op: &str, kind: &str| -> Result<[CudaFunction; 3]> {
            Ok([
                load(&format!("{op}_{kind}_store"))?,
                load(&format!("{op}_{kind}_gelu"))?,
                load(&format!("{op}_{kind}_add"))?,
            ])
        };
        let mat = |l: &Linear| -> Result<Option<Mat>> {
            let Some((w, bias)) = l.gpu_weight() else {
                return Ok(None);
            };
            let bias = bias.map(upload).transpose()?;
            Ok(match w {
                GpuWeight::Quantized(q) => {
                    let Some((kind, per_block, bytes, units)) = kind(q.dtype()) else {
                        return Ok(None);
                    };
                    let (rows, cols) = q.shape().dims2()?;
                    if cols % per_block != 0 {
                        return Ok(None);
                    }
                    let blocks = cols / per_block;
                    Some(Mat {
                        ptr: q.device_ptr()? as u64,
                        _keep: Box::new(q.clone()),
                        kernels: products("mmvq", kind)?,
                        row_bytes: (blocks * bytes) as u64,
                        rows,
                        units: blocks * units,
                        dense: false,
                        bias,
                    })
                }
                GpuWeight::Dense(t) => {
                    let kind = match t.dtype() {
                        DType::F32 => "f32",
                        DType::F16 => "f16",
                        _ => return Ok(None),
                    };
                    if !t.is_contiguous() || !t.device().is_cuda() {
                        return Ok(None);
                    }
                    let (rows, cols) = t.dims2()?;
                    Some(Mat {
                        ptr: address(t, &stream)?,
                        _keep: Box::new(t.clone()),
                        kernels: products("mmv", kind)?,
                        row_bytes: (cols * t.dtype().size_in_bytes()) as u64,
                        rows,
                        units: cols,
                        dense: true,
                        bias,
                    })
                }
            })
        };
        let mut layers = Vec::with_capacity(phi.blocks.len());
        for b in &phi.blocks {
            let (Some(qkv), Some(dense), Some(fc1), Some(fc2)) =
                (mat(&b.qkv)?, mat(&b.dense)?, mat(&b.fc1)?, mat(&b.fc2)?)
            else {
                return Ok(None);
            };
            layers.push(Layer {
                norm: norm(&b.norm)?,
                qkv,
                dense,
                fc1,
                fc2,
            });
        }
        let Some(lm_head) = mat(&phi.lm_head)? else {
            return Ok(None);
        };
        let kernels = Kernels {
            ln_q8: load("ln_q8")?,
            quant_q8: load("quant_q8")?,
            rope_append: load("rope_append")?,
            attn_part: load("attn_part")?,
            attn_merge_q8: load("attn_merge_q8")?,
            lora_down: load("lora_down")?,
            lora_up: load("lora_up")?,
        };
        let splits = cfg.max_position_embeddings.div_ceil(CHUNK);
        let q8 = |n: usize| -> Result<Q8> {
            Ok(Q8 {
                q: dev.alloc_zeros::<i8>(n)?,
                d: dev.alloc_zeros::<f32>(n / 32)?,
                s: dev.alloc_zeros::<f32>(n / 32)?,
            })
        };
        let scratch = Scratch {
            x: dev.alloc_zeros::<f32>(hidden)?,
            qkv: dev.alloc_zeros::<f32>(3 * hidden)?,
            q: dev.alloc_zeros::<f32>(hidden)?,
            act: dev.alloc_zeros::<f32>(inter)?,
            h: q8(hidden)?,
            y: q8(hidden)?,
            a: q8(inter)?,
            hf: dev.alloc_zeros::<f32>(hidden)?,
            yf: dev.alloc_zeros::<f32>(hidden)?,
            t: dev.alloc_zeros::<f32>(MAX_RANK)?,
            step: dev.alloc_zeros::<i32>(1)?,
            table: dev.alloc_zeros::<u64>(3 * phi.blocks.len())?,
            logits: dev.alloc_zeros::<f32>(lm_head.rows)?,
            graph: None,
            pm: dev.alloc_zeros::<f32>(heads * splits)?,
            pl: dev.alloc_zeros::<f32>(heads * splits)?,
            po: dev.alloc_zeros::<f32>(heads * splits * hd)?,
        };
        let parts = Self {
            dev: dev.clone(),
            stream: stream.clone(),
            kernels,
            layers,
            final_norm: norm(&phi.final_norm)?,
            lm_head,
            cos: upload(&phi.cos)?,
            sin: upload(&phi.sin)?,
            eps: cfg.layer_norm_eps as f32,
            graphs: std::env::var_os("DRAMATIS_GPU_GRAPH")
                .is_none_or(|v| v != "0")
                .into(),
            max_splits: splits,
            captures: 0.into(),
            graph_error: Mutex::new(None),
            prompt: (std::env::var_os("DRAMATIS_GPU_PROMPT").is_none_or(|v| v != "0")
                && crate::flash::tensor_cores(dev))
            .into(),
            scratch: Mutex::new(scratch),
        };
        // The uploads land before any thread's stream reads them (candle's
        // streams are per thread; the step may run on another).
        stream.synchronize().w()?;
        Ok(Some(parts))
    }

    /// Turns graph replay on or off (tests run both).
    #[cfg(test)]
    fn set_graphs(&self, on: bool) {
        self.graphs.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether steps without an adapter replay a graph (a capture the driver
    /// refused turns it off).
    pub(crate) fn graphs(&self) -> bool {
        self.graphs.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether graph replay is on (a failed capture turns it off), the
    /// graphs captured, and why it was turned off.
    #[cfg(test)]
    fn graph_state(&self) -> (bool, usize, Option<String>) {
        (
            self.graphs(),
            self.captures.load(std::sync::atomic::Ordering::Relaxed),
            self.graph_error.lock().unwrap().clone(),
        )
    }

    /// The number of blocks the buffers were made for.
    pub(crate) fn layers(&self) -> usize {
        self.layers.len()
    }

    /// Whether a prompt's attention runs on the kernels.
    pub(crate) fn prompt_kernels(&self) -> bool {
        self.prompt.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Turns the prompt kernels on or off (tests run both).
    #[cfg(test)]
    fn set_prompt_kernels(&self, on: bool) {
        self.prompt.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// A prompt's attention in layer `layer` (one sequence): `qkv` (`[n,
    /// 3·hidden]` f32, the fused projection's output) rotated at positions
    /// `cache.len()..`, its keys and values written into the layer's f16
    /// cache after the held ones, and each new query's causal attention
    /// over the held and new keys, without the score matrix: `[n, hidden]`
    /// f32, the dense projection's input. [`KvCache::advance`] commits the
    /// length once every layer is done. `None` (nothing written) for a head
    /// size without a kernel. Only where [`GpuParts::prompt_kernels`] says
    /// (the GPU has the tensor cores the kernel needs).
    pub(crate) fn prompt_attention(
        &self,
        phi: &Phi,
        qkv: &Tensor,
        cache: &mut KvCache,
        layer: usize,
    ) -> Result<Option<Tensor>> {
        let cfg = &phi.cfg;
        let (heads, hd, hidden) = (cfg.num_attention_heads, cfg.head_dim(), cfg.hidden_size);
        let Device::Cuda(dev) = phi.device() else {
            return Ok(None);
        };
        if !PROMPT_HEAD_SIZES.contains(&hd) || qkv.dtype() != DType::F32 {
            return Ok(None);
        }
        let (n, width) = qkv.dims2()?;
        if width != 3 * hidden || n == 0 {
            return Err(Error::Invalid(format!(
                "a prompt's qkv is [{n}, {width}], not [_, {}]",
                3 * hidden
            )));
        }
        let pos = cache.len();
        if pos + n > cfg.max_position_embeddings {
            return Err(Error::Invalid(format!(
                "the context is full: {} tokens exceed the model's {}",
                pos + n,
                cfg.max_position_embeddings
            )));
        }
        let (k, v) = cache.reserve(layer, pos + n, (1, heads, hd), DType::F16, phi.device())?;
        let cap = k.dim(2)?;
        let qkv = qkv.contiguous()?;
        let (qkv_s, qkv_l) = qkv.storage_and_layout();
        let (k_s, k_l) = k.storage_and_layout();
        let (v_s, v_l) = v.storage_and_layout();
        let (Storage::Cuda(qkv_s), Storage::Cuda(k_s), Storage::Cuda(v_s)) =
            (&*qkv_s, &*k_s, &*v_s)
        else {
            return Err(Error::Invalid("a prompt's tensors are not on CUDA".into()));
        };
        use crate::kernels::cuda::contiguous;
        let qkv_v = contiguous::<f32>((qkv_s, qkv_l))?;
        let k_v = contiguous::<half::f16>((k_s, k_l))?;
        let v_v = contiguous::<half::f16>((v_s, v_l))?;
        // SAFETY: rope_append_prompt writes every element of q (a block per
        // (head, row), a thread per dimension) and prompt_attn every element
        // of o (each row's every head).
        let mut q = unsafe { dev.alloc::<half::f16>(heads * n * hd)? };
        let mut o = unsafe { dev.alloc::<f32>(n * hidden)? };
        let (n32, pos32, cap32) = (n as i32, pos as i32, cap as i32);
        let (hidden32, hd32, rd32, heads32) = (
            hidden as i32,
            hd as i32,
            cfg.rotary_dim() as i32,
            heads as i32,
        );
        let scale = 1.0 / (hd as f32).sqrt();
        let f = dev.get_or_load_custom_func("rope_append_prompt", MODULE, PTX)?;
        let mut l = f.builder();
        l.arg(&qkv_v).arg(&self.cos).arg(&self.sin);
        l.arg(&hidden32)
            .arg(&hd32)
            .arg(&rd32)
            .arg(&pos32)
            .arg(&n32)
            .arg(&cap32);
        l.arg(&k_v).arg(&v_v).arg(&scale).arg(&mut q);
        let grid = |x: usize, y: usize, threads: u32| LaunchConfig {
            grid_dim: (x as u32, y as u32, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: qkv holds n rows of 3·hidden; the rotary tables hold the
        // window's positions (pos + n checked above); the cache buffers hold
        // `cap` ≥ pos + n positions of every head (reserved above).
        unsafe { l.launch(grid(heads, n, hd.next_multiple_of(32) as u32)) }.w()?;
        let f = dev.get_or_load_custom_func(&format!("prompt_attn_hd{hd}"), MODULE, PTX)?;
        let mut l = f.builder();
        l.arg(&q).arg(&k_v).arg(&v_v).arg(&mut o);
        l.arg(&heads32).arg(&n32).arg(&pos32).arg(&cap32);
        // SAFETY: q is [heads, n, hd], the cache [heads, cap, hd] with
        // positions 0..pos + n written, o [n, hidden]; the kernel bounds its
        // rows by n and its keys by pos + n.
        unsafe { l.launch(grid(n.div_ceil(64), heads, 128)) }.w()?;
        let o = Storage::Cuda(CudaStorage::wrap_cuda_slice(o, dev.clone()));
        Ok(Some(Tensor::from_storage(
            o,
            (n, hidden),
            BackpropOp::none(),
            false,
        )))
    }

    fn launch(&self, f: &CudaFunction, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        let mut b = self.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::P(v) | Arg::U(v) => b.arg(v),
                Arg::I(v) => b.arg(v),
                Arg::F(v) => b.arg(v),
            };
        }
        // SAFETY: every pointer is a live device buffer of the size the
        // kernel indexes: the model's shape for the weights and buffers, the
        // checked shapes of adapter slots (`takes`). Temporaries (adapter
        // copies, a grown cache's old buffer) are freed in stream order,
        // after the kernels queued before on this thread's stream.
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }

    fn p<T>(&self, s: &CudaSlice<T>) -> Arg {
        Arg::P(ptr(s, &self.stream))
    }

    /// `out (=|+=) m · x (+ bias)`, per `mode`: `x` quantized for a
    /// quantized weight, `xf` (f32) for a dense one.
    fn mmvq(&self, m: &Mat, x: &Q8, xf: u64, mode: Mode, out: u64) -> Result<()> {
        let bias = m.bias.as_ref().map_or(Arg::P(0), |b| self.p(b));
        let cfg = LaunchConfig {
            grid_dim: (m.rows.div_ceil(ROWS_PER_BLOCK) as u32, 1, 1),
            block_dim: (32 * ROWS_PER_BLOCK as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = &m.kernels[mode as usize];
        let (w, rows, units) = (Arg::P(m.ptr), Arg::I(m.rows as i32), Arg::I(m.units as i32));
        let row_bytes = Arg::U(m.row_bytes);
        if m.dense {
            return self.launch(
                f,
                cfg,
                &[w, row_bytes, rows, units, Arg::P(xf), bias, Arg::P(out)],
            );
        }
        let (q, d, sums) = (self.p(&x.q), self.p(&x.d), self.p(&x.s));
        self.launch(
            f,
            cfg,
            &[w, row_bytes, rows, units, q, d, sums, bias, Arg::P(out)],
        )
    }

    /// Layer norm of `x` into `out`, and in f32 to `hf` unless it is 0.
    fn layer_norm(
        &self,
        x: &CudaSlice<f32>,
        norm: &(CudaSlice<f32>, CudaSlice<f32>),
        out: &Q8,
        hf: u64,
    ) -> Result<()> {
        let n = x.len();
        self.launch(
            &self.kernels.ln_q8,
            one_block(1024),
            &[
                self.p(x),
                self.p(&norm.0),
                self.p(&norm.1),
                Arg::I(n as i32),
                Arg::F(self.eps),
                self.p(&out.q),
                self.p(&out.d),
                self.p(&out.s),
                Arg::P(hf),
            ],
        )
    }

    /// `out[..m] += scale · B (A x)` for an adapter slot (`out` already at
    /// the slot's first column), through `t`.
    fn lora(&self, slot: &LoraSlot, x: u64, t: &CudaSlice<f32>, out: u64) -> Result<()> {
        let a = slot.a.to_dtype(DType::F32)?.contiguous()?;
        let b = slot.b.to_dtype(DType::F32)?.contiguous()?;
        let (r, n) = a.dims2()?;
        let m = b.dim(0)?;
        self.launch(
            &self.kernels.lora_down,
            LaunchConfig {
                grid_dim: (r.div_ceil(ROWS_PER_BLOCK) as u32, 1, 1),
                block_dim: (32 * ROWS_PER_BLOCK as u32, 1, 1),
                shared_mem_bytes: 0,
            },
            &[
                Arg::P(address(&a, &self.stream)?),
                Arg::P(x),
                Arg::I(r as i32),
                Arg::I(n as i32),
                self.p(t),
            ],
        )?;
        self.launch(
            &self.kernels.lora_up,
            LaunchConfig {
                grid_dim: (m.div_ceil(256) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            },
            &[
                Arg::P(address(&b, &self.stream)?),
                self.p(t),
                Arg::I(m as i32),
                Arg::I(r as i32),
                Arg::F(slot.scale as f32),
                Arg::P(out),
            ],
        )
    }
}

/// Whether the decode step takes `adapter`: every slot of the shape and
/// offset its target has in `phi`, of a rank it has room for, in f32 or a
/// type that converts, without dropout, on the model's device. (The kernels
/// index by these shapes; anything else takes the tensor path, which
/// reports it.)
pub(crate) fn takes(phi: &Phi, adapter: Option<&LoraAdapter>) -> bool {
    let cfg = &phi.cfg;
    adapter.is_none_or(|a| {
        a.layers.len() == phi.blocks.len()
            && a.layers.iter().all(|l| {
                LoraTarget::ALL.iter().all(|&t| {
                    let Some(s) = l.slot(t) else { return true };
                    let (inp, out) = t.shape(cfg);
                    let r = s.a.dim(0).unwrap_or(usize::MAX);
                    r <= MAX_RANK
                        && s.a.dims() == [r, inp]
                        && s.b.dims() == [out, r]
                        && s.out_offset == t.fused_offset(cfg)
                        && s.dropout == 0.0
                        && s.a.device().same_device(phi.device())
                        && s.b.device().same_device(phi.device())
                })
            })
    })
}

enum Arg {
    P(u64),
    U(u64),
    I(i32),
    F(f32),
}

fn one_block(threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The device address of a CUDA f16 or f32 tensor's first element.
fn address(t: &Tensor, stream: &CudaStream) -> Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        return Err(Error::Invalid("a decode-step tensor is not on CUDA".into()));
    };
    let base = match t.dtype() {
        DType::F16 => ptr(s.as_cuda_slice::<half::f16>()?, stream),
        DType::F32 => ptr(s.as_cuda_slice::<f32>()?, stream),
        other => {
            return Err(Error::Invalid(format!(
                "a decode-step tensor is {other:?}, not f16 or f32"
            )));
        }
    };
    Ok(base + (layout.start_offset() * t.dtype().size_in_bytes()) as u64)
}

/// Runs token `id` after what `cache` holds, with `adapter`'s deltas, and
/// returns the next logits, `[1, vocab]` on the device.
pub(crate) fn decode(
    phi: &Phi,
    g: &GpuParts,
    id: u32,
    cache: &mut KvCache,
    adapter: Option<&LoraAdapter>,
) -> Result<Tensor> {
    let cfg = &phi.cfg;
    let (heads, hd) = (cfg.num_attention_heads, cfg.head_dim());
    let pos = cache.len();
    let n = pos + 1;
    let x = phi.embed.rows(&[id])?;
    // Every layer's cache buffers first, grown where needed: nothing
    // allocates between the launches (a graph capture could not hold it).
    let mut caches = Vec::with_capacity(g.layers.len());
    for i in 0..g.layers.len() {
        let (k, v) = cache.reserve(i, n, (1, heads, hd), DType::F16, phi.device())?;
        caches.push(CacheAt {
            k: address(&k, &g.stream)?,
            v: address(&v, &g.stream)?,
            cap: k.dim(2)?,
        });
    }
    // A panic while holding the buffers left nothing they need: take them back.
    let mut guard = g.scratch.lock().unwrap_or_else(|p| p.into_inner());
    let s = &mut *guard;
    g.dev.memcpy_htod(&x, &mut s.x)?;
    let vocab = g.lm_head.rows;
    // SAFETY: the head's mat-vec (or the copy from the graph's buffer)
    // writes every element.
    let mut logits = unsafe { g.dev.alloc::<f32>(vocab)? };
    let replayed = g.graphs.load(std::sync::atomic::Ordering::Relaxed)
        && adapter.is_none()
        && match capture(phi, g, s, &caches) {
            Ok(()) => true,
            Err(e) => {
                // The driver refused the capture (or could not instantiate
                // it): one launch at a time from now on.
                tracing::warn!("decode graphs are off: {e}");
                g.graphs.store(false, std::sync::atomic::Ordering::Relaxed);
                *g.graph_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                false
            }
        };
    if replayed {
        let table: Vec<u64> = caches
            .iter()
            .flat_map(|c| [c.k, c.v, c.cap as u64])
            .collect();
        g.dev.memcpy_htod(&table, &mut s.table)?;
        g.dev.memcpy_htod(&[pos as i32], &mut s.step)?;
        s.graph.as_ref().expect("captured").graph.launch().w()?;
        g.dev.memcpy_dtod(&s.logits, &mut logits)?;
    } else {
        let out = ptr(&logits, &g.stream);
        record(phi, g, s, &caches, Position::At(pos), adapter, out)?;
    }
    cache.advance(1);
    // The buffers are shared by every thread decoding on this model, each on
    // its own stream: release them only once this step is done with them
    // (the caller waits for the logits right after anyway).
    g.stream.synchronize().w()?;
    drop(guard);
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(logits, g.dev.clone()));
    Ok(Tensor::from_storage(
        storage,
        (1, vocab),
        BackpropOp::none(),
        false,
    ))
}

/// Captures the step as a graph once: the kernels read the position and
/// each layer's cache from `s.step` and `s.table`, written before every
/// replay, so one graph serves every position and every cache.
fn capture(phi: &Phi, g: &GpuParts, s: &mut Scratch, caches: &[CacheAt]) -> Result<()> {
    if s.graph.is_some() {
        return Ok(());
    }
    let at = Position::Graph {
        step: ptr(&s.step, &g.stream),
        table: ptr(&s.table, &g.stream),
        splits: g.max_splits,
    };
    let out = ptr(&s.logits, &g.stream);
    g.stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .w()?;
    let mut capturing = Capturing(Some(&g.stream));
    let recorded = record(phi, g, s, caches, at, None, out);
    let graph = capturing.end();
    recorded?;
    let graph =
        graph?.ok_or_else(|| Error::Invalid("capturing the decode step gave no graph".into()))?;
    s.graph = Some(StepGraph { graph });
    g.captures
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// Ends a stream capture, also when what was being captured unwinds (a
/// stream left capturing would refuse all later work on its thread).
struct Capturing<'a>(Option<&'a Arc<CudaStream>>);

impl Capturing<'_> {
    fn end(&mut self) -> Result<Option<CudaGraph>> {
        match self.0.take() {
            Some(stream) => Ok(stream.end_capture(sys::CUgraphInstantiate_flags(0)).w()?),
            None => Ok(None),
        }
    }
}

impl Drop for Capturing<'_> {
    fn drop(&mut self) {
        let _ = self.end();
    }
}

/// A layer's cache buffers as the kernels address them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CacheAt {
    k: u64,
    v: u64,
    cap: usize,
}

/// The decode step captured as a CUDA graph.
struct StepGraph {
    graph: CudaGraph,
}

// SAFETY: a CUDA graph may be used from any thread as long as the uses are
// serialized; this one lives in the scratch buffers' mutex.
unsafe impl Send for StepGraph {}

/// Where the new token goes: a position given with each launch (one step),
/// or read by the kernels from device memory with each layer's cache (a
/// graph replayed for every step, its attention grid covering the whole
/// window).
#[derive(Clone, Copy)]
enum Position {
    At(usize),
    Graph {
        step: u64,
        table: u64,
        splits: usize,
    },
}

/// Queues the whole step on the stream: every block, the final norm and the
/// output head into `logits`.
fn record(
    phi: &Phi,
    g: &GpuParts,
    s: &Scratch,
    caches: &[CacheAt],
    at: Position,
    adapter: Option<&LoraAdapter>,
    logits: u64,
) -> Result<()> {
    let cfg = &phi.cfg;
    let (hidden, heads, hd) = (cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim());
    let (pos, step, table, splits) = match at {
        Position::At(pos) => (pos, 0, 0, (pos + 1).div_ceil(CHUNK)),
        Position::Graph {
            step,
            table,
            splits,
        } => (0, step, table, splits),
    };
    let n = pos + 1;
    let xp = ptr(&s.x, &g.stream);
    let no_lora = LoraLayer::default();
    for (i, l) in g.layers.iter().enumerate() {
        let al = adapter.map_or(&no_lora, |a| &a.layers[i]);
        let slot = |t: LoraTarget| al.slot(t);
        // The f32 inputs, for adapters and dense weights.
        let needs_h = [LoraTarget::Q, LoraTarget::K, LoraTarget::V, LoraTarget::Fc1]
            .iter()
            .any(|t| slot(*t).is_some())
            || l.qkv.dense
            || l.fc1.dense;
        let hf = if needs_h { ptr(&s.hf, &g.stream) } else { 0 };
        let yf = if slot(LoraTarget::Dense).is_some() || l.dense.dense {
            ptr(&s.yf, &g.stream)
        } else {
            0
        };
        // (A graph reads the cache from the table instead.)
        let CacheAt { k: kp, v: vp, cap } = caches[i];
        let lay = if table == 0 { 0 } else { table + 24 * i as u64 };
        g.layer_norm(&s.x, &l.norm, &s.h, hf)?;
        let qkv = ptr(&s.qkv, &g.stream);
        g.mmvq(&l.qkv, &s.h, hf, Mode::Store, qkv)?;
        for t in [LoraTarget::Q, LoraTarget::K, LoraTarget::V] {
            if let Some(sl) = slot(t) {
                g.lora(sl, hf, &s.t, qkv + 4 * sl.out_offset as u64)?;
            }
        }
        g.launch(
            &g.kernels.rope_append,
            LaunchConfig {
                grid_dim: (heads as u32, 1, 1),
                block_dim: (hd.next_multiple_of(32) as u32, 1, 1),
                shared_mem_bytes: 0,
            },
            &[
                g.p(&s.qkv),
                g.p(&g.cos),
                g.p(&g.sin),
                Arg::I(hidden as i32),
                Arg::I(hd as i32),
                Arg::I(cfg.rotary_dim() as i32),
                Arg::I(pos as i32),
                Arg::P(step),
                Arg::P(lay),
                Arg::I(cap as i32),
                Arg::P(kp),
                Arg::P(vp),
                g.p(&s.q),
            ],
        )?;
        g.launch(
            &g.kernels.attn_part,
            LaunchConfig {
                grid_dim: (heads as u32, splits as u32, 1),
                block_dim: (CHUNK as u32, 1, 1),
                shared_mem_bytes: 0,
            },
            &[
                g.p(&s.q),
                Arg::P(kp),
                Arg::P(vp),
                Arg::I(hd as i32),
                Arg::I(cap as i32),
                Arg::I(n as i32),
                Arg::P(step),
                Arg::P(lay),
                Arg::F(1.0 / (hd as f32).sqrt()),
                g.p(&s.pm),
                g.p(&s.pl),
                g.p(&s.po),
            ],
        )?;
        g.launch(
            &g.kernels.attn_merge_q8,
            one_block(1024),
            &[
                g.p(&s.pm),
                g.p(&s.pl),
                g.p(&s.po),
                Arg::I(hd as i32),
                Arg::I(hidden as i32),
                Arg::I(splits as i32),
                Arg::I(n as i32),
                Arg::P(step),
                g.p(&s.y.q),
                g.p(&s.y.d),
                g.p(&s.y.s),
                Arg::P(yf),
            ],
        )?;
        g.mmvq(&l.dense, &s.y, yf, Mode::Add, xp)?;
        if let Some(sl) = slot(LoraTarget::Dense) {
            g.lora(sl, yf, &s.t, xp)?;
        }
        let act = ptr(&s.act, &g.stream);
        // With an adapter on fc1 its delta goes in before GELU.
        let fc1 = slot(LoraTarget::Fc1);
        if let Some(sl) = fc1 {
            g.mmvq(&l.fc1, &s.h, hf, Mode::Store, act)?;
            g.lora(sl, hf, &s.t, act)?;
        } else {
            g.mmvq(&l.fc1, &s.h, hf, Mode::Gelu, act)?;
        }
        let inter = s.act.len();
        g.launch(
            &g.kernels.quant_q8,
            LaunchConfig {
                grid_dim: ((inter / 32).div_ceil(8) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            },
            &[
                g.p(&s.act),
                Arg::I(inter as i32),
                Arg::I(i32::from(fc1.is_some())),
                g.p(&s.a.q),
                g.p(&s.a.d),
                g.p(&s.a.s),
            ],
        )?;
        g.mmvq(&l.fc2, &s.a, act, Mode::Add, xp)?;
        if let Some(sl) = slot(LoraTarget::Fc2) {
            g.lora(sl, act, &s.t, xp)?;
        }
    }
    let hf = if g.lm_head.dense {
        ptr(&s.hf, &g.stream)
    } else {
        0
    };
    g.layer_norm(&s.x, &g.final_norm, &s.h, hf)?;
    g.mmvq(&g.lm_head, &s.h, hf, Mode::Store, logits)
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{QTensor, gguf_file};
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::{Logits, PhiConfig, QuantType, write_synthetic_gguf};

    const TYPES: [GgmlDType; 4] = [
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
        GgmlDType::Q8_0,
    ];

    /// Model `r` of [`model_on`] with the prompt kernels off, so that the
    /// tensor path the tests compare against is candle's ops throughout.
    fn model(r: usize, dir: &std::path::Path, dev: &Device) -> Phi {
        let phi = model_on(r, dir, dev);
        if let Some(g) = &phi.gpu {
            g.set_prompt_kernels(false);
        }
        phi
    }

    /// A synthetic model whose qkv, dense, fc1, fc2 and output weights are
    /// `TYPES` rotated by `r` (every type at every place over four models);
    /// model 4 is all f32, model 5 all Q8_0 with head size 80.
    fn model_on(r: usize, dir: &std::path::Path, dev: &Device) -> Phi {
        let cfg = PhiConfig::tiny(320, 512);
        let base = dir.join("base.gguf");
        write_synthetic_gguf(&cfg, QuantType::F32, 5, &base, |_, _, _| {}).unwrap();
        if r == 4 {
            return crate::load_model(&base, dev).unwrap();
        }
        if r == 5 {
            // Phi-2's head size (80): rotary threads past it idle, and the
            // merge's 32-value blocks straddle heads. Q8_0 throughout (the
            // K-quants need 256-wide rows), its token table quantized.
            let cfg = PhiConfig {
                hidden_size: 320,
                intermediate_size: 640,
                ..cfg
            };
            let path = dir.join("q8-80.gguf");
            write_synthetic_gguf(&cfg, QuantType::Q8_0, 6, &path, |_, _, _| {}).unwrap();
            return crate::load_model(&path, dev).unwrap();
        }
        let mut f = std::fs::File::open(&base).unwrap();
        let content = gguf_file::Content::read(&mut f).unwrap();
        let pick = |name: &str| {
            let at = [
                "attn_qkv",
                "attn_output",
                "ffn_up",
                "ffn_down",
                "output.weight",
            ]
            .iter()
            .position(|p| name.contains(p))?;
            name.ends_with(".weight").then(|| TYPES[(at + r) % 4])
        };
        let tensors: Vec<(String, QTensor)> = content
            .tensor_infos
            .keys()
            .map(|name| {
                let t = content.tensor(&mut f, name, &Device::Cpu).unwrap();
                let t = match pick(name) {
                    Some(dt) => {
                        QTensor::quantize(&t.dequantize(&Device::Cpu).unwrap(), dt).unwrap()
                    }
                    None => t,
                };
                (name.clone(), t)
            })
            .collect();
        let meta: Vec<(String, gguf_file::Value)> = content.metadata.into_iter().collect();
        let path = dir.join(format!("mixed{r}.gguf"));
        crate::write_gguf(&path, &meta, &tensors).unwrap();
        crate::load_model(&path, dev).unwrap()
    }

    /// Random slots of rank 8 on every target (but fc1 unless `fc1`), on `dev`.
    fn adapter(phi: &Phi, dev: &Device, fc1: bool) -> LoraAdapter {
        let cfg = phi.config();
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let mut random =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-0.3f32..0.3)).collect() };
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| {
                let mut l = LoraLayer::default();
                for t in LoraTarget::ALL {
                    if t == LoraTarget::Fc1 && !fc1 {
                        continue;
                    }
                    let (inp, out) = t.shape(cfg);
                    l.set(
                        t,
                        LoraSlot {
                            a: Tensor::from_vec(random(8 * inp), (8, inp), dev).unwrap(),
                            b: Tensor::from_vec(random(out * 8), (out, 8), dev).unwrap(),
                            scale: 2.0,
                            out_offset: t.fused_offset(cfg),
                            dropout: 0.0,
                            dropout_seed: 0,
                        },
                    );
                }
                l
            })
            .collect();
        LoraAdapter {
            layers,
            id: "gpu-test".into(),
        }
    }

    /// The GPU, and the lock that keeps GPU tests from running at once (see
    /// [`crate::GPU_TESTS`]; a failed test's poison is no reason to fail).
    fn cuda() -> (std::sync::MutexGuard<'static, ()>, Device) {
        let lock = crate::GPU_TESTS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let dev = crate::DeviceChoice::Cuda(0)
            .open()
            .expect("these tests need a CUDA device");
        (lock, dev)
    }

    /// Each decode step on the kernels against the tensor path from equal
    /// caches: 250 prompt tokens, then 60 steps (the cache grows past 256
    /// and the attention goes from two splits to three on the way), then 5
    /// tokens through the tensor path on both caches (a next turn reading
    /// what the kernels wrote). Models: every quantized type in every place
    /// (0–3), dense f32 (4), head size 80 in Q8_0 (5); adapters on 1 (no
    /// fc1 slot), 3 (every target) and 4 (no fc1 slot), so fc1 runs both
    /// with GELU in the product and with the delta before GELU; the models
    /// without an adapter again with the step replayed as a CUDA graph
    /// (recaptured when the cache grows). Logits within
    /// 2% of the largest; the greedy token the same wherever the reference's
    /// top two are further apart than that.
    #[test]
    fn decode_steps_equal_the_tensor_path() {
        let (_lock, dev) = cuda();
        let dir = tempfile::tempdir().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for r in 0..6 {
            eprintln!("model {r}");
            let phi = model(r, dir.path(), &dev);
            assert!(
                phi.gpu.is_some(),
                "model {r} does not run on the decode kernels"
            );
            let lora = [1, 3, 4].contains(&r).then(|| adapter(&phi, &dev, r == 3));
            let lora = lora.as_ref();
            assert!(takes(&phi, lora));
            // Steps without an adapter also as a replayed graph.
            for graphs in [false, true] {
                if graphs && lora.is_some() {
                    continue;
                }
                let g = phi.gpu.as_ref().expect("checked");
                g.set_graphs(graphs);
                compare(
                    &phi,
                    &dev,
                    lora,
                    &mut rng,
                    &format!("model {r}, graphs {graphs}"),
                );
                let (on, captures, error) = g.graph_state();
                assert_eq!(on, graphs, "model {r}: the graph fell back: {error:?}");
                // One capture served every step and the cache's growth past 256.
                assert_eq!(captures, usize::from(graphs), "model {r}");
            }
        }
    }

    /// A prompt's attention on the kernels against the tensor path from
    /// equal caches: three prompts in turn (100 tokens onto an empty cache,
    /// 70 after them, 130 more: the cache grows past 256 on the way), every
    /// position's logits within 2% of the largest; then 10 one-token steps
    /// through the kernels (what a step the decode kernels do not take
    /// runs), then 20 decode steps on what the kernels wrote. Models 0-5 of
    /// `model` (head sizes 64 and 80) and two f32 ones with head sizes 32
    /// and 128 (every size the kernel is built for); adapters on 1 and 3
    /// (the q, k and v deltas reach the kernels).
    #[test]
    fn prompt_attention_equals_the_tensor_path() {
        let (_lock, dev) = cuda();
        let dir = tempfile::tempdir().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for r in 0..8 {
            let phi = if r < 6 {
                model(r, dir.path(), &dev)
            } else {
                let heads = if r == 6 { 8 } else { 2 };
                let cfg = PhiConfig {
                    num_attention_heads: heads,
                    ..PhiConfig::tiny(320, 512)
                };
                let path = dir.path().join(format!("heads{heads}.gguf"));
                write_synthetic_gguf(&cfg, QuantType::F32, 7, &path, |_, _, _| {}).unwrap();
                crate::load_model(&path, &dev).unwrap()
            };
            let g = phi.gpu.as_ref().expect("on the decode kernels");
            assert!(PROMPT_HEAD_SIZES.contains(&phi.config().head_dim()));
            let lora = [1, 3].contains(&r).then(|| adapter(&phi, &dev, r == 3));
            let lora = lora.as_ref();
            // On by default where the GPU has the tensor cores (`model`
            // turns them off); `passes_alike` sets them for each pass and
            // turns them off after it.
            if r >= 6 && std::env::var_os("DRAMATIS_GPU_PROMPT").is_none() {
                let Device::Cuda(cuda) = &dev else {
                    unreachable!()
                };
                let on = crate::flash::tensor_cores(cuda);
                assert_eq!(g.prompt_kernels(), on, "model {r}: the default");
            }
            let worst = passes_alike(
                &phi,
                &dev,
                lora,
                &mut rng,
                &|on| g.set_prompt_kernels(on),
                (&[100, 70, 130], 10, 20, 7),
                r,
            );
            eprintln!(
                "model {r}, prompt kernels: worst logit difference {worst:.2e} of the largest"
            );
        }
    }

    /// A prompt's rows looked up in the quantized table on the GPU equal
    /// the host's dequantized rows (the same blocks, dequantized by
    /// different code: within 1e-6 of the largest), for each type a Q4_K_M
    /// or Q8_0 file holds its table in; an id past the table is refused.
    #[test]
    fn prompt_embedding_on_the_gpu_equals_the_host_rows() {
        use crate::model::Embedding;
        let (_lock, dev) = cuda();
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let (rows, width) = (300, 512);
        let table: Vec<f32> = (0..rows * width)
            .map(|_| rng.random_range(-1f32..1.0))
            .collect();
        let table = Tensor::from_vec(table, (rows, width), &Device::Cpu).unwrap();
        for dtype in [
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
            GgmlDType::Q8_0,
        ] {
            let q = QTensor::quantize(&table, dtype).unwrap();
            let raw = crate::cpu::Bytes::Owned(Arc::new(q.data().unwrap().into_owned()));
            let embed = Embedding::quantized(raw, dtype, rows, width);
            let ids: Vec<u32> = [0, rows as u32 - 1, 7, 7]
                .into_iter()
                .chain((0..60).map(|_| rng.random_range(0..rows as u32)))
                .collect();
            let ids = Tensor::from_vec(ids, (2, 32), &Device::Cpu).unwrap();
            let gpu = embed.forward_prompt(&ids, &dev).unwrap();
            assert!(gpu.device().is_cuda(), "{dtype:?}");
            assert_eq!(gpu.dims(), [2, 32, width]);
            let host = embed.forward_prompt(&ids, &Device::Cpu).unwrap();
            let (a, b): (Vec<f32>, Vec<f32>) = (
                gpu.flatten_all().unwrap().to_vec1().unwrap(),
                host.flatten_all().unwrap().to_vec1().unwrap(),
            );
            let top = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let off = a
                .iter()
                .zip(&b)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(off <= 1e-6 * top, "{dtype:?}: {off} of {top}");
            let past = Tensor::new(&[[3u32, rows as u32]], &Device::Cpu).unwrap();
            let err = embed.forward_prompt(&past, &dev).unwrap_err().to_string();
            assert!(err.contains("outside the vocabulary"), "{err}");
            assert!(embed.on_gpu(), "{dtype:?}: the table was not copied");
            // A table kept on the host (training) gives the same rows.
            let raw = crate::cpu::Bytes::Owned(Arc::new(q.data().unwrap().into_owned()));
            let kept = Embedding::quantized(raw, dtype, rows, width);
            kept.keep_on_host();
            let again = kept.forward_prompt(&ids, &dev).unwrap();
            assert!(
                !kept.on_gpu(),
                "{dtype:?}: copied although kept on the host"
            );
            let again: Vec<f32> = again.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(again, b, "{dtype:?}: the host's rows");
        }
    }

    /// The prompt GEMM (the weight dequantized to f16, one cuBLAS product
    /// accumulating in f32) against the f32 product of the same dequantized
    /// weight on the host, for every type a Q4_K_M or Q8_0 file holds in its
    /// products: within 5e-3 of the largest output (f16 rounds the weight
    /// and the activations at about 5e-4 each); candle's int8 kernels on the
    /// same inputs are printed beside it. Fewer than `ROWS` rows, or the
    /// path off, keep candle's kernels.
    #[test]
    fn prompt_gemm_equals_the_host_product() {
        use crate::linear::prompt_gemm;
        use candle_core::Module;
        let (_lock, dev) = cuda();
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let (out, inp) = (384, 512);
        for dtype in [
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
            GgmlDType::Q8_0,
        ] {
            let w: Vec<f32> = (0..out * inp)
                .map(|_| rng.random_range(-1f32..1.0))
                .collect();
            let w = Tensor::from_vec(w, (out, inp), &Device::Cpu).unwrap();
            let host = QTensor::quantize(&w, dtype).unwrap();
            let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
                dtype,
                &host.data().unwrap(),
                vec![out, inp],
                &dev,
            )
            .unwrap();
            let x: Vec<f32> = (0..2 * 50 * inp)
                .map(|_| rng.random_range(-3f32..3.0))
                .collect();
            let x = Tensor::from_vec(x, (2, 50, inp), &dev).unwrap();
            prompt_gemm::set(false);
            assert!(!prompt_gemm::takes(&q, &x), "{dtype:?}: taken while off");
            prompt_gemm::set(true);
            assert!(prompt_gemm::takes(&q, &x), "{dtype:?}");
            assert!(
                !prompt_gemm::takes(&q, &x.narrow(1, 0, 31).unwrap()),
                "{dtype:?}: 62 rows"
            );
            let got = prompt_gemm::product(&q, &x).unwrap();
            assert_eq!(got.dims(), [2, 50, out]);
            let want = x
                .to_device(&Device::Cpu)
                .unwrap()
                .broadcast_matmul(&host.dequantize(&Device::Cpu).unwrap().t().unwrap())
                .unwrap();
            let mmq = candle_core::quantized::QMatMul::from_qtensor(q)
                .unwrap()
                .forward(&x)
                .unwrap();
            let flat = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
            let (got, want, mmq) = (flat(&got), flat(&want), flat(&mmq));
            let top = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let off = |a: &[f32]| {
                a.iter()
                    .zip(&want)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
                    / top
            };
            let (ours, theirs) = (off(&got), off(&mmq));
            eprintln!(
                "{dtype:?}: prompt GEMM {ours:.2e}, candle's kernels {theirs:.2e} of the largest"
            );
            assert!(ours <= 5e-3, "{dtype:?}: {ours}");
        }
        prompt_gemm::set(false);
    }

    /// Prompts through the prompt GEMM against candle's kernels, whole
    /// models (every quantized type in every place, adapters on 1 and 3),
    /// 100 then 70 tokens onto a cache: every position's logits within 2%
    /// of the largest, and decode steps on the cache it wrote.
    #[test]
    fn prompts_through_the_gemm_equal_candle_s_kernels() {
        use crate::linear::prompt_gemm;
        let (_lock, dev) = cuda();
        let dir = tempfile::tempdir().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(17);
        for r in [0, 1, 2, 3, 5] {
            let phi = model(r, dir.path(), &dev);
            let lora = [1, 3].contains(&r).then(|| adapter(&phi, &dev, r == 3));
            let lora = lora.as_ref();
            let worst = passes_alike(
                &phi,
                &dev,
                lora,
                &mut rng,
                &prompt_gemm::set,
                (&[100, 70], 0, 5, 3),
                r,
            );
            eprintln!("model {r}, prompt GEMM: worst logit difference {worst:.2e} of the largest");
        }
    }

    /// Passes with a switch on against the same passes with it off, from
    /// two caches of `phi` (the switch set around each pass, left off):
    /// prompts of `lens` random tokens in turn, then `steps` one-token
    /// passes, every position's logits within 2% of the largest; then
    /// `decodes` decode steps on what each wrote, from token `first`.
    /// Returns the worst difference (of the largest logit).
    fn passes_alike(
        phi: &Phi,
        dev: &Device,
        lora: Option<&LoraAdapter>,
        rng: &mut rand::rngs::StdRng,
        set: &dyn Fn(bool),
        (lens, steps, decodes, first): (&[usize], u32, usize, u32),
        r: usize,
    ) -> f32 {
        let vocab = phi.config().vocab_size as u32;
        let (mut fast, mut reference) = (phi.new_cache(), phi.new_cache());
        let all = |ids: &[u32], cache: &mut KvCache, on: bool| -> Vec<f32> {
            set(on);
            let x = Tensor::new(ids, dev).unwrap().unsqueeze(0).unwrap();
            let out = phi.run_tensors(&x, Some(cache), Logits::All, lora);
            set(false);
            out.unwrap().flatten_all().unwrap().to_vec1().unwrap()
        };
        let mut worst = 0f32;
        for (turn, &len) in lens.iter().enumerate() {
            let ids: Vec<u32> = (0..len).map(|_| rng.random_range(0..vocab)).collect();
            let a = all(&ids, &mut fast, true);
            let b = all(&ids, &mut reference, false);
            assert_eq!(fast.len(), reference.len());
            for (p, (a, b)) in a
                .chunks(vocab as usize)
                .zip(b.chunks(vocab as usize))
                .enumerate()
            {
                let off = within(a, b, format_args!("model {r} turn {turn} position {p}"));
                worst = worst.max(off);
            }
        }
        // One token at a time through the switched path.
        for step in 0..steps {
            let id = [(step * 37 + 11) % vocab];
            let a = all(&id, &mut fast, true);
            let b = all(&id, &mut reference, false);
            let off = within(&a, &b, format_args!("model {r} one-token step {step}"));
            worst = worst.max(off);
        }
        // Decode steps read the keys and values each wrote.
        let mut token = first;
        for step in 0..decodes {
            let a = pass(phi, dev, lora, &[token], &mut fast, true);
            let b = pass(phi, dev, lora, &[token], &mut reference, true);
            let off = within(&a, &b, format_args!("model {r} decode step {step}"));
            worst = worst.max(off);
            token = argmax(&b);
        }
        worst
    }

    /// Steps on two caches at once, from two threads (each on its own CUDA
    /// stream, sharing the step's buffers), against the tensor path; one
    /// capture serves both caches.
    #[test]
    fn two_threads_on_two_caches_decode_alike() {
        let (_lock, dev) = cuda();
        let dir = tempfile::tempdir().unwrap();
        for graphs in [false, true] {
            let phi = model(0, dir.path(), &dev);
            let g = phi.gpu.as_ref().expect("on the decode kernels");
            g.set_graphs(graphs);
            let (phi, dev) = (&phi, &dev);
            std::thread::scope(|scope| {
                for t in 0..2u32 {
                    scope.spawn(move || {
                        let (mut fast, mut reference) = (phi.new_cache(), phi.new_cache());
                        let run = |ids: &[u32], cache: &mut KvCache, tensors: bool| {
                            pass(phi, dev, None, ids, cache, tensors)
                        };
                        let prompt: Vec<u32> = (0..40).map(|i| (i * 7 + t * 13) % 320).collect();
                        run(&prompt, &mut fast, false);
                        run(&prompt, &mut reference, true);
                        for step in 0..40u32 {
                            let id = (step * 11 + t * 5) % 320;
                            let a = run(&[id], &mut fast, false);
                            let b = run(&[id], &mut reference, true);
                            within(
                                &a,
                                &b,
                                format_args!("thread {t} step {step} graphs {graphs}"),
                            );
                        }
                    });
                }
            });
            let (on, captures, error) = g.graph_state();
            assert_eq!(on, graphs, "the graph fell back: {error:?}");
            assert_eq!(captures, usize::from(graphs));
        }
    }

    /// One model's run of [`decode_steps_equal_the_tensor_path`].
    fn compare(
        phi: &Phi,
        dev: &Device,
        lora: Option<&LoraAdapter>,
        rng: &mut rand::rngs::StdRng,
        name: &str,
    ) {
        let vocab = phi.config().vocab_size as u32;
        let prompt: Vec<u32> = (0..250).map(|_| rng.random_range(0..vocab)).collect();
        let (mut fast, mut reference) = (phi.new_cache(), phi.new_cache());
        let run = |ids: &[u32], cache: &mut KvCache, tensors: bool| {
            pass(phi, dev, lora, ids, cache, tensors)
        };
        let first = run(&prompt, &mut fast, false);
        run(&prompt, &mut reference, true);
        let mut token = argmax(&first);
        let (mut worst, mut compared) = (0f32, 0);
        let mut check = |step: usize, a: &[f32], b: &[f32]| {
            worst = worst.max(within(a, b, format_args!("{name} step {step}")));
            let top = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let mut sorted = b.to_vec();
            sorted.sort_by(|x, y| y.total_cmp(x));
            if sorted[0] - sorted[1] > 0.02 * top {
                assert_eq!(argmax(a), argmax(b), "{name} step {step}");
                compared += 1;
            }
            argmax(b)
        };
        for step in 0..60 {
            let a = run(&[token], &mut fast, false);
            let b = run(&[token], &mut reference, true);
            assert_eq!(fast.len(), reference.len());
            token = check(step, &a, &b);
        }
        let next: Vec<u32> = (0..5).map(|_| rng.random_range(0..vocab)).collect();
        let a = run(&next, &mut fast, true);
        let b = run(&next, &mut reference, true);
        check(60, &a, &b);
        assert!(
            compared >= 30,
            "{name}: only {compared} clear greedy tokens"
        );
        eprintln!(
            "{name}: worst logit difference {worst:.2e} of the largest; {compared} greedy tokens compared"
        );
    }

    /// `ids` after `cache`, through the kernels (or the tensor path), as
    /// the last position's logits.
    fn pass(
        phi: &Phi,
        dev: &Device,
        lora: Option<&LoraAdapter>,
        ids: &[u32],
        cache: &mut KvCache,
        tensors: bool,
    ) -> Vec<f32> {
        let x = Tensor::new(ids, dev).unwrap().unsqueeze(0).unwrap();
        let out = if tensors {
            phi.run_tensors(&x, Some(cache), Logits::Last, lora)
        } else {
            phi.forward(&x, Some(cache), Logits::Last, lora)
        };
        out.unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Asserts the largest difference of `a` from the reference `b` is finite
    /// and at most 2% of `b`'s largest magnitude; returns it as that share.
    fn within(a: &[f32], b: &[f32], what: std::fmt::Arguments<'_>) -> f32 {
        let top = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            diff.is_finite() && diff <= 0.02 * top,
            "{what}: {diff} of {top}"
        );
        diff / top
    }

    fn argmax(v: &[f32]) -> u32 {
        v.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as u32)
            .unwrap()
    }
}
