//! The SwiGLU activation `silu(gate) * up` in one pass over f32 rows, and the exponentials of a
//! sampling softmax.
//!
//! candle computes it as two ops (silu with a scalar `expf` per element, then a product), each
//! allocating an output and synchronising its thread pool. Here one loop reads `gate` and `up` and
//! writes the product, with a 16-lane AVX-512 `exp` when the CPU has it.

use super::par::{self, SyncPtr};
use super::vec_written_by;

/// Below this many elements the activation runs on the calling thread alone.
const MIN_PARALLEL: usize = 64 * 1024;

/// `out[r, j] = silu(gate[r, j]) * up[r, j]` for `rows` rows of `cols` values; `gate` and `up`
/// have row strides `gate_stride` and `up_stride` (so both may be views into one `[rows, 2·cols]`
/// buffer), `out` is `[rows, cols]`.
///
/// # Panics
/// When a slice is too short for its shape.
pub fn swiglu(
    gate: &[f32],
    gate_stride: usize,
    up: &[f32],
    up_stride: usize,
    rows: usize,
    cols: usize,
    out: &mut [f32],
) {
    assert!(rows == 0 || (gate.len() >= (rows - 1) * gate_stride + cols && up.len() >= (rows - 1) * up_stride + cols));
    assert_eq!(out.len(), rows * cols);
    let dst = SyncPtr(out.as_mut_ptr());
    let run = |r0: usize, r1: usize| {
        let dst = &dst;
        for r in r0..r1 {
            // SAFETY: row `r` of `out` is written by this call only (rows are handed out once).
            let o = unsafe { std::slice::from_raw_parts_mut(dst.0.add(r * cols), cols) };
            swiglu_row(&gate[r * gate_stride..][..cols], &up[r * up_stride..][..cols], o);
        }
    };
    par::for_parts(rows, rows * cols >= MIN_PARALLEL && rows >= 2, 4, &run);
}

/// [`swiglu`] into a new `[rows, cols]` vector.
///
/// # Panics
/// When a slice is too short for its shape.
pub fn swiglu_to_vec(
    gate: &[f32],
    gate_stride: usize,
    up: &[f32],
    up_stride: usize,
    rows: usize,
    cols: usize,
) -> Vec<f32> {
    // SAFETY: swiglu writes all `rows × cols` values.
    unsafe { vec_written_by(rows * cols, |out| swiglu(gate, gate_stride, up, up_stride, rows, cols, out)) }
}

/// `out[i] = exp((xs[i] - shift) / temperature)` (the unnormalised softmax weights of sampling).
///
/// # Panics
/// When `out` and `xs` differ in length.
pub fn exp_shifted(xs: &[f32], shift: f32, temperature: f32, out: &mut [f32]) {
    assert_eq!(xs.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F detected; equal lengths checked above.
        unsafe { avx512::exp_shifted(xs, shift, temperature, out) };
        return;
    }
    for (o, &x) in out.iter_mut().zip(xs) {
        *o = ((x - shift) / temperature).exp();
    }
}

/// One block of keys of an online softmax (attention over key blocks, flash-style): `row` (the
/// block's raw scores) becomes `exp(row · scale + mask − m)` where `m` is the running maximum
/// `*max` raised to the block's own maximum; `*sum` is rescaled to `m` and gets the block's
/// weights added; returns the factor `exp(old max − m)` that output sums accumulated so far
/// must be multiplied by (0 when nothing was visible before, 1 when the maximum stayed). A block
/// that sees no key (every score `-inf`) is set to zeros and changes nothing.
pub(crate) fn softmax_online(row: &mut [f32], mask: Option<&[f32]>, scale: f32, max: &mut f32, sum: &mut f32) -> f32 {
    let n = row.len();
    softmax_online_within(row, 0..n, mask, scale, max, sum)
}

/// [`softmax_online`] where only the scores in `visible` may be seen: those outside it are set
/// to zero weight without being read (as if masked with `-inf`, and with the same result to the
/// bit: the vector lanes keep their positions, and the hidden ones add nothing).
///
/// # Panics
/// When `visible` reaches past the row or the mask does not match the row.
pub(crate) fn softmax_online_within(
    row: &mut [f32],
    visible: std::ops::Range<usize>,
    mask: Option<&[f32]>,
    scale: f32,
    max: &mut f32,
    sum: &mut f32,
) -> f32 {
    if let Some(m) = mask {
        assert_eq!(m.len(), row.len(), "mask row does not match the scores");
    }
    assert!(visible.end <= row.len(), "visible keys {visible:?} reach past {} scores", row.len());
    let (lo, hi) = (visible.start, visible.end.max(visible.start));
    row[..lo].fill(0.0);
    row[hi..].fill(0.0);
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F detected; lo <= hi <= row.len(), and the mask (when given) has the
        // row's length.
        return unsafe { avx512::softmax_online(row, lo, hi, mask, scale, max, sum) };
    }
    let part = &mut row[lo..hi];
    for (i, v) in part.iter_mut().enumerate() {
        *v = *v * scale + mask.map_or(0.0, |m| m[lo + i]);
    }
    let block_max = part.iter().fold(f32::NEG_INFINITY, |a, &v| if v > a { v } else { a });
    if block_max == f32::NEG_INFINITY {
        part.fill(0.0);
        return 1.0;
    }
    let m = max.max(block_max);
    let corr = if *max == f32::NEG_INFINITY { 0.0 } else { (*max - m).exp() };
    let mut s = 0f32;
    for v in part.iter_mut() {
        *v = if *v == f32::NEG_INFINITY { 0.0 } else { (*v - m).exp() };
        s += *v;
    }
    *sum = *sum * corr + s;
    *max = m;
    corr
}

/// `o[i] = silu(g[i]) * u[i]` for one row (the three slices have the same length).
pub(crate) fn swiglu_row(g: &[f32], u: &[f32], o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F detected; the three slices have the same length.
        unsafe { avx512::row(g, u, o) };
        return;
    }
    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// `silu(g) * u` lane by lane.
    ///
    /// # Safety
    /// AVX-512F present; `g`, `u` and `o` have the same length.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn row(g: &[f32], u: &[f32], o: &mut [f32]) {
        let n = o.len();
        let one = _mm512_set1_ps(1.0);
        let mut i = 0;
        while i < n {
            let mask: __mmask16 = if n - i >= 16 { !0 } else { (1u16 << (n - i)) - 1 };
            let gv = _mm512_maskz_loadu_ps(mask, g.as_ptr().add(i));
            let uv = _mm512_maskz_loadu_ps(mask, u.as_ptr().add(i));
            let e = exp(_mm512_sub_ps(_mm512_setzero_ps(), gv));
            let s = _mm512_div_ps(gv, _mm512_add_ps(one, e));
            _mm512_mask_storeu_ps(o.as_mut_ptr().add(i), mask, _mm512_mul_ps(s, uv));
            i += 16;
        }
    }

    /// [`super::softmax_online_within`] on 16 lanes, for the scores `lo..hi` (the rest of the
    /// row is zero already). The chunks of 16 stay where they are in the full row, so each
    /// visible score meets the same lane of the running sums as without the range.
    ///
    /// # Safety
    /// AVX-512F present; `lo <= hi <= row.len()`; `mask`, when given, has the row's length.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn softmax_online(
        row: &mut [f32],
        lo: usize,
        hi: usize,
        mask: Option<&[f32]>,
        scale: f32,
        max: &mut f32,
        sum: &mut f32,
    ) -> f32 {
        let p = row.as_mut_ptr();
        // the lanes of the chunk at `i` that lie in lo..hi
        let lanes = |i: usize| -> __mmask16 {
            let (a, b) = (lo.saturating_sub(i).min(16), (hi - i).min(16));
            (((1u32 << b) - 1) & !((1u32 << a) - 1)) as u16
        };
        let first = lo / 16 * 16;
        let sc = _mm512_set1_ps(scale);
        // The scaled, masked scores of the chunk at `i`, computed in both passes rather than
        // stored between them (the same values to the bit, one write of the row less); a macro,
        // not a closure, so that the intrinsics stay inside this AVX-512 function.
        macro_rules! scaled {
            ($i:expr, $k:expr) => {{
                let x = _mm512_mul_ps(_mm512_maskz_loadu_ps($k, p.add($i)), sc);
                match mask {
                    Some(m) => _mm512_add_ps(x, _mm512_maskz_loadu_ps($k, m.as_ptr().add($i))),
                    None => x,
                }
            }};
        }
        let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
        for i in (first..hi).step_by(16) {
            let k = lanes(i);
            mx = _mm512_mask_max_ps(mx, k, scaled!(i, k), mx);
        }
        let block_max = _mm512_reduce_max_ps(mx);
        if block_max == f32::NEG_INFINITY {
            row[lo..hi].fill(0.0);
            return 1.0;
        }
        let m = max.max(block_max);
        let corr = if *max == f32::NEG_INFINITY { 0.0 } else { (*max - m).exp() };
        let (mv, mut s) = (_mm512_set1_ps(m), _mm512_setzero_ps());
        for i in (first..hi).step_by(16) {
            let k = lanes(i);
            // exp gives exactly 0 below e^-87.3, so -inf scores come out as 0
            let e = exp(_mm512_sub_ps(scaled!(i, k), mv));
            _mm512_mask_storeu_ps(p.add(i), k, e);
            s = _mm512_mask_add_ps(s, k, s, e);
        }
        *sum = *sum * corr + _mm512_reduce_add_ps(s);
        *max = m;
        corr
    }

    /// `exp((x - shift) / t)` lane by lane.
    ///
    /// # Safety
    /// AVX-512F present; `xs` and `out` have the same length.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp_shifted(xs: &[f32], shift: f32, t: f32, out: &mut [f32]) {
        let (sv, tv) = (_mm512_set1_ps(shift), _mm512_set1_ps(t));
        let n = out.len();
        let mut i = 0;
        while i < n {
            let mask: __mmask16 = if n - i >= 16 { !0 } else { (1u16 << (n - i)) - 1 };
            let x = _mm512_maskz_loadu_ps(mask, xs.as_ptr().add(i));
            let e = exp(_mm512_div_ps(_mm512_sub_ps(x, sv), tv));
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), mask, e);
            i += 16;
        }
    }

    /// `e^x` to about 1 ulp: `x = n·ln2 + r` with `|r| ≤ ln2/2`, a degree-6 polynomial for
    /// `e^r` (Taylor coefficients, error below 2e-8 relative on that interval) and `2^n` applied
    /// with `scalef` (+inf for large x); 0 for x < -87.3 (and NaN), never a subnormal.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(super) unsafe fn exp(x: __m512) -> __m512 {
        // Below e^-87.3 the result would be subnormal, which costs the FP units ~100× per value
        // (a causal softmax has half its scores at -inf): those lanes give exactly 0 instead.
        let normal = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(-87.3));
        let x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.8)), _mm512_set1_ps(-87.3));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
            x,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
        ));
        // r = x - n·ln2 in two steps (Cody–Waite) to keep r exact enough.
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm512_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_maskz_mov_ps(normal, _mm512_scalef_ps(p, n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swiglu_matches_scalar_formula() {
        let (rows, cols) = (7usize, 37usize);
        let gate: Vec<f32> = (0..rows * 2 * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.37).collect();
        let up: Vec<f32> = (0..rows * cols).map(|i| ((i * 13 % 29) as f32 - 14.0) * 0.1).collect();
        let mut out = vec![0f32; rows * cols];
        // gate rows read with a stride of 2·cols, as from a fused [rows, 2·cols] buffer
        swiglu(&gate, 2 * cols, &up, cols, rows, cols, &mut out);
        for r in 0..rows {
            for j in 0..cols {
                let g = gate[r * 2 * cols + j] as f64;
                let want = g / (1.0 + (-g).exp()) * up[r * cols + j] as f64;
                let got = out[r * cols + j] as f64;
                assert!((got - want).abs() <= 1e-6 * (1.0 + want.abs()), "[{r},{j}] g={g}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn exp_shifted_matches_std() {
        let xs: Vec<f32> = (0..1000).map(|i| (i as f32 - 700.0) * 0.173).collect();
        let mut out = vec![0f32; xs.len()];
        exp_shifted(&xs, 2.5, 0.7, &mut out);
        for (x, o) in xs.iter().zip(&out) {
            // the argument rounded to f32 as the scalar code computes it; then exp in f64
            let want = (((x - 2.5) / 0.7) as f64).exp();
            assert!((*o as f64 - want).abs() <= 1e-6 * want + 1e-37, "x={x}: {o} vs {want}");
        }
    }

    /// Blocks of one row fed one at a time give the softmax of the whole row (in f64), with
    /// the output rescaled by each returned factor as attention does.
    #[test]
    fn softmax_online_matches_f64_over_blocks() {
        let n = 70;
        let scores: Vec<f32> = (0..n).map(|i| ((i * 29 % 31) as f32 - 15.0) * 3.1 - i as f32 * 0.5).collect();
        let mask: Vec<f32> =
            (0..n).map(|i| if i % 5 == 1 || (20..40).contains(&i) { f32::NEG_INFINITY } else { 0.0 }).collect();
        let x: Vec<f64> = (0..n).map(|i| scores[i] as f64 * 0.3 + mask[i] as f64).collect();
        let mx = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = x.iter().map(|v| (v - mx).exp()).sum();
        let want: f64 = x.iter().enumerate().map(|(i, v)| (v - mx).exp() / z * i as f64).sum();
        for block in [1usize, 7, 16, 20, 70] {
            let (mut m, mut s, mut acc) = (f32::NEG_INFINITY, 0f32, 0f32);
            for b0 in (0..n).step_by(block) {
                let b1 = n.min(b0 + block);
                let mut row = scores[b0..b1].to_vec();
                let corr = softmax_online(&mut row, Some(&mask[b0..b1]), 0.3, &mut m, &mut s);
                acc = acc * corr + row.iter().enumerate().map(|(j, w)| w * (b0 + j) as f32).sum::<f32>();
                for (j, w) in row.iter().enumerate() {
                    if mask[b0 + j] == f32::NEG_INFINITY {
                        assert_eq!(*w, 0.0);
                    }
                }
            }
            let got = (acc / s) as f64;
            assert!((got - want).abs() < 1e-4 * want.abs().max(1.0), "block {block}: {got} vs {want}");
        }
        let (mut m, mut s) = (f32::NEG_INFINITY, 0f32);
        let mut hidden = vec![1.0f32; 20];
        assert_eq!(softmax_online(&mut hidden, Some(&[f32::NEG_INFINITY; 20]), 1.0, &mut m, &mut s), 1.0);
        assert_eq!((hidden, m, s), (vec![0.0; 20], f32::NEG_INFINITY, 0.0), "a block that sees nothing");
    }

    /// A visible range gives, to the bit, what masking the scores outside it with `-inf` gives,
    /// with and without an additive mask inside it, for ranges on and off the 16-lane chunks.
    #[test]
    fn softmax_online_within_equals_the_masked_row() {
        let n = 70;
        let scores: Vec<f32> = (0..n).map(|i| ((i * 29 % 31) as f32 - 15.0) * 1.7).collect();
        let inner: Vec<f32> = (0..n).map(|i| if i % 7 == 3 { f32::NEG_INFINITY } else { 0.0 }).collect();
        for (lo, hi) in [(0, 70), (0, 1), (5, 40), (16, 32), (17, 17), (31, 70), (69, 70), (3, 64)] {
            for with_inner in [false, true] {
                let outside: Vec<f32> = (0..n)
                    .map(|i| {
                        if (lo..hi).contains(&i) && with_inner {
                            inner[i]
                        } else if (lo..hi).contains(&i) {
                            0.0
                        } else {
                            f32::NEG_INFINITY
                        }
                    })
                    .collect();
                let (mut m1, mut s1, mut m2, mut s2) = (0.5f32, 2.0f32, 0.5f32, 2.0f32);
                let mut want = scores.clone();
                let c1 = softmax_online(&mut want, Some(&outside), 0.3, &mut m1, &mut s1);
                let mut got = scores.clone();
                let c2 =
                    softmax_online_within(&mut got, lo..hi, with_inner.then_some(&inner[..]), 0.3, &mut m2, &mut s2);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{lo}..{hi} inner {with_inner}");
                assert_eq!((c2.to_bits(), m2.to_bits(), s2.to_bits()), (c1.to_bits(), m1.to_bits(), s1.to_bits()));
            }
        }
    }

    #[test]
    fn swiglu_extremes() {
        let gate = [-1000.0f32, -100.0, -88.0, 0.0, 88.0, 100.0, 1000.0, f32::NAN];
        let up = [1.0f32; 8];
        let mut out = [0f32; 8];
        swiglu(&gate, 8, &up, 8, 1, 8, &mut out);
        assert!(out[0].abs() < 1e-30 && out[1].abs() < 1e-30, "{out:?}");
        let want = -88.0f64 / (1.0 + 88f64.exp());
        assert!((out[2] as f64 - want).abs() <= 1e-6 * want.abs(), "{out:?}");
        assert_eq!(out[3], 0.0);
        assert_eq!(&out[4..7], &[88.0, 100.0, 1000.0]);
        assert!(out[7].is_nan());
    }
}
