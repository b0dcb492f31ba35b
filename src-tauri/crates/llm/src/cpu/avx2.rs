//! The dot products of [`super::blocks`] with AVX2 and FMA, one weight row
//! against `N` rows of activations: each 32 weights are unpacked to bytes
//! once, then multiplied with each activation row's bytes (`maddubs`:
//! unsigned × signed into 16-bit pairs) and widened with their sub-block's
//! scale (`madd`) into 32-bit sums; one float multiply-add per super-block
//! and row. The same integer sums as the plain versions, so the tests
//! compare them up to float rounding. Prefill takes rows four at a time,
//! which shares the unpacking; decode takes one.
//!
//! Every function here needs AVX2 and FMA; [`Avx2`] is the proof they are
//! there, made once by runtime detection.
#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::blocks::{Q8Block, Q8K, k4_scales_packed};

/// Proof that this CPU runs AVX2, FMA and F16C (made only by [`Avx2::detect`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx2(());

impl Avx2 {
    /// `Some` on an x86-64 CPU with AVX2, FMA and F16C (every AVX2 CPU has F16C).
    pub(crate) fn detect() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            return Some(Self(()));
        }
        None
    }

    /// `dst[i] = src[i]` as f32 (the KV cache's f16 rows).
    pub(crate) fn widen(self, src: &[half::f16], dst: &mut [f32]) {
        assert_eq!(src.len(), dst.len());
        // SAFETY: `self` exists only where AVX2, FMA and F16C were detected.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            widen(src, dst)
        }
        #[cfg(not(target_arch = "x86_64"))]
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }

    /// `dst[i] = src[i]` rounded to f16 (to the nearest, as `f16::from_f32`).
    pub(crate) fn narrow(self, src: &[f32], dst: &mut [half::f16]) {
        assert_eq!(src.len(), dst.len());
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            narrow(src, dst)
        }
        #[cfg(not(target_arch = "x86_64"))]
        for (d, s) in dst.iter_mut().zip(src) {
            *d = half::f16::from_f32(*s);
        }
    }

    /// GELU (the tanh approximation, [`super::gelu`]) of every value, in
    /// place: eight at a time through a vector exponential, as
    /// `x·σ(2√(2/π)(x + 0.044715x³))` (½(1 + tanh u) = σ(2u)).
    pub(crate) fn gelu(self, v: &mut [f32]) {
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            gelu8(v)
        }
        #[cfg(not(target_arch = "x86_64"))]
        v.iter_mut().for_each(|x| *x = super::gelu(*x));
    }

    /// A softmax in place: `v[i] = e^(v[i] − max) / Σ`, eight at a time
    /// (−∞, a masked position, gives exactly 0). `v` must hold a finite value.
    pub(crate) fn softmax(self, v: &mut [f32]) {
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            softmax8(v)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for x in v.iter_mut() {
                *x = (*x - max).exp();
                sum += *x;
            }
            v.iter_mut().for_each(|x| *x /= sum);
        }
    }

    /// `Σ a[i]·b[i]`.
    pub(crate) fn dot(self, a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            dot_f32(a, b)
        }
        #[cfg(not(target_arch = "x86_64"))]
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    /// `a[r] · b` for each of `N` rows (each value of `b` loaded once for all).
    pub(crate) fn dots<const N: usize>(self, a: [&[f32]; N], b: &[f32]) -> [f32; N] {
        assert!(a.iter().all(|r| r.len() == b.len()));
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            dots_f32(a, b)
        }
        #[cfg(not(target_arch = "x86_64"))]
        a.map(|r| r.iter().zip(b).map(|(x, y)| x * y).sum())
    }

    /// `y[r][i] += a[r]·x[i]` for each of `N` rows (each value of `x` loaded once).
    pub(crate) fn axpys<const N: usize>(self, a: [f32; N], x: &[f32], y: [&mut [f32]; N]) {
        assert!(y.iter().all(|r| r.len() == x.len()));
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            axpys(a, x, y)
        }
        #[cfg(not(target_arch = "x86_64"))]
        for (a, y) in a.into_iter().zip(y) {
            for (o, v) in y.iter_mut().zip(x) {
                *o += a * v;
            }
        }
    }

    /// `y[i] += a·x[i]`.
    pub(crate) fn axpy(self, a: f32, x: &[f32], y: &mut [f32]) {
        assert_eq!(x.len(), y.len());
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            axpy(a, x, y)
        }
        #[cfg(not(target_arch = "x86_64"))]
        for (o, v) in y.iter_mut().zip(x) {
            *o += a * v;
        }
    }

    /// `row` · each of `N` activation rows (the weights unpacked once for all).
    pub(crate) fn dot_q4k<const N: usize>(self, row: &[u8], acts: [&[Q8K]; N]) -> [f32; N] {
        // SAFETY: `self` exists only where AVX2, FMA and F16C were detected.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            kq::<N, false>(row, acts)
        }
        #[cfg(not(target_arch = "x86_64"))]
        acts.map(|a| super::blocks::dot_q4k(row, a))
    }

    /// As [`Self::dot_q4k`] for Q5_K.
    pub(crate) fn dot_q5k<const N: usize>(self, row: &[u8], acts: [&[Q8K]; N]) -> [f32; N] {
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            kq::<N, true>(row, acts)
        }
        #[cfg(not(target_arch = "x86_64"))]
        acts.map(|a| super::blocks::dot_q5k(row, a))
    }

    /// As [`Self::dot_q4k`] for Q6_K.
    pub(crate) fn dot_q6k<const N: usize>(self, row: &[u8], acts: [&[Q8K]; N]) -> [f32; N] {
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            q6k::<N>(row, acts)
        }
        #[cfg(not(target_arch = "x86_64"))]
        acts.map(|a| super::blocks::dot_q6k(row, a))
    }

    /// As [`Self::dot_q4k`] for Q8_0.
    pub(crate) fn dot_q8_0<const N: usize>(self, row: &[u8], acts: [&[Q8Block]; N]) -> [f32; N] {
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            q8_0::<N>(row, acts)
        }
        #[cfg(not(target_arch = "x86_64"))]
        acts.map(|a| super::blocks::dot_q8_0(row, a))
    }
}

/// 32 bytes from the start of `s` (checked).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
fn load(s: &[u8]) -> __m256i {
    assert!(s.len() >= 32);
    // SAFETY: 32 readable bytes (checked above); unaligned load.
    unsafe { _mm256_loadu_si256(s.as_ptr().cast()) }
}

#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
fn load_i8(s: &[i8]) -> __m256i {
    assert!(s.len() >= 32);
    // SAFETY: as `load`.
    unsafe { _mm256_loadu_si256(s.as_ptr().cast()) }
}

#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
fn load_i16x16(s: &[i16; 16]) -> __m256i {
    // SAFETY: 32 bytes.
    unsafe { _mm256_loadu_si256(s.as_ptr().cast()) }
}

#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
fn load_i32x8(s: &[i32; 8]) -> __m256i {
    // SAFETY: 32 bytes.
    unsafe { _mm256_loadu_si256(s.as_ptr().cast()) }
}

#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// The f16 at `b[at..at + 2]` as f32, by F16C (a block's scale: one per
/// 32 weights in Q8_0, where a software conversion showed in decode).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(super) fn f16c_at(b: &[u8], at: usize) -> f32 {
    let bits = u16::from_le_bytes([b[at], b[at + 1]]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// Σ over 32 bytes of `w` (0..=127 each) × `x` (signed), widened by `scale`: 8 × i32.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
fn scaled(w: __m256i, x: __m256i, scale: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), scale)
}

/// A `shuffle_epi8` control that copies 16-bit element `lo` into every
/// element of the low 128 bits and `hi` into the high 128 bits.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
fn pick16(lo: i8, hi: i8) -> __m256i {
    let (a, b) = (2 * lo, 2 * hi);
    _mm256_setr_epi8(
        a,
        a + 1,
        a,
        a + 1,
        a,
        a + 1,
        a,
        a + 1,
        a,
        a + 1,
        a,
        a + 1,
        a,
        a + 1,
        a,
        a + 1, //
        b,
        b + 1,
        b,
        b + 1,
        b,
        b + 1,
        b,
        b + 1,
        b,
        b + 1,
        b,
        b + 1,
        b,
        b + 1,
        b,
        b + 1,
    )
}

/// Q4_K (`FIFTH = false`) and Q5_K (`FIFTH = true`) against `N` rows of activations.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn kq<const N: usize, const FIFTH: bool>(row: &[u8], acts: [&[Q8K]; N]) -> [f32; N] {
    let bb = if FIFTH { 176 } else { 144 };
    let qs_at = if FIFTH { 48 } else { 16 };
    let m4 = _mm256_set1_epi8(0x0F);
    let one = _mm256_set1_epi8(1);
    let picks = [pick16(0, 0), pick16(1, 1), pick16(2, 2), pick16(3, 3)];
    let picks_hi = [pick16(4, 4), pick16(5, 5), pick16(6, 6), pick16(7, 7)];
    let mut acc = [_mm256_setzero_ps(); N];
    for (k, b) in row.chunks_exact(bb).enumerate() {
        prefetch_ahead::<AHEAD_K>(b, 3);
        let (d, dmin) = (f16c_at(b, 0), f16c_at(b, 2));
        let (sc, mn) = k4_scales_packed(&b[4..16]);
        // Eight 16-bit scales in both halves; element j picked per sub-block.
        let sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64)));
        let mins32 = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(mn as i64));
        let mut sumi = [_mm256_setzero_si256(); N];
        let mut qh = if FIFTH {
            load(&b[16..48])
        } else {
            _mm256_setzero_si256()
        };
        for c in 0..4 {
            let q = load(&b[qs_at + c * 32..]);
            let mut lo = _mm256_and_si256(q, m4);
            let mut hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            if FIFTH {
                // Bits 2c and 2c+1 of each fifth-bit byte, shifted down a chunk at a time.
                lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(qh, one), 4));
                hi = _mm256_or_si256(
                    hi,
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 1), one), 4),
                );
                qh = _mm256_srli_epi16(qh, 2);
            }
            let (s_lo, s_hi) = if c < 2 {
                (
                    _mm256_shuffle_epi8(sc16, picks[2 * c]),
                    _mm256_shuffle_epi8(sc16, picks[2 * c + 1]),
                )
            } else {
                (
                    _mm256_shuffle_epi8(sc16, picks_hi[2 * c - 4]),
                    _mm256_shuffle_epi8(sc16, picks_hi[2 * c - 3]),
                )
            };
            for t in 0..N {
                let y = &acts[t][k].qs;
                let p = _mm256_add_epi32(
                    scaled(lo, load_i8(&y[c * 64..]), s_lo),
                    scaled(hi, load_i8(&y[c * 64 + 32..]), s_hi),
                );
                sumi[t] = _mm256_add_epi32(sumi[t], p);
            }
        }
        for t in 0..N {
            let a = &acts[t][k];
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), _mm256_cvtepi32_ps(sumi[t]), acc[t]);
            let m = _mm256_mullo_epi32(mins32, load_i32x8(&a.sums32));
            acc[t] = _mm256_fnmadd_ps(_mm256_set1_ps(dmin * a.d), _mm256_cvtepi32_ps(m), acc[t]);
        }
    }
    acc.map(|v| hsum(v))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn q6k<const N: usize>(row: &[u8], acts: [&[Q8K]; N]) -> [f32; N] {
    let m4 = _mm256_set1_epi8(0x0F);
    let m2 = _mm256_set1_epi8(3);
    let picks = [pick16(0, 1), pick16(2, 3), pick16(4, 5), pick16(6, 7)];
    let mut acc = [_mm256_setzero_ps(); N];
    for (k, b) in row.chunks_exact(210).enumerate() {
        prefetch_ahead::<AHEAD_K>(b, 4);
        let d = f16c_at(b, 208);
        // SAFETY: 16 readable bytes.
        let sc8 = unsafe { _mm_loadu_si128(b[192..208].as_ptr().cast()) };
        let sc16 = _mm256_cvtepi8_epi16(sc8);
        let mut sumi = [_mm256_setzero_si256(); N];
        for h in 0..2 {
            // This half's eight scales in both 128-bit halves.
            let s = if h == 0 {
                _mm256_permute2x128_si256(sc16, sc16, 0x00)
            } else {
                _mm256_permute2x128_si256(sc16, sc16, 0x11)
            };
            let ql0 = load(&b[h * 64..]);
            let ql1 = load(&b[h * 64 + 32..]);
            let qh = load(&b[128 + h * 32..]);
            let q = [
                _mm256_or_si256(
                    _mm256_and_si256(ql0, m4),
                    _mm256_slli_epi16(_mm256_and_si256(qh, m2), 4),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(ql1, m4),
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m2), 4),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), m2), 4),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), m2), 4),
                ),
            ];
            for (j, qj) in q.iter().enumerate() {
                let sj = _mm256_shuffle_epi8(s, picks[j]);
                for t in 0..N {
                    let y = &acts[t][k].qs[h * 128 + j * 32..];
                    sumi[t] = _mm256_add_epi32(sumi[t], scaled(*qj, load_i8(y), sj));
                }
            }
        }
        for t in 0..N {
            let a = &acts[t][k];
            // The −32 offset: 32 · Σ scale × the sums of its 16 activations.
            let off = _mm256_madd_epi16(sc16, load_i16x16(&a.bsums));
            let total = _mm256_sub_epi32(sumi[t], _mm256_slli_epi32(off, 5));
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), _mm256_cvtepi32_ps(total), acc[t]);
        }
    }
    acc.map(|v| hsum(v))
}

/// One Q8_0 block `b` (34 bytes) · `a`, added to `acc` (8 partial sums).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q8_0_block(b: &[u8], a: &Q8Block, acc: __m256) -> __m256 {
    let w = load(&b[2..34]);
    // maddubs wants its first operand unsigned: |w|, and x with w's sign.
    let p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(load_i8(&a.qs), w));
    let s = _mm256_madd_epi16(p, _mm256_set1_epi16(1));
    let scale = _mm256_set1_ps(f16c_at(b, 0) * a.d);
    _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(s), acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn q8_0<const N: usize>(row: &[u8], acts: [&[Q8Block]; N]) -> [f32; N] {
    // Independent chains of multiply-adds per activation row, blocks k,
    // k+1, ... in turn: one chain waits on the multiply-add's latency at every
    // block (~4 cycles for ~3 cycles of work). Four for one row; two for
    // several, whose 2·N accumulators still fit the 16 vector registers with
    // the block's operands (4·N would spill, and a spilled chain waits on a
    // store and a reload: 5.9 cycles a block on one core before, when two
    // chains were indexed by the block's parity and kept on the stack).
    if N == 1 {
        q8_0_chains::<N, 4>(row, acts)
    } else {
        q8_0_chains::<N, 2>(row, acts)
    }
}

/// How far ahead of a few-token product's weight stream [`prefetch_ahead`]
/// asks for bytes: Q8_0's kernel reads its bytes faster than the K-quants'
/// (fewer instructions a byte), so it asks further ahead. One core, tg32
/// from an empty context, tok/s by distance (0, 8, 16, 32 KB): Q8_0 9.2,
/// 12.2, 12.7, 12.7; Q4_K_M 17.8, 20.0, 19.5, 19.1.
#[cfg(target_arch = "x86_64")]
pub(super) const AHEAD_Q8_0: usize = 16 << 10;
/// See [`AHEAD_Q8_0`].
#[cfg(target_arch = "x86_64")]
pub(super) const AHEAD_K: usize = 8 << 10;

/// Asks for `lines` 64-byte lines from `at`, `AHEAD` bytes further on, to
/// be brought into the first-level cache: a product over a few tokens
/// (decode's one, or a short prompt's) reads each weight byte once, and
/// the hardware's prefetcher alone kept one core's stream at ~75% of what a
/// plain read of the same bytes reaches. Called once per block with lines ≤ 64 bytes apart, so
/// every line of the stream is asked for. Past the end of a row is the
/// next row (rows lie one after another); past the end of the weights a
/// prefetch does nothing (it never faults).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) fn prefetch_ahead<const AHEAD: usize>(at: &[u8], lines: usize) {
    let p = at.as_ptr().wrapping_add(AHEAD);
    for l in 0..lines {
        // SAFETY: SSE is part of x86-64; a prefetch reads nothing the
        // program sees and does not fault on any address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64 * l).cast()) };
    }
}

#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q8_0_chains<const N: usize, const C: usize>(row: &[u8], acts: [&[Q8Block]; N]) -> [f32; N] {
    let mut acc = [[_mm256_setzero_ps(); N]; C];
    let groups = row.chunks_exact(C * 34);
    let rest = groups.remainder();
    let mut k = 0;
    for grp in groups {
        // C·34 bytes: 3 lines for one token's four chains, 2 for two.
        prefetch_ahead::<AHEAD_Q8_0>(grp, (C * 34).div_ceil(64));
        for t in 0..N {
            for (c, chain) in acc.iter_mut().enumerate() {
                let b = &grp[c * 34..(c + 1) * 34];
                chain[t] = q8_0_block(b, &acts[t][k + c], chain[t]);
            }
        }
        k += C;
    }
    // The 0..C leftover blocks, on the first chain (a chain chosen at run
    // time would index the accumulators by a variable, which keeps them in
    // memory).
    for b in rest.chunks_exact(34) {
        for t in 0..N {
            acc[0][t] = q8_0_block(b, &acts[t][k], acc[0][t]);
        }
        k += 1;
    }
    std::array::from_fn(|t| {
        let mut s = acc[0][t];
        for chain in &acc[1..] {
            s = _mm256_add_ps(s, chain[t]);
        }
        hsum(s)
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn widen(src: &[half::f16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len());
    let n = src.len() / 8 * 8;
    for i in (0..n).step_by(8) {
        // SAFETY: `i + 8 <= n <= len` for both slices (asserted equal above).
        unsafe {
            let h = _mm_loadu_si128(src.as_ptr().add(i).cast());
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        }
    }
    for i in n..src.len() {
        dst[i] = src[i].to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn narrow(src: &[f32], dst: &mut [half::f16]) {
    assert_eq!(src.len(), dst.len());
    let n = src.len() / 8 * 8;
    for i in (0..n).step_by(8) {
        // SAFETY: `i + 8 <= n <= len` for both slices (asserted equal above).
        unsafe {
            let h =
                _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(src.as_ptr().add(i)));
            _mm_storeu_si128(dst.as_mut_ptr().add(i).cast(), h);
        }
    }
    for i in n..src.len() {
        dst[i] = half::f16::from_f32(src[i]);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let n = a.len() / 8 * 8;
    let mut acc = _mm256_setzero_ps();
    for i in (0..n).step_by(8) {
        // SAFETY: `i + 8 <= n <= len` for both slices (asserted equal above).
        unsafe {
            acc = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i)),
                _mm256_loadu_ps(b.as_ptr().add(i)),
                acc,
            );
        }
    }
    let mut s = hsum(acc);
    for i in n..a.len() {
        s += a[i] * b[i];
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dots_f32<const N: usize>(a: [&[f32]; N], b: &[f32]) -> [f32; N] {
    assert!(a.iter().all(|r| r.len() == b.len()));
    let n = b.len() / 8 * 8;
    let mut acc = [_mm256_setzero_ps(); N];
    for i in (0..n).step_by(8) {
        // SAFETY: `i + 8 <= n <= len` for every slice (asserted equal above).
        unsafe {
            let bv = _mm256_loadu_ps(b.as_ptr().add(i));
            for (acc, r) in acc.iter_mut().zip(&a) {
                *acc = _mm256_fmadd_ps(_mm256_loadu_ps(r.as_ptr().add(i)), bv, *acc);
            }
        }
    }
    std::array::from_fn(|r| {
        let mut s = hsum(acc[r]);
        for i in n..b.len() {
            s += a[r][i] * b[i];
        }
        s
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn axpys<const N: usize>(a: [f32; N], x: &[f32], mut y: [&mut [f32]; N]) {
    assert!(y.iter().all(|r| r.len() == x.len()));
    let n = x.len() / 8 * 8;
    let av = a.map(|a| _mm256_set1_ps(a));
    for i in (0..n).step_by(8) {
        // SAFETY: `i + 8 <= n <= len` for every slice (asserted equal above);
        // each row is written through its own `&mut`.
        unsafe {
            let xv = _mm256_loadu_ps(x.as_ptr().add(i));
            for (av, y) in av.iter().zip(y.iter_mut()) {
                let p = y.as_mut_ptr().add(i);
                _mm256_storeu_ps(p, _mm256_fmadd_ps(*av, xv, _mm256_loadu_ps(p)));
            }
        }
    }
    for (a, y) in a.into_iter().zip(y) {
        for i in n..x.len() {
            y[i] += a * x[i];
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len());
    let n = x.len() / 8 * 8;
    let av = _mm256_set1_ps(a);
    for i in (0..n).step_by(8) {
        // SAFETY: `i + 8 <= n <= len` for both slices (asserted equal above).
        unsafe {
            let p = y.as_mut_ptr().add(i);
            _mm256_storeu_ps(
                p,
                _mm256_fmadd_ps(av, _mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(p)),
            );
        }
    }
    for i in n..x.len() {
        y[i] += a * x[i];
    }
}

/// `e^t` for each lane (Cephes' single-precision polynomial after a
/// power-of-two range reduction; relative error about 1e-7), with `t`
/// clamped to ±87 so the power of two stays a normal float.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp8(t: __m256) -> __m256 {
    let t = _mm256_min_ps(
        _mm256_max_ps(t, _mm256_set1_ps(-87.0)),
        _mm256_set1_ps(87.0),
    );
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        t,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    // r = t − n·ln 2, with ln 2 split in two for the precision.
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), t);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_2e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let e = _mm256_fmadd_ps(
        _mm256_mul_ps(p, r),
        r,
        _mm256_add_ps(r, _mm256_set1_ps(1.0)),
    );
    let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_mul_ps(e, _mm256_castsi256_ps(pow2))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gelu8(v: &mut [f32]) {
    const C: f32 = 0.797_884_6; // √(2/π)
    let n = v.len() / 8 * 8;
    for i in (0..n).step_by(8) {
        // SAFETY: `i + 8 <= n <= len`.
        unsafe {
            let p = v.as_mut_ptr().add(i);
            let x = _mm256_loadu_ps(p);
            let x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
            let u = _mm256_mul_ps(
                _mm256_set1_ps(C),
                _mm256_fmadd_ps(x3, _mm256_set1_ps(0.044_715), x),
            );
            // σ(2u) = 1 / (1 + e^(−2u)); past e^80 it is 0 (as tanh's −1 in
            // f32), also for the x that would not divide down to nothing.
            let t = _mm256_mul_ps(u, _mm256_set1_ps(-2.0));
            let y = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0), exp8(t)));
            let gone = _mm256_cmp_ps::<_CMP_GT_OQ>(t, _mm256_set1_ps(80.0));
            _mm256_storeu_ps(p, _mm256_andnot_ps(gone, y));
        }
    }
    for x in &mut v[n..] {
        *x = super::gelu(*x);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn softmax8(v: &mut [f32]) {
    let n = v.len() / 8 * 8;
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let (mx, floor) = (_mm256_set1_ps(max), _mm256_set1_ps(-87.0));
    let mut sum = _mm256_setzero_ps();
    for i in (0..n).step_by(8) {
        // SAFETY: `i + 8 <= n <= len`.
        unsafe {
            let p = v.as_mut_ptr().add(i);
            let t = _mm256_sub_ps(_mm256_loadu_ps(p), mx);
            // Below e^−87 (masked positions among them) is 0, not the clamp's value.
            let e = _mm256_andnot_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(t, floor), exp8(t));
            sum = _mm256_add_ps(sum, e);
            _mm256_storeu_ps(p, e);
        }
    }
    let mut total = hsum(sum);
    for x in &mut v[n..] {
        *x = (*x - max).exp();
        total += *x;
    }
    let inv = 1.0 / total;
    v.iter_mut().for_each(|x| *x *= inv);
}
