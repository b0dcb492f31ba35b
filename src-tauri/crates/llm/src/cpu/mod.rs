//! The CPU's quantized matrix products, over the GGUF blocks where they lie
//! (the memory-mapped file: one copy of the weights, paged in by the OS, no
//! repacking before the first reply), and the threads that run them.
//!
//! A product quantizes its input once to 8-bit blocks, then splits the
//! weight's rows among the threads; each thread takes its rows a few at a
//! time against a tile of input rows, so the weights stay in its cache while
//! the tile streams by. Used where [`Avx2`] is detected (every x86-64 CPU of
//! the last ten years); elsewhere (Apple's NEON) candle's kernels serve.
//!
//! Where every block's products run here, the whole forward pass of a
//! session runs here too ([`forward`]): plain f32 buffers on the engine's
//! threads, an f16 KV cache and a fused attention over it ([`attention`]).

mod attention;
mod avx2;
mod avx512;
pub(crate) mod blocks;
pub(crate) mod forward;
pub(crate) mod pool;
pub mod threads;
mod tiled;

use std::sync::Arc;

pub(crate) use avx2::Avx2;
use avx512::Avx512;
use blocks::Kind;

/// Bytes of a weight: a range of the mapped model file, or owned (a matrix
/// assembled from parts).
#[derive(Clone)]
pub(crate) enum Bytes {
    Owned(Arc<Vec<u8>>),
    Mapped {
        map: Arc<memmap2::Mmap>,
        start: usize,
        len: usize,
    },
}

impl Bytes {
    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            Self::Owned(v) => v,
            Self::Mapped { map, start, len } => &map[*start..*start + *len],
        }
    }
}

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Owned(v) => write!(f, "Bytes::Owned({} bytes)", v.len()),
            Self::Mapped { len, .. } => write!(f, "Bytes::Mapped({len} bytes)"),
        }
    }
}

/// Maps a model file read-only.
#[allow(unsafe_code)]
pub(crate) fn map_file(file: &std::fs::File) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: model files are written once (downloads land under a temporary
    // name and are renamed into place; the cache keeps blobs immutable) and
    // only read afterwards; a file changed under the mapping would show
    // changed weights, not unsound memory, except that truncating it would
    // fault — the same contract as llama.cpp's mmap and candle's safetensors.
    unsafe { memmap2::Mmap::map(file) }
}

impl Bytes {
    /// `len` bytes at `start` of a mapping (checked).
    pub(crate) fn mapped(map: &Arc<memmap2::Mmap>, start: usize, len: usize) -> Option<Self> {
        (start.checked_add(len)? <= map.len()).then(|| Self::Mapped {
            map: map.clone(),
            start,
            len,
        })
    }
}

/// A `[rows, cols]` matrix of quantized blocks, row-major, multiplied on the CPU.
#[derive(Debug, Clone)]
pub(crate) struct QMatrix {
    bytes: Bytes,
    kind: Kind,
    rows: usize,
    cols: usize,
    simd: Avx2,
    /// The K-quants' wider kernels, where the CPU has AVX-512.
    wide: Option<Avx512>,
    /// The tiled products for many tokens (see [`tiled::Tiles`]).
    tiles: Option<tiled::Tiles>,
}

/// Rows of the input multiplied against the same few weight rows before moving on.
const INPUT_TILE: usize = 32;

/// Input rows the AVX-512 kernels take per weight row: its unpacked
/// weights and scales (8 registers) stay in registers while each row's
/// chunks stream by. 16 measured 4-5% slower for prefill here.
const WIDE_ROWS: usize = 8;

impl QMatrix {
    /// `None` when the type has no kernel here, the CPU lacks AVX2, or the
    /// byte count does not match the shape.
    pub(crate) fn new(
        bytes: Bytes,
        dtype: candle_core::quantized::GgmlDType,
        rows: usize,
        cols: usize,
    ) -> Option<Self> {
        let kind = Kind::from_ggml(dtype)?;
        let simd = Avx2::detect()?;
        if !cols.is_multiple_of(kind.block_elems())
            || bytes.as_slice().len() != rows * cols / kind.block_elems() * kind.block_bytes()
        {
            return None;
        }
        Some(Self {
            bytes,
            kind,
            rows,
            cols,
            simd,
            wide: Avx512::detect(),
            tiles: tiled::Tiles::detect(),
        })
    }

    /// Whether weights of type `dtype` run on these kernels on this CPU.
    pub(crate) fn supports(dtype: candle_core::quantized::GgmlDType) -> bool {
        Kind::from_ggml(dtype).is_some() && Avx2::detect().is_some()
    }

    pub(crate) fn dtype(&self) -> candle_core::quantized::GgmlDType {
        self.kind.ggml()
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        self.bytes.as_slice()
    }

    fn row_bytes(&self) -> usize {
        self.cols / self.kind.block_elems() * self.kind.block_bytes()
    }

    /// `x Wᵀ` for `x` `[m, cols]` row-major: `[m, rows]`.
    #[cfg(test)]
    pub(crate) fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_with(x, m, Epilogue::default())
    }

    /// `x Wᵀ`, then `epilogue` on each output as it is written (by the
    /// thread that computed it: no second pass over the output).
    pub(crate) fn matmul_with(&self, x: &[f32], m: usize, epilogue: Epilogue<'_>) -> Vec<f32> {
        assert_eq!(x.len(), m * self.cols, "input is not [m, cols]");
        if let Some(b) = epilogue.bias {
            assert_eq!(b.len(), self.rows, "one bias per output");
        }
        let simd = self.simd;
        if let Some(v) = self.tiles
            && m >= tiles_from(self.kind)
            && self.rows.is_multiple_of(tiled::ROWS)
            && self.cols.is_multiple_of(blocks::QK_K)
        {
            return self.run_tiled(v, x, m, epilogue);
        }
        if self.kind == Kind::Q8_0 {
            let mut acts = Vec::with_capacity(x.len() / blocks::QK8_0);
            blocks::quantize_q8(x, &mut acts);
            return self.run(
                &acts,
                m,
                epilogue,
                |w, a| simd.dot_q8_0::<1>(w, [a])[0],
                |w, a| simd.dot_q8_0::<4>(w, a),
            );
        }
        let mut acts = Vec::with_capacity(x.len() / blocks::QK_K);
        blocks::quantize_q8k(x, &mut acts);
        // More input rows per weight row where the registers allow (AVX-512), else four.
        match self.wide {
            Some(v) => self.run_k::<_, WIDE_ROWS>(v, &acts, m, epilogue),
            None => self.run_k::<_, 4>(simd, &acts, m, epilogue),
        }
    }

    /// [`QMatrix::run`] for this matrix's K-quant type on `dots`' kernels.
    fn run_k<D: KDots, const N: usize>(
        &self,
        dots: D,
        acts: &[blocks::Q8K],
        m: usize,
        epilogue: Epilogue<'_>,
    ) -> Vec<f32> {
        match self.kind {
            Kind::Q4K => self.run(
                acts,
                m,
                epilogue,
                |w, a| dots.q4k::<1>(w, [a])[0],
                |w, a| dots.q4k::<N>(w, a),
            ),
            Kind::Q5K => self.run(
                acts,
                m,
                epilogue,
                |w, a| dots.q5k::<1>(w, [a])[0],
                |w, a| dots.q5k::<N>(w, a),
            ),
            _ => self.run(
                acts,
                m,
                epilogue,
                |w, a| dots.q6k::<1>(w, [a])[0],
                |w, a| dots.q6k::<N>(w, a),
            ),
        }
    }

    /// Every (input row, weight row) product, the weight rows split among
    /// the threads; input rows `N` at a time (`dotn`) where there are `N`.
    fn run<A: Sync, const N: usize>(
        &self,
        acts: &[A],
        m: usize,
        epilogue: Epilogue<'_>,
        dot: impl Fn(&[u8], &[A]) -> f32 + Sync,
        dotn: impl Fn(&[u8], [&[A]; N]) -> [f32; N] + Sync,
    ) -> Vec<f32> {
        let rb = self.row_bytes();
        let per_row = acts.len() / m;
        let w = self.bytes.as_slice();
        let threads = pool::threads();
        // Several chunks per thread so a slow thread's share is taken up by others.
        let chunk = self.rows.div_ceil(threads * 4).clamp(4, 64);
        if m == 1 {
            let mut out = vec![0f32; self.rows];
            pool::chunks(&mut out, chunk, |c, ys| {
                let r0 = c * chunk;
                for (i, y) in ys.iter_mut().enumerate() {
                    let r = r0 + i;
                    *y = dot(&w[r * rb..(r + 1) * rb], acts);
                }
                epilogue.apply(self.simd, ys, r0, 1);
            });
            return out;
        }
        // Computed as [rows, m] so each thread owns contiguous output, then transposed.
        let mut t = vec![0f32; self.rows * m];
        pool::chunks(&mut t, chunk * m, |c, ys| {
            let r0 = c * chunk;
            let n = ys.len() / m;
            for t0 in (0..m).step_by(INPUT_TILE) {
                let t1 = (t0 + INPUT_TILE).min(m);
                for i in 0..n {
                    let r = r0 + i;
                    let wr = &w[r * rb..(r + 1) * rb];
                    let a = |tok: usize| &acts[tok * per_row..(tok + 1) * per_row];
                    let mut tok = t0;
                    while tok + N <= t1 {
                        let v = dotn(wr, std::array::from_fn(|j| a(tok + j)));
                        ys[i * m + tok..i * m + tok + N].copy_from_slice(&v);
                        tok += N;
                    }
                    for tok in tok..t1 {
                        ys[i * m + tok] = dot(wr, a(tok));
                    }
                }
            }
            epilogue.apply(self.simd, ys, r0, m);
        });
        transpose(&t, self.rows, m)
    }

    /// The product for many tokens as [`tiled`] products.
    fn run_tiled(&self, v: tiled::Tiles, x: &[f32], m: usize, epilogue: Epilogue<'_>) -> Vec<f32> {
        v.product(
            self.kind,
            self.bytes.as_slice(),
            self.rows,
            self.cols,
            x,
            m,
            |tile, r0| epilogue.apply(self.simd, tile, r0, tiled::TOKENS),
        )
    }
}

/// The fewest tokens whose product takes the tiles. A panel holds 16
/// tokens, padded, so below 16 the tiles do a panel's work for fewer; the
/// row kernels' cost grows with each token instead. One core, seconds per
/// product of the whole model: Q8_0's row kernels 0.21, 0.42, 0.63 for 4, 8
/// and 12 tokens against 0.40 for a panel with AVX-512 (AVX2 only: 0.41 and
/// 0.63 for 8 and 12 against 0.50), so from 10 tokens; Q4_K_M's 0.30 (12
/// tokens, AVX-512) and 0.41 (AVX2) against 0.31 and 0.44 for a panel, so
/// the K-quants keep a whole panel.
fn tiles_from(kind: Kind) -> usize {
    match kind {
        Kind::Q8_0 => 10,
        _ => tiled::TOKENS,
    }
}

/// `[m, rows]` from `[rows, m]`, on the engine's threads.
fn transpose(t: &[f32], rows: usize, m: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * m];
    pool::chunks(&mut out, rows, |tok, o| {
        for (r, v) in o.iter_mut().enumerate() {
            *v = t[r * m + tok];
        }
    });
    out
}

/// One instruction set's K-quant dot products: a weight row against `N`
/// rows of activations (the AVX2 and AVX-512 kernels).
trait KDots: Copy + Sync {
    fn q4k<const N: usize>(self, row: &[u8], acts: [&[blocks::Q8K]; N]) -> [f32; N];
    fn q5k<const N: usize>(self, row: &[u8], acts: [&[blocks::Q8K]; N]) -> [f32; N];
    fn q6k<const N: usize>(self, row: &[u8], acts: [&[blocks::Q8K]; N]) -> [f32; N];
}

/// Both proofs answer with their own kernels.
macro_rules! k_dots {
    ($t:ty) => {
        impl KDots for $t {
            fn q4k<const N: usize>(self, row: &[u8], acts: [&[blocks::Q8K]; N]) -> [f32; N] {
                self.dot_q4k::<N>(row, acts)
            }
            fn q5k<const N: usize>(self, row: &[u8], acts: [&[blocks::Q8K]; N]) -> [f32; N] {
                self.dot_q5k::<N>(row, acts)
            }
            fn q6k<const N: usize>(self, row: &[u8], acts: [&[blocks::Q8K]; N]) -> [f32; N] {
                self.dot_q6k::<N>(row, acts)
            }
        }
    };
}
k_dots!(Avx2);
k_dots!(Avx512);

/// What a product does to each output before storing it.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Epilogue<'a> {
    /// Added to output `r` (one per weight row).
    pub(crate) bias: Option<&'a [f32]>,
    /// Then GELU (the tanh approximation, Phi-2's `gelu_new`).
    pub(crate) gelu: bool,
}

impl Epilogue<'_> {
    /// On outputs `ys` of weight rows `r0..`, `per` values per row (one per
    /// input row): the row's bias, then GELU, by the thread that computed them.
    fn apply(&self, simd: Avx2, ys: &mut [f32], r0: usize, per: usize) {
        if let Some(b) = self.bias {
            for (run, b) in ys.chunks_exact_mut(per).zip(&b[r0..]) {
                run.iter_mut().for_each(|v| *v += b);
            }
        }
        if self.gelu {
            simd.gelu(ys);
        }
    }
}

/// GELU, tanh approximation: ½x(1 + tanh(√(2/π)(x + 0.044715x³))).
#[inline]
pub(crate) fn gelu(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // √(2/π)
    0.5 * x * (1.0 + (C * (x + 0.044_715 * x * x * x)).tanh())
}

#[cfg(test)]
mod tests;
