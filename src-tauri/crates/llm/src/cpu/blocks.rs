//! GGUF's quantized blocks as they lie in the file, the activations' 8-bit
//! blocks, and the dot products between them in plain Rust: the reference
//! the SIMD kernels are tested against, and the path where they cannot run.
//!
//! Layouts (bytes, little-endian; `f16` scales):
//! - Q8_0, 32 values: `d` f16, 32 × i8. Value = d·q.
//! - Q4_K, 256 values: `d`, `dmin` f16, 12 bytes of eight 6-bit scales and
//!   mins, 128 bytes of nibbles. Each 64 values take 32 bytes: the low
//!   nibbles are sub-block 2c, the high nibbles 2c+1. Value = d·s·q − dmin·m.
//! - Q5_K, 256 values: as Q4_K with 32 bytes of fifth bits before the
//!   nibbles: bit 2c of byte l tops value l of sub-block 2c, bit 2c+1 of
//!   sub-block 2c+1.
//! - Q6_K, 256 values: 128 bytes of low nibbles, 64 bytes of high bit pairs,
//!   16 i8 scales (one per 16 values), `d` f16. Value = d·s·(q − 32).

use half::f16;

/// Values per K-quant super-block.
pub(crate) const QK_K: usize = 256;
/// Values per Q8_0 block.
pub(crate) const QK8_0: usize = 32;

/// The quantized weight types with kernels here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Q4K,
    Q5K,
    Q6K,
    Q8_0,
}

impl Kind {
    pub(crate) fn from_ggml(t: candle_core::quantized::GgmlDType) -> Option<Self> {
        use candle_core::quantized::GgmlDType as G;
        Some(match t {
            G::Q4K => Self::Q4K,
            G::Q5K => Self::Q5K,
            G::Q6K => Self::Q6K,
            G::Q8_0 => Self::Q8_0,
            _ => return None,
        })
    }

    pub(crate) fn ggml(self) -> candle_core::quantized::GgmlDType {
        use candle_core::quantized::GgmlDType as G;
        match self {
            Self::Q4K => G::Q4K,
            Self::Q5K => G::Q5K,
            Self::Q6K => G::Q6K,
            Self::Q8_0 => G::Q8_0,
        }
    }

    /// Values per block.
    pub(crate) fn block_elems(self) -> usize {
        match self {
            Self::Q8_0 => QK8_0,
            _ => QK_K,
        }
    }

    /// Bytes per block.
    pub(crate) fn block_bytes(self) -> usize {
        match self {
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
            Self::Q8_0 => 34,
        }
    }
}

/// 256 activations as 8-bit integers: value ≈ d·q; `bsums` are the sums of
/// each 16 `q`s and `sums32` of each 32 (the K-quants' minimums and offsets
/// need only those).
#[derive(Debug, Clone, Copy)]
#[repr(C, align(32))]
pub(crate) struct Q8K {
    pub(crate) qs: [i8; QK_K],
    pub(crate) bsums: [i16; QK_K / 16],
    pub(crate) sums32: [i32; QK_K / 32],
    pub(crate) d: f32,
}

/// 32 activations as 8-bit integers: value ≈ d·q.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(32))]
pub(crate) struct Q8Block {
    pub(crate) qs: [i8; QK8_0],
    pub(crate) d: f32,
}

/// The scale that maps the largest magnitude onto ±127, and its inverse.
/// (Values are rounded to nearest even, as the vector conversions do.)
fn scale_of(x: &[f32]) -> (f32, f32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 || !amax.is_finite() {
        (0.0, 0.0)
    } else {
        (amax / 127.0, 127.0 / amax)
    }
}

/// `x` (|x| ≤ 127, or NaN) rounded to the nearest integer, ties to even:
/// adding and taking away 1.5 · 2²³ leaves no bits below the units, and the
/// float addition rounds to nearest even. Two additions that vectorize,
/// where `round_ties_even` is a call into the C library on x86-64 (SSE4.1's
/// `roundps` is not in its baseline): 2% of a decode step.
#[inline]
fn round_small(x: f32) -> f32 {
    const M: f32 = 12_582_912.0;
    (x + M) - M
}

/// Quantizes `x` (a multiple of 256 long) into super-blocks.
pub(crate) fn quantize_q8k(x: &[f32], out: &mut Vec<Q8K>) {
    for chunk in x.chunks_exact(QK_K) {
        let (d, id) = scale_of(chunk);
        let mut b = Q8K {
            qs: [0; QK_K],
            d,
            bsums: [0; QK_K / 16],
            sums32: [0; QK_K / 32],
        };
        for (q, v) in b.qs.iter_mut().zip(chunk) {
            *q = round_small((v * id).clamp(-127.0, 127.0)) as i8;
        }
        for (s, g) in b.bsums.iter_mut().zip(b.qs.chunks_exact(16)) {
            *s = g.iter().map(|&q| q as i16).sum();
        }
        for (s, p) in b.sums32.iter_mut().zip(b.bsums.chunks_exact(2)) {
            *s = p[0] as i32 + p[1] as i32;
        }
        out.push(b);
    }
}

/// Quantizes `x` (a multiple of 32 long) into Q8_0-sized blocks.
pub(crate) fn quantize_q8(x: &[f32], out: &mut Vec<Q8Block>) {
    for chunk in x.chunks_exact(QK8_0) {
        let (d, id) = scale_of(chunk);
        let mut b = Q8Block { qs: [0; QK8_0], d };
        for (q, v) in b.qs.iter_mut().zip(chunk) {
            *q = round_small((v * id).clamp(-127.0, 127.0)) as i8;
        }
        out.push(b);
    }
}

#[inline]
pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Q4_K/Q5_K's twelve bytes as eight 6-bit scales and eight 6-bit mins,
/// each as the eight bytes of a `u64`: the same unpacking as [`k4_scales`]
/// on four bytes at a time. Scales 0–3 are the low six bits of bytes 0–3,
/// mins 0–3 of bytes 4–7; scales and mins 4–7 take bytes 8–11's low and
/// high nibbles, topped by the two spare bits of bytes 0–3 and 4–7.
#[inline]
pub(crate) fn k4_scales_packed(s: &[u8]) -> (u64, u64) {
    let w = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
    let (a, b, c) = (w(0), w(4), w(8));
    const LOW6: u32 = 0x3f3f_3f3f;
    const NIB: u32 = 0x0f0f_0f0f;
    const TOP2: u32 = 0x0303_0303;
    let sc_lo = a & LOW6;
    let mn_lo = b & LOW6;
    let sc_hi = (c & NIB) | (((a >> 6) & TOP2) << 4);
    let mn_hi = ((c >> 4) & NIB) | (((b >> 6) & TOP2) << 4);
    (
        sc_lo as u64 | (sc_hi as u64) << 32,
        mn_lo as u64 | (mn_hi as u64) << 32,
    )
}

/// Q4_K/Q5_K's twelve bytes as eight 6-bit scales and eight 6-bit mins.
#[inline]
pub(crate) fn k4_scales(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..4 {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
    }
    for j in 4..8 {
        sc[j] = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
        mn[j] = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
    (sc, mn)
}

/// Σ mins × the activations' sums over each 32-value sub-block.
#[inline]
pub(crate) fn k4_min_term(mins: &[u8; 8], a: &Q8K) -> i32 {
    (0..8)
        .map(|j| mins[j] as i32 * (a.bsums[2 * j] as i32 + a.bsums[2 * j + 1] as i32))
        .sum()
}

/// One row of Q4_K blocks · super-blocks of activations.
#[cfg_attr(target_arch = "x86_64", allow(dead_code))] // tests; other CPUs
pub(crate) fn dot_q4k(row: &[u8], acts: &[Q8K]) -> f32 {
    let mut total = 0f32;
    for (b, a) in row.chunks_exact(144).zip(acts) {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let (sc, mn) = k4_scales(&b[4..16]);
        let qs = &b[16..144];
        let mut sumi = 0i32;
        for c in 0..4 {
            let (mut lo, mut hi) = (0i32, 0i32);
            for l in 0..32 {
                let q = qs[c * 32 + l];
                lo += (q & 15) as i32 * a.qs[c * 64 + l] as i32;
                hi += (q >> 4) as i32 * a.qs[c * 64 + 32 + l] as i32;
            }
            sumi += lo * sc[2 * c] as i32 + hi * sc[2 * c + 1] as i32;
        }
        total += a.d * (d * sumi as f32 - dmin * k4_min_term(&mn, a) as f32);
    }
    total
}

/// One row of Q5_K blocks · super-blocks of activations.
#[cfg_attr(target_arch = "x86_64", allow(dead_code))] // tests; other CPUs
pub(crate) fn dot_q5k(row: &[u8], acts: &[Q8K]) -> f32 {
    let mut total = 0f32;
    for (b, a) in row.chunks_exact(176).zip(acts) {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let (sc, mn) = k4_scales(&b[4..16]);
        let qh = &b[16..48];
        let qs = &b[48..176];
        let mut sumi = 0i32;
        for c in 0..4 {
            let (mut lo, mut hi) = (0i32, 0i32);
            for l in 0..32 {
                let q = qs[c * 32 + l];
                let ql = (q & 15) as i32 + ((((qh[l] >> (2 * c)) & 1) as i32) << 4);
                let qu = (q >> 4) as i32 + ((((qh[l] >> (2 * c + 1)) & 1) as i32) << 4);
                lo += ql * a.qs[c * 64 + l] as i32;
                hi += qu * a.qs[c * 64 + 32 + l] as i32;
            }
            sumi += lo * sc[2 * c] as i32 + hi * sc[2 * c + 1] as i32;
        }
        total += a.d * (d * sumi as f32 - dmin * k4_min_term(&mn, a) as f32);
    }
    total
}

/// One row of Q6_K blocks · super-blocks of activations.
#[cfg_attr(target_arch = "x86_64", allow(dead_code))] // tests; other CPUs
pub(crate) fn dot_q6k(row: &[u8], acts: &[Q8K]) -> f32 {
    let mut total = 0f32;
    for (b, a) in row.chunks_exact(210).zip(acts) {
        let d = f16_at(b, 208);
        let sc = &b[192..208];
        let mut sumi = 0i32;
        for h in 0..2 {
            let ql = &b[h * 64..h * 64 + 64];
            let qh = &b[128 + h * 32..128 + h * 32 + 32];
            let y = &a.qs[h * 128..h * 128 + 128];
            let s = &sc[h * 8..h * 8 + 8];
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[l] & 15) | ((qh[l] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                sumi += s[is] as i8 as i32 * q1 * y[l] as i32
                    + s[is + 2] as i8 as i32 * q2 * y[l + 32] as i32
                    + s[is + 4] as i8 as i32 * q3 * y[l + 64] as i32
                    + s[is + 6] as i8 as i32 * q4 * y[l + 96] as i32;
            }
        }
        total += a.d * d * sumi as f32;
    }
    total
}

/// One row of Q8_0 blocks · blocks of activations.
#[cfg_attr(target_arch = "x86_64", allow(dead_code))] // tests; other CPUs
pub(crate) fn dot_q8_0(row: &[u8], acts: &[Q8Block]) -> f32 {
    let mut total = 0f32;
    for (b, a) in row.chunks_exact(34).zip(acts) {
        let sumi: i32 = b[2..34]
            .iter()
            .zip(&a.qs)
            .map(|(&w, &x)| w as i8 as i32 * x as i32)
            .sum();
        total += f16_at(b, 0) * a.d * sumi as f32;
    }
    total
}

#[cfg(test)]
mod tests {
    /// Every half-integer in [−127, 127], its float neighbours and a sweep
    /// of the range round as `round_ties_even` does (up to the sign of zero,
    /// which `as i8` drops).
    #[test]
    fn round_small_rounds_to_nearest_even() {
        let mut xs: Vec<f32> = (-254..=254).map(|k| k as f32 / 2.0).collect();
        let ties = xs.clone();
        for x in ties {
            xs.push(f32::from_bits(x.to_bits() + 1));
            xs.push(f32::from_bits(x.to_bits().wrapping_sub(1)));
        }
        xs.extend((0..200_000).map(|i| -127.0 + i as f32 * (254.0 / 200_000.0)));
        for x in xs.into_iter().filter(|x| x.abs() <= 127.0) {
            let (got, want) = (super::round_small(x), x.round_ties_even());
            assert!(got == want, "{x}: {got} vs {want}");
        }
        assert!(super::round_small(f32::NAN).is_nan());
    }
}
