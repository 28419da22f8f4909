//! Attention of one new position per sequence against its KV cache (a decode step), in f32.
//!
//! With one query row, candle's path (a batched matmul for the scores, a scale, a mask add, a
//! softmax, a second batched matmul, a transpose copy) is seven ops that each allocate and
//! synchronise threads for a few microseconds of arithmetic. Here each (sequence, query head)
//! is one pass over its keys and values, written straight into the `[batch, heads · head_dim]`
//! layout the output projection reads. Each sequence's result depends only on its own data.

use super::activations::{exp_shifted, softmax_online};
use super::head_group::{group_scores, group_values};
use super::par::{self, SyncPtr};
use super::vec_written_by;

/// Shapes of a decode-step attention.
#[derive(Debug, Clone, Copy)]
pub struct DecodeShape {
    /// Sequences.
    pub batch: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub kv_heads: usize,
    /// Values per head.
    pub head_dim: usize,
    /// Cached positions, the new one included.
    pub keys: usize,
}

/// Where each key (and value) row lives: row `j` of kv head `h` of sequence `b` starts at
/// `offset + b·batch_stride + h·head_stride + j·head_dim`.
#[derive(Debug, Clone, Copy)]
pub struct KvStrides {
    /// First value of the view.
    pub offset: usize,
    /// Between sequences.
    pub batch_stride: usize,
    /// Between kv heads.
    pub head_stride: usize,
}

/// Keys per chunk of a (sequence, kv head): fixed, so that a sequence's result does not depend on
/// the batch it runs in or the number of threads (chunks are summed in one order).
const CHUNK_KEYS: usize = 512;

/// One sequence's cached keys and values for [`decode_attention_seqs`]: row `j` of kv head `h`
/// at `k[h·head_stride + j·head_dim ..]` (the same for `v`), `keys` rows each.
#[derive(Debug, Clone, Copy)]
pub struct SeqKv<'a> {
    /// Keys, from the first row of kv head 0.
    pub k: &'a [f32],
    /// Values, laid out as the keys.
    pub v: &'a [f32],
    /// Between kv heads.
    pub head_stride: usize,
    /// Rows per kv head (the new position included).
    pub keys: usize,
    /// Additive mask over the keys (`keys` values, `-inf` = not visible), if any.
    pub mask: Option<&'a [f32]>,
}

/// `out[b, h·d..(h+1)·d] = softmax(q[b,h]·Kᵀ·scale + mask[b]) · V` for every sequence `b` and
/// query head `h` (query heads share kv heads in groups, as grouped-query attention).
/// `q` is `[batch, heads, head_dim]`; `mask`, when given, is additive `[batch or 1, keys]`
/// (`-inf` = not visible); `out` is `[batch, heads · head_dim]`. See [`decode_attention_seqs`].
///
/// # Panics
/// When a slice is too short for the shape, or `heads` is not a multiple of `kv_heads`.
#[allow(clippy::too_many_arguments)]
pub fn decode_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    kv: KvStrides,
    mask: Option<&[f32]>,
    shape: DecodeShape,
    scale: f32,
    out: &mut [f32],
) {
    let DecodeShape { batch, heads, kv_heads, head_dim: d, keys } = shape;
    assert!(kv_heads > 0 && heads.is_multiple_of(kv_heads), "{heads} heads do not group over {kv_heads} kv heads");
    if batch == 0 || d == 0 {
        return;
    }
    if keys > 0 {
        let last = kv.offset + (batch - 1) * kv.batch_stride + (kv_heads - 1) * kv.head_stride + keys * d;
        assert!(k.len() >= last && v.len() >= last, "key/value views are shorter than their shape");
    }
    let mask_rows = mask.map(|m| {
        assert!(m.len() == keys || m.len() == batch * keys, "mask has {} values for {batch} x {keys}", m.len());
        m.len() / keys.max(1)
    });
    let seqs: Vec<SeqKv> = (0..batch)
        .map(|b| {
            let at = (kv.offset + b * kv.batch_stride).min(k.len());
            SeqKv {
                k: &k[at..],
                v: &v[at.min(v.len())..],
                head_stride: kv.head_stride,
                keys,
                mask: mask.map(|m| &m[if mask_rows == Some(1) { 0 } else { b * keys }..][..keys]),
            }
        })
        .collect();
    decode_attention_seqs(q, &seqs, heads, kv_heads, d, scale, out);
}

/// [`decode_attention`] over sequences whose caches live apart and hold different numbers of
/// positions (continuous batching reads each request's own cache in place, unpadded).
///
/// Work is split flash-decoding style: each (sequence, kv head) is one or more chunks of
/// [`CHUNK_KEYS`] keys, so that the cores share even one long sequence; a chunk computes the scores of all the
/// group's query heads (each key row read once), its softmax weights against the chunk's own
/// maximum and the weighted sum of its value rows; the chunks of a pair are then combined with
/// their maxima. So a step reads each cached key and value once, on every core. A sequence with
/// no visible key gets zeros.
///
/// # Panics
/// When a slice is too short for its shape, or `heads` is not a multiple of `kv_heads`.
pub fn decode_attention_seqs(
    q: &[f32],
    seqs: &[SeqKv<'_>],
    heads: usize,
    kv_heads: usize,
    d: usize,
    scale: f32,
    out: &mut [f32],
) {
    let batch = seqs.len();
    assert!(kv_heads > 0 && heads.is_multiple_of(kv_heads), "{heads} heads do not group over {kv_heads} kv heads");
    assert_eq!(q.len(), batch * heads * d);
    assert_eq!(out.len(), batch * heads * d);
    if batch == 0 || d == 0 {
        return;
    }
    for (b, s) in seqs.iter().enumerate() {
        if s.keys > 0 {
            let last = (kv_heads - 1) * s.head_stride + s.keys * d;
            assert!(
                s.k.len() >= last && s.v.len() >= last,
                "sequence {b}: key/value views are shorter than their shape"
            );
        }
        assert!(s.mask.is_none_or(|m| m.len() == s.keys), "sequence {b}: mask does not match its keys");
    }
    let g = heads / kv_heads;
    let total: usize = seqs.iter().map(|s| s.keys).sum();
    let parallel = total * heads * d >= 64 * 1024 && par::threads() > 1;
    let chunk = CHUNK_KEYS;
    // units: (sequence, kv head, first key, keys); per pair, its first unit and unit count
    let mut units: Vec<(usize, usize, usize, usize)> = Vec::new();
    let mut pair_units: Vec<(usize, usize)> = Vec::with_capacity(batch * kv_heads);
    for (b, s) in seqs.iter().enumerate() {
        let n_chunks = s.keys.div_ceil(chunk).max(1);
        for kh in 0..kv_heads {
            pair_units.push((units.len(), n_chunks));
            for c in 0..n_chunks {
                let j0 = c * chunk;
                units.push((b, kh, j0, chunk.min(s.keys - j0.min(s.keys))));
            }
        }
    }
    // per split unit and head: running maximum, sum of weights, unnormalised output
    let stride = g * (d + 2);
    let mut partial = vec![0f32; units.len() * stride];
    let (dst, part) = (SyncPtr(out.as_mut_ptr()), SyncPtr(partial.as_mut_ptr()));
    let unit = |u: usize, scores: &mut Vec<f32>| {
        let (dst, part) = (&dst, &part);
        let (b, kh, j0, n) = units[u];
        let s = &seqs[b];
        let whole = pair_units[b * kv_heads + kh].1 == 1;
        let base = kh * s.head_stride + j0 * d;
        let qg = &q[(b * heads + kh * g) * d..][..g * d];
        let mut stats = [(f32::NEG_INFINITY, 0f32); 1].repeat(g);
        scores.resize(g * n, 0.0);
        if n > 0 {
            group_scores(qg, g, d, &s.k[base..], n, scores);
            let m = s.mask.map(|m| &m[j0..][..n]);
            for (h, (mx, sum)) in stats.iter_mut().enumerate() {
                softmax_online(&mut scores[h * n..][..n], m, scale, mx, sum);
            }
        }
        let acc = if whole {
            // SAFETY: the heads of kv head `kh` of sequence `b` are written by this unit only.
            unsafe { std::slice::from_raw_parts_mut(dst.0.add((b * heads + kh * g) * d), g * d) }
        } else {
            // SAFETY: unit `u`'s slot of `partial` is written by this unit only.
            let slot = unsafe { std::slice::from_raw_parts_mut(part.0.add(u * stride), stride) };
            let (head_stats, acc) = slot.split_at_mut(2 * g);
            for (h, (mx, sum)) in stats.iter().enumerate() {
                head_stats[2 * h] = *mx;
                head_stats[2 * h + 1] = *sum;
            }
            acc
        };
        acc.fill(0.0);
        if n > 0 {
            group_values(scores, g, n, &s.v[base..], d, acc);
        }
        if whole {
            for (h, (_, sum)) in stats.iter().enumerate() {
                // nothing visible: zeros, as a fully masked softmax row times V would be NaN
                let inv = if *sum > 0.0 { 1.0 / sum } else { 0.0 };
                acc[h * d..][..d].iter_mut().for_each(|x| *x *= inv);
            }
        }
    };
    let run = |u0: usize, u1: usize| {
        let mut scores = Vec::new();
        (u0..u1).for_each(|u| unit(u, &mut scores));
    };
    if parallel {
        par::for_chunks(units.len(), 1, &run);
    } else {
        run(0, units.len());
    }
    for (pair, &(first, n_chunks)) in pair_units.iter().enumerate() {
        if n_chunks == 1 {
            continue;
        }
        let (b, kh) = (pair / kv_heads, pair % kv_heads);
        for h in 0..g {
            let slot = |c: usize| &partial[(first + c) * stride..][..stride];
            let at = |c: usize| (slot(c)[2 * h], slot(c)[2 * h + 1]);
            let top = (0..n_chunks).map(|c| at(c).0).fold(f32::NEG_INFINITY, f32::max);
            let o = &mut out[(b * heads + kh * g + h) * d..][..d];
            o.fill(0.0);
            if top == f32::NEG_INFINITY {
                continue;
            }
            let mut total = 0f32;
            for c in 0..n_chunks {
                let (mx, sum) = at(c);
                if mx == f32::NEG_INFINITY {
                    continue;
                }
                let w = (mx - top).exp();
                total += w * sum;
                for (x, a) in o.iter_mut().zip(&slot(c)[2 * g + h * d..][..d]) {
                    *x += w * a;
                }
            }
            let inv = 1.0 / total;
            o.iter_mut().for_each(|x| *x *= inv);
        }
    }
}

/// Where the additive mask row of a score row comes from: score rows are `[batch, groups, t]`
/// flattened (`rows_per_batch = groups · t`), the mask is `[mask_batches (1 or batch), t, keys]`.
#[derive(Debug, Clone, Copy)]
pub struct MaskLayout {
    /// Score rows per sequence.
    pub rows_per_batch: usize,
    /// Query positions (the mask's rows per sequence).
    pub t: usize,
    /// 1 (one mask for every sequence) or the batch size.
    pub mask_batches: usize,
}

/// `out[r] = softmax(scores[r] · scale + mask row of r)` for every row of `keys` scores, in one
/// pass per row (candle needs three ops and a scalar `expf` per value). Masked (`-inf`) keys get
/// exactly 0; a row with no visible key gets zeros.
///
/// # Panics
/// When the lengths do not match the layout.
pub fn masked_softmax(scores: &[f32], keys: usize, scale: f32, mask: Option<(&[f32], MaskLayout)>, out: &mut [f32]) {
    assert_eq!(scores.len(), out.len());
    if keys == 0 || scores.is_empty() {
        return;
    }
    assert_eq!(scores.len() % keys, 0, "scores are not whole rows of {keys}");
    let rows = scores.len() / keys;
    if let Some((m, l)) = mask {
        assert_eq!(m.len(), l.mask_batches * l.t * keys, "mask has {} values for its layout", m.len());
        assert!(l.rows_per_batch > 0 && l.t > 0 && rows.is_multiple_of(l.rows_per_batch));
    }
    let dst = SyncPtr(out.as_mut_ptr());
    let run = |r0: usize, r1: usize| {
        let dst = &dst;
        let mut x = vec![0f32; keys];
        for r in r0..r1 {
            let src = &scores[r * keys..][..keys];
            match mask {
                Some((m, l)) => {
                    let (b, ti) = (r / l.rows_per_batch, r % l.t);
                    let mrow = &m[((if l.mask_batches == 1 { 0 } else { b }) * l.t + ti) * keys..][..keys];
                    for ((xv, sv), mv) in x.iter_mut().zip(src).zip(mrow) {
                        *xv = sv * scale + mv;
                    }
                }
                None => {
                    for (xv, sv) in x.iter_mut().zip(src) {
                        *xv = sv * scale;
                    }
                }
            }
            // SAFETY: row `r` of `out` is written by this call only (rows are handed out once).
            let o = unsafe { std::slice::from_raw_parts_mut(dst.0.add(r * keys), keys) };
            softmax_into(&x, o);
        }
    };
    par::for_parts(rows, scores.len() >= 64 * 1024 && rows >= 2, 4, &run);
}

/// [`masked_softmax`] into a new vector.
///
/// # Panics
/// As [`masked_softmax`].
pub fn masked_softmax_to_vec(scores: &[f32], keys: usize, scale: f32, mask: Option<(&[f32], MaskLayout)>) -> Vec<f32> {
    // SAFETY: masked_softmax writes every row of `out`.
    unsafe { vec_written_by(scores.len(), |out| masked_softmax(scores, keys, scale, mask, out)) }
}

/// `o = softmax(x)` for one row of scaled, masked scores: `-inf` entries get exactly 0, and a
/// row with no finite entry gets zeros.
pub(super) fn softmax_into(x: &[f32], o: &mut [f32]) {
    // (a NaN score is not a maximum; it still makes the row NaN through the exponentials)
    let max = lanes(x, f32::NEG_INFINITY, |a, v| if v > a { v } else { a });
    if max == f32::NEG_INFINITY {
        o.fill(0.0);
        return;
    }
    exp_shifted(x, max, 1.0, o);
    for (ov, xv) in o.iter_mut().zip(x) {
        *ov = if *xv == f32::NEG_INFINITY { 0.0 } else { *ov };
    }
    let inv = 1.0 / lanes(o, 0.0, |a, b| a + b);
    for ov in o.iter_mut() {
        *ov *= inv;
    }
}

/// `x` folded with `f` over 8 independent lanes, then the lanes folded together (a fixed
/// order, and a loop the compiler vectorizes, where one running value would wait on each step;
/// rows are short, so the final fold of the lanes matters too).
#[inline]
fn lanes(x: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder().iter().fold(init, |a, v| f(a, *v));
    for c in chunks {
        for i in 0..8 {
            acc[i] = f(acc[i], c[i]);
        }
    }
    acc.iter().fold(tail, |a, v| f(a, *v))
}

/// `Σ a·b` with 16 independent partial sums (a fixed order, so results are reproducible, and a
/// shape the compiler turns into vector multiply-adds).
#[inline]
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_softmax_matches_f64() {
        // 2 sequences x 3 groups x t = 2 rows of 4 keys; sequence 0 cannot see key 0 (padding)
        let (b, g, t, keys) = (2, 3, 2, 4);
        let scores: Vec<f32> = (0..b * g * t * keys).map(|i| ((i * 13 % 17) as f32 - 8.0) / 3.0).collect();
        let mut mask = vec![0f32; b * t * keys];
        mask[0] = f32::NEG_INFINITY;
        mask[keys] = f32::NEG_INFINITY;
        mask[b * t * keys - 1] = f32::NEG_INFINITY;
        let layout = MaskLayout { rows_per_batch: g * t, t, mask_batches: b };
        let mut out = vec![f32::NAN; scores.len()];
        masked_softmax(&scores, keys, 0.5, Some((&mask, layout)), &mut out);
        for r in 0..b * g * t {
            let (bi, ti) = (r / (g * t), r % t);
            let x: Vec<f64> =
                (0..keys).map(|j| scores[r * keys + j] as f64 * 0.5 + mask[(bi * t + ti) * keys + j] as f64).collect();
            let mx = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = x.iter().map(|v| (v - mx).exp()).sum();
            for j in 0..keys {
                let want = (x[j] - mx).exp() / z;
                let got = out[r * keys + j] as f64;
                assert!((got - want).abs() < 1e-6, "row {r} key {j}: {got} vs {want}");
                if x[j] == f64::NEG_INFINITY {
                    assert_eq!(got, 0.0);
                }
            }
        }
    }

    /// Long key runs split into chunks across threads (one sequence and two), with masked
    /// stretches, a chunk that sees nothing and a fully masked sequence, against f64.
    #[test]
    fn chunked_long_rows_match_f64() {
        for (batch, keys, d) in [(1usize, 1500usize, 64usize), (2, 700, 32), (1, 300, 24)] {
            let (heads, kv_heads, cap) = (6, 2, keys + 3);
            let shape = DecodeShape { batch, heads, kv_heads, head_dim: d, keys };
            let kv = KvStrides { offset: d, batch_stride: kv_heads * cap * d, head_stride: cap * d };
            let f = |i: usize| ((i * 37 % 101) as f32 / 50.0) - 1.0;
            let q: Vec<f32> = (0..batch * heads * d).map(|i| 3.0 * f(i)).collect();
            let len = kv.offset + batch * kv.batch_stride;
            let k: Vec<f32> = (0..len).map(|i| f(i + 11)).collect();
            let v: Vec<f32> = (0..len).map(|i| f(i + 29)).collect();
            let mut mask = vec![0f32; batch * keys];
            for (j, m) in mask.iter_mut().enumerate().take(keys) {
                if j < keys / 2 || j % 7 == 3 {
                    *m = f32::NEG_INFINITY; // the first half: whole chunks that see nothing
                }
            }
            if batch == 2 {
                mask[keys..].fill(f32::NEG_INFINITY); // sequence 1 sees nothing at all
            }
            let mut out = vec![f32::NAN; batch * heads * d];
            decode_attention(&q, &k, &v, kv, Some(&mask), shape, 0.3, &mut out);
            for b in 0..batch {
                for h in 0..heads {
                    let base = kv.offset + b * kv.batch_stride + (h / (heads / kv_heads)) * kv.head_stride;
                    let s: Vec<f64> = (0..keys)
                        .map(|j| {
                            (0..d).map(|x| q[(b * heads + h) * d + x] as f64 * k[base + j * d + x] as f64).sum::<f64>()
                                * 0.3
                                + mask[b * keys + j] as f64
                        })
                        .collect();
                    let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    for x in 0..d {
                        let want = if mx == f64::NEG_INFINITY {
                            0.0
                        } else {
                            let e: Vec<f64> = s.iter().map(|y| (y - mx).exp()).collect();
                            let z: f64 = e.iter().sum();
                            (0..keys).map(|j| e[j] / z * v[base + j * d + x] as f64).sum()
                        };
                        let got = out[(b * heads + h) * d + x] as f64;
                        assert!((got - want).abs() < 1e-5, "{batch}x{keys} d{d} b{b} h{h} x{x}: {got} vs {want}");
                    }
                }
            }
        }
    }

    /// Sequences of different lengths in separate buffers give what each gives alone in the
    /// strided form (bit for bit), with and without masks, one of them empty.
    #[test]
    fn separate_sequences_equal_each_alone() {
        let (heads, kv_heads, d) = (6, 2, 32);
        let f = |i: usize| ((i * 37 % 101) as f32 / 50.0) - 1.0;
        let lens = [700usize, 5, 0, 1300];
        let bufs: Vec<(Vec<f32>, Vec<f32>, usize)> = lens
            .iter()
            .enumerate()
            .map(|(b, &n)| {
                let cap = n + 7;
                let len = kv_heads * cap * d;
                ((0..len).map(|i| f(i + 3 * b)).collect(), (0..len).map(|i| f(i + 11 * b + 1)).collect(), cap)
            })
            .collect();
        let masks: Vec<Vec<f32>> =
            lens.iter().map(|&n| (0..n).map(|j| if j % 9 == 4 { f32::NEG_INFINITY } else { 0.0 }).collect()).collect();
        let q: Vec<f32> = (0..lens.len() * heads * d).map(|i| 2.0 * f(i + 5)).collect();
        for masked in [false, true] {
            let seqs: Vec<SeqKv> = bufs
                .iter()
                .zip(&lens)
                .zip(&masks)
                .map(|(((k, v, cap), &n), m)| SeqKv {
                    k,
                    v,
                    head_stride: cap * d,
                    keys: n,
                    mask: masked.then_some(&m[..]),
                })
                .collect();
            let mut all = vec![f32::NAN; q.len()];
            decode_attention_seqs(&q, &seqs, heads, kv_heads, d, 0.2, &mut all);
            for (b, ((k, v, cap), &n)) in bufs.iter().zip(&lens).enumerate() {
                let shape = DecodeShape { batch: 1, heads, kv_heads, head_dim: d, keys: n };
                let kv = KvStrides { offset: 0, batch_stride: 0, head_stride: cap * d };
                let mut one = vec![f32::NAN; heads * d];
                let mask = masked.then_some(&masks[b][..]);
                decode_attention(&q[b * heads * d..][..heads * d], k, v, kv, mask, shape, 0.2, &mut one);
                assert_eq!(one, all[b * heads * d..][..heads * d], "sequence {b} (masked: {masked})");
                if n == 0 {
                    assert!(one.iter().all(|x| *x == 0.0), "an empty sequence gives zeros");
                }
            }
        }
    }

    #[test]
    fn matches_a_direct_softmax() {
        let shape = DecodeShape { batch: 3, heads: 4, kv_heads: 2, head_dim: 8, keys: 5 };
        let cap = 7;
        let kv = KvStrides { offset: 0, batch_stride: 2 * cap * 8, head_stride: cap * 8 };
        let f = |i: usize| ((i * 37 % 101) as f32 / 50.0) - 1.0;
        let q: Vec<f32> = (0..3 * 4 * 8).map(f).collect();
        let k: Vec<f32> = (0..3 * 2 * cap * 8).map(|i| f(i + 11)).collect();
        let v: Vec<f32> = (0..3 * 2 * cap * 8).map(|i| f(i + 29)).collect();
        let mut mask = vec![0f32; 3 * 5];
        mask[5] = f32::NEG_INFINITY; // sequence 1 does not see key 0 (left padding)
        let mut out = vec![0f32; 3 * 4 * 8];
        decode_attention(&q, &k, &v, kv, Some(&mask), shape, 0.3, &mut out);
        for b in 0..3 {
            for h in 0..4 {
                let base = b * 2 * cap * 8 + (h / 2) * cap * 8;
                let s: Vec<f64> = (0..5)
                    .map(|j| {
                        (0..8).map(|x| q[(b * 4 + h) * 8 + x] as f64 * k[base + j * 8 + x] as f64).sum::<f64>() * 0.3
                            + mask[b * 5 + j] as f64
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                for x in 0..8 {
                    let want: f64 = (0..5).map(|j| e[j] / z * v[base + j * 8 + x] as f64).sum();
                    let got = out[(b * 4 + h) * 8 + x] as f64;
                    assert!((got - want).abs() < 1e-5, "b{b} h{h} x{x}: {got} vs {want}");
                }
            }
        }
    }
}

#[cfg(test)]
mod after_matmul_bench {
    use super::*;
    use crate::amx::{self, AmxMatrix};
    use crate::packed_matmul::PackedMatrix;

    /// A decode step's attention over 8,000 keys (the default model's layer shape) timed right
    /// after a one-row projection on AMX tiles ("high") and after the f32 one ("highest"), in
    /// turns: whether the attention itself slows down after AMX work.
    #[test]
    #[ignore = "timing; run with --ignored --nocapture"]
    fn decode_attention_after_amx_bench() {
        if !amx::available() {
            eprintln!("no AMX: skipped");
            return;
        }
        let (heads, kv_heads, d, keys) = (9, 3, 64, 8000);
        let f = |i: usize| ((i * 37 % 101) as f32 / 50.0) - 1.0;
        let q: Vec<f32> = (0..heads * d).map(f).collect();
        let k: Vec<f32> = (0..kv_heads * keys * d).map(|i| f(i + 3)).collect();
        let v: Vec<f32> = (0..kv_heads * keys * d).map(|i| f(i + 7)).collect();
        let kv = KvStrides { offset: 0, batch_stride: kv_heads * keys * d, head_stride: keys * d };
        let shape = DecodeShape { batch: 1, heads, kv_heads, head_dim: d, keys };
        let (rows, cols) = (3072, 576);
        let w: Vec<f32> = (0..rows * cols).map(|i| f(i + 1) * 0.05).collect();
        let (packed, tiles) = (PackedMatrix::pack(&w, rows, cols), AmxMatrix::pack(&w, rows, cols));
        let x: Vec<f32> = (0..cols).map(f).collect();
        let (mut y, mut out) = (vec![0f32; rows], vec![0f32; heads * d]);
        let mut times: [Vec<f64>; 3] = [Vec::new(), Vec::new(), Vec::new()];
        for _ in 0..200 {
            for (mode, t) in times.iter_mut().enumerate() {
                match mode {
                    0 => packed.matmul(&x, 1, &mut y),
                    1 => tiles.matmul(&x, 1, &mut y),
                    _ => {}
                }
                let s = std::time::Instant::now();
                decode_attention(&q, &k, &v, kv, None, shape, 0.125, &mut out);
                t.push(s.elapsed().as_secs_f64() * 1e6);
            }
        }
        for (name, t) in ["after f32 matmul", "after AMX matmul", "alone"].iter().zip(times.iter_mut()) {
            t.sort_by(f64::total_cmp);
            eprintln!("{name}: attention min {:.0} us, median {:.0} us", t[0], t[t.len() / 2]);
        }
    }
}
