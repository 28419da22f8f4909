//! Monitor projections of a few residual rows: each row's dot product with a handful of unit
//! vectors and its Euclidean norm, in plain loops.
//!
//! A decode step of continuous batching monitors each request's one row with that request's own
//! vectors; through candle that was ~8 tensor ops per row and monitored layer (a 16-request step
//! monitoring 8 vectors at all 31 rows: ~4,000 ops, +16% on the step). Here a row costs
//! `k + 1` dot products of `hidden` floats, and every row's result is the same whatever batch it
//! came in.

/// Lanes of the partial sums (a multiple of the widest vector register, so the loop vectorises).
const LANES: usize = 16;

/// `Σ a[i]·b[i]`, summed in `LANES` interleaved partial sums (the same bits whether the loop
/// is compiled for the baseline or for AVX2: the same multiplies and adds in the same order).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        sum += x * y;
    }
    sum
}

/// For each row of `x` (`rows` × `hidden`, row-major) and each of the `k` directions in `dirs`
/// (`k` × `hidden`, row-major): the projection `row · dir` into `scores` and the row's norm
/// `‖row‖` into `norms`, both appended row by row (`rows` × `k` values each).
///
/// # Panics
/// When `x` or `dirs` is not a whole number of rows of `hidden` values.
pub fn project_rows(x: &[f32], hidden: usize, dirs: &[f32], scores: &mut Vec<f32>, norms: &mut Vec<f32>) {
    assert!(
        hidden > 0 && x.len().is_multiple_of(hidden) && dirs.len().is_multiple_of(hidden),
        "rows of {hidden} values expected"
    );
    let k = dirs.len() / hidden;
    scores.reserve(x.len() / hidden * k);
    norms.reserve(x.len() / hidden * k);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { project_rows_avx2(x, hidden, dirs, scores, norms) };
    }
    project_each(x, hidden, dirs, scores, norms);
}

/// [`project_rows`] compiled for AVX2, in vector registers instead of the baseline build's
/// 4-wide SSE2 (one feature check per call, not per dot product).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn project_rows_avx2(x: &[f32], hidden: usize, dirs: &[f32], scores: &mut Vec<f32>, norms: &mut Vec<f32>) {
    project_each(x, hidden, dirs, scores, norms);
}

#[inline(always)]
fn project_each(x: &[f32], hidden: usize, dirs: &[f32], scores: &mut Vec<f32>, norms: &mut Vec<f32>) {
    for row in x.chunks_exact(hidden) {
        let norm = dot(row, row).sqrt();
        for dir in dirs.chunks_exact(hidden) {
            scores.push(dot(row, dir));
            norms.push(norm);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projections_and_norms_match_a_float64_reference() {
        let hidden = 37; // not a multiple of the lanes: the remainder is summed too
        let x: Vec<f32> = (0..3 * hidden).map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0).collect();
        let dirs: Vec<f32> = (0..2 * hidden).map(|i| ((i * 104729) % 97) as f32 / 48.0 - 1.0).collect();
        let (mut s, mut n) = (Vec::new(), Vec::new());
        project_rows(&x, hidden, &dirs, &mut s, &mut n);
        assert_eq!((s.len(), n.len()), (6, 6));
        for r in 0..3 {
            let row = &x[r * hidden..(r + 1) * hidden];
            let norm = row.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt();
            for j in 0..2 {
                let dir = &dirs[j * hidden..(j + 1) * hidden];
                let want: f64 = row.iter().zip(dir).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
                assert!((f64::from(s[r * 2 + j]) - want).abs() < 1e-5 * (1.0 + want.abs()), "score {r},{j}");
                assert!((f64::from(n[r * 2 + j]) - norm).abs() < 1e-5 * norm, "norm {r}");
            }
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_avx2_build_gives_the_same_bits() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        for n in [1, 15, 16, 37, 576] {
            let a: Vec<f32> = (0..2 * n).map(|i| ((i * 7919) % 101) as f32 / 37.0 - 1.3).collect();
            let b: Vec<f32> = (0..3 * n).map(|i| ((i * 104729) % 97) as f32 / 29.0 - 1.7).collect();
            let (mut s1, mut n1, mut s2, mut n2) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            // SAFETY: AVX2 checked above.
            unsafe { project_rows_avx2(&a, n, &b, &mut s1, &mut n1) };
            project_each(&a, n, &b, &mut s2, &mut n2);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!((bits(&s1), bits(&n1)), (bits(&s2), bits(&n2)), "n={n}");
        }
    }

    #[test]
    #[should_panic(expected = "rows of 4 values expected")]
    fn a_partial_row_is_refused() {
        project_rows(&[1.0; 6], 4, &[1.0; 4], &mut Vec::new(), &mut Vec::new());
    }
}
