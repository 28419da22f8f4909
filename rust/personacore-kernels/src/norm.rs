//! RMSNorm, optionally fused with the residual add before it, and the residual add alone, in f32.
//!
//! A decoder block adds a sublayer's output to the residual stream and normalizes the sum for
//! the next sublayer. candle does that as an add (a new tensor), then a norm that reads the sum
//! again; here one pass per row writes both. The norm is transformers' `LlamaRMSNorm`:
//! `weight · (h · 1/sqrt(mean(h²) + eps))`, the mean of squares accumulated in f32 over 16
//! lanes ([`dot`]).

use super::attention::dot;
use super::par::{self, SyncPtr};
use super::vec_written_by;

/// Rows below this many values run on the calling thread alone.
const MIN_PARALLEL: usize = 64 * 1024;

/// For each row of `width` values: `h = x + delta` (or `h = x` without `delta`), written to
/// `sum` when given, and `out = weight · h / sqrt(mean(h²) + eps)`.
///
/// # Panics
/// When the lengths differ or are not whole rows of `weight.len()`.
pub fn add_rms_norm(
    x: &[f32],
    delta: Option<&[f32]>,
    weight: &[f32],
    eps: f32,
    sum: Option<&mut [f32]>,
    out: &mut [f32],
) {
    let width = weight.len();
    assert!(width > 0 && x.len().is_multiple_of(width), "{} values are not rows of {width}", x.len());
    assert_eq!(out.len(), x.len(), "output does not match the input");
    assert!(delta.is_none_or(|d| d.len() == x.len()), "residual and update differ in length");
    assert!(sum.as_ref().is_none_or(|s| s.len() == x.len()), "sum does not match the input");
    let rows = x.len() / width;
    let (dst, sum_dst) = (SyncPtr(out.as_mut_ptr()), sum.map(|s| SyncPtr(s.as_mut_ptr())));
    let run = |r0: usize, r1: usize| {
        let (dst, sum_dst) = (&dst, &sum_dst);
        let mut scratch = Vec::new();
        for r in r0..r1 {
            let xr = &x[r * width..][..width];
            // SAFETY: row `r` of `out` and `sum` is written by this call only (rows are handed
            // out once); lengths checked above.
            let (h, o) = unsafe {
                let o = std::slice::from_raw_parts_mut(dst.0.add(r * width), width);
                match (delta, sum_dst) {
                    // x + delta straight into its row of `sum`, then normalised from there
                    (Some(d), Some(s)) => {
                        let h = std::slice::from_raw_parts_mut(s.0.add(r * width), width);
                        h.iter_mut().zip(xr).zip(&d[r * width..][..width]).for_each(|((hv, a), b)| *hv = a + b);
                        (&*h, o)
                    }
                    (Some(d), None) => {
                        scratch.clear();
                        scratch.extend(xr.iter().zip(&d[r * width..][..width]).map(|(a, b)| a + b));
                        (&scratch[..], o)
                    }
                    (None, Some(s)) => {
                        let h = std::slice::from_raw_parts_mut(s.0.add(r * width), width);
                        h.copy_from_slice(xr);
                        (&*h, o)
                    }
                    (None, None) => (xr, o),
                }
            };
            let inv = 1.0 / (dot(h, h) / width as f32 + eps).sqrt();
            for ((ov, hv), wv) in o.iter_mut().zip(h).zip(weight) {
                *ov = wv * (hv * inv);
            }
        }
    };
    par::for_parts(rows, x.len() >= MIN_PARALLEL && rows >= 2, 4, &run);
}

/// `out = x + delta`, shared between the cores.
///
/// # Panics
/// When the lengths differ.
pub fn add(x: &[f32], delta: &[f32], out: &mut [f32]) {
    assert!(x.len() == delta.len() && out.len() == x.len(), "lengths differ");
    const CHUNK: usize = 16 * 1024;
    let dst = SyncPtr(out.as_mut_ptr());
    let run = |c0: usize, c1: usize| {
        let dst = &dst;
        let (a, b) = (c0 * CHUNK, (c1 * CHUNK).min(x.len()));
        // SAFETY: values a..b are written by this call only (chunks are handed out once).
        let o = unsafe { std::slice::from_raw_parts_mut(dst.0.add(a), b - a) };
        o.iter_mut().zip(&x[a..b]).zip(&delta[a..b]).for_each(|((ov, xv), dv)| *ov = xv + dv);
    };
    let chunks = x.len().div_ceil(CHUNK);
    if x.len() < MIN_PARALLEL {
        run(0, chunks);
    } else {
        par::for_chunks(chunks, chunks.div_ceil(2 * par::threads()), &run);
    }
}

/// `weight · x / sqrt(mean(x²) + eps)` for each row of `x` (rows of `weight.len()` values), as
/// a new vector: [`add_rms_norm`] without a residual.
///
/// # Panics
/// As [`add_rms_norm`].
pub fn rms_norm_to_vec(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    // SAFETY: add_rms_norm writes every value of `out`.
    unsafe { vec_written_by(x.len(), |out| add_rms_norm(x, None, weight, eps, None, out)) }
}

/// `(h, norm(h))` with `h = x + delta`, as new vectors: [`add_rms_norm`] keeping the sum.
///
/// # Panics
/// As [`add_rms_norm`].
pub fn add_rms_norm_to_vec(x: &[f32], delta: &[f32], weight: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let mut sum = Vec::new();
    // SAFETY: add_rms_norm writes every value of `out` and, given a delta, of `sum`.
    let out = unsafe {
        vec_written_by(x.len(), |out| {
            sum = vec_written_by(x.len(), |s| add_rms_norm(x, Some(delta), weight, eps, Some(s), out))
        })
    };
    (sum, out)
}

/// `x + delta` as a new vector ([`add`]).
///
/// # Panics
/// When the lengths differ.
pub fn add_to_vec(x: &[f32], delta: &[f32]) -> Vec<f32> {
    // SAFETY: add writes every value of `out`.
    unsafe { vec_written_by(x.len(), |out| add(x, delta, out)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_f64_norm_of_the_sum() {
        let (rows, width) = (300, 72);
        let x: Vec<f32> = (0..rows * width).map(|i| (i * 17 % 29) as f32 / 7.0 - 2.0).collect();
        let d: Vec<f32> = (0..rows * width).map(|i| (i * 13 % 31) as f32 / 9.0 - 1.5).collect();
        let w: Vec<f32> = (0..width).map(|i| 0.5 + i as f32 / 50.0).collect();
        let fresh = || vec![f32::NAN; x.len()];
        let (mut s, mut o, mut plain) = (fresh(), fresh(), fresh());
        add_rms_norm(&x, Some(&d), &w, 1e-5, Some(&mut s), &mut o);
        add_rms_norm(&s, None, &w, 1e-5, None, &mut plain);
        assert_eq!(o, plain, "norm of a precomputed sum equals the fused one");
        let (mut no_sum, mut copy, mut of_copy) = (fresh(), fresh(), fresh());
        add_rms_norm(&x, Some(&d), &w, 1e-5, None, &mut no_sum);
        assert_eq!(no_sum, o, "the sum need not be kept");
        add_rms_norm(&s, None, &w, 1e-5, Some(&mut copy), &mut of_copy);
        assert_eq!((copy, of_copy), (s.clone(), plain.clone()), "without a delta the sum is x");
        let mut added = vec![0f32; x.len()];
        add(&x, &d, &mut added);
        assert_eq!(added, s);
        for r in 0..rows {
            let h: Vec<f64> = (0..width).map(|j| x[r * width + j] as f64 + d[r * width + j] as f64).collect();
            let inv = 1.0 / (h.iter().map(|v| v * v).sum::<f64>() / width as f64 + 1e-5).sqrt();
            for j in 0..width {
                assert!((s[r * width + j] as f64 - h[j]).abs() < 1e-6);
                let want = w[j] as f64 * h[j] * inv;
                assert!((o[r * width + j] as f64 - want).abs() < 1e-5 * want.abs().max(1.0), "row {r} col {j}");
            }
        }
    }
}
