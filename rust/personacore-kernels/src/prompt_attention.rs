//! Attention of many query positions per sequence (a prompt, or a pooled capture), in f32.
//!
//! Blocked (flash-style) attention: the keys and the values of each (sequence, kv head) are
//! packed once, in blocks of key positions, for the products' kernel. A unit of work is one block
//! of [`QUERY_BLOCK`] query positions of one (sequence, kv head), for all the query heads of its
//! group (`m` query rows); it walks the key blocks it can see (a causal prompt skips the blocks
//! past its last query), multiplies for the block's scores, turns them into softmax weights
//! against a running maximum per row (rescaling what it summed so far when the maximum grows) and
//! adds the weights times the block's values. No buffer grows with the prompt beyond the packed
//! keys and values, and units are many and small enough to keep both cores busy for one long
//! sequence. Each sequence's result depends only on its own data.
//!
//! The two products run as [`Products`] says.
//!
//! f32 multiply-adds (precision "highest"): key blocks of [`F32_KEY_BLOCK`] positions, the keys
//! as 12-row tiles and the values transposed into 32-wide panels ([`crate::packed_matmul`]). A
//! unit multiplies its query rows by `scale · log₂e` once and packs them as panels of 32 rows.
//! Per key block it takes 32 query rows at a time (so that their scores stay in L1 from one step
//! to the next): the scores come out key by key, `[keys][32]` (the key tiles times the query
//! panel), in log2 units; [`crate::column_softmax`] turns them into weights `2^(x − max)` with
//! one query row per vector lane (running maxima and sums per lane, no horizontal sums, no
//! scalar exponential per row); and the weights × values kernel broadcasts them straight from
//! that layout and adds into the unit's sums in place
//! ([`PackedMatrix::accumulate_by_columns`]), so the weights are never rearranged. The block is
//! cut to the keys the 32 rows see (a causal prompt's last block is mostly cut away), rounded
//! up to whole key tiles for the scores.
//!
//! bf16x3 on AMX tiles (a model loaded at precision "high" on a CPU with AMX, `head_dim` a
//! multiple of 32): key blocks of [`KEY_BLOCK`] positions padded to whole 32-key panels by zero
//! keys that get zero weight, through the linear layers' kernel ([`crate::amx`]). A unit splits
//! its query rows into bf16 pairs once; each block's scores are `[m][keys]`, the online softmax
//! runs row by row ([`crate::activations`]), and the weights × values product goes through a
//! partial sum added to the unit's.
//!
//! The online softmax is f32 either way. Its exponential is exactly 0 where the scores are
//! `-inf` or the weight would be subnormal.

use std::sync::OnceLock;

use super::activations::softmax_online_within;
use super::amx::{self, AmxMatrix, AmxRows};
use super::attention::KvStrides;
use super::column_softmax::{softmax_columns, ColumnMask};
use super::packed_matmul::{self, PackedMatrix, PackedRows};
use super::par::{self, SyncPtr};
use super::vec_written_by;

/// Query positions per unit (times the heads of a group: the rows of each matmul).
pub const QUERY_BLOCK: usize = 64;
/// Key positions per packed block for the f32 products (a multiple of the matmul's 12-row
/// tiles: the keys are the rows of the scores' product). With 32 query rows at a time, a block's
/// scores (15 KiB) stay in L1 beside its key tiles and value panels; on the development host 120
/// was faster than 72, 144, 240 and 360.
pub const F32_KEY_BLOCK: usize = 120;
/// Query rows (columns of a block's scores) taken through a key block at a time by the f32
/// products: one panel of the scores' product.
const PANEL: usize = 32;
/// Key positions per packed block for the tile products (a multiple of their 32-key panels).
pub const KEY_BLOCK: usize = 256;

/// Shapes of a prompt attention.
#[derive(Debug, Clone, Copy)]
pub struct PromptShape {
    /// Sequences.
    pub batch: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub kv_heads: usize,
    /// Values per head.
    pub head_dim: usize,
    /// Query positions per sequence.
    pub queries: usize,
    /// Key positions per sequence (cached ones included).
    pub keys: usize,
}

/// Which keys each query row of a prompt attention sees.
#[derive(Debug, Clone, Copy)]
pub enum PromptMask<'a> {
    /// Every query sees every key.
    None,
    /// Additive values `[batch or 1, queries, keys]` (`-inf` = not visible).
    Dense(&'a [f32]),
    /// A causal mask described by its shape (no `[queries, keys]` values to read).
    Causal(CausalRows<'a>),
}

/// A causal mask by shape: query `i` of a sequence sits at key slot `past + i` and sees the
/// slots up to its own, at most `window` of them when there is a window, none of its sequence's
/// left padding (the first `left_pads[b]` slots of sequence `b`); a padding slot sees only itself.
#[derive(Debug, Clone, Copy)]
pub struct CausalRows<'a> {
    /// Key slots before the first query (cached positions).
    pub past: usize,
    /// Most keys a query sees (its own slot included), if limited.
    pub window: Option<usize>,
    /// Padding slots at the start of each sequence (empty: none in any).
    pub left_pads: &'a [usize],
}

impl CausalRows<'_> {
    /// The key slots `lo..hi` that query `i` of sequence `b` sees.
    pub fn visible(&self, b: usize, i: usize) -> std::ops::Range<usize> {
        let q = self.past + i;
        let pad = self.left_pads.get(b).copied().unwrap_or(0);
        if q < pad {
            return if self.window == Some(0) { q..q } else { q..q + 1 };
        }
        let lo = self.window.map_or(0, |w| (q + 1).saturating_sub(w));
        lo.max(pad)..q + 1
    }
}

/// Whether this CPU runs the kernel (the f32 matmul needs AVX-512).
pub fn available() -> bool {
    packed_matmul::available()
}

/// How a prompt attention computes its two products, `Q·Kᵀ` per key block and the weights
/// times the values (the online softmax between them is f32 either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Products {
    /// f32 multiply-adds (AVX-512): the model's precision "highest".
    F32,
    /// bf16x3 on AMX tiles, as the linear layers at precision "high" (each f32 split into two
    /// bf16, three products accumulated in f32; see [`crate::amx`]), where the CPU has AMX and
    /// `head_dim` is a multiple of 32; [`F32`](Self::F32) otherwise.
    Bf16x3,
}

impl Products {
    /// Whether these products run on AMX tiles for heads of `head_dim` values on this CPU.
    fn on_tiles(self, head_dim: usize) -> bool {
        self == Self::Bf16x3 && head_dim > 0 && head_dim.is_multiple_of(32) && amx::available()
    }
}

/// One key block of one (sequence, kv head), packed for the products' kernel.
enum KeyBlock {
    /// Keys `[n, d]` as row tiles (the rows of the scores' product `K·Qᵀ`) and transposed values
    /// `[d, n]` as panels, for the f32 kernel.
    F32 { keys: PackedRows, values: PackedMatrix },
    /// Keys padded with zero keys to `np`, a multiple of 32 (`[np, d]`), and transposed values
    /// padded with zero columns (`[d, np]`), split for the AMX kernel.
    Tiles { keys: AmxMatrix, values: AmxMatrix },
}

impl KeyBlock {
    /// Packs `n` keys and values (`[n, d]` each, row-major).
    fn pack(keys: &[f32], values: &[f32], n: usize, d: usize, tiles: bool) -> Self {
        if !tiles {
            return Self::F32 {
                keys: PackedRows::pack(keys, n, d),
                values: PackedMatrix::pack_transposed(values, n, d),
            };
        }
        let np = n.next_multiple_of(32);
        let mut kpad = vec![0f32; np * d];
        kpad[..n * d].copy_from_slice(keys);
        let mut vt = vec![0f32; d * np];
        for (j, row) in values.chunks_exact(d).enumerate() {
            for (x, v) in row.iter().enumerate() {
                vt[x * np + j] = *v;
            }
        }
        Self::Tiles { keys: AmxMatrix::pack(&kpad, np, d), values: AmxMatrix::pack(&vt, d, np) }
    }
}

/// `out[b, i, h·d..(h+1)·d] = softmax(q[b, h, i] · K[b, h/g]ᵀ · scale + mask[b, i]) · V[b, h/g]`
/// for every sequence `b`, query head `h` (groups of `g = heads / kv_heads` share a kv head) and
/// query position `i`. `q` is `[batch, heads, queries, head_dim]`; keys and values are laid out
/// as `kv` says with `keys` rows each; `mask` says which keys each query sees (a row that sees
/// no key gets zeros); `products` says how the two matmuls are computed; `out` is `[batch,
/// queries, heads · head_dim]`.
///
/// # Panics
/// When a slice is too short for the shape, `heads` is not a multiple of `kv_heads`, a dense mask
/// does not match the shape, a causal one has `past + queries != keys` or left padding for
/// another number of sequences, or the CPU lacks AVX-512 (check [`available`]).
#[allow(clippy::too_many_arguments)]
pub fn prompt_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    kv: KvStrides,
    mask: PromptMask<'_>,
    shape: PromptShape,
    scale: f32,
    products: Products,
    out: &mut [f32],
) {
    let PromptShape { batch, heads, kv_heads, head_dim: d, queries: t, keys: s } = shape;
    assert!(kv_heads > 0 && heads.is_multiple_of(kv_heads), "{heads} heads do not group over {kv_heads} kv heads");
    assert!(available(), "prompt attention needs AVX-512");
    assert_eq!(q.len(), batch * heads * t * d, "queries do not match the shape");
    assert_eq!(out.len(), batch * t * heads * d, "output does not match the shape");
    if batch == 0 || t == 0 || d == 0 {
        return;
    }
    if s == 0 {
        out.fill(0.0);
        return;
    }
    let last = kv.offset + (batch - 1) * kv.batch_stride + (kv_heads - 1) * kv.head_stride + s * d;
    assert!(k.len() >= last && v.len() >= last, "key/value views are shorter than their shape");
    let rows = RowKeys::new(mask, batch, t, s);
    let tiles = products.on_tiles(d);
    // Keys and transposed values packed once per (sequence, kv head, key block).
    let kblock = if tiles { KEY_BLOCK } else { F32_KEY_BLOCK };
    let kblocks = s.div_ceil(kblock);
    let packs: Vec<OnceLock<KeyBlock>> = (0..batch * kv_heads * kblocks).map(|_| OnceLock::new()).collect();
    let pack_block = |i: usize| {
        let (pair, kb) = (i / kblocks, i % kblocks);
        let (b, h) = (pair / kv_heads, pair % kv_heads);
        let n = kblock.min(s - kb * kblock);
        let at = kv.offset + b * kv.batch_stride + h * kv.head_stride + kb * kblock * d;
        KeyBlock::pack(&k[at..at + n * d], &v[at..at + n * d], n, d, tiles)
    };
    let pack = |i0: usize, i1: usize| {
        for (i, slot) in packs.iter().enumerate().take(i1).skip(i0) {
            slot.get_or_init(|| pack_block(i));
        }
    };
    par::for_parts(packs.len(), packs.len() > 1 && s * d >= 16 * 1024, 2, &pack);
    let qblocks = t.div_ceil(QUERY_BLOCK);
    let dst = SyncPtr(out.as_mut_ptr());
    let unit = |u: usize| {
        let dst = &dst;
        // the last query blocks of a causal prompt see the most keys: hand them out first
        let (pair, qb) = (u / qblocks, qblocks - 1 - u % qblocks);
        let (b, h) = (pair / kv_heads, pair % kv_heads);
        let (t0, tn) = (qb * QUERY_BLOCK, QUERY_BLOCK.min(t - qb * QUERY_BLOCK));
        let g = heads / kv_heads;
        let m = g * tn;
        // the key blocks that some row of the unit sees
        let seen: Vec<std::ops::Range<usize>> = (t0..t0 + tn).map(|i| rows.visible(b, i)).collect();
        let (lo, hi) =
            seen.iter().filter(|r| !r.is_empty()).fold((s, 0), |(lo, hi), r| (lo.min(r.start), hi.max(r.end)));
        // rows [g, tn]: row r is head h·g + r / tn at position t0 + r % tn
        let mut qs = vec![0f32; m * d];
        for gi in 0..g {
            let src = &q[((b * heads + h * g + gi) * t + t0) * d..][..tn * d];
            qs[gi * tn * d..][..tn * d].copy_from_slice(src);
        }
        let mut acc = vec![0f32; m * d];
        let (mut maxes, mut sums) = (vec![f32::NEG_INFINITY; m], vec![0f32; m]);
        let blocks = lo / kblock..hi.div_ceil(kblock);
        if tiles {
            // prepared once for the kernel, multiplied by every key block
            let qrows = AmxRows::split(&qs, m, d);
            let mut part = vec![0f32; m * d];
            let width = KEY_BLOCK.min(s).next_multiple_of(32);
            let mut scores = vec![0f32; m * width];
            for kb in blocks {
                // Every block was packed above, before any unit runs: this only reads it.
                let i = pair * kblocks + kb;
                let KeyBlock::Tiles { keys, values } = packs[i].get_or_init(|| pack_block(i)) else {
                    unreachable!("key blocks are packed for the products' kernel")
                };
                let (j0, n, width) = (kb * KEY_BLOCK, KEY_BLOCK.min(s - kb * KEY_BLOCK), keys.rows());
                let scores = &mut scores[..m * width];
                keys.matmul_rows(&qrows, scores);
                for (r, row) in scores.chunks_exact_mut(width).enumerate() {
                    // the padding keys of a tile block get zero weight
                    let (row, padding) = row.split_at_mut(n);
                    padding.fill(0.0);
                    let ti = t0 + r % tn;
                    let seen = &seen[r % tn];
                    let within = seen.start.clamp(j0, j0 + n) - j0..seen.end.clamp(j0, j0 + n) - j0;
                    if within.is_empty() {
                        row.fill(0.0);
                        continue;
                    }
                    let mrow = rows.dense(b, ti).map(|mk| &mk[j0..][..n]);
                    let corr = softmax_online_within(row, within, mrow, scale, &mut maxes[r], &mut sums[r]);
                    if corr != 1.0 {
                        acc[r * d..][..d].iter_mut().for_each(|x| *x *= corr);
                    }
                }
                values.matmul(scores, m, &mut part);
                for (a, p) in acc.iter_mut().zip(&part) {
                    *a += p;
                }
            }
        } else {
            // Scale and log2(e) folded into the queries once: the scores come out in log2
            // units, ready for the softmax's 2^x. As panels of 32 query rows, they are the
            // matrix that each key block's row tiles are multiplied by (scores `[keys][m]`).
            let l2 = scale * std::f32::consts::LOG2_E;
            qs.iter_mut().for_each(|x| *x *= l2);
            let qpanels = PackedMatrix::pack(&qs, m, d);
            with_scores(F32_KEY_BLOCK.min(s) * PANEL, |scores| {
                let (mut lo_r, mut hi_r, mut corr) = (vec![0u32; m], vec![0u32; m], vec![0f32; m]);
                let dense = rows.dense_values();
                let mut offsets = vec![0usize; dense.map_or(0, |_| m)];
                for kb in blocks {
                    // Every block was packed above, before any unit runs: this only reads it.
                    let i = pair * kblocks + kb;
                    let KeyBlock::F32 { keys, values } = packs[i].get_or_init(|| pack_block(i)) else {
                        unreachable!("key blocks are packed for the products' kernel")
                    };
                    let (j0, n) = (kb * F32_KEY_BLOCK, keys.rows());
                    for r in 0..m {
                        let seen = &seen[r % tn];
                        let (a, z) = (seen.start.clamp(j0, j0 + n) - j0, seen.end.clamp(j0, j0 + n) - j0);
                        // keys up to F32_KEY_BLOCK: the block-relative bounds fit in u32
                        (lo_r[r], hi_r[r]) = if a < z { (a as u32, z as u32) } else { (0, 0) };
                    }
                    if dense.is_some() {
                        for (r, o) in offsets.iter_mut().enumerate() {
                            *o = rows.row_index(b, t0 + r % tn) * s + j0;
                        }
                    }
                    // 32 query rows at a time, so that their scores stay in L1 from the product
                    // through the softmax to the weights × values
                    for (panel, c0) in (0..m).step_by(PANEL).enumerate() {
                        let c = c0..m.min(c0 + PANEL);
                        // the block's keys up to the last one these rows see (a causal prompt's
                        // last block is cut short), rounded up to whole row tiles for the product
                        let n = hi_r[c.clone()].iter().max().map_or(0, |&z| z as usize);
                        if n == 0 {
                            continue;
                        }
                        let (nk, w) = (keys.cover(n), c.len());
                        let scores = &mut scores[..nk * w];
                        qpanels.matmul_rows_panel(keys, nk, panel, scores);
                        let mask = dense.map(|values| ColumnMask { values, offsets: &offsets[c.clone()] });
                        let (lo, hi) = (&lo_r[c.clone()], &hi_r[c.clone()]);
                        let (mx, sm, cr) = (&mut maxes[c.clone()], &mut sums[c.clone()], &mut corr[c.clone()]);
                        softmax_columns(scores, n, w, lo, hi, mask, mx, sm, cr);
                        let acc = &mut acc[c0 * d..c.end * d];
                        for (row, &f) in acc.chunks_exact_mut(d).zip(cr.iter()) {
                            if f != 1.0 {
                                row.iter_mut().for_each(|x| *x *= f);
                            }
                        }
                        values.accumulate_by_columns(scores, w, w, n, acc);
                    }
                }
            });
        }
        for (r, (orow, sum)) in acc.chunks_exact(d).zip(&sums).enumerate() {
            let (gi, ti) = (r / tn, t0 + r % tn);
            // a row that sees no key gets zeros
            let inv = if *sum > 0.0 { 1.0 / sum } else { 0.0 };
            // SAFETY: head `h·g + gi` of sequence `b` at position `ti` is written by this unit
            // only (units are handed out once); the index is within `out` (length checked above).
            let o = unsafe { std::slice::from_raw_parts_mut(dst.0.add(((b * t + ti) * heads + h * g + gi) * d), d) };
            for (x, a) in o.iter_mut().zip(orow) {
                *x = a * inv;
            }
        }
    };
    let units = batch * kv_heads * qblocks;
    if units >= par::threads() {
        // One unit per core at a time; the matmuls inside run on the core that took the unit.
        par::for_chunks(units, 1, &|u0, u1| (u0..u1).for_each(unit));
    } else {
        // Too few units to share: each one's matmuls use every core instead.
        (0..units).for_each(unit);
    }
}

thread_local! {
    /// Each thread's buffer for a unit's block of scores, kept between units and calls (a block
    /// is too large to allocate per unit without fresh pages to fault in and clear).
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on `len` floats of scratch starting on a 64-byte boundary (so that each 16-lane
/// column chunk of the scores is one cache line), this thread's kept buffer when it is free.
fn with_scores<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let run = |buf: &mut Vec<f32>| {
        if buf.len() < len + 16 {
            buf.resize(len + 16, 0.0);
        }
        let at = buf.as_ptr().align_offset(64).min(16);
        f(&mut buf[at..at + len])
    };
    SCORES.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => run(&mut buf),
        Err(_) => run(&mut Vec::new()),
    })
}

/// Which keys each query row sees, from a [`PromptMask`]: a dense mask's rows with the visible
/// prefix of each (past its last visible key, all are masked), or the causal ranges.
struct RowKeys<'a> {
    mask: PromptMask<'a>,
    queries: usize,
    keys: usize,
    /// Dense masks only: per mask row, how many leading keys it can see.
    prefix: Vec<usize>,
    /// Dense masks only: one mask for every sequence.
    shared: bool,
}

impl<'a> RowKeys<'a> {
    /// Checks `mask` against the shape and, for a dense one, scans each row's visible prefix.
    fn new(mask: PromptMask<'a>, batch: usize, t: usize, s: usize) -> Self {
        let (mut prefix, mut shared) = (Vec::new(), true);
        match mask {
            PromptMask::None => {}
            PromptMask::Dense(m) => {
                assert!(
                    m.len() == t * s || m.len() == batch * t * s,
                    "mask has {} values for {batch} x {t} x {s}",
                    m.len()
                );
                shared = m.len() == t * s;
                prefix = m
                    .chunks_exact(s)
                    .map(|row| row.iter().rposition(|v| *v != f32::NEG_INFINITY).map_or(0, |j| j + 1))
                    .collect();
            }
            PromptMask::Causal(c) => {
                assert_eq!(
                    c.past + t,
                    s,
                    "a causal mask of {t} queries after {} cached keys does not match {s} keys",
                    c.past
                );
                assert!(
                    c.left_pads.is_empty() || c.left_pads.len() == batch,
                    "left padding for {} sequences, expected {batch}",
                    c.left_pads.len()
                );
            }
        }
        Self { mask, queries: t, keys: s, prefix, shared }
    }

    /// The mask row of query `i` of sequence `b` when the mask is dense.
    fn row_index(&self, b: usize, i: usize) -> usize {
        (if self.shared { 0 } else { b }) * self.queries + i
    }

    /// The key slots that query `i` of sequence `b` may see (a dense mask can hide keys inside it).
    fn visible(&self, b: usize, i: usize) -> std::ops::Range<usize> {
        match self.mask {
            PromptMask::None => 0..self.keys,
            PromptMask::Dense(_) => 0..self.prefix[self.row_index(b, i)],
            PromptMask::Causal(c) => c.visible(b, i),
        }
    }

    /// All the dense mask's values, if the mask is dense (row [`row_index`](Self::row_index) at
    /// `row · keys`).
    fn dense_values(&self) -> Option<&'a [f32]> {
        match self.mask {
            PromptMask::Dense(m) => Some(m),
            _ => None,
        }
    }

    /// The dense mask row of query `i` of sequence `b` (all `keys` values), if the mask is dense.
    fn dense(&self, b: usize, i: usize) -> Option<&'a [f32]> {
        match self.mask {
            PromptMask::Dense(m) => Some(&m[self.row_index(b, i) * self.keys..][..self.keys]),
            _ => None,
        }
    }
}

/// [`prompt_attention`] into a new `[batch, queries, heads · head_dim]` vector.
///
/// # Panics
/// As [`prompt_attention`].
#[allow(clippy::too_many_arguments)]
pub fn prompt_attention_to_vec(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    kv: KvStrides,
    mask: PromptMask<'_>,
    shape: PromptShape,
    scale: f32,
    products: Products,
) -> Vec<f32> {
    let len = shape.batch * shape.queries * shape.heads * shape.head_dim;
    // SAFETY: prompt_attention writes every value of its output (zeros for rows that see no key).
    unsafe { vec_written_by(len, |out| prompt_attention(q, k, v, kv, mask, shape, scale, products, out)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct f64 attention for row `(b, h, i)`: the `d` outputs.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        kv: KvStrides,
        mask: &[f32],
        sh: PromptShape,
        scale: f64,
        (b, h, i): (usize, usize, usize),
    ) -> Vec<f64> {
        let d = sh.head_dim;
        let base = kv.offset + b * kv.batch_stride + (h / (sh.heads / sh.kv_heads)) * kv.head_stride;
        let qrow = &q[((b * sh.heads + h) * sh.queries + i) * d..][..d];
        let mb = mask.len() / (sh.queries * sh.keys);
        let sc: Vec<f64> = (0..sh.keys)
            .map(|j| {
                let dot: f64 = (0..d).map(|x| qrow[x] as f64 * k[base + j * d + x] as f64).sum();
                dot * scale + mask[((if mb == 1 { 0 } else { b }) * sh.queries + i) * sh.keys + j] as f64
            })
            .collect();
        let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        if mx == f64::NEG_INFINITY {
            return vec![0.0; d];
        }
        let e: Vec<f64> = sc.iter().map(|x| (x - mx).exp()).collect();
        let z: f64 = e.iter().sum();
        (0..d).map(|x| (0..sh.keys).map(|j| e[j] / z * v[base + j * d + x] as f64).sum()).collect()
    }

    /// Largest difference from f64 attention allowed for outputs of magnitude ≤ 1: f32 products,
    /// or bf16x3 ones (dot products within ~1e-5 relative, through the scores' exponentials;
    /// measured here: at most 5e-6, against 4e-7 for f32).
    fn tolerance(products: Products) -> f64 {
        match products {
            Products::F32 => 1e-4,
            Products::Bf16x3 => 2e-5,
        }
    }

    const BOTH: [Products; 2] = [Products::F32, Products::Bf16x3];

    fn check(sh: PromptShape, cap: usize, causal_per_batch: bool, pad: usize) {
        for products in BOTH {
            check_products(sh, cap, causal_per_batch, pad, products);
        }
    }

    fn check_products(sh: PromptShape, cap: usize, causal_per_batch: bool, pad: usize, products: Products) {
        if !available() {
            eprintln!("AVX-512 not available: skipped");
            return;
        }
        let d = sh.head_dim;
        let kv = KvStrides { offset: 3 * d, batch_stride: sh.kv_heads * cap * d, head_stride: cap * d };
        let f = |i: usize| ((i * 37 % 101) as f32 / 50.0) - 1.0;
        let q: Vec<f32> = (0..sh.batch * sh.heads * sh.queries * d).map(f).collect();
        let len = kv.offset + sh.batch * kv.batch_stride;
        let k: Vec<f32> = (0..len).map(|i| f(i + 11)).collect();
        let v: Vec<f32> = (0..len).map(|i| f(i + 29)).collect();
        // causal over the last `queries` keys
        let past = sh.keys - sh.queries;
        let mb = if causal_per_batch { sh.batch } else { 1 };
        let mut mask = vec![0f32; mb * sh.queries * sh.keys];
        for b in 0..mb {
            for i in 0..sh.queries {
                for j in 0..sh.keys {
                    // sequence 0 also has `pad` positions of left padding: hidden keys, and
                    // query rows that see nothing at all
                    if j > past + i || (causal_per_batch && b == 0 && (j < pad || i < pad)) {
                        mask[(b * sh.queries + i) * sh.keys + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        let mut out = vec![f32::NAN; sh.batch * sh.queries * sh.heads * d];
        prompt_attention(&q, &k, &v, kv, PromptMask::Dense(&mask), sh, 0.125, products, &mut out);
        let mut worst = 0f64;
        for b in 0..sh.batch {
            for h in 0..sh.heads {
                for i in 0..sh.queries {
                    let want = reference(&q, &k, &v, kv, &mask, sh, 0.125, (b, h, i));
                    for x in 0..d {
                        let got = out[((b * sh.queries + i) * sh.heads + h) * d + x] as f64;
                        let err = (got - want[x]).abs();
                        worst = worst.max(err);
                        assert!(
                            err < tolerance(products),
                            "{sh:?} {products:?} b{b} h{h} i{i} x{x}: {got} vs {}",
                            want[x]
                        );
                    }
                }
            }
        }
        eprintln!("{sh:?} {products:?}: max |error| {worst:.2e}");
    }

    /// The tile products are used (not a silent fall back to f32) where the CPU has AMX, and are
    /// f32 products, to the bit, for heads that do not fill whole 32-value tile rows.
    #[test]
    fn tile_products_differ_from_f32_only_where_they_run() {
        if !available() {
            return;
        }
        for (d, tiles) in [(64, amx::available()), (24, false)] {
            let sh = PromptShape { batch: 1, heads: 2, kv_heads: 1, head_dim: d, queries: 70, keys: 300 };
            let f = |i: usize| ((i * 37 % 101) as f32 / 50.0) - 1.0;
            let q: Vec<f32> = (0..2 * 70 * d).map(f).collect();
            let k: Vec<f32> = (0..300 * d).map(|i| f(i + 11)).collect();
            let v: Vec<f32> = (0..300 * d).map(|i| f(i + 29)).collect();
            let kv = KvStrides { offset: 0, batch_stride: 300 * d, head_stride: 300 * d };
            let rows = CausalRows { past: 230, window: None, left_pads: &[] };
            let run = |p| prompt_attention_to_vec(&q, &k, &v, kv, PromptMask::Causal(rows), sh, 0.125, p);
            assert_eq!(run(Products::Bf16x3) != run(Products::F32), tiles, "head_dim {d}");
        }
    }

    #[test]
    fn matches_f64_attention() {
        // keys a multiple of 32 and not (a partial last panel); per-batch and shared masks
        check(PromptShape { batch: 2, heads: 6, kv_heads: 2, head_dim: 32, queries: 40, keys: 40 }, 45, true, 3);
        check(PromptShape { batch: 3, heads: 4, kv_heads: 4, head_dim: 64, queries: 20, keys: 64 }, 64, false, 0);
        // a whole block of query rows that sees nothing, and causal prefixes of the keys
        check(PromptShape { batch: 2, heads: 2, kv_heads: 1, head_dim: 32, queries: 150, keys: 150 }, 150, true, 70);
        // several query and key blocks, past keys before the queries, a partial last key block
        check(PromptShape { batch: 2, heads: 6, kv_heads: 2, head_dim: 64, queries: 300, keys: 620 }, 630, true, 5);
        check(PromptShape { batch: 1, heads: 3, kv_heads: 1, head_dim: 32, queries: 513, keys: 513 }, 513, false, 0);
        // head_dim not a multiple of 32
        check(PromptShape { batch: 1, heads: 2, kv_heads: 1, head_dim: 24, queries: 7, keys: 9 }, 9, true, 2);
    }

    /// A causal mask described by shape (past keys, a window, left padding) gives, to the bit,
    /// what the same mask written out as `-inf` values gives, and both match f64 attention.
    #[test]
    fn causal_by_shape_equals_the_dense_mask() {
        if !available() {
            return;
        }
        let cases: [(PromptShape, Option<usize>, &[usize]); 6] = [
            (PromptShape { batch: 1, heads: 3, kv_heads: 1, head_dim: 64, queries: 600, keys: 600 }, None, &[]),
            (PromptShape { batch: 2, heads: 6, kv_heads: 2, head_dim: 32, queries: 300, keys: 620 }, None, &[]),
            (PromptShape { batch: 1, heads: 2, kv_heads: 1, head_dim: 64, queries: 530, keys: 530 }, Some(100), &[]),
            (PromptShape { batch: 3, heads: 4, kv_heads: 2, head_dim: 32, queries: 150, keys: 150 }, None, &[0, 70, 3]),
            (PromptShape { batch: 2, heads: 2, kv_heads: 2, head_dim: 16, queries: 280, keys: 300 }, Some(40), &[5, 0]),
            (PromptShape { batch: 2, heads: 2, kv_heads: 1, head_dim: 24, queries: 9, keys: 9 }, Some(0), &[2, 0]),
        ];
        for (sh, window, left_pads) in cases {
            let d = sh.head_dim;
            let kv = KvStrides { offset: d, batch_stride: sh.kv_heads * sh.keys * d, head_stride: sh.keys * d };
            let f = |i: usize| ((i * 37 % 101) as f32 / 25.0) - 2.0;
            let q: Vec<f32> = (0..sh.batch * sh.heads * sh.queries * d).map(f).collect();
            let len = kv.offset + sh.batch * kv.batch_stride;
            let k: Vec<f32> = (0..len).map(|i| f(i + 11)).collect();
            let v: Vec<f32> = (0..len).map(|i| f(i + 29)).collect();
            let rows = CausalRows { past: sh.keys - sh.queries, window, left_pads };
            let mut mask = vec![f32::NEG_INFINITY; sh.batch * sh.queries * sh.keys];
            for b in 0..sh.batch {
                for i in 0..sh.queries {
                    mask[(b * sh.queries + i) * sh.keys..][..sh.keys][rows.visible(b, i)].fill(0.0);
                }
            }
            for products in BOTH {
                let mut dense = vec![f32::NAN; sh.batch * sh.queries * sh.heads * d];
                prompt_attention(&q, &k, &v, kv, PromptMask::Dense(&mask), sh, 0.125, products, &mut dense);
                let mut by_shape = vec![f32::NAN; dense.len()];
                prompt_attention(&q, &k, &v, kv, PromptMask::Causal(rows), sh, 0.125, products, &mut by_shape);
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert!(bits(&dense) == bits(&by_shape), "{sh:?} {products:?} window {window:?} pads {left_pads:?}");
                for b in 0..sh.batch {
                    for h in 0..sh.heads {
                        for i in (0..sh.queries).step_by(7) {
                            let want = reference(&q, &k, &v, kv, &mask, sh, 0.125, (b, h, i));
                            for x in 0..d {
                                let got = by_shape[((b * sh.queries + i) * sh.heads + h) * d + x] as f64;
                                // values up to 2 here: twice the tolerance of outputs up to 1
                                assert!(
                                    (got - want[x]).abs() < 2.0 * tolerance(products),
                                    "{sh:?} {products:?} b{b} h{h} i{i} x{x}: {got} vs {}",
                                    want[x]
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn sequences_do_not_depend_on_each_other() {
        if !available() {
            return;
        }
        let (heads, kv_heads, d, t) = (4, 2, 32, 33);
        let f = |i: usize| ((i * 53 % 97) as f32 / 48.0) - 1.0;
        let sh = |batch| PromptShape { batch, heads, kv_heads, head_dim: d, queries: t, keys: t };
        let q: Vec<f32> = (0..3 * heads * t * d).map(f).collect();
        let k: Vec<f32> = (0..3 * kv_heads * t * d).map(|i| f(i + 5)).collect();
        let v: Vec<f32> = (0..3 * kv_heads * t * d).map(|i| f(i + 9)).collect();
        let kv = KvStrides { offset: 0, batch_stride: kv_heads * t * d, head_stride: t * d };
        for products in BOTH {
            let mut all = vec![0f32; 3 * t * heads * d];
            prompt_attention(&q, &k, &v, kv, PromptMask::None, sh(3), 0.2, products, &mut all);
            for b in 0..3 {
                let one_kv = KvStrides { offset: b * kv.batch_stride, ..kv };
                let mut one = vec![0f32; t * heads * d];
                let qb = &q[b * heads * t * d..][..heads * t * d];
                prompt_attention(qb, &k, &v, one_kv, PromptMask::None, sh(1), 0.2, products, &mut one);
                assert_eq!(one, all[b * t * heads * d..][..t * heads * d], "sequence {b} {products:?}");
            }
        }
    }
}

#[cfg(test)]
mod bench {
    use super::*;

    /// CPU seconds of this process so far (all threads): on a shared host a better measure of
    /// the work than wall time.
    fn cpu_seconds() -> f64 {
        // SAFETY: getrusage only writes the struct it is given.
        let r = unsafe {
            let mut r: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_SELF, &mut r);
            r
        };
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
        tv(r.ru_utime) + tv(r.ru_stime)
    }

    /// One layer of the default model's attention (9 heads, 3 kv heads, 64 values) over causal
    /// prompts of the shapes in `PC_BENCH_SHAPES` (`BATCHxTOKENS`, comma-separated; default
    /// 8x128,4x512,1x4096), f32 and bf16x3 products in turns: best wall and CPU time per call.
    #[test]
    #[ignore = "timing; run with --ignored --nocapture"]
    fn prompt_attention_bench() {
        let shapes = std::env::var("PC_BENCH_SHAPES").unwrap_or_else(|_| "8x128,4x512,1x4096".into());
        for shape in shapes.split(',') {
            let (batch, t) = shape.trim().split_once('x').expect("PC_BENCH_SHAPES: BATCHxTOKENS");
            let (batch, t): (usize, usize) = (batch.parse().expect("batch"), t.parse().expect("tokens"));
            let sh = PromptShape { batch, heads: 9, kv_heads: 3, head_dim: 64, queries: t, keys: t };
            let d = sh.head_dim;
            let f = |i: usize| ((i * 37 % 101) as f32 / 50.0) - 1.0;
            let q: Vec<f32> = (0..batch * sh.heads * t * d).map(f).collect();
            let kvlen = batch * sh.kv_heads * t * d;
            let k: Vec<f32> = (0..kvlen).map(|i| f(i + 3)).collect();
            let v: Vec<f32> = (0..kvlen).map(|i| f(i + 7)).collect();
            let kv = KvStrides { offset: 0, batch_stride: sh.kv_heads * t * d, head_stride: t * d };
            let mask = PromptMask::Causal(CausalRows { past: 0, window: None, left_pads: &[] });
            let mut out = vec![0f32; q.len()];
            let calls = (2e9 / (batch * t * t * sh.heads * d) as f64).clamp(1.0, 20.0) as usize;
            let all = [Products::F32, Products::Bf16x3];
            let (mut wall, mut cpu) = ([f64::MAX; 2], [f64::MAX; 2]);
            for _ in 0..6 {
                for (i, products) in all.into_iter().enumerate() {
                    let (w0, c0) = (std::time::Instant::now(), cpu_seconds());
                    for _ in 0..calls {
                        prompt_attention(&q, &k, &v, kv, mask, sh, 0.125, products, &mut out);
                    }
                    wall[i] = wall[i].min(w0.elapsed().as_secs_f64() / calls as f64);
                    cpu[i] = cpu[i].min((cpu_seconds() - c0) / calls as f64);
                }
            }
            eprintln!(
                "{batch}x{t}: f32 {:.2} ms wall, {:.2} ms CPU | bf16x3 {:.2} ms wall, {:.2} ms CPU (per layer, best of 6 rounds of {calls})",
                wall[0] * 1e3,
                cpu[0] * 1e3,
                wall[1] * 1e3,
                cpu[1] * 1e3
            );
        }
    }
}

#[cfg(test)]
mod long_bench {
    use super::*;
    use crate::attention::{decode_attention, DecodeShape};

    /// Lengths from `PC_BENCH_LENS` (comma-separated), default 512,2000,4096,8000.
    fn lens() -> Vec<usize> {
        std::env::var("PC_BENCH_LENS")
            .unwrap_or_else(|_| "512,2000,4096,8000".into())
            .split(',')
            .map(|s| s.trim().parse().expect("PC_BENCH_LENS: numbers"))
            .collect()
    }

    #[test]
    #[ignore = "timing; run with --ignored --nocapture"]
    fn long_attention_bench() {
        let (heads, kv_heads, d) = (9, 3, 64);
        let f = |i: usize| ((i * 37 % 101) as f32 / 50.0) - 1.0;
        for t in lens() {
            let q: Vec<f32> = (0..heads * t * d).map(f).collect();
            let k: Vec<f32> = (0..kv_heads * t * d).map(|i| f(i + 3)).collect();
            let v: Vec<f32> = (0..kv_heads * t * d).map(|i| f(i + 7)).collect();
            let kv = KvStrides { offset: 0, batch_stride: kv_heads * t * d, head_stride: t * d };
            let mut mask = vec![0f32; t * t];
            for i in 0..t {
                mask[i * t + i + 1..(i + 1) * t].fill(f32::NEG_INFINITY);
            }
            let sh = PromptShape { batch: 1, heads, kv_heads, head_dim: d, queries: t, keys: t };
            let mut out = vec![0f32; q.len()];
            // the causal mask by shape (what the model passes) and written out, in turns
            let causal = PromptMask::Causal(CausalRows { past: 0, window: None, left_pads: &[] });
            // and the causal mask's products on AMX tiles (precision "high")
            let (mut best, mut best_dense, mut best_tiles) = (f64::MAX, f64::MAX, f64::MAX);
            for _ in 0..3 {
                let s = std::time::Instant::now();
                prompt_attention(&q, &k, &v, kv, causal, sh, 0.125, Products::F32, &mut out);
                best = best.min(s.elapsed().as_secs_f64());
                let s = std::time::Instant::now();
                prompt_attention(&q, &k, &v, kv, PromptMask::Dense(&mask), sh, 0.125, Products::F32, &mut out);
                best_dense = best_dense.min(s.elapsed().as_secs_f64());
                let s = std::time::Instant::now();
                prompt_attention(&q, &k, &v, kv, causal, sh, 0.125, Products::Bf16x3, &mut out);
                best_tiles = best_tiles.min(s.elapsed().as_secs_f64());
            }
            let ds = DecodeShape { batch: 1, heads, kv_heads, head_dim: d, keys: t };
            let mut o1 = vec![0f32; heads * d];
            let mut bd = f64::MAX;
            for _ in 0..20 {
                let s = std::time::Instant::now();
                decode_attention(&q[..heads * d], &k, &v, kv, None, ds, 0.125, &mut o1);
                bd = bd.min(s.elapsed().as_secs_f64());
            }
            eprintln!(
                "t={t}: prompt {:.1} ms/layer (dense mask {:.1}; bf16x3 {:.1}), decode {:.0} us/layer",
                best * 1e3,
                best_dense * 1e3,
                best_tiles * 1e3,
                bd * 1e6
            );
        }
    }
}
