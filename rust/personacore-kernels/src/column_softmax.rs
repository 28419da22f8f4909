//! The online softmax of a block of attention scores laid out key by key, one column per query
//! row, for the f32 prompt attention ([`crate::prompt_attention`]).
//!
//! The scores arrive as `[keys][ld]` (key `kk` of query row `c` at `kk · ld + c`), already in
//! log2 units: the queries were multiplied by `scale · log₂e`, so a weight is `2^(x − max)`. The
//! 16 lanes of a vector are 16 query rows: the running maximum, the running sum and the
//! rescaling factor of each row live in its own lane, so a block costs one pass for the maxima
//! and one for the weights with no horizontal reduction and no scalar exponential per row, and
//! the weights come out in the layout the weights × values product reads
//! ([`PackedMatrix::accumulate_by_columns`](crate::packed_matmul::PackedMatrix::accumulate_by_columns)).

/// A dense additive mask as the columns of a block see it: column `c`'s value for key `kk` of
/// the block is `values[offsets[c] + kk]`, in natural units (multiplied by `log₂e` here; a
/// finite value too large for that becomes `-f32::MAX`, never `-inf`, so a row whose keys are
/// all masked with finite values still gets weights, as without the change of units).
#[derive(Clone, Copy)]
pub(crate) struct ColumnMask<'a> {
    pub values: &'a [f32],
    pub offsets: &'a [usize],
}

/// One key block of an online softmax over columns: for each column `c < maxes.len()` the
/// scores `kk` in `lo[c]..hi[c]` (the keys it sees, block-relative; `hi[c] ≤ keys`), plus the
/// dense mask where there is one, become `2^(x − m)` where `m` is the column's running maximum
/// `maxes[c]` raised to the block's own; every other score of the column's first `keys` becomes
/// 0. `sums[c]` is rescaled to `m` and gets the weights added; `corr[c]` is the factor for what
/// was summed so far (`2^(old max − m)`: 0 when nothing was seen before, 1 when the maximum
/// stayed or the column sees nothing yet).
///
/// # Panics
/// When the slices do not match: `lo`, `hi`, `sums`, `corr` (and the mask's offsets) as long as
/// `maxes`, more columns than `ld`, `scores` shorter than `keys` rows of `ld`, a range past
/// `keys`, or a mask offset whose `keys` values lie past the mask.
#[allow(clippy::too_many_arguments)]
pub(crate) fn softmax_columns(
    scores: &mut [f32],
    keys: usize,
    ld: usize,
    lo: &[u32],
    hi: &[u32],
    mask: Option<ColumnMask<'_>>,
    maxes: &mut [f32],
    sums: &mut [f32],
    corr: &mut [f32],
) {
    let cols = maxes.len();
    assert!(
        lo.len() == cols && hi.len() == cols && sums.len() == cols && corr.len() == cols,
        "column state of {cols} columns does not match"
    );
    assert!(
        cols <= ld && (keys == 0 || scores.len() >= (keys - 1) * ld + cols),
        "scores are shorter than {keys} x {ld}"
    );
    assert!(lo.iter().zip(hi).all(|(&a, &b)| a <= b && b as usize <= keys), "a visible range reaches past {keys} keys");
    if let Some(m) = mask {
        assert!(
            m.offsets.len() == cols
                && m.offsets.iter().all(|&o| o.checked_add(keys).is_some_and(|e| e <= m.values.len())),
            "mask offsets do not match the mask"
        );
    }
    if cols == 0 || keys == 0 {
        corr.fill(1.0);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F detected; the lengths, ranges and mask offsets were checked above.
        unsafe { avx512::softmax_columns(scores, keys, ld, lo, hi, mask, maxes, sums, corr) };
        return;
    }
    scalar(scores, keys, ld, lo, hi, mask, maxes, sums, corr);
}

/// [`softmax_columns`] one value at a time (CPUs without AVX-512), for checked arguments.
#[allow(clippy::too_many_arguments)]
fn scalar(
    scores: &mut [f32],
    keys: usize,
    ld: usize,
    lo: &[u32],
    hi: &[u32],
    mask: Option<ColumnMask<'_>>,
    maxes: &mut [f32],
    sums: &mut [f32],
    corr: &mut [f32],
) {
    for c in 0..maxes.len() {
        let (a, b) = (lo[c] as usize, hi[c] as usize);
        let x = |kk: usize, v: f32| v + mask.map_or(0.0, |m| log2_mask(m.values[m.offsets[c] + kk]));
        let block_max = (a..b).map(|kk| x(kk, scores[kk * ld + c])).fold(f32::NEG_INFINITY, f32::max);
        let m = maxes[c].max(block_max);
        corr[c] = if m == f32::NEG_INFINITY { 1.0 } else { (maxes[c] - m).exp2() };
        let mut s = 0f32;
        for kk in 0..keys {
            // as the vector path: exactly 0 below 2^-125 (and for -inf and NaN)
            let e = if (a..b).contains(&kk) { x(kk, scores[kk * ld + c]) - m } else { f32::NEG_INFINITY };
            let w = if e >= -125.0 { e.exp2() } else { 0.0 };
            scores[kk * ld + c] = w;
            s += w;
        }
        sums[c] = sums[c] * corr[c] + s;
        maxes[c] = m;
    }
}

/// A mask value in log2 units, finite values kept finite.
fn log2_mask(v: f32) -> f32 {
    if v == f32::NEG_INFINITY {
        v
    } else {
        (v * std::f32::consts::LOG2_E).max(-f32::MAX)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::ColumnMask;

    /// [`super::softmax_columns`] 16 columns at a time.
    ///
    /// # Safety
    /// AVX-512F present; the arguments as [`super::softmax_columns`] checks them, `keys > 0`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn softmax_columns(
        scores: &mut [f32],
        keys: usize,
        ld: usize,
        lo: &[u32],
        hi: &[u32],
        mask: Option<ColumnMask<'_>>,
        maxes: &mut [f32],
        sums: &mut [f32],
        corr: &mut [f32],
    ) {
        let cols = maxes.len();
        let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
        for c0 in (0..cols).step_by(16) {
            let w = (cols - c0).min(16);
            let valid: __mmask16 = if w == 16 { !0 } else { ((1u32 << w) - 1) as u16 };
            // columns past `cols` see nothing and are neither read nor written
            let lo_v = _mm512_maskz_loadu_epi32(valid, lo.as_ptr().add(c0) as *const i32);
            let hi_v = _mm512_maskz_loadu_epi32(valid, hi.as_ptr().add(c0) as *const i32);
            let whole = _mm512_cmpeq_epi32_mask(lo_v, _mm512_setzero_si512())
                & _mm512_cmpeq_epi32_mask(hi_v, _mm512_set1_epi32(keys as i32))
                & valid
                == valid;
            let chunk = Chunk { p: scores.as_mut_ptr().add(c0), keys, ld, valid, lo: lo_v, hi: hi_v };
            let mx = match (mask, whole) {
                (None, true) => chunk.max::<true>(),
                (None, false) => chunk.max::<false>(),
                (Some(m), true) => chunk.mask_and_max::<true>(m, c0),
                (Some(m), false) => chunk.mask_and_max::<false>(m, c0),
            };
            let old = _mm512_mask_loadu_ps(neg_inf, valid, maxes.as_ptr().add(c0));
            let m = _mm512_max_ps(old, mx);
            // a column that has seen nothing yet keeps its (empty) sums: factor 1
            let nothing = _mm512_cmpeq_ps_mask(m, neg_inf);
            let c = _mm512_mask_mov_ps(exp2(!nothing, _mm512_sub_ps(old, m)), nothing, _mm512_set1_ps(1.0));
            let s = if whole { chunk.weights::<true>(m) } else { chunk.weights::<false>(m) };
            let sum = _mm512_maskz_loadu_ps(valid, sums.as_ptr().add(c0));
            _mm512_mask_storeu_ps(sums.as_mut_ptr().add(c0), valid, _mm512_fmadd_ps(sum, c, s));
            _mm512_mask_storeu_ps(maxes.as_mut_ptr().add(c0), valid, m);
            _mm512_mask_storeu_ps(corr.as_mut_ptr().add(c0), valid, c);
        }
    }

    /// Up to 16 columns of a block: scores at `p + kk · ld` for key `kk < keys`; `valid` the
    /// lanes that are columns; `lo`/`hi` each lane's visible keys. `WHOLE`: every valid lane sees
    /// every key (no per-key lane masks).
    struct Chunk {
        p: *mut f32,
        keys: usize,
        ld: usize,
        valid: __mmask16,
        lo: __m512i,
        hi: __m512i,
    }

    impl Chunk {
        /// The lanes of key `kk` (as a vector of `kk`) that their columns see.
        #[target_feature(enable = "avx512f")]
        #[inline]
        unsafe fn seen<const WHOLE: bool>(&self, kk: __m512i) -> __mmask16 {
            if WHOLE {
                self.valid
            } else {
                _mm512_cmple_epi32_mask(self.lo, kk) & _mm512_cmplt_epi32_mask(kk, self.hi)
            }
        }

        /// Each lane's largest visible score (four running maxima, so that the loop is not one
        /// chain of dependent `max`es; the maximum is exact in any order).
        #[target_feature(enable = "avx512f")]
        #[inline]
        unsafe fn max<const WHOLE: bool>(&self) -> __m512 {
            let (one, mut kkv) = (_mm512_set1_epi32(1), _mm512_setzero_si512());
            let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
            let mut mx = [neg_inf; 4];
            let mut kk = 0;
            while kk < self.keys {
                for (j, m) in mx.iter_mut().enumerate().take(self.keys - kk) {
                    let k = self.seen::<WHOLE>(kkv);
                    *m = _mm512_mask_max_ps(*m, k, _mm512_maskz_loadu_ps(k, self.p.add((kk + j) * self.ld)), *m);
                    if !WHOLE {
                        kkv = _mm512_add_epi32(kkv, one);
                    }
                }
                kk += 4;
            }
            _mm512_max_ps(_mm512_max_ps(mx[0], mx[1]), _mm512_max_ps(mx[2], mx[3]))
        }

        /// Adds the dense mask (in log2 units) to the visible scores, in place, and returns each
        /// lane's largest; column `c0 + l`'s mask values start at `mask.offsets[c0 + l]`.
        #[target_feature(enable = "avx512f")]
        #[inline]
        unsafe fn mask_and_max<const WHOLE: bool>(&self, mask: ColumnMask<'_>, c0: usize) -> __m512 {
            let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
            // offsets of the 16 columns' mask values, two halves of 8 (64-bit indices)
            let mut offs = [0i64; 16];
            let w = self.valid.count_ones() as usize;
            for (o, &v) in offs.iter_mut().zip(&mask.offsets[c0..c0 + w]) {
                *o = v as i64;
            }
            let (mut ia, mut ib) = (_mm512_loadu_epi64(offs.as_ptr()), _mm512_loadu_epi64(offs.as_ptr().add(8)));
            let (one, one64, mut kkv) = (_mm512_set1_epi32(1), _mm512_set1_epi64(1), _mm512_setzero_si512());
            let (l2e, floor) = (_mm512_set1_ps(std::f32::consts::LOG2_E), _mm512_set1_ps(-f32::MAX));
            let base = mask.values.as_ptr();
            let mut mx = neg_inf;
            for kk in 0..self.keys {
                let k = self.seen::<WHOLE>(kkv);
                let ga = _mm512_mask_i64gather_ps::<4>(_mm256_setzero_ps(), k as __mmask8, ia, base);
                let gb = _mm512_mask_i64gather_ps::<4>(_mm256_setzero_ps(), (k >> 8) as __mmask8, ib, base);
                let mv = _mm512_castpd_ps(_mm512_insertf64x4::<1>(
                    _mm512_castps_pd(_mm512_castps256_ps512(ga)),
                    _mm256_castps_pd(gb),
                ));
                // log2 units; finite values stay finite, -inf stays -inf
                let hidden = _mm512_cmpeq_ps_mask(mv, neg_inf);
                let mv = _mm512_mask_mov_ps(_mm512_max_ps(_mm512_mul_ps(mv, l2e), floor), hidden, neg_inf);
                let row = self.p.add(kk * self.ld);
                let x = _mm512_add_ps(_mm512_maskz_loadu_ps(k, row), mv);
                _mm512_mask_storeu_ps(row, k, x);
                mx = _mm512_mask_max_ps(mx, k, x, mx);
                kkv = _mm512_add_epi32(kkv, one);
                ia = _mm512_add_epi64(ia, one64);
                ib = _mm512_add_epi64(ib, one64);
            }
            mx
        }

        /// Replaces the scores by their weights `2^(x − m)` (0 where not seen) and returns each
        /// lane's sum of them.
        #[target_feature(enable = "avx512f")]
        #[inline]
        unsafe fn weights<const WHOLE: bool>(&self, m: __m512) -> __m512 {
            let (one, mut kkv) = (_mm512_set1_epi32(1), _mm512_setzero_si512());
            let mut s = _mm512_setzero_ps();
            for kk in 0..self.keys {
                let k = self.seen::<WHOLE>(kkv);
                let row = self.p.add(kk * self.ld);
                let e = exp2(k, _mm512_sub_ps(_mm512_maskz_loadu_ps(k, row), m));
                _mm512_mask_storeu_ps(row, self.valid, e);
                s = _mm512_add_ps(s, e);
                if !WHOLE {
                    kkv = _mm512_add_epi32(kkv, one);
                }
            }
            s
        }
    }

    /// `2^x` for `x ≤ 0` in the lanes of `k`, 0 in the others: `x = n + r` with `n` the nearest
    /// integer, a degree-6 polynomial for `2^r` on `[-1/2, 1/2]` (a Chebyshev fit; error about
    /// 1e-7 relative in f32, as `exp`'s in [`crate::activations`]) and `2^n` applied with
    /// `scalef`. Below `2^-125` (and for `-inf` and NaN) the result is exactly 0, never a
    /// subnormal, which would cost the FP units ~100× per value.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn exp2(k: __mmask16, x: __m512) -> __m512 {
        let normal = k & _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(-125.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
        let r = _mm512_sub_ps(x, n);
        let mut p = _mm512_set1_ps(1.546_531_3e-4);
        for c in [1.339_528e-3, 9.618_04e-3, 5.550_340_6e-2, 2.402_265e-1, 6.931_472e-1, 1.0] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_maskz_scalef_ps(normal, p, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks of a `[keys][ld]` score matrix fed one at a time give each column's softmax over
    /// its visible keys (in f64), with accumulated sums rescaled by each returned factor as
    /// attention does; with and without a dense mask (with `-inf` values), for column counts on
    /// and off 16 and ranges on and off the block edges; the vector path and the scalar one.
    #[test]
    fn columns_match_f64_softmax_over_blocks() {
        let (keys, ld) = (70usize, 40usize);
        for cols in [1usize, 16, 37] {
            let raw: Vec<f32> = (0..keys * ld).map(|i| ((i * 29 % 31) as f32 - 15.0) * 0.9 - (i % 7) as f32).collect();
            // column c sees keys lo..hi of the whole row; column 3 sees nothing
            let range = |c: usize| if c == 3 { 0..0 } else { (c * 5 % 23)..(keys - c % 9) };
            let mask: Vec<f32> = (0..cols * keys)
                .map(|i| match i % 11 {
                    0 => f32::NEG_INFINITY,
                    5 => -0.5,
                    _ => 0.0,
                })
                .collect();
            for (dense, block, vector) in [false, true]
                .into_iter()
                .flat_map(|d| [7usize, 16, 70].map(|b| (d, b)))
                .flat_map(|(d, b)| [(d, b, true), (d, b, false)])
            {
                {
                    let (mut maxes, mut sums) = (vec![f32::NEG_INFINITY; cols], vec![0f32; cols]);
                    let mut acc = vec![0f64; cols];
                    for j0 in (0..keys).step_by(block) {
                        let n = block.min(keys - j0);
                        let mut s: Vec<f32> = raw[j0 * ld..(j0 + n) * ld].to_vec();
                        let clip = |v: usize| (v.clamp(j0, j0 + n) - j0) as u32;
                        let lo: Vec<u32> = (0..cols).map(|c| clip(range(c).start)).collect();
                        let hi: Vec<u32> = (0..cols).map(|c| clip(range(c).end).max(clip(range(c).start))).collect();
                        let offsets: Vec<usize> = (0..cols).map(|c| c * keys + j0).collect();
                        let m = dense.then_some(ColumnMask { values: &mask, offsets: &offsets });
                        let mut corr = vec![f32::NAN; cols];
                        let run = if vector { softmax_columns } else { scalar };
                        run(&mut s, n, ld, &lo, &hi, m, &mut maxes, &mut sums, &mut corr);
                        for c in 0..cols {
                            acc[c] = acc[c] * corr[c] as f64
                                + (0..n).map(|kk| s[kk * ld + c] as f64 * (j0 + kk) as f64).sum::<f64>();
                            for kk in 0..n {
                                if !range(c).contains(&(j0 + kk))
                                    || (dense && mask[c * keys + j0 + kk] == f32::NEG_INFINITY)
                                {
                                    assert_eq!(s[kk * ld + c], 0.0, "cols {cols} block {block} c{c} key {}", j0 + kk);
                                }
                            }
                        }
                        // columns past `cols` are left as they were
                        for kk in 0..n {
                            for c in cols..ld {
                                assert_eq!(s[kk * ld + c].to_bits(), raw[(j0 + kk) * ld + c].to_bits());
                            }
                        }
                    }
                    for c in 0..cols {
                        // in natural units: the scores are log2 units, so e^(x·ln2)
                        let x: Vec<(usize, f64)> = range(c)
                            .map(|j| {
                                let add = if dense { mask[c * keys + j] as f64 } else { 0.0 };
                                (j, raw[j * ld + c] as f64 * std::f64::consts::LN_2 + add)
                            })
                            .filter(|(_, v)| *v != f64::NEG_INFINITY)
                            .collect();
                        if x.is_empty() {
                            assert_eq!((sums[c], acc[c]), (0.0, 0.0), "a column that sees nothing");
                            continue;
                        }
                        let mx = x.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
                        let z: f64 = x.iter().map(|p| (p.1 - mx).exp()).sum();
                        let want: f64 = x.iter().map(|p| (p.1 - mx).exp() / z * p.0 as f64).sum();
                        let got = acc[c] / sums[c] as f64;
                        assert!(
                            (got - want).abs() < 1e-5 * want.abs().max(1.0),
                            "cols {cols} block {block} c{c}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// A mask of huge finite values (as some frameworks write "hidden") keeps a row's weights
    /// finite and equal, as it does in natural units, while `-inf` hides a key.
    #[test]
    fn huge_finite_mask_values_stay_finite() {
        let (keys, ld) = (5usize, 1usize);
        let values = [f32::MIN, f32::MIN, f32::MIN, f32::NEG_INFINITY, f32::MIN];
        for vector in [true, false] {
            let mut s = vec![0.5f32, -1.0, 2.0, 3.0, 0.0];
            let (mut mx, mut sum, mut corr) = ([f32::NEG_INFINITY], [0f32], [0f32]);
            let mask = ColumnMask { values: &values, offsets: &[0] };
            let run = if vector { softmax_columns } else { scalar };
            run(&mut s, keys, ld, &[0], &[5], Some(mask), &mut mx, &mut sum, &mut corr);
            assert_eq!(s, [1.0, 1.0, 1.0, 0.0, 1.0], "vector {vector}");
            assert_eq!((mx[0], sum[0], corr[0]), (-f32::MAX, 4.0, 0.0), "vector {vector}");
        }
    }
}
