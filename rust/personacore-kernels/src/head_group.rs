//! The two products of one decode-step attention for the query heads of a group (the heads that
//! share one kv head), over a run of keys: the scores `q_h · k_j` and the weighted sum of the
//! values `Σ_j p_hj · v_j`. Each key and value row is read once for the whole group, and the
//! value sums stay in registers across the run (AVX-512 when `head_dim` is a multiple of 16).

/// `scores[h·n + j] = q[h] · k[j]` for the `g` query rows of `q` (`d` values each) and the `n`
/// key rows of `k` (`d` values each, consecutive).
///
/// # Panics
/// When a slice is shorter than its shape.
pub(crate) fn group_scores(q: &[f32], g: usize, d: usize, k: &[f32], n: usize, scores: &mut [f32]) {
    assert!(q.len() >= g * d && k.len() >= n * d && scores.len() >= g * n, "group scores: short slices");
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(16) && d > 0 && std::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F detected, lengths checked above, d a positive multiple of 16.
        unsafe { avx512::scores(q, g, d, k, n, scores) };
        return;
    }
    for j in 0..n {
        let kj = &k[j * d..][..d];
        for h in 0..g {
            scores[h * n + j] = super::attention::dot(&q[h * d..][..d], kj);
        }
    }
}

/// `acc[h·d..][..d] += Σ_j p[h·n + j] · v[j]` for the `g` rows of weights `p` (`n` each) and the
/// `n` value rows of `v` (`d` values each, consecutive).
///
/// # Panics
/// When a slice is shorter than its shape.
pub(crate) fn group_values(p: &[f32], g: usize, n: usize, v: &[f32], d: usize, acc: &mut [f32]) {
    assert!(p.len() >= g * n && v.len() >= n * d && acc.len() >= g * d, "group values: short slices");
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(16) && d > 0 && std::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F detected, lengths checked above, d a positive multiple of 16.
        unsafe { avx512::values(p, g, n, v, d, acc) };
        return;
    }
    for j in 0..n {
        let vj = &v[j * d..][..d];
        for h in 0..g {
            let w = p[h * n + j];
            if w != 0.0 {
                for (a, x) in acc[h * d..][..d].iter_mut().zip(vj) {
                    *a += w * x;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// [`super::group_scores`] for `d` a multiple of 16: each key row is loaded once per
    /// group of up to four heads, one vector accumulator per head, then reduced.
    ///
    /// # Safety
    /// AVX-512F present; slices at least as long as the shapes; `d` a positive multiple of 16.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scores(q: &[f32], g: usize, d: usize, k: &[f32], n: usize, scores: &mut [f32]) {
        let (qp, kp, sp) = (q.as_ptr(), k.as_ptr(), scores.as_mut_ptr());
        let mut h0 = 0;
        while h0 < g {
            let hn = (g - h0).min(4);
            for j in 0..n {
                let kj = kp.add(j * d);
                let mut acc = [_mm512_setzero_ps(); 4];
                for z in (0..d).step_by(16) {
                    let kv = _mm512_loadu_ps(kj.add(z));
                    for (i, a) in acc.iter_mut().enumerate().take(hn) {
                        *a = _mm512_fmadd_ps(_mm512_loadu_ps(qp.add((h0 + i) * d + z)), kv, *a);
                    }
                }
                for (i, a) in acc.iter().enumerate().take(hn) {
                    *sp.add((h0 + i) * n + j) = _mm512_reduce_add_ps(*a);
                }
            }
            h0 += hn;
        }
    }

    /// [`super::group_values`] for `d` a multiple of 16: slices of the head dimension (64 values
    /// where `d` allows, else 16) times up to four heads held in registers across all `n` rows.
    ///
    /// # Safety
    /// As [`scores`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn values(p: &[f32], g: usize, n: usize, v: &[f32], d: usize, acc: &mut [f32]) {
        let mut h0 = 0;
        while h0 < g {
            let hn = (g - h0).min(4);
            let mut z = 0;
            while z < d {
                if d - z >= 64 {
                    match hn {
                        1 => slice::<1, 4>(p, h0, n, v, d, z, acc),
                        2 => slice::<2, 4>(p, h0, n, v, d, z, acc),
                        3 => slice::<3, 4>(p, h0, n, v, d, z, acc),
                        _ => slice::<4, 4>(p, h0, n, v, d, z, acc),
                    }
                    z += 64;
                } else {
                    match hn {
                        1 => slice::<1, 1>(p, h0, n, v, d, z, acc),
                        2 => slice::<2, 1>(p, h0, n, v, d, z, acc),
                        3 => slice::<3, 1>(p, h0, n, v, d, z, acc),
                        _ => slice::<4, 1>(p, h0, n, v, d, z, acc),
                    }
                    z += 16;
                }
            }
            h0 += hn;
        }
    }

    /// Heads `h0..h0+G`, values `z..z + 16·Z` of each row: `G·Z` accumulators in registers.
    ///
    /// # Safety
    /// As [`values`], with `h0 + G <= g` and `z + 16·Z <= d`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn slice<const G: usize, const Z: usize>(
        p: &[f32],
        h0: usize,
        n: usize,
        v: &[f32],
        d: usize,
        z: usize,
        acc: &mut [f32],
    ) {
        let (pp, vp, ap) = (p.as_ptr(), v.as_ptr(), acc.as_mut_ptr());
        let mut a = [[_mm512_setzero_ps(); Z]; G];
        for (i, row) in a.iter_mut().enumerate() {
            for (c, x) in row.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(ap.add((h0 + i) * d + z + 16 * c));
            }
        }
        for j in 0..n {
            let mut vv = [_mm512_setzero_ps(); Z];
            for (c, x) in vv.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(vp.add(j * d + z + 16 * c));
            }
            for (i, row) in a.iter_mut().enumerate() {
                let w = _mm512_set1_ps(*pp.add((h0 + i) * n + j));
                for (c, x) in row.iter_mut().enumerate() {
                    *x = _mm512_fmadd_ps(w, vv[c], *x);
                }
            }
        }
        for (i, row) in a.iter().enumerate() {
            for (c, x) in row.iter().enumerate() {
                _mm512_storeu_ps(ap.add((h0 + i) * d + z + 16 * c), *x);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both products against f64 sums, for head dims with and without the SIMD path and group
    /// sizes across the four-head blocks.
    #[test]
    fn products_match_f64() {
        let f = |i: usize| ((i * 37 % 101) as f32 / 50.0) - 1.0;
        for (g, d, n) in [(1, 64, 7), (3, 64, 33), (5, 128, 20), (7, 80, 9), (2, 24, 5), (4, 256, 3), (9, 16, 1)] {
            let q: Vec<f32> = (0..g * d).map(f).collect();
            let k: Vec<f32> = (0..n * d).map(|i| f(i + 5)).collect();
            let mut s = vec![f32::NAN; g * n];
            group_scores(&q, g, d, &k, n, &mut s);
            for h in 0..g {
                for j in 0..n {
                    let want: f64 = (0..d).map(|x| q[h * d + x] as f64 * k[j * d + x] as f64).sum();
                    assert!((s[h * n + j] as f64 - want).abs() < 1e-4, "g{g} d{d} scores[{h},{j}]");
                }
            }
            let p: Vec<f32> = (0..g * n).map(|i| f(i + 9).abs()).collect();
            let init: Vec<f32> = (0..g * d).map(|i| f(i + 13)).collect();
            let mut acc = init.clone();
            group_values(&p, g, n, &k, d, &mut acc);
            for h in 0..g {
                for x in 0..d {
                    let want: f64 =
                        init[h * d + x] as f64 + (0..n).map(|j| p[h * n + j] as f64 * k[j * d + x] as f64).sum::<f64>();
                    assert!((acc[h * d + x] as f64 - want).abs() < 1e-4, "g{g} d{d} acc[{h},{x}]");
                }
            }
        }
    }
}
