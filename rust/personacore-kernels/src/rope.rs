//! The projections' rows split into heads, with rotary embeddings applied on the way, in f32.
//!
//! candle's path takes a strided view of the fused q/k/v output, copies it into `[batch, heads,
//! t, head_dim]`, and then applies the rotation into a second new tensor. Here both happen in
//! one pass: each value is read once from the projection's rows and written once, rotated, into
//! its head. The rotation is transformers' `rotate_half` convention: for `i < d/2`,
//! `y[i] = x[i]·cos[i] − x[i + d/2]·sin[i]` and `y[i + d/2] = x[i + d/2]·cos[i] + x[i]·sin[i]`.

use super::par::{self, SyncPtr};
use super::vec_written_by;

/// Where row `(b, i)` of a `[batch, t, width]` view starts: `offset + b·batch_stride +
/// i·row_stride`; the `width` values of a row are contiguous.
#[derive(Debug, Clone, Copy)]
pub struct Rows {
    /// First value of the view.
    pub offset: usize,
    /// Between sequences.
    pub batch_stride: usize,
    /// Between positions.
    pub row_stride: usize,
}

/// Shapes of a head split.
#[derive(Debug, Clone, Copy)]
pub struct HeadShape {
    /// Sequences.
    pub batch: usize,
    /// Positions per sequence.
    pub t: usize,
    /// Heads (the row is `heads · head_dim` wide).
    pub heads: usize,
    /// Values per head (even when rotating).
    pub head_dim: usize,
}

/// `out[b, h, i, :] = rotate(x[b, i, h·d..(h+1)·d], cos[b, i], sin[b, i])` (no rotation when
/// `rotation` is `None`). `x` is read through `rows`; `cos` and `sin` are `[batch, t, d/2]`;
/// `out` is `[batch, heads, t, d]`.
///
/// # Panics
/// When a slice is too short for the shape, or `d` is odd while rotating.
pub fn split_heads(x: &[f32], rows: Rows, shape: HeadShape, rotation: Option<(&[f32], &[f32])>, out: &mut [f32]) {
    let HeadShape { batch, t, heads, head_dim: d } = shape;
    assert_eq!(out.len(), batch * heads * t * d, "output does not match the shape");
    if out.is_empty() {
        return;
    }
    let last = rows.offset + (batch - 1) * rows.batch_stride + (t - 1) * rows.row_stride + heads * d;
    assert!(x.len() >= last, "input view is shorter than its shape");
    let half = d / 2;
    if let Some((cos, sin)) = rotation {
        assert!(d.is_multiple_of(2), "rotary embeddings need an even head_dim, got {d}");
        assert!(cos.len() == batch * t * half && sin.len() == cos.len(), "rotation tables do not match the shape");
    }
    let dst = SyncPtr(out.as_mut_ptr());
    // One unit per (sequence, position): its row is read once and scattered into every head.
    let run = |u0: usize, u1: usize| {
        let dst = &dst;
        for u in u0..u1 {
            let (b, i) = (u / t, u % t);
            let row = &x[rows.offset + b * rows.batch_stride + i * rows.row_stride..][..heads * d];
            for (h, src) in row.chunks_exact(d).enumerate() {
                // SAFETY: position `i` of head `h` of sequence `b` is written by this unit only
                // (units are handed out once); within `out` (length checked above).
                let o = unsafe { std::slice::from_raw_parts_mut(dst.0.add(((b * heads + h) * t + i) * d), d) };
                match rotation {
                    Some((cos, sin)) => {
                        let (c, s) = (&cos[u * half..][..half], &sin[u * half..][..half]);
                        let (x1, x2) = src.split_at(half);
                        let (o1, o2) = o.split_at_mut(half);
                        for j in 0..half {
                            o1[j] = x1[j] * c[j] - x2[j] * s[j];
                            o2[j] = x2[j] * c[j] + x1[j] * s[j];
                        }
                    }
                    None => o.copy_from_slice(src),
                }
            }
        }
    };
    let units = batch * t;
    par::for_parts(units, units * heads * d >= 64 * 1024, 4, &run);
}

/// [`split_heads`] into a new `[batch, heads, t, head_dim]` vector.
///
/// # Panics
/// As [`split_heads`].
pub fn split_heads_to_vec(x: &[f32], rows: Rows, shape: HeadShape, rotation: Option<(&[f32], &[f32])>) -> Vec<f32> {
    let len = shape.batch * shape.heads * shape.t * shape.head_dim;
    // SAFETY: split_heads writes every value of `out` (it checks the length against the shape).
    unsafe { vec_written_by(len, |out| split_heads(x, rows, shape, rotation, out)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_direct_rotation() {
        let shape = HeadShape { batch: 2, t: 5, heads: 3, head_dim: 8 };
        // a view of every other block of 24 in rows of 40 (like q inside a fused q/k/v output)
        let (width, off) = (40, 16);
        let x: Vec<f32> = (0..2 * 5 * width + off).map(|i| (i * 31 % 47) as f32 / 10.0 - 2.0).collect();
        let rows = Rows { offset: off, batch_stride: 5 * width, row_stride: width };
        let cos: Vec<f32> = (0..2 * 5 * 4).map(|i| ((i as f32) * 0.3).cos()).collect();
        let sin: Vec<f32> = (0..2 * 5 * 4).map(|i| ((i as f32) * 0.3).sin()).collect();
        let mut out = vec![f32::NAN; 2 * 3 * 5 * 8];
        split_heads(&x, rows, shape, Some((&cos, &sin)), &mut out);
        let mut plain = vec![f32::NAN; out.len()];
        split_heads(&x, rows, shape, None, &mut plain);
        for b in 0..2 {
            for i in 0..5 {
                for h in 0..3 {
                    let src = &x[off + b * 5 * width + i * width + h * 8..][..8];
                    let (c, s) = (&cos[(b * 5 + i) * 4..][..4], &sin[(b * 5 + i) * 4..][..4]);
                    let at = ((b * 3 + h) * 5 + i) * 8;
                    for j in 0..4 {
                        assert_eq!(out[at + j], src[j] * c[j] - src[j + 4] * s[j]);
                        assert_eq!(out[at + j + 4], src[j + 4] * c[j] + src[j] * s[j]);
                    }
                    assert_eq!(&plain[at..at + 8], src);
                }
            }
        }
    }
}
