//! Causal attention over a layer's f16 KV cache, fused: scores, softmax and
//! the weighted sum of values in one pass per (head, block of queries), the
//! blocks spread over the engine's threads. Nothing of size
//! `seq × context` is ever materialized beyond one block's scores, and each
//! cached key and value is widened to f32 once per block, not per query.

use super::{Avx2, pool};
use crate::cache::HostKv;

/// Queries that share one pass over a head's keys and values.
const QUERY_BLOCK: usize = 16;

/// `q`: `[seq, heads, head_dim]` rows (rotated), for positions
/// `offset..offset + seq`; `kv` holds positions `0..offset + seq` (these
/// queries' own keys included). Returns `[seq, heads · head_dim]`: each
/// query's attention output, heads side by side (what the output
/// projection reads).
pub(crate) fn attend(
    simd: Avx2,
    q: &[f32],
    seq: usize,
    offset: usize,
    kv: &HostKv,
    scale: f32,
) -> Vec<f32> {
    let (heads, hd) = (kv.heads, kv.head_dim);
    assert_eq!(
        q.len(),
        seq * heads * hd,
        "queries are not [seq, heads, head_dim]"
    );
    assert!(
        offset + seq <= kv.cap,
        "the cache does not hold the queries' keys"
    );
    let blocks = seq.div_ceil(QUERY_BLOCK);
    // One task per (head, query block); each returns its rows of one head.
    let parts = pool::map(heads * blocks, |task| {
        let (h, b) = (task / blocks, task % blocks);
        let i0 = b * QUERY_BLOCK;
        let i1 = (i0 + QUERY_BLOCK).min(seq);
        (h, i0, attend_block(simd, q, i0..i1, h, offset, kv, scale))
    });
    let width = heads * hd;
    let mut out = vec![0f32; seq * width];
    for (h, i0, rows) in parts {
        for (k, row) in rows.chunks_exact(hd).enumerate() {
            let at = (i0 + k) * width + h * hd;
            out[at..at + hd].copy_from_slice(row);
        }
    }
    out
}

/// Head `h`'s output for queries `range` (`[range.len(), head_dim]`).
fn attend_block(
    simd: Avx2,
    q: &[f32],
    range: std::ops::Range<usize>,
    h: usize,
    offset: usize,
    kv: &HostKv,
    scale: f32,
) -> Vec<f32> {
    let (heads, hd) = (kv.heads, kv.head_dim);
    let nq = range.len();
    // The last query sees the most keys: its own position and all before it.
    let n = offset + range.end;
    let (keys, values) = kv.head(h, n);
    let query = |k: usize| {
        let at = ((range.start + k) * heads + h) * hd;
        &q[at..at + hd]
    };
    let mut row = vec![0f32; hd];
    let mut scores = vec![f32::NEG_INFINITY; nq * n];
    // Queries four at a time share each widened key's loads.
    let full = nq / 4 * 4;
    for j in 0..n {
        simd.widen(&keys[j * hd..(j + 1) * hd], &mut row);
        // Query k (at position offset + start + k) sees keys up to itself.
        let sees = |k: usize| j <= offset + range.start + k;
        for k0 in (0..full).step_by(4) {
            let s = simd.dots::<4>(std::array::from_fn(|i| query(k0 + i)), &row);
            for (i, s) in s.into_iter().enumerate() {
                if sees(k0 + i) {
                    scores[(k0 + i) * n + j] = s * scale;
                }
            }
        }
        for k in (full..nq).filter(|&k| sees(k)) {
            scores[k * n + j] = simd.dot(query(k), &row) * scale;
        }
    }
    for s in scores.chunks_exact_mut(n) {
        simd.softmax(s);
    }
    let mut out = vec![0f32; nq * hd];
    for j in 0..n {
        simd.widen(&values[j * hd..(j + 1) * hd], &mut row);
        for (g, group) in out.chunks_mut(4 * hd).enumerate() {
            let weight = |i: usize| scores[(g * 4 + i) * n + j];
            if let Ok([a, b, c, d]) =
                group.get_disjoint_mut([0..hd, hd..2 * hd, 2 * hd..3 * hd, 3 * hd..4 * hd])
                && (0..4).all(|i| weight(i) != 0.0)
            {
                simd.axpys(std::array::from_fn(weight), &row, [a, b, c, d]);
                continue;
            }
            // A partial group, or a key some of these queries cannot see
            // (or weigh at 0): it adds nothing to those, not even 0 · an
            // infinite value.
            for (i, o) in group.chunks_exact_mut(hd).enumerate() {
                if weight(i) != 0.0 {
                    simd.axpy(weight(i), &row, o);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::cache::KvCache;

    #[test]
    fn fused_attention_equals_the_definition() {
        let Some(simd) = Avx2::detect() else {
            eprintln!("no AVX2 here: the CPU pass is not used on this CPU");
            return;
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        // A head width that is not a multiple of 8 (the vector tails), queries
        // that fill no whole block, and a cached prefix before them.
        for (heads, hd, offset, seq) in [
            (3, 20, 7, 9),
            (2, 64, 0, 1),
            (4, 16, 30, 4),
            (1, 8, 0, 13),
            (2, 24, 5, 37),
        ] {
            let n = offset + seq;
            let mut random = |len: usize| -> Vec<f32> {
                (0..len).map(|_| rng.random_range(-2.0..2.0)).collect()
            };
            let (k, v, q) = (
                random(n * heads * hd),
                random(n * heads * hd),
                random(seq * heads * hd),
            );
            let mut cache = KvCache::new(1, 64);
            let kv = cache.append_host(simd, 0, &k, &v, heads, hd).unwrap();
            let scale = 1.0 / (hd as f32).sqrt();
            let got = attend(simd, &q, seq, offset, kv, scale);
            // The definition, in f64, over the cache's f16 values.
            let f16 = |x: f32| half::f16::from_f32(x).to_f32() as f64;
            for i in 0..seq {
                for h in 0..heads {
                    let qi = &q[(i * heads + h) * hd..][..hd];
                    let visible = offset + i + 1;
                    let s: Vec<f64> = (0..visible)
                        .map(|j| {
                            let kj = &k[(j * heads + h) * hd..][..hd];
                            qi.iter()
                                .zip(kj)
                                .map(|(a, b)| *a as f64 * f16(*b))
                                .sum::<f64>()
                                * scale as f64
                        })
                        .collect();
                    let max = s.iter().copied().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for d in 0..hd {
                        let want: f64 = (0..visible)
                            .map(|j| e[j] / z * f16(v[(j * heads + h) * hd + d]))
                            .sum();
                        let g = got[i * heads * hd + h * hd + d] as f64;
                        assert!(
                            (g - want).abs() < 1e-5,
                            "heads {heads} hd {hd} offset {offset}: query {i} head {h} dim {d}: {g} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
