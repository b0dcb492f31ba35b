//! The K-quant dot products of [`super::blocks`] with AVX-512 (BW, and VNNI
//! where the CPU has it), one weight row against `N` rows of activations.
//!
//! A 512-bit register holds one 64-value chunk of a super-block, laid out as
//! the activations are: Q4_K/Q5_K's 32 bytes of nibbles are broadcast to
//! both halves and shifted by 0 and 4 bits (low nibbles, then high), Q6_K's
//! 64 bytes of low nibbles are read whole. So each activation row is read
//! with one unaligned 64-byte load per chunk, multiplied (`maddubs`:
//! unsigned × signed into 16-bit pairs) and widened with the sub-blocks'
//! scales into 32-bit sums — with VNNI's `dpwssd` in the same instruction
//! as the accumulation. Half the instructions of the AVX2 kernels per
//! value, and the weights' unpacking is shared by eight rows, not four.
//! The same integer sums as the plain versions, so the tests compare them
//! up to float rounding.
#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::blocks::{Q8K, k4_scales_packed};

/// Proof that this CPU runs AVX-512 F and BW (made only by
/// [`Avx512::detect`]), and whether it has VNNI.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx512 {
    vnni: bool,
}

impl Avx512 {
    /// `Some` on an x86-64 CPU with AVX-512 F and BW, AVX2, FMA and F16C. Off
    /// when `DRAMATIS_NO_AVX512` is set (to measure or test the AVX2 path
    /// on the same machine).
    pub(crate) fn detect() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
            && std::env::var_os("DRAMATIS_NO_AVX512").is_none()
        {
            return Some(Self {
                vnni: std::arch::is_x86_feature_detected!("avx512vnni"),
            });
        }
        None
    }

    /// The same CPU's kernels without VNNI (the tests run both).
    #[cfg(test)]
    pub(crate) fn without_vnni(self) -> Self {
        Self { vnni: false }
    }

    /// `row` (Q4_K) · each of `N` activation rows.
    pub(crate) fn dot_q4k<const N: usize>(self, row: &[u8], acts: [&[Q8K]; N]) -> [f32; N] {
        // SAFETY: `self` exists only where AVX-512 F/BW, AVX2 and FMA were
        // detected; the VNNI variant only where VNNI was too.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            if self.vnni {
                kq_vnni::<N, false>(row, acts)
            } else {
                kq_bw::<N, false>(row, acts)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        acts.map(|a| super::blocks::dot_q4k(row, a))
    }

    /// As [`Self::dot_q4k`] for Q5_K.
    pub(crate) fn dot_q5k<const N: usize>(self, row: &[u8], acts: [&[Q8K]; N]) -> [f32; N] {
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            if self.vnni {
                kq_vnni::<N, true>(row, acts)
            } else {
                kq_bw::<N, true>(row, acts)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        acts.map(|a| super::blocks::dot_q5k(row, a))
    }

    /// As [`Self::dot_q4k`] for Q6_K.
    pub(crate) fn dot_q6k<const N: usize>(self, row: &[u8], acts: [&[Q8K]; N]) -> [f32; N] {
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            if self.vnni {
                q6k_vnni::<N>(row, acts)
            } else {
                q6k_bw::<N>(row, acts)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        acts.map(|a| super::blocks::dot_q6k(row, a))
    }
}

/// 64 bytes from the start of `s` (checked).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
fn load64(s: &[u8]) -> __m512i {
    assert!(s.len() >= 64);
    // SAFETY: 64 readable bytes (checked above); unaligned load.
    unsafe { _mm512_loadu_si512(s.as_ptr().cast()) }
}

/// Values `64c .. 64c + 64` of a super-block of activations.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
fn chunk64(qs: &[i8; 256], c: usize) -> __m512i {
    assert!(c < 4);
    // SAFETY: 64c + 64 <= 256 (checked above); unaligned load.
    unsafe { _mm512_loadu_si512(qs.as_ptr().add(c * 64).cast()) }
}

/// The two f16 at the start of `b` (a K-quant block's `d` and `dmin`), by F16C.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,f16c")]
fn f16_pair(b: &[u8]) -> (f32, f32) {
    let bits = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32));
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
}

/// 32 bytes of `s` in both halves of a 512-bit register (checked).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
fn load32_twice(s: &[u8]) -> __m512i {
    assert!(s.len() >= 32);
    // SAFETY: 32 readable bytes (checked above); unaligned load.
    unsafe { _mm512_broadcast_i64x4(_mm256_loadu_si256(s.as_ptr().cast())) }
}

/// Sixteen 16-bit lanes per half: `lo` in the low 256 bits, `hi` in the high.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
fn halves16(lo: i16, hi: i16) -> __m512i {
    _mm512_inserti64x4::<1>(
        _mm512_castsi256_si512(_mm256_set1_epi16(lo)),
        _mm256_set1_epi16(hi),
    )
}

/// A `permutexvar_epi16` index: 16-bit lane `i` takes element `at[i / 8]`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
fn pick(at: [i16; 4]) -> __m512i {
    let mut idx = [0i16; 32];
    for (i, v) in idx.iter_mut().enumerate() {
        *v = at[i / 8];
    }
    // SAFETY: 64 bytes.
    unsafe { _mm512_loadu_si512(idx.as_ptr().cast()) }
}

/// `acc + Σ pairs of (w × x)` weighted by `scale` (16-bit lanes), as
/// 32-bit sums: VNNI's one instruction, or its two without it.
macro_rules! scaled_add {
    (true, $acc:expr, $w:expr, $x:expr, $scale:expr) => {
        _mm512_dpwssd_epi32($acc, _mm512_maddubs_epi16($w, $x), $scale)
    };
    (false, $acc:expr, $w:expr, $x:expr, $scale:expr) => {
        _mm512_add_epi32(
            $acc,
            _mm512_madd_epi16(_mm512_maddubs_epi16($w, $x), $scale),
        )
    };
}

/// The kernels, compiled once per feature set: a function may only use the
/// instructions its `target_feature` names, so the VNNI kernels and the
/// plain AVX-512 ones are separate functions from one text.
macro_rules! kernels {
    ($kq:ident, $q6k:ident, $features:literal, $vnni:tt) => {
        /// Q4_K (`FIFTH = false`) and Q5_K (`FIFTH = true`) against `N` rows.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        fn $kq<const N: usize, const FIFTH: bool>(row: &[u8], acts: [&[Q8K]; N]) -> [f32; N] {
            let bb = if FIFTH { 176 } else { 144 };
            let qs_at = if FIFTH { 48 } else { 16 };
            let m4 = _mm512_set1_epi8(0x0F);
            let one = _mm512_set1_epi8(1);
            // Low half keeps the low nibbles, high half shifts the high ones down.
            let nibbles = halves16(0, 4);
            // Chunk c's fifth bits: bit 2c for the low half, 2c + 1 for the high.
            let fifth = [
                halves16(0, 1),
                halves16(2, 3),
                halves16(4, 5),
                halves16(6, 7),
            ];
            // Chunk c's scales: sub-block 2c in the low half, 2c + 1 in the high.
            let picks = [
                pick([0, 0, 1, 1]),
                pick([2, 2, 3, 3]),
                pick([4, 4, 5, 5]),
                pick([6, 6, 7, 7]),
            ];
            let mut acc = [_mm512_setzero_ps(); N];
            for (k, b) in row.chunks_exact(bb).enumerate() {
                super::avx2::prefetch_ahead::<{ super::avx2::AHEAD_K }>(b, 3);
                let a: [&Q8K; N] = std::array::from_fn(|t| &acts[t][k]);
                let (d, dmin) = f16_pair(b);
                let (sc, mn) = k4_scales_packed(&b[4..16]);
                let sc16 = _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64)));
                let mins32 = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(mn as i64));
                let qh = if FIFTH {
                    load32_twice(&b[16..48])
                } else {
                    _mm512_setzero_si512()
                };
                // The four chunks' weights and scales, unpacked once for all rows.
                let ws: [__m512i; 4] = std::array::from_fn(|c| {
                    let q = load32_twice(&b[qs_at + c * 32..]);
                    let w = _mm512_and_si512(_mm512_srlv_epi16(q, nibbles), m4);
                    if FIFTH {
                        let top = _mm512_and_si512(_mm512_srlv_epi16(qh, fifth[c]), one);
                        _mm512_or_si512(w, _mm512_slli_epi16::<4>(top))
                    } else {
                        w
                    }
                });
                let ss: [__m512i; 4] =
                    std::array::from_fn(|c| _mm512_permutexvar_epi16(picks[c], sc16));
                for t in 0..N {
                    let mut sumi = _mm512_setzero_si512();
                    for c in 0..4 {
                        sumi = scaled_add!($vnni, sumi, ws[c], chunk64(&a[t].qs, c), ss[c]);
                    }
                    // SAFETY: 32 bytes.
                    let sums = unsafe { _mm256_loadu_si256(a[t].sums32.as_ptr().cast()) };
                    // Eight minimum terms in the low lanes, zeros above.
                    let m = _mm512_zextsi256_si512(_mm256_mullo_epi32(mins32, sums));
                    acc[t] = _mm512_fmadd_ps(
                        _mm512_set1_ps(d * a[t].d),
                        _mm512_cvtepi32_ps(sumi),
                        acc[t],
                    );
                    acc[t] = _mm512_fnmadd_ps(
                        _mm512_set1_ps(dmin * a[t].d),
                        _mm512_cvtepi32_ps(m),
                        acc[t],
                    );
                }
            }
            acc.map(|v| _mm512_reduce_add_ps(v))
        }

        /// Q6_K against `N` rows.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        fn $q6k<const N: usize>(row: &[u8], acts: [&[Q8K]; N]) -> [f32; N] {
            let m4 = _mm512_set1_epi8(0x0F);
            let m2 = _mm512_set1_epi8(3);
            // The two bits above value l of part j sit at bit 2j of high byte l:
            // parts 0 and 1 make the first register, 2 and 3 the second.
            let tops = [halves16(0, 2), halves16(4, 6)];
            // Sixteen scales, one per 16 values: half h's register r takes
            // scales 8h + 4r .. 8h + 4r + 3, eight 16-bit lanes each.
            let picks = [
                [pick([0, 1, 2, 3]), pick([4, 5, 6, 7])],
                [pick([8, 9, 10, 11]), pick([12, 13, 14, 15])],
            ];
            let mut acc = [_mm512_setzero_ps(); N];
            for (k, b) in row.chunks_exact(210).enumerate() {
                super::avx2::prefetch_ahead::<{ super::avx2::AHEAD_K }>(b, 4);
                let a: [&Q8K; N] = std::array::from_fn(|t| &acts[t][k]);
                let d = super::avx2::f16c_at(b, 208);
                // SAFETY: 16 readable bytes.
                let sc8 = unsafe { _mm_loadu_si128(b[192..208].as_ptr().cast()) };
                let sc16 = _mm256_cvtepi8_epi16(sc8);
                let sc512 = _mm512_castsi256_si512(sc16);
                // Half h's register r holds values 128h + 64r .. + 64 (chunk 2h + r).
                let mut ws = [_mm512_setzero_si512(); 4];
                let mut ss = [_mm512_setzero_si512(); 4];
                for h in 0..2 {
                    let ql = load64(&b[h * 64..]);
                    let qh = load32_twice(&b[128 + h * 32..]);
                    let lo = _mm512_and_si512(ql, m4);
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(ql), m4);
                    for (r, low) in [lo, hi].into_iter().enumerate() {
                        let top = _mm512_and_si512(_mm512_srlv_epi16(qh, tops[r]), m2);
                        ws[2 * h + r] = _mm512_or_si512(low, _mm512_slli_epi16::<4>(top));
                        ss[2 * h + r] = _mm512_permutexvar_epi16(picks[h][r], sc512);
                    }
                }
                for t in 0..N {
                    let mut sumi = _mm512_setzero_si512();
                    for c in 0..4 {
                        sumi = scaled_add!($vnni, sumi, ws[c], chunk64(&a[t].qs, c), ss[c]);
                    }
                    // The −32 offset: 32 · Σ scale × the sums of its 16 activations.
                    // SAFETY: 32 bytes.
                    let bsums = unsafe { _mm256_loadu_si256(a[t].bsums.as_ptr().cast()) };
                    let off = _mm256_slli_epi32::<5>(_mm256_madd_epi16(sc16, bsums));
                    let total = _mm512_sub_epi32(sumi, _mm512_zextsi256_si512(off));
                    acc[t] = _mm512_fmadd_ps(
                        _mm512_set1_ps(d * a[t].d),
                        _mm512_cvtepi32_ps(total),
                        acc[t],
                    );
                }
            }
            acc.map(|v| _mm512_reduce_add_ps(v))
        }
    };
}

kernels!(
    kq_vnni,
    q6k_vnni,
    "avx512f,avx512bw,avx512vnni,avx2,fma,f16c",
    true
);
kernels!(kq_bw, q6k_bw, "avx512f,avx512bw,avx2,fma,f16c", false);
