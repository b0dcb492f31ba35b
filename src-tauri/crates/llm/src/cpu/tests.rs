use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

use super::blocks::{self, Kind};
use super::{Avx2, Avx512, Bytes, QMatrix, WIDE_ROWS};

const KINDS: [GgmlDType; 4] = [
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
    GgmlDType::Q8_0,
];

pub(super) fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Heavy-ish tails, like trained weights, and some exact zeros.
    (0..n)
        .map(|i| {
            if i % 97 == 0 {
                0.0
            } else {
                let u: f32 = rng.random_range(-1.0..1.0);
                u * u * u * 3.0 + u * 0.2
            }
        })
        .collect()
}

/// A `[rows, cols]` matrix quantized by candle (the file's bytes), and its
/// dequantized values (what the bytes mean, by candle's reading).
pub(super) fn quantized(
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
    seed: u64,
) -> (QMatrix, Vec<f32>) {
    let w = Tensor::from_vec(random(rows * cols, seed), (rows, cols), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&w, dtype).unwrap();
    let dense: Vec<f32> = q
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let bytes = Bytes::Owned(Arc::new(q.data().unwrap().into_owned()));
    (
        QMatrix::new(bytes, dtype, rows, cols).expect("kernel"),
        dense,
    )
}

fn reference(dense: &[f32], x: &[f32], m: usize, rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * rows];
    for t in 0..m {
        for r in 0..rows {
            out[t * rows + r] = (0..cols)
                .map(|c| dense[r * cols + c] as f64 * x[t * cols + c] as f64)
                .sum::<f64>() as f32;
        }
    }
    out
}

/// Q8_0 rows of every length from 1 to 13 blocks: the kernel takes blocks
/// four at a time, so 1–3 are left over in every residue.
#[test]
fn q8_0_rows_of_any_block_count() {
    let Some(simd) = Avx2::detect() else {
        eprintln!("no AVX2 here: the kernels are not used on this CPU");
        return;
    };
    for nb in 1..=13 {
        let cols = nb * blocks::QK8_0;
        let (m, dense) = quantized(GgmlDType::Q8_0, 2, cols, 40 + nb as u64);
        let xs: Vec<Vec<f32>> = (0..4).map(|i| random(cols, 90 + i)).collect();
        let acts: Vec<Vec<_>> = xs
            .iter()
            .map(|x| {
                let mut v = Vec::new();
                blocks::quantize_q8(x, &mut v);
                v
            })
            .collect();
        let a4 = [&acts[0][..], &acts[1], &acts[2], &acts[3]];
        let rb = m.row_bytes();
        for r in 0..2 {
            let row = &m.bytes()[r * rb..(r + 1) * rb];
            let four = simd.dot_q8_0::<4>(row, a4);
            for t in 0..4 {
                let plain = blocks::dot_q8_0(row, a4[t]);
                let one = simd.dot_q8_0::<1>(row, [a4[t]])[0];
                // The same integer sums; only the float accumulation order differs.
                for (what, v) in [("one row", one), ("four rows", four[t])] {
                    assert!(
                        (plain - v).abs() <= 1e-4 * plain.abs().max(1.0),
                        "{nb} blocks, row {r}, input {t}, {what}: plain {plain} vs simd {v}"
                    );
                }
                // And the plain dot is the product it stands for (8-bit
                // activations: within 2% of the dense product's scale).
                let exact: f32 = (0..cols).map(|c| dense[r * cols + c] * xs[t][c]).sum();
                let scale: f32 = (0..cols)
                    .map(|c| (dense[r * cols + c] * xs[t][c]).abs())
                    .sum();
                assert!(
                    (plain - exact).abs() <= 0.02 * scale,
                    "{nb} blocks: {plain} vs dense {exact}"
                );
            }
        }
    }
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

#[test]
fn simd_dots_equal_the_plain_dots() {
    let Some(simd) = Avx2::detect() else {
        eprintln!("no AVX2 here: the kernels are not used on this CPU");
        return;
    };
    let cols = 1024;
    let xs: Vec<Vec<f32>> = (0..4).map(|i| random(cols, 7 + i)).collect();
    let k: Vec<Vec<_>> = xs
        .iter()
        .map(|x| {
            let mut v = Vec::new();
            blocks::quantize_q8k(x, &mut v);
            v
        })
        .collect();
    let q8: Vec<Vec<_>> = xs
        .iter()
        .map(|x| {
            let mut v = Vec::new();
            blocks::quantize_q8(x, &mut v);
            v
        })
        .collect();
    let k4 = [&k[0][..], &k[1], &k[2], &k[3]];
    let q4 = [&q8[0][..], &q8[1], &q8[2], &q8[3]];
    for dtype in KINDS {
        let (m, _) = quantized(dtype, 16, cols, 3);
        let rb = m.row_bytes();
        for r in 0..16 {
            let row = &m.bytes()[r * rb..(r + 1) * rb];
            let (plain, one, four): (Vec<f32>, Vec<f32>, [f32; 4]) =
                match Kind::from_ggml(dtype).unwrap() {
                    Kind::Q4K => (
                        k4.map(|a| blocks::dot_q4k(row, a)).to_vec(),
                        k4.map(|a| simd.dot_q4k::<1>(row, [a])[0]).to_vec(),
                        simd.dot_q4k::<4>(row, k4),
                    ),
                    Kind::Q5K => (
                        k4.map(|a| blocks::dot_q5k(row, a)).to_vec(),
                        k4.map(|a| simd.dot_q5k::<1>(row, [a])[0]).to_vec(),
                        simd.dot_q5k::<4>(row, k4),
                    ),
                    Kind::Q6K => (
                        k4.map(|a| blocks::dot_q6k(row, a)).to_vec(),
                        k4.map(|a| simd.dot_q6k::<1>(row, [a])[0]).to_vec(),
                        simd.dot_q6k::<4>(row, k4),
                    ),
                    Kind::Q8_0 => (
                        q4.map(|a| blocks::dot_q8_0(row, a)).to_vec(),
                        q4.map(|a| simd.dot_q8_0::<1>(row, [a])[0]).to_vec(),
                        simd.dot_q8_0::<4>(row, q4),
                    ),
                };
            for t in 0..4 {
                // The same integer sums; only the float accumulation order differs.
                for (what, v) in [("one row", one[t]), ("four rows", four[t])] {
                    assert!(
                        (plain[t] - v).abs() <= 1e-4 * plain[t].abs().max(1.0),
                        "{dtype:?} row {r}, input {t}, {what}: plain {} vs simd {v}",
                        plain[t]
                    );
                }
            }
        }
    }
}

#[test]
fn products_match_the_dequantized_weights() {
    if Avx2::detect().is_none() {
        return;
    }
    // Decode (one row), a partial input tile, 12 tokens (Q8_0 on the tiles
    // in one padded panel, the K-quants on the row kernels) and more than
    // one tile; 72 rows (tasks of one and two row groups) and 7,176 (tasks
    // of eight groups that each panel goes through, up to 112 threads, and a
    // last one of one).
    for (i, dtype) in KINDS.into_iter().enumerate() {
        for (rows, cols, ms) in [(72, 512, &[1usize, 5, 12, 70][..]), (7176, 256, &[40][..])] {
            let (q, dense) = quantized(dtype, rows, cols, 11 + i as u64);
            for &m in ms {
                let x = random(m * cols, 100 + m as u64);
                let got = q.matmul(&x, m);
                let want = reference(&dense, &x, m, rows, cols);
                // Only the activations' 8-bit rounding separates the two (≈0.4% per value).
                let e = rel_err(&got, &want);
                assert!(e < 0.01, "{dtype:?} {rows} rows, m={m}: relative error {e}");
            }
        }
    }
}

#[test]
fn shapes_that_do_not_fit_the_blocks_are_refused() {
    if Avx2::detect().is_none() {
        return;
    }
    let bytes = |n| Bytes::Owned(Arc::new(vec![0u8; n]));
    // 100 columns are not whole super-blocks; a byte count one short.
    assert!(QMatrix::new(bytes(144), GgmlDType::Q4K, 1, 100).is_none());
    assert!(QMatrix::new(bytes(143), GgmlDType::Q4K, 1, 256).is_none());
    assert!(QMatrix::new(bytes(144), GgmlDType::Q4K, 1, 256).is_some());
    assert!(QMatrix::new(bytes(64), GgmlDType::Q4_0, 1, 256).is_none());
}

#[test]
fn all_zero_inputs_give_zeros() {
    if Avx2::detect().is_none() {
        return;
    }
    for dtype in KINDS {
        let (q, _) = quantized(dtype, 8, 256, 5);
        assert!(q.matmul(&[0.0; 512], 2).iter().all(|&v| v == 0.0));
    }
}

#[test]
fn the_epilogue_adds_the_bias_then_gelu() {
    if Avx2::detect().is_none() {
        return;
    }
    let (q, _) = quantized(GgmlDType::Q4K, 24, 256, 9);
    let bias: Vec<f32> = (0..24).map(|i| i as f32 * 0.25 - 3.0).collect();
    // Decode, the row kernels' prompt path, and the tiles' (16 or more tokens).
    for m in [1usize, 6, 20] {
        let x = random(m * 256, 40);
        let plain = q.matmul(&x, m);
        let fused = q.matmul_with(
            &x,
            m,
            super::Epilogue {
                bias: Some(&bias),
                gelu: true,
            },
        );
        for (i, (p, f)) in plain.iter().zip(&fused).enumerate() {
            let want = super::gelu(p + bias[i % 24]);
            assert!(
                (want - f).abs() <= 1e-5 * want.abs().max(1.0),
                "m={m} [{i}]: {want} vs {f}"
            );
        }
    }
    // GELU itself: 0 at 0, x for large x, 0 for very negative x, ≈0.8412 at 1.
    assert_eq!(super::gelu(0.0), 0.0);
    assert!((super::gelu(1.0) - 0.841_192).abs() < 1e-5);
    assert!((super::gelu(10.0) - 10.0).abs() < 1e-4 && super::gelu(-10.0).abs() < 1e-4);
}

#[test]
fn avx512_dots_equal_the_plain_dots() {
    let Some(wide) = Avx512::detect() else {
        eprintln!("no AVX-512 here: the AVX2 kernels serve");
        return;
    };
    let cols = 1024;
    let acts: Vec<Vec<_>> = (0..WIDE_ROWS as u64)
        .map(|i| {
            let mut v = Vec::new();
            blocks::quantize_q8k(&random(cols, 40 + i), &mut v);
            v
        })
        .collect();
    let a8: [&[blocks::Q8K]; WIDE_ROWS] = std::array::from_fn(|i| &acts[i][..]);
    for v in [wide, wide.without_vnni()] {
        for dtype in [GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K] {
            let (m, _) = quantized(dtype, 12, cols, 9);
            let rb = m.row_bytes();
            for r in 0..12 {
                let row = &m.bytes()[r * rb..(r + 1) * rb];
                let (plain, one, many): (Vec<f32>, Vec<f32>, [f32; WIDE_ROWS]) =
                    match Kind::from_ggml(dtype).unwrap() {
                        Kind::Q4K => (
                            a8.map(|a| blocks::dot_q4k(row, a)).to_vec(),
                            a8.map(|a| v.dot_q4k::<1>(row, [a])[0]).to_vec(),
                            v.dot_q4k::<WIDE_ROWS>(row, a8),
                        ),
                        Kind::Q5K => (
                            a8.map(|a| blocks::dot_q5k(row, a)).to_vec(),
                            a8.map(|a| v.dot_q5k::<1>(row, [a])[0]).to_vec(),
                            v.dot_q5k::<WIDE_ROWS>(row, a8),
                        ),
                        _ => (
                            a8.map(|a| blocks::dot_q6k(row, a)).to_vec(),
                            a8.map(|a| v.dot_q6k::<1>(row, [a])[0]).to_vec(),
                            v.dot_q6k::<WIDE_ROWS>(row, a8),
                        ),
                    };
                for t in 0..WIDE_ROWS {
                    for (what, got) in [("one row", one[t]), ("many rows", many[t])] {
                        assert!(
                            (plain[t] - got).abs() <= 1e-4 * plain[t].abs().max(1.0),
                            "{dtype:?} {v:?} row {r}, input {t}, {what}: plain {} vs {got}",
                            plain[t]
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn vector_gelu_equals_the_scalar_one() {
    let Some(simd) = Avx2::detect() else {
        return;
    };
    // The whole range that matters, the tails where e^(−2u) under- or
    // overflows, exact zeros, and a length that leaves a scalar tail.
    let mut xs = vec![
        -3e38, -1e20, -100.0, -30.0, -9.5, 0.0, -0.0, 1e-30, -1e-30, 9.5, 30.0, 100.0, 1e20, 3e38,
        -5.0, 5.0,
    ];
    xs.extend((-4000..=4000).map(|i| i as f32 / 400.0));
    let mut got = xs.clone();
    simd.gelu(&mut got);
    for (x, g) in xs.iter().zip(&got) {
        let want = super::gelu(*x);
        assert!(
            (g - want).abs() <= 2e-6 * want.abs().max(1.0),
            "gelu({x}): {g} vs {want}"
        );
    }
}
