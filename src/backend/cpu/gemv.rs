//! Skinny products for decode: `out = x · wᵀ` with few rows (`x` is
//! `[m, k]`, m ≤ [`MAX_ROWS`]).
//!
//! Why not the `gemm` crate here: for more than one row it packs the whole
//! weight matrix on every call, one extra pass over memory that made a
//! batch-4 decode step three times slower than batch 1. This kernel reads
//! each weight row once and dots it with every input row while it sits in
//! L1, so a decode step costs one pass over the weights whatever the batch.
//!
//! Each output element is computed by the same sequence of operations
//! whatever `m` is, so a sequence gets bit-identical logits alone and inside
//! a batch.

use rayon::prelude::*;

use super::parallel::SharedMut;

/// Most rows handled here; more go to the blocked GEMM.
pub const MAX_ROWS: usize = 16;

/// Weight rows per parallel task.
const ROWS_PER_TASK: usize = 64;

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// Dot products of `R` input rows with one weight row, portable version:
/// 8 lanes of partial sums, summed pairwise at the end (the same order as
/// the AVX2 version, so both give the same bits on the same input).
fn dots_portable<const R: usize>(xs: [&[f32]; R], w: &[f32]) -> [f32; R] {
    let k = w.len();
    let body = k / 8 * 8;
    let mut acc = [[0.0f32; 8]; R];
    for c in (0..body).step_by(8) {
        for r in 0..R {
            for l in 0..8 {
                acc[r][l] = xs[r][c + l].mul_add(w[c + l], acc[r][l]);
            }
        }
    }
    let mut out = [0.0f32; R];
    for r in 0..R {
        out[r] = finish(acc[r], xs[r], w, body);
    }
    out
}

/// Sums the 8 lanes pairwise, then adds the tail `body..k` in order: the
/// one reduction both versions share, so they give the same bits.
#[inline(always)]
fn finish(a: [f32; 8], x: &[f32], w: &[f32], body: usize) -> f32 {
    let s4 = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    let s2 = [s4[0] + s4[2], s4[1] + s4[3]];
    let mut s = s2[0] + s2[1];
    for c in body..w.len() {
        s = x[c].mul_add(w[c], s);
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_avx2<const R: usize>(xs: [&[f32]; R], w: &[f32]) -> [f32; R] {
    use std::arch::x86_64::*;
    let k = w.len();
    let body = k / 8 * 8;
    let mut acc = [_mm256_setzero_ps(); R];
    let mut c = 0;
    while c < body {
        // SAFETY: c + 8 <= body <= k, and every row holds k values (checked
        // by the caller).
        unsafe {
            let wv = _mm256_loadu_ps(w.as_ptr().add(c));
            for r in 0..R {
                acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xs[r].as_ptr().add(c)), wv, acc[r]);
            }
        }
        c += 8;
    }
    let mut out = [0.0f32; R];
    for r in 0..R {
        let mut a = [0.0f32; 8];
        // SAFETY: `a` holds 8 floats.
        unsafe { _mm256_storeu_ps(a.as_mut_ptr(), acc[r]) };
        out[r] = finish(a, xs[r], w, body);
    }
    out
}

fn dots<const R: usize>(xs: [&[f32]; R], w: &[f32]) -> [f32; R] {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
        return unsafe { dots_avx2(xs, w) };
    }
    dots_portable(xs, w)
}

/// `out[i, j] = bias[j] + Σ_c x[i, c] · w[j, c]`.
///
/// `x` rows start at `x_off + i * x_stride` and hold `k` values; `w` is
/// `[n, k]` dense; out rows start at `o_off + i * o_stride`. The caller
/// checked every range.
#[allow(clippy::too_many_arguments)]
pub fn skinny(
    x: &[f32],
    x_off: usize,
    x_stride: usize,
    m: usize,
    w: &[f32],
    n: usize,
    k: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
    o_off: usize,
    o_stride: usize,
    accumulate: bool,
) {
    assert!(m <= MAX_ROWS && w.len() >= n * k, "skinny product outside its shape");
    let rows: Vec<&[f32]> = (0..m).map(|i| &x[x_off + i * x_stride..x_off + i * x_stride + k]).collect();
    let outp = SharedMut::new(out);
    (0..n.div_ceil(ROWS_PER_TASK)).into_par_iter().for_each(|t| {
        for j in t * ROWS_PER_TASK..((t + 1) * ROWS_PER_TASK).min(n) {
            let wj = &w[j * k..(j + 1) * k];
            let b = bias.map_or(0.0, |b| b[j]);
            let mut i = 0;
            let put = |i: usize, v: f32| {
                // SAFETY: this task alone owns output column j.
                let o = unsafe { outp.at(o_off + i * o_stride + j) };
                *o = if accumulate { *o + (v + b) } else { v + b };
            };
            while i + 4 <= m {
                let d = dots::<4>([rows[i], rows[i + 1], rows[i + 2], rows[i + 3]], wj);
                for (r, v) in d.into_iter().enumerate() {
                    put(i + r, v);
                }
                i += 4;
            }
            while i < m {
                put(i, dots::<1>([rows[i]], wj)[0]);
                i += 1;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f64> {
        (0..m).flat_map(|i| (0..n).map(move |j| (0..k).map(|c| x[i * k + c] as f64 * w[j * k + c] as f64).sum::<f64>())).collect()
    }

    fn data(len: usize, seed: u64) -> Vec<f32> {
        let mut r = crate::backend::rng::SplitMix64::new(seed);
        (0..len).map(|_| r.next_f32() * 2.0 - 1.0).collect()
    }

    #[test]
    fn matches_a_double_precision_reference_at_odd_sizes() {
        for (m, n, k) in [(1, 3, 5), (3, 130, 17), (5, 64, 64), (16, 7, 200)] {
            let (x, w, bias) = (data(m * k, 1), data(n * k, 2), data(n, 3));
            let mut out = vec![f32::NAN; m * n];
            skinny(&x, 0, k, m, &w, n, k, Some(&bias), &mut out, 0, n, false);
            let want = naive(&x, m, &w, n, k);
            for (idx, (o, r)) in out.iter().zip(&want).enumerate() {
                let r = r + bias[idx % n] as f64;
                assert!((*o as f64 - r).abs() < 1e-4 * (1.0 + r.abs()), "({m},{n},{k}) [{idx}] {o} vs {r}");
            }
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_and_in_a_batch() {
        let (m, n, k) = (7, 50, 333);
        let (x, w) = (data(m * k, 4), data(n * k, 5));
        let mut batch = vec![0.0; m * n];
        skinny(&x, 0, k, m, &w, n, k, None, &mut batch, 0, n, false);
        for i in 0..m {
            let mut alone = vec![0.0; n];
            skinny(&x, i * k, k, 1, &w, n, k, None, &mut alone, 0, n, false);
            assert_eq!(alone, batch[i * n..(i + 1) * n]);
        }
    }

    #[test]
    fn portable_and_simd_paths_agree() {
        let k = 77;
        let (x, w) = (data(k, 6), data(k, 7));
        let p = dots_portable::<1>([&x], &w)[0];
        let d = dots::<1>([&x], &w)[0];
        assert_eq!(p, d);
    }
}
