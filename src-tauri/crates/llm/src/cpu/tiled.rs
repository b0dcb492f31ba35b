//! Prefill's quantized products (Q4_K, Q5_K, Q6_K, Q8_0) as an 8-bit
//! matrix product: the activations of 16 tokens side by side, one weight
//! value broadcast against all of them per multiply.
//!
//! The row kernels of [`super::avx512`] multiply one weight row by eight
//! activation rows with `maddubs` then a scale multiply per 64 values — two
//! multiplies per 64 products. Here the activations are laid out as panels
//! of 16 tokens: a 64-byte line holds four consecutive values of each of 16
//! tokens, so `dpbusd` with four weight bytes broadcast (unsigned, the
//! unpacked values) adds 64 products into 16 per-token sums in one
//! instruction, and a sub-block's scale is one integer multiply per 32 (or
//! 16) values × 16 tokens. The weights are unpacked to one byte per value a
//! few rows at a time into the thread's scratch (from the mapped blocks,
//! never a second copy of the model), and every token panel reuses them.
//! [`Tiles`] says which instructions do it on this CPU: AVX-512 VNNI, or on
//! 256 bits AVX-VNNI or plain AVX2 (module `avx`).
//!
//! The integer sums are those of the plain dot products in
//! [`super::blocks`]; only the float accumulation order differs, so the
//! tests compare them up to float rounding.
#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::blocks::{self, Kind, QK_K};
use super::pool::{self, Parts};

/// Tokens per panel: one 32-bit lane each in a 512-bit register.
pub(crate) const TOKENS: usize = 16;
/// Weight rows multiplied against a panel at once (their eight sums and
/// eight scaled sums stay in registers).
pub(crate) const ROWS: usize = 8;

/// 64 bytes on a cache line: four values of each of 16 tokens.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([i8; 64]);

/// 16 lanes of 32 bits on a cache line: one per token.
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
struct Lanes([i32; TOKENS]);

/// The activations of a product, quantized to 8 bits and laid out in
/// panels of 16 tokens (the last padded with zeros): one scale per 256
/// values for the K-quants (as [`blocks::quantize_q8k`]), one per 32 for
/// Q8_0 (as [`blocks::quantize_q8`]).
pub(crate) struct Panels {
    m: usize,
    nb: usize,
    /// `[panel][super-block][64 lines]`: line `g` holds values `4g..4g + 4`.
    q: Vec<Line>,
    /// `[panel][super-block][256 / values per scale]`: each token's scales (f32 bits).
    d: Vec<Lanes>,
    /// `[panel][super-block][16]`: each token's sums of 16 values.
    bsums: Vec<Lanes>,
    /// `[panel][super-block][4]`: the sums of 32 values of sub-blocks 2p
    /// (low 16 bits) and 2p + 1 (high), for the minimums' `dpwssd`.
    pairs: Vec<Lanes>,
}

impl Panels {
    /// Quantizes `x` (`[m, cols]`) panel by panel on the engine's threads,
    /// for weights of `kind`: one scale per 32 values for Q8_0's blocks, per
    /// 256 for the K-quants' super-blocks. `v` proves AVX2.
    pub(crate) fn new(x: &[f32], m: usize, cols: usize, kind: Kind, v: Tiles) -> Self {
        assert!(cols.is_multiple_of(QK_K) && x.len() == m * cols);
        let _ = v;
        let per = kind.block_elems();
        let nb = cols / QK_K;
        let nd = QK_K / per;
        let panels = m.div_ceil(TOKENS);
        let mut q = vec![Line([0; 64]); panels * nb * 64];
        let mut d = vec![Lanes::default(); panels * nb * nd];
        let mut bsums = vec![Lanes::default(); panels * nb * 16];
        let mut pairs = vec![Lanes::default(); panels * nb * 4];
        let (qp, dp) = (Parts::new(&mut q, nb * 64), Parts::new(&mut d, nb * nd));
        let (bp, pp) = (
            Parts::new(&mut bsums, nb * 16),
            Parts::new(&mut pairs, nb * 4),
        );
        pool::run(panels, |p| {
            // SAFETY: task `p` runs once and alone takes panel `p` of each.
            let (q, d, bsums, pairs) = unsafe { (qp.get(p), dp.get(p), bp.get(p), pp.get(p)) };
            let t0 = p * TOKENS;
            let t1 = (t0 + TOKENS).min(m);
            let mut qs = [0i8; QK_K];
            let mut ds = [0f32; 8];
            for (t, tok) in (t0..t1).enumerate() {
                for (k, xs) in x[tok * cols..(tok + 1) * cols]
                    .chunks_exact(QK_K)
                    .enumerate()
                {
                    // SAFETY: `v` proves AVX2.
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        quantize(xs, per, &mut qs, &mut ds[..nd])
                    };
                    for (g, four) in qs.chunks_exact(4).enumerate() {
                        q[k * 64 + g].0[t * 4..t * 4 + 4].copy_from_slice(four);
                    }
                    for (j, dj) in ds[..nd].iter().enumerate() {
                        d[k * nd + j].0[t] = dj.to_bits() as i32;
                    }
                    let mut s16 = [0i32; 16];
                    for (s, g) in s16.iter_mut().zip(qs.chunks_exact(16)) {
                        *s = g.iter().map(|&v| v as i32).sum();
                    }
                    for (j, &s) in s16.iter().enumerate() {
                        bsums[k * 16 + j].0[t] = s;
                    }
                    for pp in 0..4 {
                        let lo = (s16[4 * pp] + s16[4 * pp + 1]) as i16 as u16 as u32;
                        let hi = (s16[4 * pp + 2] + s16[4 * pp + 3]) as i16 as u16 as u32;
                        pairs[k * 4 + pp].0[t] = (lo | hi << 16) as i32;
                    }
                }
            }
        });
        Self {
            m,
            nb,
            q,
            d,
            bsums,
            pairs,
        }
    }

    fn panels(&self) -> usize {
        self.m.div_ceil(TOKENS)
    }
}

/// 256 values to 8 bits, one scale per `per` values: the largest magnitude
/// maps onto ±127, rounding to nearest even — the same numbers as
/// [`blocks::quantize_q8k`] and [`blocks::quantize_q8`], eight at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn quantize(x: &[f32], per: usize, q: &mut [i8; QK_K], d: &mut [f32]) {
    assert!(x.len() == QK_K && d.len() * per == QK_K && per.is_multiple_of(8));
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    for ((xs, qs), d) in x.chunks_exact(per).zip(q.chunks_exact_mut(per)).zip(d) {
        let load = |i: usize| {
            // SAFETY: 8 floats at 8i < per (the loops below).
            unsafe { _mm256_loadu_ps(xs.as_ptr().add(8 * i)) }
        };
        let mut m = _mm256_setzero_ps();
        for i in 0..per / 8 {
            // maxps answers its second operand where either is NaN: NaN
            // values are passed over, as `f32::max` does in the plain version.
            m = _mm256_max_ps(_mm256_and_ps(load(i), abs), m);
        }
        let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
        if amax == 0.0 || !amax.is_finite() {
            // As the plain version: a zero scale and zeros.
            *d = 0.0;
            qs.fill(0);
            continue;
        }
        *d = amax / 127.0;
        let id = _mm256_set1_ps(127.0 / amax);
        let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
        for (i, out) in qs.chunks_exact_mut(8).enumerate() {
            // NaN (a NaN value, or 0 · an infinite inverse scale) stays NaN
            // through the clamp and converts to 0x8000_0000, whose low byte
            // is 0 — as `NaN as i8` is in the plain version.
            let v = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_mul_ps(load(i), id)));
            let n = _mm256_cvtps_epi32(v);
            let mut lanes = [0i32; 8];
            // SAFETY: 32 bytes.
            unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), n) };
            for (o, l) in out.iter_mut().zip(lanes) {
                *o = l as i8;
            }
        }
    }
}

/// [`ROWS`] weight rows unpacked to one byte per value, with their
/// sub-blocks' scales: a thread's scratch, refilled for each group of rows.
pub(crate) struct Unpacked {
    nb: usize,
    /// `[row][super-block]`: values 0–63 (Q6_K's offset of 32 kept).
    q: Vec<[u8; QK_K]>,
    /// `[row][super-block][16]`: sub-block scales (Q4_K/Q5_K use 8).
    sc: Vec<[i32; 16]>,
    /// `[row][super-block][4]`: minimums of sub-blocks 2p and 2p + 1 as
    /// 16-bit pairs (Q4_K/Q5_K).
    mn: Vec<[i32; 4]>,
    /// `[row][super-block]`: `d` and `dmin`.
    d: Vec<[f32; 2]>,
    /// `[row][256 values]`: Q8_0's eight block scales.
    d8: Vec<[f32; 8]>,
}

impl Unpacked {
    pub(crate) fn new(cols: usize) -> Self {
        let nb = cols / QK_K;
        Self {
            nb,
            q: vec![[0; QK_K]; ROWS * nb],
            sc: vec![[0; 16]; ROWS * nb],
            mn: vec![[0; 4]; ROWS * nb],
            d: vec![[0.0; 2]; ROWS * nb],
            d8: vec![[0.0; 8]; ROWS * nb],
        }
    }

    /// Unpacks `rows` (`ROWS` rows of `kind` blocks, `row_bytes` each).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn fill(&mut self, kind: Kind, rows: &[u8], row_bytes: usize, tiles: Tiles) {
        // Bytes per 256 values (eight blocks of Q8_0).
        let bb = kind.block_bytes() * (QK_K / kind.block_elems());
        for r in 0..ROWS {
            let row = &rows[r * row_bytes..(r + 1) * row_bytes];
            for (k, b) in row.chunks_exact(bb).enumerate() {
                let i = r * self.nb + k;
                match kind {
                    Kind::Q4K | Kind::Q5K => {
                        let fifth = kind == Kind::Q5K;
                        let (sc, mn) = blocks::k4_scales(&b[4..16]);
                        for (o, &v) in self.sc[i].iter_mut().zip(&sc) {
                            *o = v as i32;
                        }
                        for p in 0..4 {
                            self.mn[i][p] = mn[2 * p] as i32 | (mn[2 * p + 1] as i32) << 16;
                        }
                        self.d[i] = [blocks::f16_at(b, 0), blocks::f16_at(b, 2)];
                        let qs = if fifth { &b[48..176] } else { &b[16..144] };
                        let qh = if fifth { Some(&b[16..48]) } else { None };
                        unpack_k4(qs, qh, &mut self.q[i]);
                    }
                    Kind::Q6K => {
                        for (o, &v) in self.sc[i].iter_mut().zip(&b[192..208]) {
                            *o = v as i8 as i32;
                        }
                        self.d[i] = [blocks::f16_at(b, 208), 0.0];
                        unpack_q6k(&b[..192], &mut self.q[i]);
                    }
                    Kind::Q8_0 => {
                        // Signed values stored + 128 (unsigned for dpbusd);
                        // as they are for plain AVX2's sign trick.
                        let flip = if tiles.0 == Isa::Avx2 {
                            _mm256_setzero_si256()
                        } else {
                            _mm256_set1_epi8(i8::MIN)
                        };
                        for (j, blk) in b.chunks_exact(34).enumerate() {
                            self.d8[i][j] = blocks::f16_at(blk, 0);
                            let v = _mm256_xor_si256(load32(blk, 2), flip);
                            store32(&mut self.q[i], j * 32, v);
                        }
                    }
                }
            }
        }
    }
}

/// 32 bytes of `s` from `at` (checked).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
fn load32(s: &[u8], at: usize) -> __m256i {
    assert!(at + 32 <= s.len());
    // SAFETY: 32 readable bytes (checked above); unaligned load.
    unsafe { _mm256_loadu_si256(s.as_ptr().add(at).cast()) }
}

/// Stores 32 bytes at `q[at..]` (checked).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
fn store32(q: &mut [u8; QK_K], at: usize, v: __m256i) {
    assert!(at + 32 <= QK_K);
    // SAFETY: 32 writable bytes (checked above); unaligned store.
    unsafe { _mm256_storeu_si256(q.as_mut_ptr().add(at).cast(), v) }
}

/// Q4_K's 128 bytes of nibbles (and Q5_K's 32 bytes of fifth bits) as 256
/// values in order: chunk c's low nibbles are values 64c.., its high ones 64c + 32...
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn unpack_k4(qs: &[u8], qh: Option<&[u8]>, q: &mut [u8; QK_K]) {
    let m4 = _mm256_set1_epi8(0x0F);
    let one = _mm256_set1_epi8(1);
    for c in 0..4 {
        let v = load32(qs, c * 32);
        let mut lo = _mm256_and_si256(v, m4);
        let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4);
        if let Some(qh) = qh {
            // Bit 2c of byte l tops value l of the low half, bit 2c + 1 the high.
            let h = _mm256_srl_epi16(load32(qh, 0), _mm_cvtsi32_si128(2 * c as i32));
            let top = |h| _mm256_slli_epi16::<4>(_mm256_and_si256(h, one));
            lo = _mm256_or_si256(lo, top(h));
            hi = _mm256_or_si256(hi, top(_mm256_srli_epi16::<1>(h)));
        }
        store32(q, c * 64, lo);
        store32(q, c * 64 + 32, hi);
    }
}

/// Q6_K's 128 bytes of low nibbles and 64 of high bit pairs as 256 values
/// 0–63 in order (see [`blocks::dot_q6k`] for the layout).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn unpack_q6k(b: &[u8], q: &mut [u8; QK_K]) {
    let m4 = _mm256_set1_epi8(0x0F);
    let m2 = _mm256_set1_epi8(0x03);
    let m2hi = _mm256_set1_epi8(0x30);
    for h in 0..2 {
        let ql0 = load32(b, h * 64);
        let ql1 = load32(b, h * 64 + 32);
        let qh = load32(b, 128 + h * 32);
        let qh2 = _mm256_srli_epi16::<2>(qh);
        let low = |v| _mm256_and_si256(v, m4);
        let high = |v| _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4);
        let top = |v| _mm256_slli_epi16::<4>(_mm256_and_si256(v, m2));
        let o = h * 128;
        store32(q, o, _mm256_or_si256(low(ql0), top(qh)));
        store32(q, o + 32, _mm256_or_si256(low(ql1), top(qh2)));
        store32(
            q,
            o + 64,
            _mm256_or_si256(high(ql0), _mm256_and_si256(qh, m2hi)),
        );
        store32(
            q,
            o + 96,
            _mm256_or_si256(high(ql1), _mm256_and_si256(qh2, m2hi)),
        );
    }
}

/// Which tiles this CPU runs (made only by [`Tiles::detect`], the proof of
/// their instructions): AVX-512 VNNI (16 tokens per register), AVX-VNNI
/// (the same 8-bit dot product on 256 bits, eight tokens: Intel's cores
/// since 2021, which have no AVX-512, and AMD's since Zen 5), or plain AVX2
/// (no dot product instruction: for the K-quants `maddubs` pairs summed in
/// 16 bits over a sub-block, then one multiply by its scale).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tiles(Isa);

/// The instruction sets; private, so only [`Tiles::detect`] (and the tests'
/// [`Tiles::all`], which checks the same features) make a [`Tiles`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    Avx512Vnni,
    AvxVnni,
    Avx2,
}

impl Tiles {
    /// The widest this CPU has. `DRAMATIS_NO_AVX512` leaves AVX-512 out
    /// (as for the row kernels), `DRAMATIS_NO_VNNI` both dot product
    /// instructions: each variant can be measured and tested on a CPU with
    /// all three.
    pub(crate) fn detect() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            let vnni = std::env::var_os("DRAMATIS_NO_VNNI").is_none();
            if vnni
                && super::avx512::Avx512::detect().is_some()
                && std::arch::is_x86_feature_detected!("avx512vnni")
            {
                return Some(Self(Isa::Avx512Vnni));
            }
            super::Avx2::detect()?;
            if vnni && std::arch::is_x86_feature_detected!("avxvnni") {
                return Some(Self(Isa::AvxVnni));
            }
            return Some(Self(Isa::Avx2));
        }
        #[allow(unreachable_code)]
        None
    }

    /// Every variant this CPU runs (the tests compare them all).
    #[cfg(test)]
    fn all() -> Vec<Self> {
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        if let Some(best) = Self::detect() {
            if best.0 == Isa::Avx512Vnni {
                v.push(best);
            }
            if best.0 != Isa::Avx2 && std::arch::is_x86_feature_detected!("avxvnni") {
                v.push(Self(Isa::AvxVnni));
            }
            v.push(Self(Isa::Avx2));
        }
        v
    }

    /// `x Wᵀ` (`x` `[m, cols]`, `W` `[rows, cols]` of `kind` blocks,
    /// `rows` a multiple of [`ROWS`]): the input quantized into panels
    /// once, the weight rows split among the threads `ROWS` at a time, each
    /// tile's outputs passed through `epilogue(tile, first row)` (a
    /// `ROWS × TOKENS` row-major tile) and written straight to their places
    /// in `[m, rows]`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn product(
        self,
        kind: Kind,
        w: &[u8],
        rows: usize,
        cols: usize,
        x: &[f32],
        m: usize,
        epilogue: impl Fn(&mut [f32], usize) + Sync,
    ) -> Vec<f32> {
        assert!(rows.is_multiple_of(ROWS));
        let rb = cols / kind.block_elems() * kind.block_bytes();
        assert_eq!(w.len(), rows * rb);
        let p = crate::profile::timed("cpu prompt:   activations to panels", || {
            Panels::new(x, m, cols, kind, self)
        });
        let threads = pool::threads();
        // Several chunks per thread so a slow thread's share is taken up by others.
        let chunk = rows
            .div_ceil(threads * 4)
            .next_multiple_of(ROWS)
            .clamp(ROWS, 64);
        let mut out = vec![0f32; rows * m];
        let dst = Shared(out.as_mut_ptr());
        // A task unpacks all its row groups first, then takes the panels one
        // at a time through every group: each panel is read from memory once
        // per chunk instead of once per eight rows (fc2's activations of a
        // 512-token prompt are 5 MB: more than a core's cache).
        pool::run_with(
            rows.div_ceil(chunk),
            || -> Vec<Unpacked> { (0..chunk / ROWS).map(|_| Unpacked::new(cols)).collect() },
            |scratch, c| {
                let dst = &dst;
                let starts = (c * chunk..((c + 1) * chunk).min(rows)).step_by(ROWS);
                for (r, un) in starts.clone().zip(scratch.iter_mut()) {
                    self.unpack(kind, &w[r * rb..(r + ROWS) * rb], rb, &p, un);
                }
                let mut tile = [[0f32; TOKENS]; ROWS];
                for panel in 0..p.panels() {
                    let t0 = panel * TOKENS;
                    let n = (m - t0).min(TOKENS);
                    for (r, un) in starts.clone().zip(scratch.iter()) {
                        self.tile(kind, un, &p, panel, &mut tile);
                        epilogue(tile.as_flattened_mut(), r);
                        assert!(r + ROWS <= rows && t0 + n <= m);
                        for t in t0..t0 + n {
                            for (i, sums) in tile.iter().enumerate() {
                                // SAFETY: in bounds (checked above: r + i <
                                // rows, t < m); chunk c's task alone writes
                                // rows c·chunk..(c + 1)·chunk, and `out` is
                                // read only after every chunk is done.
                                unsafe { *dst.0.add(t * rows + r + i) = sums[t - t0] };
                            }
                        }
                    }
                }
            },
        );
        out
    }

    /// The products of `rows` (`ROWS` rows of `kind` blocks, `row_bytes`
    /// each) with every token of `p`: `emit(t0, n, tile)` takes each panel's
    /// `ROWS × TOKENS` tile (tokens `t0..t0 + n` are real, the rest
    /// padding). `scratch` holds the unpacked weights. (The tests' entry:
    /// [`Tiles::product`] takes each panel through several row groups.)
    #[cfg(test)]
    pub(crate) fn rows(
        self,
        kind: Kind,
        rows: &[u8],
        row_bytes: usize,
        p: &Panels,
        scratch: &mut Unpacked,
        mut emit: impl FnMut(usize, usize, &mut [[f32; TOKENS]; ROWS]),
    ) {
        self.unpack(kind, rows, row_bytes, p, scratch);
        let mut tile = [[0f32; TOKENS]; ROWS];
        for panel in 0..p.panels() {
            self.tile(kind, scratch, p, panel, &mut tile);
            let t0 = panel * TOKENS;
            emit(t0, (p.m - t0).min(TOKENS), &mut tile);
        }
    }

    /// Unpacks `rows` (`ROWS` rows of `kind` blocks, `row_bytes` each, for
    /// the panels `p`) into `scratch`.
    fn unpack(self, kind: Kind, rows: &[u8], row_bytes: usize, p: &Panels, scratch: &mut Unpacked) {
        assert_eq!(scratch.nb, p.nb);
        assert_eq!(
            row_bytes,
            p.nb * QK_K / kind.block_elems() * kind.block_bytes()
        );
        assert_eq!(rows.len(), ROWS * row_bytes);
        // SAFETY: `self` exists only where AVX2 (and more) was detected.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            scratch.fill(kind, rows, row_bytes, self)
        };
    }

    /// The `ROWS × TOKENS` products of the unpacked rows `w` with panel
    /// `panel` of `p`, into `tile`.
    fn tile(
        self,
        kind: Kind,
        w: &Unpacked,
        p: &Panels,
        panel: usize,
        tile: &mut [[f32; TOKENS]; ROWS],
    ) {
        assert_eq!(w.nb, p.nb);
        assert!(panel < p.panels());
        // SAFETY: `self` is the proof of each variant's features.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            match (self.0, kind) {
                (Isa::Avx512Vnni, Kind::Q6K) => tile_k::<16, false>(w, p, panel, tile),
                (Isa::Avx512Vnni, Kind::Q8_0) => tile_q8(w, p, panel, tile),
                (Isa::Avx512Vnni, _) => tile_k::<32, true>(w, p, panel, tile),
                (_, _) => {
                    for (r0, half) in [(0, 0), (0, 1), (4, 0), (4, 1)] {
                        let plain = self.0 == Isa::Avx2;
                        let t = match kind {
                            Kind::Q4K if plain => {
                                avx::tile_k_plain::<32, true, 8>(w, r0, p, panel, half)
                            }
                            Kind::Q5K if plain => {
                                avx::tile_k_plain::<32, true, 4>(w, r0, p, panel, half)
                            }
                            Kind::Q6K if plain => {
                                avx::tile_k_plain::<16, false, 2>(w, r0, p, panel, half)
                            }
                            Kind::Q8_0 if plain => avx::tile_q8_plain(w, r0, p, panel, half),
                            Kind::Q6K => avx::tile_k::<16, false>(w, r0, p, panel, half),
                            Kind::Q8_0 => avx::tile_q8(w, r0, p, panel, half),
                            _ => avx::tile_k::<32, true>(w, r0, p, panel, half),
                        };
                        for (i, sums) in t.iter().enumerate() {
                            tile[r0 + i][half * 8..half * 8 + 8].copy_from_slice(sums);
                        }
                    }
                }
            }
        }
    }
}

/// The output buffer of [`Tiles::product`], written by many threads at
/// disjoint places.
struct Shared(*mut f32);
// SAFETY: the threads write disjoint elements (see `Tiles::product`).
unsafe impl Sync for Shared {}

/// Super-block `pk`'s 64 lines of the panels, and rows `r0..r0 + N`'s
/// unpacked bytes of super-block `k`: what each tile multiplies. (Always
/// inlined: as a call, the AVX-512 tiles lost 5% of a prefill.)
#[inline(always)]
fn operands<'a, const N: usize>(
    w: &'a Unpacked,
    r0: usize,
    p: &'a Panels,
    pk: usize,
    k: usize,
) -> (&'a [Line; 64], [&'a [u8; QK_K]; N]) {
    let lines = p.q[pk * 64..pk * 64 + 64].try_into().unwrap();
    (lines, std::array::from_fn(|r| &w.q[(r0 + r) * p.nb + k]))
}

/// The `ROWS × TOKENS` products of the unpacked rows with one panel, over
/// every super-block. `SUB` values per sub-block (32 for Q4_K/Q5_K, with
/// minimums; 16 for Q6_K, with its offset of 32 taken out through the
/// tokens' sums).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
fn tile_k<const SUB: usize, const MINS: bool>(
    w: &Unpacked,
    p: &Panels,
    panel: usize,
    out: &mut [[f32; TOKENS]; ROWS],
) {
    let nb = p.nb;
    let mut acc = [_mm512_setzero_ps(); ROWS];
    for k in 0..nb {
        let pk = panel * nb + k;
        let (lines, wq) = operands::<ROWS>(w, 0, p, pk, k);
        let mut s1 = [_mm512_setzero_si512(); ROWS];
        for s in 0..QK_K / SUB {
            let mut a = [_mm512_setzero_si512(); ROWS];
            for g in s * SUB / 4..(s + 1) * SUB / 4 {
                // SAFETY: a 64-byte aligned line.
                let x = unsafe { _mm512_load_si512(lines[g].0.as_ptr().cast()) };
                for r in 0..ROWS {
                    let four = i32::from_le_bytes(wq[r][g * 4..g * 4 + 4].try_into().unwrap());
                    a[r] = _mm512_dpbusd_epi32(a[r], _mm512_set1_epi32(four), x);
                }
            }
            if !MINS {
                // Q6_K's values are stored + 32: take 32 × the 16 values' sums out.
                // SAFETY: a 64-byte aligned line.
                let bs = unsafe { _mm512_load_si512(p.bsums[pk * 16 + s].0.as_ptr().cast()) };
                let off = _mm512_slli_epi32::<5>(bs);
                for v in &mut a {
                    *v = _mm512_sub_epi32(*v, off);
                }
            }
            for r in 0..ROWS {
                let sc = _mm512_set1_epi32(w.sc[r * nb + k][s]);
                s1[r] = _mm512_add_epi32(s1[r], _mm512_mullo_epi32(a[r], sc));
            }
        }
        // SAFETY: a 64-byte aligned line.
        let d1 = unsafe { _mm512_load_ps(p.d[pk].0.as_ptr().cast()) };
        for r in 0..ROWS {
            let [d, dmin] = w.d[r * nb + k];
            let mut f = _mm512_mul_ps(_mm512_cvtepi32_ps(s1[r]), _mm512_set1_ps(d));
            if MINS {
                let mut m = _mm512_setzero_si512();
                for pp in 0..4 {
                    // SAFETY: a 64-byte aligned line.
                    let sums = unsafe { _mm512_load_si512(p.pairs[pk * 4 + pp].0.as_ptr().cast()) };
                    m = _mm512_dpwssd_epi32(m, sums, _mm512_set1_epi32(w.mn[r * nb + k][pp]));
                }
                f = _mm512_fnmadd_ps(_mm512_set1_ps(dmin), _mm512_cvtepi32_ps(m), f);
            }
            acc[r] = _mm512_fmadd_ps(f, d1, acc[r]);
        }
    }
    for (o, v) in out.iter_mut().zip(acc) {
        // SAFETY: 16 floats.
        unsafe { _mm512_storeu_ps(o.as_mut_ptr(), v) };
    }
}

/// As [`tile_k`] for Q8_0: a scale per 32 values on both sides, and the
/// weights' offset of 128 taken out through the tokens' sums.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
fn tile_q8(w: &Unpacked, p: &Panels, panel: usize, out: &mut [[f32; TOKENS]; ROWS]) {
    let nb = p.nb;
    let mut acc = [_mm512_setzero_ps(); ROWS];
    for k in 0..nb {
        let pk = panel * nb + k;
        let (lines, wq) = operands::<ROWS>(w, 0, p, pk, k);
        for b in 0..8 {
            let mut a = [_mm512_setzero_si512(); ROWS];
            for g in b * 8..(b + 1) * 8 {
                // SAFETY: a 64-byte aligned line.
                let x = unsafe { _mm512_load_si512(lines[g].0.as_ptr().cast()) };
                for r in 0..ROWS {
                    let four = i32::from_le_bytes(wq[r][g * 4..g * 4 + 4].try_into().unwrap());
                    a[r] = _mm512_dpbusd_epi32(a[r], _mm512_set1_epi32(four), x);
                }
            }
            // SAFETY: 64-byte aligned lines.
            let (s0, s1, da) = unsafe {
                (
                    _mm512_load_si512(p.bsums[pk * 16 + 2 * b].0.as_ptr().cast()),
                    _mm512_load_si512(p.bsums[pk * 16 + 2 * b + 1].0.as_ptr().cast()),
                    _mm512_load_ps(p.d[pk * 8 + b].0.as_ptr().cast()),
                )
            };
            let off = _mm512_slli_epi32::<7>(_mm512_add_epi32(s0, s1));
            for r in 0..ROWS {
                let v = _mm512_cvtepi32_ps(_mm512_sub_epi32(a[r], off));
                let scale = _mm512_mul_ps(da, _mm512_set1_ps(w.d8[r * nb + k][b]));
                acc[r] = _mm512_fmadd_ps(v, scale, acc[r]);
            }
        }
    }
    for (o, v) in out.iter_mut().zip(acc) {
        // SAFETY: 16 floats.
        unsafe { _mm512_storeu_ps(o.as_mut_ptr(), v) };
    }
}

/// The same tiles on 256 bits: four weight rows against half a panel
/// (eight tokens) at a time — sixteen registers hold no more — with
/// AVX-VNNI's `vpdpbusd`, or with plain AVX2's `maddubs`.
#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    use super::{Line, Panels, QK_K, Unpacked, operands};

    /// Rows `r0..r0 + 4` of the unpacked weights.
    const R: usize = 4;

    /// 32 bytes of a line or lanes: tokens `8·half..8·half + 8`.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn half_of(line: &[i32; 16], half: usize) -> __m256i {
        assert!(half < 2);
        // SAFETY: 8 lanes at 8·half ≤ 8 (checked above).
        unsafe { _mm256_loadu_si256(line.as_ptr().add(8 * half).cast()) }
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn half_line(line: &Line, half: usize) -> __m256i {
        assert!(half < 2);
        // SAFETY: 32 bytes at 32·half ≤ 32 (checked above).
        unsafe { _mm256_loadu_si256(line.0.as_ptr().add(32 * half).cast()) }
    }

    /// Four weight bytes (values `4g..4g + 4`) in every lane.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn four(q: &[u8; QK_K], g: usize) -> __m256i {
        _mm256_set1_epi32(i32::from_le_bytes(q[g * 4..g * 4 + 4].try_into().unwrap()))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn out(acc: [__m256; R]) -> [[f32; 8]; R] {
        acc.map(|v| {
            let mut o = [0f32; 8];
            // SAFETY: 8 floats.
            unsafe { _mm256_storeu_ps(o.as_mut_ptr(), v) };
            o
        })
    }

    /// A K-quant super-block's sums, scaled by their sub-blocks' scales
    /// (`s1`), into the float sums: × `d`, less `dmin` × the minimums' terms,
    /// × each token's scale.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    fn finish_k<const MINS: bool>(
        w: &Unpacked,
        r0: usize,
        p: &Panels,
        pk: usize,
        k: usize,
        half: usize,
        s1: [__m256i; R],
        acc: &mut [__m256; R],
    ) {
        let d1 = _mm256_castsi256_ps(half_of(&p.d[pk].0, half));
        for r in 0..R {
            let [d, dmin] = w.d[(r0 + r) * p.nb + k];
            let mut f = _mm256_mul_ps(_mm256_cvtepi32_ps(s1[r]), _mm256_set1_ps(d));
            if MINS {
                let mut m = _mm256_setzero_si256();
                for pp in 0..4 {
                    let sums = half_of(&p.pairs[pk * 4 + pp].0, half);
                    let mn = _mm256_set1_epi32(w.mn[(r0 + r) * p.nb + k][pp]);
                    m = _mm256_add_epi32(m, _mm256_madd_epi16(sums, mn));
                }
                f = _mm256_fnmadd_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(m), f);
            }
            acc[r] = _mm256_fmadd_ps(f, d1, acc[r]);
        }
    }

    /// Q8_0 block `b`'s integer sums into the float sums: × both sides' scales.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    fn finish_q8(
        w: &Unpacked,
        r0: usize,
        p: &Panels,
        pk: usize,
        k: usize,
        b: usize,
        half: usize,
        a: [__m256i; R],
        acc: &mut [__m256; R],
    ) {
        let da = _mm256_castsi256_ps(half_of(&p.d[pk * 8 + b].0, half));
        for r in 0..R {
            let scale = _mm256_mul_ps(da, _mm256_set1_ps(w.d8[(r0 + r) * p.nb + k][b]));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[r]), scale, acc[r]);
        }
    }

    /// As [`super::tile_k`]: rows `r0..r0 + 4`, tokens `8·half..`.
    #[target_feature(enable = "avx2,fma,avxvnni")]
    pub(super) fn tile_k<const SUB: usize, const MINS: bool>(
        w: &Unpacked,
        r0: usize,
        p: &Panels,
        panel: usize,
        half: usize,
    ) -> [[f32; 8]; R] {
        let mut acc = [_mm256_setzero_ps(); R];
        for k in 0..p.nb {
            let pk = panel * p.nb + k;
            let (lines, wq) = operands::<R>(w, r0, p, pk, k);
            let mut s1 = [_mm256_setzero_si256(); R];
            for s in 0..QK_K / SUB {
                let mut a = [_mm256_setzero_si256(); R];
                #[allow(clippy::needless_range_loop)] // g also picks the weights
                for g in s * SUB / 4..(s + 1) * SUB / 4 {
                    let x = half_line(&lines[g], half);
                    for r in 0..R {
                        a[r] = _mm256_dpbusd_avx_epi32(a[r], four(wq[r], g), x);
                    }
                }
                if !MINS {
                    let off = _mm256_slli_epi32::<5>(half_of(&p.bsums[pk * 16 + s].0, half));
                    for v in &mut a {
                        *v = _mm256_sub_epi32(*v, off);
                    }
                }
                for r in 0..R {
                    let sc = _mm256_set1_epi32(w.sc[(r0 + r) * p.nb + k][s]);
                    s1[r] = _mm256_add_epi32(s1[r], _mm256_mullo_epi32(a[r], sc));
                }
            }
            finish_k::<MINS>(w, r0, p, pk, k, half, s1, &mut acc);
        }
        out(acc)
    }

    /// As [`tile_k`] without a dot product instruction: `maddubs` pairs of
    /// `G16` groups of four values summed in 16 bits (they cannot overflow:
    /// Q4_K's values are at most 15, so 8 groups give at most
    /// 8 · 2 · 15 · 127 = 30,480; Q5_K's 31 allow 4, Q6_K's 63 allow 2), then
    /// one `madd` by the sub-block's scale.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn tile_k_plain<const SUB: usize, const MINS: bool, const G16: usize>(
        w: &Unpacked,
        r0: usize,
        p: &Panels,
        panel: usize,
        half: usize,
    ) -> [[f32; 8]; R] {
        let mut acc = [_mm256_setzero_ps(); R];
        for k in 0..p.nb {
            let pk = panel * p.nb + k;
            let (lines, wq) = operands::<R>(w, r0, p, pk, k);
            let mut s1 = [_mm256_setzero_si256(); R];
            for s in 0..QK_K / SUB {
                let sc: [i32; R] = std::array::from_fn(|r| w.sc[(r0 + r) * p.nb + k][s]);
                for part in 0..SUB / 4 / G16 {
                    let g0 = s * SUB / 4 + part * G16;
                    let mut h = [_mm256_setzero_si256(); R];
                    #[allow(clippy::needless_range_loop)] // g also picks the weights
                    for g in g0..g0 + G16 {
                        let x = half_line(&lines[g], half);
                        for r in 0..R {
                            let pairs = _mm256_maddubs_epi16(four(wq[r], g), x);
                            h[r] = _mm256_add_epi16(h[r], pairs);
                        }
                    }
                    for r in 0..R {
                        let scaled = _mm256_madd_epi16(h[r], _mm256_set1_epi16(sc[r] as i16));
                        s1[r] = _mm256_add_epi32(s1[r], scaled);
                    }
                }
                if !MINS {
                    // Q6_K's offset: 32 · scale · the 16 values' sum (which fits in 16 bits).
                    let bs = half_of(&p.bsums[pk * 16 + s].0, half);
                    for r in 0..R {
                        let t = _mm256_madd_epi16(bs, _mm256_set1_epi32(sc[r] & 0xFFFF));
                        s1[r] = _mm256_sub_epi32(s1[r], _mm256_slli_epi32::<5>(t));
                    }
                }
            }
            finish_k::<MINS>(w, r0, p, pk, k, half, s1, &mut acc);
        }
        out(acc)
    }

    /// As [`super::tile_q8`]: rows `r0..r0 + 4`, tokens `8·half..`.
    #[target_feature(enable = "avx2,fma,avxvnni")]
    pub(super) fn tile_q8(
        w: &Unpacked,
        r0: usize,
        p: &Panels,
        panel: usize,
        half: usize,
    ) -> [[f32; 8]; R] {
        let mut acc = [_mm256_setzero_ps(); R];
        for k in 0..p.nb {
            let pk = panel * p.nb + k;
            let (lines, wq) = operands::<R>(w, r0, p, pk, k);
            for b in 0..8 {
                // Σ (w + 128)·x − 128·Σx.
                let s = _mm256_add_epi32(
                    half_of(&p.bsums[pk * 16 + 2 * b].0, half),
                    half_of(&p.bsums[pk * 16 + 2 * b + 1].0, half),
                );
                let mut a =
                    [_mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32::<7>(s)); R];
                #[allow(clippy::needless_range_loop)] // g also picks the weights
                for g in b * 8..(b + 1) * 8 {
                    let x = half_line(&lines[g], half);
                    for r in 0..R {
                        a[r] = _mm256_dpbusd_avx_epi32(a[r], four(wq[r], g), x);
                    }
                }
                finish_q8(w, r0, p, pk, k, b, half, a, &mut acc);
            }
        }
        out(acc)
    }

    /// As [`tile_q8`] without a dot product instruction: the weights' own
    /// signs moved onto the activations (`maddubs` wants one operand
    /// unsigned), each pair of products (at most 2 · 127 · 127) widened at
    /// once. The weights were unpacked signed for this variant.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn tile_q8_plain(
        w: &Unpacked,
        r0: usize,
        p: &Panels,
        panel: usize,
        half: usize,
    ) -> [[f32; 8]; R] {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); R];
        for k in 0..p.nb {
            let pk = panel * p.nb + k;
            let (lines, wq) = operands::<R>(w, r0, p, pk, k);
            for b in 0..8 {
                let mut a = [_mm256_setzero_si256(); R];
                #[allow(clippy::needless_range_loop)] // g also picks the weights
                for g in b * 8..(b + 1) * 8 {
                    let x = half_line(&lines[g], half);
                    for r in 0..R {
                        let ws = four(wq[r], g);
                        let pairs =
                            _mm256_maddubs_epi16(_mm256_abs_epi8(ws), _mm256_sign_epi8(x, ws));
                        a[r] = _mm256_add_epi32(a[r], _mm256_madd_epi16(pairs, ones));
                    }
                }
                finish_q8(w, r0, p, pk, k, b, half, a, &mut acc);
            }
        }
        out(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every (row, token) of the tiled product equals the plain dot product
    /// of the same blocks (the same integer sums; float order differs).
    #[test]
    fn tiles_equal_the_plain_dots() {
        let variants = Tiles::all();
        if variants.is_empty() {
            eprintln!("no AVX2 here: the tiled products are not used on this CPU");
        }
        for v in variants {
            check_variant(v);
        }
    }

    /// The largest values each type holds against the largest activations
    /// (±127): where the 16-bit sums of plain AVX2 come closest to overflowing.
    #[test]
    fn the_largest_values_do_not_overflow() {
        let f16_one = [0x00, 0x3C];
        // Scales 63 and minimums 0 (see `blocks::k4_scales`).
        let k4_scales = [[0xFF; 4], [0; 4], [0x0F; 4]].concat();
        let q4k = [&f16_one[..], &[0, 0], &k4_scales, &[0xFF; 128]].concat();
        let q5k = [&f16_one[..], &[0, 0], &k4_scales, &[0xFF; 32], &[0xFF; 128]].concat();
        let q6k = [&[0xFF; 192][..], &[127; 16], &f16_one].concat();
        let q8 = [&f16_one[..], &[127; 32]].concat().repeat(8);
        for v in Tiles::all() {
            for (kind, block) in [
                (Kind::Q4K, &q4k),
                (Kind::Q5K, &q5k),
                (Kind::Q6K, &q6k),
                (Kind::Q8_0, &q8),
            ] {
                let rows = block.repeat(ROWS);
                for sign in [1.0f32, -1.0] {
                    let x = vec![sign; TOKENS * QK_K];
                    let p = Panels::new(&x, TOKENS, QK_K, kind, v);
                    let mut scratch = Unpacked::new(QK_K);
                    let mut got = Vec::new();
                    v.rows(kind, &rows, block.len(), &p, &mut scratch, |_, n, tile| {
                        got.extend(tile.iter().flat_map(|r| r[..n].to_vec()));
                    });
                    let (mut a, mut a8) = (Vec::new(), Vec::new());
                    blocks::quantize_q8k(&x[..QK_K], &mut a);
                    blocks::quantize_q8(&x[..QK_K], &mut a8);
                    let want = match kind {
                        Kind::Q4K => blocks::dot_q4k(block, &a),
                        Kind::Q5K => blocks::dot_q5k(block, &a),
                        Kind::Q6K => blocks::dot_q6k(block, &a),
                        Kind::Q8_0 => blocks::dot_q8_0(block, &a8),
                    };
                    assert!(want.abs() > 100.0, "{kind:?}: a large product ({want})");
                    for g in got {
                        assert!(
                            (g - want).abs() <= 1e-5 * want.abs(),
                            "{v:?} {kind:?} sign {sign}: plain {want} vs tiled {g}"
                        );
                    }
                }
            }
        }
    }

    /// The vector quantizer gives the plain one's bytes and scales exactly:
    /// ties, zeros, infinities, NaN anywhere in a block, and subnormals.
    #[test]
    fn the_vector_quantizer_equals_the_plain_one() {
        if Tiles::detect().is_none() {
            return;
        }
        let mut blocks_in: Vec<Vec<f32>> = vec![
            super::super::tests::random(QK_K, 77),
            // amax 127: every value · 1, with exact ties at .5.
            (0..QK_K)
                .map(|i| {
                    if i == 3 {
                        127.0
                    } else {
                        (i as f32 - 128.0) * 0.5
                    }
                })
                .collect(),
            vec![0.0; QK_K],
            (0..QK_K)
                .map(|i| if i == 100 { f32::INFINITY } else { 1.0 })
                .collect(),
            (0..QK_K)
                .map(|i| if i == 9 { f32::NAN } else { i as f32 })
                .collect(),
            (0..QK_K)
                .map(|i| if i == 255 { f32::NAN } else { -(i as f32) })
                .collect(),
            (0..QK_K)
                .map(|i| if i % 3 == 0 { 0.0 } else { 1e-40 * i as f32 })
                .collect(),
        ];
        blocks_in.push(blocks_in[1].iter().map(|v| -v).collect());
        for x in &blocks_in {
            for per in [QK_K, blocks::QK8_0] {
                let (mut q, mut d) = ([0i8; QK_K], vec![0f32; QK_K / per]);
                // SAFETY: `Tiles::detect` found AVX2 and FMA.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    quantize(x, per, &mut q, &mut d)
                };
                let (want_q, want_d): (Vec<i8>, Vec<f32>) = if per == QK_K {
                    let mut a = Vec::new();
                    blocks::quantize_q8k(x, &mut a);
                    (a[0].qs.to_vec(), vec![a[0].d])
                } else {
                    let mut a = Vec::new();
                    blocks::quantize_q8(x, &mut a);
                    (
                        a.iter().flat_map(|b| b.qs).collect(),
                        a.iter().map(|b| b.d).collect(),
                    )
                };
                assert_eq!(q.to_vec(), want_q, "per {per}: {:?}", &x[..8]);
                assert_eq!(
                    d.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want_d.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "per {per}"
                );
            }
        }
    }

    fn check_variant(v: Tiles) {
        let cols = 512;
        for kind in [Kind::Q4K, Kind::Q5K, Kind::Q6K, Kind::Q8_0] {
            let (m_q, _) = super::super::tests::quantized(kind.ggml(), ROWS, cols, 21);
            let rb = m_q.row_bytes();
            for m in [1usize, 16, 17, 40] {
                let x = super::super::tests::random(m * cols, 300 + m as u64);
                let p = Panels::new(&x, m, cols, kind, v);
                let mut scratch = Unpacked::new(cols);
                let mut out = vec![f32::NAN; ROWS * m];
                let mut seen = 0;
                v.rows(kind, m_q.bytes(), rb, &p, &mut scratch, |t0, n, tile| {
                    assert_eq!(t0, seen, "panels in order");
                    seen += n;
                    for (r, sums) in tile.iter().enumerate() {
                        out[r * m + t0..r * m + t0 + n].copy_from_slice(&sums[..n]);
                    }
                });
                assert_eq!(seen, m, "every token once");
                for t in 0..m {
                    let xt = &x[t * cols..(t + 1) * cols];
                    let (mut acts, mut acts8) = (Vec::new(), Vec::new());
                    blocks::quantize_q8k(xt, &mut acts);
                    blocks::quantize_q8(xt, &mut acts8);
                    for r in 0..ROWS {
                        let row = &m_q.bytes()[r * rb..(r + 1) * rb];
                        let want = match kind {
                            Kind::Q4K => blocks::dot_q4k(row, &acts),
                            Kind::Q5K => blocks::dot_q5k(row, &acts),
                            Kind::Q6K => blocks::dot_q6k(row, &acts),
                            Kind::Q8_0 => blocks::dot_q8_0(row, &acts8),
                        };
                        let got = out[r * m + t];
                        assert!(
                            (want - got).abs() <= 1e-4 * want.abs().max(1.0),
                            "{v:?} {kind:?} m={m} row {r} token {t}: plain {want} vs tiled {got}"
                        );
                    }
                }
            }
        }
    }
}
