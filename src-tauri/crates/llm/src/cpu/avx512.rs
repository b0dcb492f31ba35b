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

use super::blocks::{Q8K, f16_at, k4_scales_packed};

/// Proof that this CPU runs AVX-512 F and BW (made only by
/// [`Avx512::detect`]), and whether it has VNNI.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx512 {
    vnni: bool,
}

impl Avx512 {
    /// `Some` on an x86-64 CPU with AVX-512 F, BW and AVX2 with FMA. Off
    /// when `DRAMATIS_NO_AVX512` is set (to measure or test the AVX2 path
    /// on the same machine).
    pub(crate) fn detect() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
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

#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
fn load64_i8(s: &[i8]) -> __m512i {
    assert!(s.len() >= 64);
    // SAFETY: as `load64`.
    unsafe { _mm512_loadu_si512(s.as_ptr().cast()) }
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

/// Σ of the eight 32-bit lanes of `v`, as f32.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum256(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
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
            let mut acc_min = [_mm256_setzero_ps(); N];
            for (k, b) in row.chunks_exact(bb).enumerate() {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let (sc, mn) = k4_scales_packed(&b[4..16]);
                let sc16 = _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64)));
                let mins32 = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(mn as i64));
                let qh = if FIFTH {
                    load32_twice(&b[16..48])
                } else {
                    _mm512_setzero_si512()
                };
                let mut sumi = [_mm512_setzero_si512(); N];
                for c in 0..4 {
                    let q = load32_twice(&b[qs_at + c * 32..]);
                    let mut w = _mm512_and_si512(_mm512_srlv_epi16(q, nibbles), m4);
                    if FIFTH {
                        let top = _mm512_and_si512(_mm512_srlv_epi16(qh, fifth[c]), one);
                        w = _mm512_or_si512(w, _mm512_slli_epi16::<4>(top));
                    }
                    let s = _mm512_permutexvar_epi16(picks[c], sc16);
                    for t in 0..N {
                        let y = load64_i8(&acts[t][k].qs[c * 64..]);
                        sumi[t] = scaled_add!($vnni, sumi[t], w, y, s);
                    }
                }
                for t in 0..N {
                    let a = &acts[t][k];
                    acc[t] = _mm512_fmadd_ps(
                        _mm512_set1_ps(d * a.d),
                        _mm512_cvtepi32_ps(sumi[t]),
                        acc[t],
                    );
                    // SAFETY: 32 bytes.
                    let sums = unsafe { _mm256_loadu_si256(a.sums32.as_ptr().cast()) };
                    let m = _mm256_mullo_epi32(mins32, sums);
                    acc_min[t] = _mm256_fmadd_ps(
                        _mm256_set1_ps(dmin * a.d),
                        _mm256_cvtepi32_ps(m),
                        acc_min[t],
                    );
                }
            }
            std::array::from_fn(|t| _mm512_reduce_add_ps(acc[t]) - hsum256(acc_min[t]))
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
                let d = f16_at(b, 208);
                // SAFETY: 16 readable bytes.
                let sc8 = unsafe { _mm_loadu_si128(b[192..208].as_ptr().cast()) };
                let sc16 = _mm256_cvtepi8_epi16(sc8);
                let sc512 = _mm512_castsi256_si512(sc16);
                let mut sumi = [_mm512_setzero_si512(); N];
                for h in 0..2 {
                    let ql = load64(&b[h * 64..]);
                    let qh = load32_twice(&b[128 + h * 32..]);
                    let lo = _mm512_and_si512(ql, m4);
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(ql), m4);
                    for (r, low) in [lo, hi].into_iter().enumerate() {
                        let top = _mm512_and_si512(_mm512_srlv_epi16(qh, tops[r]), m2);
                        let w = _mm512_or_si512(low, _mm512_slli_epi16::<4>(top));
                        let s = _mm512_permutexvar_epi16(picks[h][r], sc512);
                        for t in 0..N {
                            let y = load64_i8(&acts[t][k].qs[h * 128 + r * 64..]);
                            sumi[t] = scaled_add!($vnni, sumi[t], w, y, s);
                        }
                    }
                }
                for t in 0..N {
                    let a = &acts[t][k];
                    // The −32 offset: 32 · Σ scale × the sums of its 16 activations.
                    // SAFETY: 32 bytes.
                    let bsums = unsafe { _mm256_loadu_si256(a.bsums.as_ptr().cast()) };
                    let off = _mm256_slli_epi32::<5>(_mm256_madd_epi16(sc16, bsums));
                    let total = _mm512_sub_epi32(sumi[t], _mm512_zextsi256_si512(off));
                    acc[t] =
                        _mm512_fmadd_ps(_mm512_set1_ps(d * a.d), _mm512_cvtepi32_ps(total), acc[t]);
                }
            }
            acc.map(|v| _mm512_reduce_add_ps(v))
        }
    };
}

kernels!(
    kq_vnni,
    q6k_vnni,
    "avx512f,avx512bw,avx512vnni,avx2,fma",
    true
);
kernels!(kq_bw, q6k_bw, "avx512f,avx512bw,avx2,fma", false);
