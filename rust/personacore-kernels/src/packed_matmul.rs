//! `y = x Wᵀ` in f32 with the weight packed once, at load, into column panels.
//!
//! candle's CPU matmul (the `gemm` crate) packs both operands on every call; for a model that is
//! called with the same weights thousands of times that is wasted work (at batch 16 most of a
//! decode step), and its one-row path uses one core. Here `W` (`[n, k]`, checkpoint layout) is
//! stored as panels of 32 output columns, each `[k][32]` contiguous, so that one k step of a panel
//! is two AVX-512 vectors. A micro-kernel keeps a tile of up to 12 rows × 32 columns of `y` in 24
//! registers and, per k, broadcasts one value of each of the 12 activation rows against the two
//! panel vectors (24 FMAs per 14 loads, no horizontal sums); `x` is first rearranged tile by tile so
//! those broadcasts read one contiguous stream (a 16 × 16 register transpose per 16 columns).
//! Blocking: a panel slice of up to `KC` steps and a block of `MC` rows of `x` stay in L2 while
//! the block's tiles pass over the slice. Panels are shared between cores with
//! [`par`](super::par). The same kernel serves one-token decoding (one row: a sequential stream
//! through each panel) and prefill (many rows). For a SwiGLU MLP the gate and up weights are one
//! matrix of alternating panels, and the activation is applied as the up tiles are stored. The
//! micro-kernel reads each step's row values from any stride: activations that already come
//! column by column (a prompt attention's weights, `x[r, kk]` at `xt[kk · ldx + r]`) are
//! multiplied as they are, and added into the output in place
//! ([`PackedMatrix::accumulate_by_columns`]).

use super::par::{self, SyncPtr};

/// Output columns per panel (two 16-lane vectors).
const NR: usize = 32;
/// Most activation rows per micro-tile (24 accumulators + 2 panel vectors + 1 broadcast).
const MR: usize = 12;
/// Deepest pass over `k` for inputs of more than two row tiles: `k` is cut into equal passes of
/// at most this many, so that a panel slice (`KC × 32` f32, 32 KiB) stays in L1 while every
/// tile of a block of rows (`MC × k`, in L2) multiplies it. Measured at 1,024 rows of the
/// default model's shapes: `[576, 576]` 207 → ~245 GFLOP/s, the others unchanged; at 64 rows
/// unchanged.
const KC: usize = 256;
/// Activation rows per block (a multiple of `MR`).
const MC: usize = 120;
/// Below this many multiply-adds a matmul runs on the calling thread alone.
const MIN_PARALLEL_WORK: usize = 32 * 1024;
/// Minimum multiply-adds per chunk handed to a thread.
const MIN_CHUNK_WORK: usize = 16 * 1024;

/// Whether this CPU runs the kernel (AVX-512F, detected at run time).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A weight `W` `[rows = out, cols = in]` packed for `y = x Wᵀ`.
pub struct PackedMatrix {
    rows: usize,
    cols: usize,
    /// `rows.div_ceil(32)` panels of `[cols][32]`; columns past `rows` are zero.
    data: Vec<f32>,
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedMatrix").field("rows", &self.rows).field("cols", &self.cols).finish()
    }
}

impl PackedMatrix {
    /// Packs a row-major `[rows, cols]` weight.
    ///
    /// # Panics
    /// When `w.len() != rows * cols`.
    pub fn pack(w: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(w.len(), rows * cols, "weight has {} values, expected {rows} x {cols}", w.len());
        let panels = rows.div_ceil(NR);
        let mut data = vec![0f32; panels * cols * NR];
        for (p, panel) in data.chunks_exact_mut(cols * NR).enumerate() {
            for c in 0..NR.min(rows - p * NR) {
                let src = &w[(p * NR + c) * cols..][..cols];
                for (kk, v) in src.iter().enumerate() {
                    panel[kk * NR + c] = *v;
                }
            }
        }
        Self { rows, cols, data }
    }

    /// Packs `W = Aᵀ` from a row-major `A` `[rows_a, cols_a]` (so `W` is `[cols_a, rows_a]` and
    /// `y = x · A`): each panel row is a 32-value stretch of a row of `A`, copied as is.
    ///
    /// # Panics
    /// When `a.len() != rows_a * cols_a`.
    pub fn pack_transposed(a: &[f32], rows_a: usize, cols_a: usize) -> Self {
        assert_eq!(a.len(), rows_a * cols_a, "matrix has {} values, expected {rows_a} x {cols_a}", a.len());
        let (rows, cols) = (cols_a, rows_a);
        let panels = rows.div_ceil(NR);
        let mut data = vec![0f32; panels * cols * NR];
        for (p, panel) in data.chunks_exact_mut(cols * NR).enumerate() {
            let width = NR.min(rows - p * NR);
            for (kk, dst) in panel.chunks_exact_mut(NR).enumerate() {
                dst[..width].copy_from_slice(&a[kk * cols_a + p * NR..][..width]);
            }
        }
        Self { rows, cols, data }
    }

    /// Output features (rows of W).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features (columns of W).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The weight back in row-major `[rows, cols]`.
    pub fn unpack(&self) -> Vec<f32> {
        let (rows, cols) = (self.rows, self.cols);
        let mut w = vec![0f32; rows * cols];
        for (r, row) in w.chunks_exact_mut(cols.max(1)).enumerate().take(rows) {
            let panel = &self.data[(r / NR) * cols * NR..];
            for (kk, v) in row.iter_mut().enumerate() {
                *v = panel[kk * NR + r % NR];
            }
        }
        w
    }

    /// `y[m, rows] = x[m, cols] · Wᵀ` (row-major), split across the matmul pool.
    ///
    /// # Panics
    /// When the CPU lacks AVX-512 (check [`available`]) or a length does not match.
    pub fn matmul(&self, x: &[f32], m: usize, y: &mut [f32]) {
        self.matmul_leading(x, m, self.rows, y);
    }

    /// `y[m, n] = x[m, cols] · W[..n]ᵀ`: the product with the first `n` rows of `W` only, where
    /// `n` is `rows` or a multiple of 32 below it (whole panels).
    ///
    /// # Panics
    /// As [`matmul`](Self::matmul), and for any other `n`.
    pub fn matmul_leading(&self, x: &[f32], m: usize, n: usize, y: &mut [f32]) {
        assert!(
            n == self.rows || (n < self.rows && n.is_multiple_of(NR)),
            "{n} leading rows of {} are not whole panels",
            self.rows
        );
        assert_eq!(y.len(), m * n, "output has {} values, expected {m} x {n}", y.len());
        self.run(x, m, n, Out::Plain(y.as_mut_ptr()));
    }

    /// The gate and up projections of a SwiGLU MLP (`[inter, cols]` each, `inter` a multiple of
    /// 32) as one matrix whose panels alternate: gate outputs `32i..32i+32`, then the same up
    /// outputs; for [`matmul_swiglu`](Self::matmul_swiglu). `None` for other shapes.
    pub fn interleave(gate: &PackedMatrix, up: &PackedMatrix) -> Option<Self> {
        let (inter, cols) = (gate.rows, gate.cols);
        if (up.rows, up.cols) != (inter, cols) || inter == 0 || cols == 0 || !inter.is_multiple_of(NR) {
            return None;
        }
        let panel = cols * NR;
        let data = gate
            .data
            .chunks_exact(panel)
            .zip(up.data.chunks_exact(panel))
            .flat_map(|(g, u)| g.iter().chain(u))
            .copied()
            .collect();
        Some(Self { rows: 2 * inter, cols, data })
    }

    /// The gate and up weights (row-major `[inter, cols]` each) of a matrix built by
    /// [`interleave`](Self::interleave).
    pub fn unpack_interleaved(&self) -> (Vec<f32>, Vec<f32>) {
        super::deinterleave_rows(&self.unpack(), self.cols, NR)
    }

    /// `out[m, rows/2] = silu(x Gᵀ) ⊙ (x Uᵀ)` for a matrix built by [`interleave`](Self::interleave):
    /// a gate panel's tiles go to a scratch, and the up panel's tiles apply the activation as
    /// they are stored, so the `[m, 2·inter]` product never reaches memory.
    ///
    /// # Panics
    /// As [`matmul`](Self::matmul), and when `rows` is not a multiple of 64.
    pub fn matmul_swiglu(&self, x: &[f32], m: usize, out: &mut [f32]) {
        assert!(self.rows.is_multiple_of(2 * NR), "{} rows are not gate/up panel pairs", self.rows);
        assert_eq!(out.len(), m * self.rows / 2, "output has {} values, expected {m} x {}", out.len(), self.rows / 2);
        self.run(x, m, self.rows, Out::SwiGlu(out.as_mut_ptr()));
    }

    /// [`matmul`](Self::matmul) into a new `[m, rows]` vector.
    ///
    /// # Panics
    /// As [`matmul`](Self::matmul).
    pub fn matmul_to_vec(&self, x: &[f32], m: usize) -> Vec<f32> {
        // SAFETY: the packed matmul writes all `m × rows` values (zeros when k = 0).
        unsafe { super::vec_written_by(m * self.rows, |y| self.matmul(x, m, y)) }
    }

    /// [`matmul_swiglu`](Self::matmul_swiglu) into a new `[m, rows/2]` vector.
    ///
    /// # Panics
    /// As [`matmul_swiglu`](Self::matmul_swiglu).
    pub fn matmul_swiglu_to_vec(&self, x: &[f32], m: usize) -> Vec<f32> {
        // SAFETY: the interleaved kernel writes all `m × rows/2` values of its output.
        unsafe { super::vec_written_by(m * (self.rows / 2), |out| self.matmul_swiglu(x, m, out)) }
    }

    /// The product with the first `n` rows of `W`, written as `out` says.
    fn run(&self, x: &[f32], m: usize, n: usize, out: Out) {
        let k = self.cols;
        assert!(available(), "packed matmul needs AVX-512");
        assert_eq!(x.len(), m * k, "input has {} values, expected {m} x {k}", x.len());
        if m == 0 || n == 0 {
            return;
        }
        if k == 0 {
            let (y, len) = match out {
                Out::Plain(y) => (y, m * n),
                Out::SwiGlu(y) => (y, m * n / 2),
            };
            // SAFETY: the callers checked that `y` holds `len` floats.
            unsafe { std::slice::from_raw_parts_mut(y, len) }.fill(0.0);
            return;
        }
        let tiles = row_tiles(m);
        let xt = pack_rows(x, k, &tiles);
        self.run_packed(&xt, &tiles, m, n, out);
    }

    /// As [`run`](Self::run) for rows already rearranged by [`pack_rows`] (`xt`, `tiles`: `m`
    /// rows of `cols`, `cols > 0`).
    fn run_packed(&self, xt: &[f32], tiles: &[(usize, usize)], m: usize, n: usize, out: Out) {
        let k = self.cols;
        // Gate/up pairs are never split between threads.
        let unit = if matches!(out, Out::SwiGlu(_)) { 2 } else { 1 };
        let units = n.div_ceil(NR) / unit;
        let out = SyncOut(out);
        let run = |u0: usize, u1: usize| {
            let out = &out;
            // SAFETY: AVX-512 checked above, lengths checked against m, n, k (callers: the
            // output); each call writes only the columns of its own panels, and distinct calls
            // get distinct panels.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                avx512::panels(&self.data, n, k, xt, tiles, u0 * unit, u1 * unit, out.0)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (u0, u1, out, xt, tiles);
        };
        if n * k * m < MIN_PARALLEL_WORK {
            run(0, units);
        } else {
            let chunk = units.div_ceil(4 * par::threads()).max(MIN_CHUNK_WORK.div_ceil(unit * NR * k * m));
            par::for_chunks(units, chunk, &run);
        }
    }
}

/// Activation rows `x` `[rows, cols]` rearranged once for the micro-kernel, for several
/// products with [`PackedMatrix`]es of `cols` columns ([`PackedMatrix::matmul_rows`]; a prompt
/// attention multiplies one block of query rows by every block of keys it sees).
pub struct PackedRows {
    rows: usize,
    cols: usize,
    tiles: Vec<(usize, usize)>,
    data: Vec<f32>,
}

impl std::fmt::Debug for PackedRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedRows").field("rows", &self.rows).field("cols", &self.cols).finish()
    }
}

impl PackedRows {
    /// Rearranges a row-major `[rows, cols]` `x`.
    ///
    /// # Panics
    /// When the CPU lacks AVX-512 (check [`available`]) or `x.len() != rows * cols`.
    pub fn pack(x: &[f32], rows: usize, cols: usize) -> Self {
        assert!(available(), "packed matmul needs AVX-512");
        assert_eq!(x.len(), rows * cols, "input has {} values, expected {rows} x {cols}", x.len());
        let tiles = row_tiles(rows);
        let data = pack_rows(x, cols, &tiles);
        Self { rows, cols, tiles, data }
    }

    /// Rows of `x`.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns of `x`.
    pub fn cols(&self) -> usize {
        self.cols
    }
}

impl PackedMatrix {
    /// `y[m, rows] = x · Wᵀ` for rows `x` rearranged once by [`PackedRows::pack`] (the product
    /// of [`matmul`](Self::matmul), to the bit, without rearranging `x` again for each matrix).
    ///
    /// # Panics
    /// When `x` has other than `cols` columns or `y` is not `[x.rows(), rows]`.
    pub fn matmul_rows(&self, x: &PackedRows, y: &mut [f32]) {
        assert_eq!(x.cols, self.cols, "packed rows have {} columns, the matrix {}", x.cols, self.cols);
        let (m, n) = (x.rows, self.rows);
        assert_eq!(y.len(), m * n, "output has {} values, expected {m} x {n}", y.len());
        if m == 0 || n == 0 {
            return;
        }
        self.run_packed(&x.data, &x.tiles, m, n, Out::Plain(y.as_mut_ptr()));
    }
}

impl PackedRows {
    /// The fewest leading rows, at least `rows`, that are whole row tiles (what
    /// [`PackedMatrix::matmul_rows_panel`] computes for `rows`): `rows` itself or up to 11 more.
    pub fn cover(&self, rows: usize) -> usize {
        self.tiles.iter().map(|&(i, r)| i + r).find(|&end| end >= rows).unwrap_or(self.rows)
    }
}

impl PackedMatrix {
    /// Output columns `32·panel..32·panel + w` of the product with the first `p` rows of `x`,
    /// into `y` `[p, w]` (`w`: 32, or what is left of `rows` in the last panel), where `p` is a
    /// whole number of row tiles (from [`PackedRows::cover`]): the same values as those of
    /// [`matmul_rows`](Self::matmul_rows), to the bit, computed on the calling thread.
    ///
    /// # Panics
    /// When `x` has other than `cols` columns, `p` is not a tile boundary of `x`, the panel is
    /// past `rows`, or `y` is not `[p, w]`.
    pub fn matmul_rows_panel(&self, x: &PackedRows, p: usize, panel: usize, y: &mut [f32]) {
        assert_eq!(x.cols, self.cols, "packed rows have {} columns, the matrix {}", x.cols, self.cols);
        let tiles = x.tiles.iter().take_while(|&&(i, _)| i < p).count();
        let end = tiles.checked_sub(1).map_or(0, |t| x.tiles[t].0 + x.tiles[t].1);
        assert_eq!(end, p, "{p} rows are not whole row tiles of {}", x.rows);
        assert!(panel * NR < self.rows, "panel {panel} of {} rows", self.rows);
        let (k, w) = (self.cols, NR.min(self.rows - panel * NR));
        assert_eq!(y.len(), p * w, "output has {} values, expected {p} x {w}", y.len());
        if p == 0 || k == 0 {
            y.fill(0.0);
            return;
        }
        // SAFETY: AVX-512 checked when `x` was packed; the panel's data is a one-panel matrix
        // of `w` rows, `x`'s first `tiles` tiles are `p` rows of `k`, and `y` holds `p × w`.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            let data = &self.data[panel * k * NR..][..k * NR];
            avx512::panels(data, w, k, &x.data[..p * k], &x.tiles[..tiles], 0, 1, Out::Plain(y.as_mut_ptr()))
        };
    }

    /// `y[m, rows] += x · W[.., ..kc]ᵀ` for `x` `[m, kc]` given by columns: `x[r, kk]` is
    /// `xt[kk · ldx + r]` (`m ≤ ldx`), e.g. a block of attention weights laid out key by key,
    /// multiplied by the first `kc` columns of `W` (e.g. values packed by
    /// [`pack_transposed`](Self::pack_transposed)). The kernel broadcasts each tile's values
    /// straight from `xt` and adds into `y` in place, so `x` is never rearranged.
    ///
    /// # Panics
    /// When the CPU lacks AVX-512 (check [`available`]), `kc > cols`, `m > ldx`, `xt` is shorter
    /// than `(kc − 1) · ldx + m` or `y` is not `[m, rows]`.
    pub fn accumulate_by_columns(&self, xt: &[f32], ldx: usize, m: usize, kc: usize, y: &mut [f32]) {
        assert!(available(), "packed matmul needs AVX-512");
        assert!(kc <= self.cols, "{kc} steps of a matrix of {} columns", self.cols);
        assert!(m <= ldx, "{m} rows in columns of stride {ldx}");
        let n = self.rows;
        assert_eq!(y.len(), m * n, "output has {} values, expected {m} x {n}", y.len());
        if m == 0 || n == 0 || kc == 0 {
            return;
        }
        assert!(xt.len() >= (kc - 1) * ldx + m, "{} values hold no {kc} columns of stride {ldx}", xt.len());
        let dst = SyncPtr(y.as_mut_ptr());
        let run = |p0: usize, p1: usize| {
            let dst = &dst;
            // SAFETY: AVX-512 and the lengths of `xt` and `y` checked above, kc ≤ cols; each
            // call adds only into the columns of its own panels, and distinct calls get
            // distinct panels.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                avx512::panels_by_columns(&self.data, n, self.cols, xt.as_ptr(), ldx, m, kc, p0, p1, dst.0)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (p0, p1, dst);
        };
        let panels = n.div_ceil(NR);
        if n * kc * m < MIN_PARALLEL_WORK || panels == 1 {
            run(0, panels);
        } else {
            par::for_chunks(panels, 1, &run);
        }
    }
}

/// Where the kernel writes: `y` `[m, n]` as is, or, for gate/up panel pairs, the SwiGLU of each
/// pair into `[m, n/2]`.
#[derive(Clone, Copy)]
enum Out {
    Plain(*mut f32),
    SwiGlu(*mut f32),
}

/// [`Out`] handed to the pool's threads.
struct SyncOut(Out);
// SAFETY: the pointer is only written through disjoint column ranges, one per job (see `run`).
unsafe impl Sync for SyncOut {}

/// Row tiles of an `m`-row input: 12-row tiles, then the rest as 8, 4, 2 and 1 rows, as
/// `(first row, rows)`.
fn row_tiles(m: usize) -> Vec<(usize, usize)> {
    let mut tiles = Vec::with_capacity(m / MR + 4);
    let mut i = 0;
    for r in [MR, 8, 4, 2, 1] {
        while m - i >= r {
            tiles.push((i, r));
            i += r;
        }
    }
    tiles
}

/// `x` (`[m, k]`) rearranged tile by tile: the tile of rows `i..i+r` becomes `[k][r]` at offset
/// `i * k`, so the micro-kernel reads one contiguous stream instead of `r` rows `k` apart (which
/// land in the same few L1 sets when `k` is a multiple of a page fraction).
fn pack_rows(x: &[f32], k: usize, tiles: &[(usize, usize)]) -> Vec<f32> {
    // SAFETY: the tiles cover all rows of `x`, and each tile's rows are written in full below.
    unsafe { super::vec_written_by(x.len(), |out| pack_rows_into(x, k, tiles, out)) }
}

/// [`pack_rows`] into `out` (`x.len()` floats, all written).
fn pack_rows_into(x: &[f32], k: usize, tiles: &[(usize, usize)], out: &mut [f32]) {
    let dst = SyncPtr(out.as_mut_ptr());
    let pack = |t0: usize, t1: usize| {
        for &(i, r) in &tiles[t0..t1] {
            let dst = &dst;
            // SAFETY: tile `(i, r)` owns `out[i * k..(i + r) * k]`; tiles are disjoint and each
            // range of tiles is handed out once.
            let dst = unsafe { std::slice::from_raw_parts_mut(dst.0.add(i * k), r * k) };
            let src = &x[i * k..(i + r) * k];
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512 is checked by the caller (the matmul needs it); r ≤ 16 (a tile).
            unsafe {
                avx512::transpose_rows(src, r, k, dst)
            };
            #[cfg(not(target_arch = "x86_64"))]
            transpose_rows_scalar(src, r, k, 0, dst);
        }
    };
    par::for_parts(tiles.len(), x.len() >= MIN_PARALLEL_WORK, 2, &pack);
}

/// `dst[kk * r + rr] = src[rr * k + kk]` for `kk` from `from` on (the part the vector path
/// leaves: the last `k % 16`, or all of it without AVX-512).
fn transpose_rows_scalar(src: &[f32], r: usize, k: usize, from: usize, dst: &mut [f32]) {
    for kk in from..k {
        for rr in 0..r {
            dst[kk * r + rr] = src[rr * k + kk];
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Out, KC, MC, MR, NR};

    /// How many k steps ahead of use the panel is prefetched.
    const PREFETCH: usize = 32;

    /// `src` (`r` rows of `k`, `r` ≤ 16) into `dst` as `[k][r]`: per 16 columns, the rows are
    /// loaded as 16 vectors (missing rows zero), transposed in registers (32-bit, then 64-bit
    /// interleaves, then two 128-bit lane shuffles) and each column's first `r` values stored.
    ///
    /// # Safety
    /// AVX-512F present; `src.len() == dst.len() == r * k`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transpose_rows(src: &[f32], r: usize, k: usize, dst: &mut [f32]) {
        debug_assert!(r <= 16 && src.len() == r * k && dst.len() == r * k);
        if r == 1 {
            dst.copy_from_slice(src);
            return;
        }
        let mask: __mmask16 = ((1u32 << r) - 1) as __mmask16;
        let full = k / 16 * 16;
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
        for k0 in (0..full).step_by(16) {
            let mut rows = [_mm512_setzero_ps(); 16];
            for (rr, v) in rows.iter_mut().enumerate().take(r) {
                *v = _mm512_loadu_ps(s.add(rr * k + k0));
            }
            let mut a = [_mm512_setzero_ps(); 16];
            for i in 0..8 {
                a[2 * i] = _mm512_unpacklo_ps(rows[2 * i], rows[2 * i + 1]);
                a[2 * i + 1] = _mm512_unpackhi_ps(rows[2 * i], rows[2 * i + 1]);
            }
            // b[4g + j], lane L: column 4L + j of rows 4g..4g+4
            let mut b = [_mm512_setzero_ps(); 16];
            for g in 0..4 {
                let pd = |v: __m512| _mm512_castps_pd(v);
                let (a0, a1, a2, a3) = (pd(a[4 * g]), pd(a[4 * g + 1]), pd(a[4 * g + 2]), pd(a[4 * g + 3]));
                b[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a0, a2));
                b[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a0, a2));
                b[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(a1, a3));
                b[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(a1, a3));
            }
            for j in 0..4 {
                let c0 = _mm512_shuffle_f32x4::<0x44>(b[j], b[4 + j]);
                let c1 = _mm512_shuffle_f32x4::<0xEE>(b[j], b[4 + j]);
                let c2 = _mm512_shuffle_f32x4::<0x44>(b[8 + j], b[12 + j]);
                let c3 = _mm512_shuffle_f32x4::<0xEE>(b[8 + j], b[12 + j]);
                let cols = [
                    (j, _mm512_shuffle_f32x4::<0x88>(c0, c2)),
                    (4 + j, _mm512_shuffle_f32x4::<0xDD>(c0, c2)),
                    (8 + j, _mm512_shuffle_f32x4::<0x88>(c1, c3)),
                    (12 + j, _mm512_shuffle_f32x4::<0xDD>(c1, c3)),
                ];
                for (c, v) in cols {
                    _mm512_mask_storeu_ps(d.add((k0 + c) * r), mask, v);
                }
            }
        }
        super::transpose_rows_scalar(src, r, k, full, dst);
    }

    /// Columns of panels `p0..p1` of `y` (`[m, n]`) for all `m` rows; with [`Out::SwiGlu`],
    /// `p0` and `p1` are even and panel pairs become the activation's columns `p/2 · 32..`.
    ///
    /// # Safety
    /// AVX-512F present; `data` holds the panels of an `[n, k]` weight, `x` is `[m, k]`, the
    /// output points to `m * n` floats (`m * n / 2` for SwiGLU) and no one else writes these
    /// panels' columns meanwhile.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn panels(
        data: &[f32],
        n: usize,
        k: usize,
        xt: &[f32],
        tiles: &[(usize, usize)],
        p0: usize,
        p1: usize,
        out: Out,
    ) {
        // With one block of rows there is no reuse to block for: one pass reads each panel as a
        // single sequential stream. Otherwise each panel is walked in passes of at most `KC`
        // over `k`, so that the slice the block's tiles share stays in L1; a tile's sums go out
        // to `y` (or the SwiGLU scratch) between passes and come back unchanged, so the passes
        // give the same bits as one.
        let kc_even = if tiles.len() <= 2 { k } else { k.div_ceil(k.div_ceil(KC)) };
        // SwiGLU: a block's gate tiles, then its up tiles, `[MC][NR]` each.
        let gated = matches!(out, Out::SwiGlu(_));
        let mut scratch = if gated { vec![0f32; 2 * MC * NR] } else { Vec::new() };
        for block in tiles.chunks(MC / MR) {
            let row0 = block[0].0;
            for p in p0..p1 {
                let cols = NR.min(n - p * NR);
                for k0 in (0..k).step_by(kc_even) {
                    let kc = kc_even.min(k - k0);
                    let b = data.as_ptr().add(p * k * NR + k0 * NR);
                    for (t, &(i, r)) in block.iter().enumerate() {
                        let xp = xt.as_ptr().add(i * k + k0 * r);
                        let (yp, ldy) = match out {
                            Out::Plain(y) => (y.add(i * n + p * NR), n),
                            Out::SwiGlu(_) => (scratch.as_mut_ptr().add(((p % 2) * MC + i - row0) * NR), NR),
                        };
                        tile_of_height(r, t == 0, b, xp, r, kc, yp, ldy, cols, k0 > 0);
                    }
                }
                if let (Out::SwiGlu(o), 1) = (out, p % 2) {
                    let (gate, up) = scratch.split_at(MC * NR);
                    // the block's tiles are consecutive rows from row0
                    let (rows, inter) = (block.iter().map(|&(_, r)| r).sum::<usize>(), n / 2);
                    for row in 0..rows {
                        let dst = std::slice::from_raw_parts_mut(o.add((row0 + row) * inter + p / 2 * NR), NR);
                        crate::activations::swiglu_row(&gate[row * NR..][..NR], &up[row * NR..][..NR], dst);
                    }
                }
            }
        }
    }

    /// `y[m, n] += x · W[.., ..kc]ᵀ` for the columns of panels `p0..p1`, where `x` (`[m, kc]`)
    /// is given by columns: `x[r, kk]` at `xt[kk · ldx + r]` (so each step of a 12-row tile
    /// broadcasts 12 neighbouring values, as from a rearranged tile, with no rearranging).
    ///
    /// # Safety
    /// AVX-512F present; `data` holds the panels of an `[n, k]` weight with `kc ≤ k`; `xt` points
    /// to `(kc − 1) · ldx + m` floats (`m ≤ ldx`), `y` to `m · n`; no one else writes these
    /// panels' columns meanwhile.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn panels_by_columns(
        data: &[f32],
        n: usize,
        k: usize,
        xt: *const f32,
        ldx: usize,
        m: usize,
        kc: usize,
        p0: usize,
        p1: usize,
        y: *mut f32,
    ) {
        let tiles = super::row_tiles(m);
        for k0 in (0..kc).step_by(KC) {
            let steps = KC.min(kc - k0);
            for block in tiles.chunks(MC / MR) {
                for p in p0..p1 {
                    let b = data.as_ptr().add(p * k * NR + k0 * NR);
                    let cols = NR.min(n - p * NR);
                    for (t, &(i, r)) in block.iter().enumerate() {
                        let (xp, yp) = (xt.add(k0 * ldx + i), y.add(i * n + p * NR));
                        tile_of_height(r, t == 0, b, xp, ldx, steps, yp, n, cols, true);
                    }
                }
            }
        }
    }

    /// [`tile`] for a tile of `r` rows (12, 8, 4, 2 or 1; see [`super::row_tiles`]).
    ///
    /// # Safety
    /// As [`tile`].
    #[target_feature(enable = "avx512f")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_of_height(
        r: usize,
        first: bool,
        b: *const f32,
        xp: *const f32,
        ldx: usize,
        kc: usize,
        yp: *mut f32,
        ldy: usize,
        cols: usize,
        acc: bool,
    ) {
        match (r, first) {
            (MR, true) => tile::<MR, true>(b, xp, ldx, kc, yp, ldy, cols, acc),
            (MR, false) => tile::<MR, false>(b, xp, ldx, kc, yp, ldy, cols, acc),
            (8, true) => tile::<8, true>(b, xp, ldx, kc, yp, ldy, cols, acc),
            (8, false) => tile::<8, false>(b, xp, ldx, kc, yp, ldy, cols, acc),
            (4, true) => tile::<4, true>(b, xp, ldx, kc, yp, ldy, cols, acc),
            (4, false) => tile::<4, false>(b, xp, ldx, kc, yp, ldy, cols, acc),
            (2, true) => tile::<2, true>(b, xp, ldx, kc, yp, ldy, cols, acc),
            (2, false) => tile::<2, false>(b, xp, ldx, kc, yp, ldy, cols, acc),
            (_, true) => tile::<1, true>(b, xp, ldx, kc, yp, ldy, cols, acc),
            (_, false) => tile::<1, false>(b, xp, ldx, kc, yp, ldy, cols, acc),
        }
    }

    /// `R` rows of `y` (from `yp`, stride `ldy`, `cols` valid columns) += or = a row tile of `x`
    /// given by columns (`xp`: `[kc][ldx]`, the tile's `R` values of step `kk` at `xp + kk·ldx`;
    /// `ldx = R` for a tile rearranged by [`pack_rows`](super::pack_rows)) times a panel slice
    /// `b` (`[kc][32]`). `FIRST`: the first tile over this slice, which brings it in from memory
    /// (later tiles find it in L1).
    ///
    /// Written out row by row with named accumulators so that they stay in registers.
    #[target_feature(enable = "avx512f")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const R: usize, const FIRST: bool>(
        b: *const f32,
        xp: *const f32,
        ldx: usize,
        kc: usize,
        yp: *mut f32,
        ldy: usize,
        cols: usize,
        accumulate: bool,
    ) {
        let m0: __mmask16 = if cols >= 16 { !0 } else { (1u16 << cols) - 1 };
        let m1: __mmask16 = if cols >= NR {
            !0
        } else if cols > 16 {
            (1u16 << (cols - 16)) - 1
        } else {
            0
        };
        let z = _mm512_setzero_ps();
        let (mut c0a, mut c0b, mut c1a, mut c1b, mut c2a, mut c2b, mut c3a, mut c3b) = (z, z, z, z, z, z, z, z);
        let (mut c4a, mut c4b, mut c5a, mut c5b, mut c6a, mut c6b, mut c7a, mut c7b) = (z, z, z, z, z, z, z, z);
        let (mut c8a, mut c8b, mut c9a, mut c9b, mut c10a, mut c10b, mut c11a, mut c11b) = (z, z, z, z, z, z, z, z);
        macro_rules! each_row {
            ($mac:ident) => {
                $mac!(0, c0a, c0b);
                $mac!(1, c1a, c1b);
                $mac!(2, c2a, c2b);
                $mac!(3, c3a, c3b);
                $mac!(4, c4a, c4b);
                $mac!(5, c5a, c5b);
                $mac!(6, c6a, c6b);
                $mac!(7, c7a, c7b);
                $mac!(8, c8a, c8b);
                $mac!(9, c9a, c9b);
                $mac!(10, c10a, c10b);
                $mac!(11, c11a, c11b);
            };
        }
        if accumulate {
            macro_rules! load {
                ($r:literal, $a:ident, $b:ident) => {
                    if R > $r {
                        $a = _mm512_maskz_loadu_ps(m0, yp.add($r * ldy));
                        $b = _mm512_maskz_loadu_ps(m1, yp.add($r * ldy + 16));
                    }
                };
            }
            each_row!(load);
        }
        for kk in 0..kc {
            if FIRST {
                // The first tile streams the panel from memory: fetch it 4 KiB ahead of use
                // (past the slice's end that is the next panel's start; prefetches never fault).
                _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add((kk + PREFETCH) * NR) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add((kk + PREFETCH) * NR + 16) as *const i8);
            }
            let b0 = _mm512_loadu_ps(b.add(kk * NR));
            let b1 = _mm512_loadu_ps(b.add(kk * NR + 16));
            macro_rules! fma {
                ($r:literal, $a:ident, $b:ident) => {
                    if R > $r {
                        let a = _mm512_set1_ps(*xp.add(kk * ldx + $r));
                        $a = _mm512_fmadd_ps(a, b0, $a);
                        $b = _mm512_fmadd_ps(a, b1, $b);
                    }
                };
            }
            each_row!(fma);
        }
        macro_rules! store {
            ($r:literal, $a:ident, $b:ident) => {
                if R > $r {
                    _mm512_mask_storeu_ps(yp.add($r * ldy), m0, $a);
                    if m1 != 0 {
                        _mm512_mask_storeu_ps(yp.add($r * ldy + 16), m1, $b);
                    }
                }
            };
        }
        each_row!(store);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        (0..rows * cols).map(|i| a[(i % rows) * cols + i / rows]).collect()
    }

    #[test]
    fn packing_round_trips() {
        for &(n, k) in &[(1usize, 1usize), (33, 5), (64, 300), (70, 1)] {
            let w = values(n * k, 11);
            assert_eq!(PackedMatrix::pack(&w, n, k).unpack(), w, "n={n} k={k}");
        }
    }

    #[test]
    fn packing_a_transpose_equals_packing_the_transposed_matrix() {
        for &(ra, ca) in &[(1usize, 1usize), (5, 33), (300, 64), (1, 70), (40, 96)] {
            let a = values(ra * ca, 5);
            let at: Vec<f32> = (0..ca * ra).map(|i| a[(i % ra) * ca + i / ra]).collect();
            assert_eq!(
                PackedMatrix::pack_transposed(&a, ra, ca).data,
                PackedMatrix::pack(&at, ca, ra).data,
                "{ra}x{ca}"
            );
        }
    }

    /// Rows rearranged once and multiplied by several matrices give, to the bit, what `matmul`
    /// gives rearranging them per call (tiles of every size, partial panels).
    #[test]
    fn packing_rows_once_equals_packing_per_call() {
        if !available() {
            return;
        }
        for &(m, k) in &[(1usize, 64usize), (19, 7), (192, 64), (200, 256)] {
            let x = values(m * k, 3 + m as u64);
            let rows = PackedRows::pack(&x, m, k);
            assert_eq!((rows.rows(), rows.cols()), (m, k));
            for n in [1usize, 40, 256] {
                let w = PackedMatrix::pack(&values(n * k, 7 + n as u64), n, k);
                let mut once = vec![f32::NAN; m * n];
                w.matmul_rows(&rows, &mut once);
                assert_eq!(once, w.matmul_to_vec(&x, m), "m={m} k={k} n={n}");
            }
        }
    }

    /// Weights given by columns (stride above the row count, fewer steps than the matrix has
    /// columns, partial panels, every tile height) added into `y` in place match f64 sums.
    #[test]
    fn accumulate_by_columns_matches_f64() {
        if !available() {
            return;
        }
        for &(n, k) in &[(64usize, 240usize), (40, 100), (33, 7), (96, 1600)] {
            let w = values(n * k, (n + k) as u64);
            let packed = PackedMatrix::pack_transposed(&transpose(&w, n, k), k, n);
            for m in [1usize, 5, 12, 13, 32, 37, 192] {
                for (ldx, kc) in [(m, k), (m + 3, k / 2 + 1)] {
                    let xt = values((kc - 1) * ldx + m, (m * 3 + kc) as u64);
                    let y0 = values(m * n, m as u64 + 1);
                    let mut y = y0.clone();
                    packed.accumulate_by_columns(&xt, ldx, m, kc, &mut y);
                    for r in 0..m {
                        for j in 0..n {
                            let dot: f64 = (0..kc).map(|t| xt[t * ldx + r] as f64 * w[j * k + t] as f64).sum();
                            let want = y0[r * n + j] as f64 + dot;
                            let got = y[r * n + j] as f64;
                            assert!(
                                (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                                "n={n} k={k} m={m} ldx={ldx} kc={kc} y[{r},{j}] = {got}, want {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// One panel of the product with a prefix of packed rows gives, to the bit, those columns
    /// of the full product's first rows; `cover` rounds up to whole row tiles.
    #[test]
    fn one_panel_of_a_row_prefix_equals_the_full_product() {
        if !available() {
            return;
        }
        for &(rows, n, k) in &[(240usize, 192usize, 64usize), (100, 40, 33), (19, 32, 5), (7, 70, 64)] {
            let x = values(rows * k, (rows + n) as u64);
            let packed_rows = PackedRows::pack(&x, rows, k);
            let w = PackedMatrix::pack(&values(n * k, k as u64), n, k);
            let mut full = vec![f32::NAN; rows * n];
            w.matmul_rows(&packed_rows, &mut full);
            let ends: Vec<usize> = row_tiles(rows).iter().map(|&(i, r)| i + r).collect();
            for want_rows in [1usize, 12, 13, rows].map(|w| w.min(rows)) {
                let p = packed_rows.cover(want_rows);
                assert!(ends.contains(&p) && p >= want_rows && p < want_rows + 12, "cover({want_rows}) = {p}");
                for panel in 0..n.div_ceil(32) {
                    let cw = 32.min(n - panel * 32);
                    let mut y = vec![f32::NAN; p * cw];
                    w.matmul_rows_panel(&packed_rows, p, panel, &mut y);
                    for r in 0..p {
                        assert_eq!(
                            y[r * cw..][..cw],
                            full[r * n + panel * 32..][..cw],
                            "{rows}x{n}x{k} p={p} panel {panel} row {r}"
                        );
                    }
                }
            }
        }
    }

    /// Row counts around every tile size and block edge, widths around KC, output widths with
    /// partial panels, one-thread and pooled sizes, against f64 sums.
    #[test]
    fn packed_matmul_matches_f64_reference() {
        if !available() {
            eprintln!("no AVX-512: packed matmul not used on this CPU");
            return;
        }
        let shapes =
            [(1usize, 1usize), (5, 7), (33, 17), (64, 576), (200, 256), (576, 600), (130, 100), (48, 1536), (40, 1600)];
        let ms = [1usize, 2, 3, 4, 5, 7, 8, 11, 12, 13, 16, 23, 31, 119, 120, 121, 250, 256, 377];
        for &(n, k) in &shapes {
            let w = values(n * k, (n * 31 + k) as u64);
            let packed = PackedMatrix::pack(&w, n, k);
            for &m in &ms {
                let x = values(m * k, (m * 7 + k) as u64);
                let mut y = vec![f32::NAN; m * n];
                packed.matmul(&x, m, &mut y);
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k).map(|t| x[i * k + t] as f64 * w[j * k + t] as f64).sum();
                        let got = y[i * n + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "n={n} k={k} m={m} y[{i},{j}] = {got}, want {want}"
                        );
                    }
                }
            }
        }
    }

    /// The register transpose gives exactly the scalar rearrangement, for every tile height and
    /// widths with and without a remainder of 16.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn row_tiles_transpose_like_the_scalar_loop() {
        if !available() {
            return;
        }
        for r in 1..=16 {
            for k in [1usize, 15, 16, 17, 48, 100] {
                let src = values(r * k, (r * 100 + k) as u64);
                let mut want = vec![0f32; r * k];
                transpose_rows_scalar(&src, r, k, 0, &mut want);
                let mut got = vec![f32::NAN; r * k];
                // SAFETY: AVX-512 checked above; lengths are r * k.
                unsafe { avx512::transpose_rows(&src, r, k, &mut got) };
                assert_eq!(got, want, "r={r} k={k}");
            }
        }
    }

    /// SwiGLU applied as the up tiles are stored equals the two products followed by the
    /// activation (the same sums in the same order), for widths within one pass and beyond, and
    /// a row's result does not depend on the batch.
    #[test]
    fn swiglu_epilogue_equals_separate_products() {
        if !available() {
            return;
        }
        for &(inter, k) in &[(32usize, 7usize), (64, 576), (96, 1600)] {
            let (g, u) = (values(inter * k, 1), values(inter * k, 2));
            let (pg, pu) = (PackedMatrix::pack(&g, inter, k), PackedMatrix::pack(&u, inter, k));
            let both = PackedMatrix::interleave(&pg, &pu).expect("inter is a multiple of 32");
            assert_eq!(both.unpack_interleaved(), (g, u));
            for m in [1usize, 5, 13, 121, 250] {
                let x = values(m * k, m as u64);
                let mut out = vec![f32::NAN; m * inter];
                both.matmul_swiglu(&x, m, &mut out);
                let (mut yg, mut yu, mut want) = (vec![0f32; m * inter], vec![0f32; m * inter], vec![0f32; m * inter]);
                pg.matmul(&x, m, &mut yg);
                pu.matmul(&x, m, &mut yu);
                crate::activations::swiglu(&yg, inter, &yu, inter, m, inter, &mut want);
                assert_eq!(out, want, "inter={inter} k={k} m={m}");
                let mut last = vec![0f32; inter];
                both.matmul_swiglu(&x[(m - 1) * k..], 1, &mut last);
                assert_eq!(last, out[(m - 1) * inter..], "inter={inter} k={k} m={m}: last row alone");
            }
        }
        let odd = PackedMatrix::pack(&values(40 * 8, 3), 40, 8);
        assert!(PackedMatrix::interleave(&odd, &odd).is_none(), "40 outputs are not whole panels");
    }

    /// A row's result is the same whether it is multiplied alone or in a batch (in any tile).
    #[test]
    fn rows_do_not_depend_on_the_batch() {
        if !available() {
            return;
        }
        for (n, k, m) in [(96, 300, 37usize), (96, 300, 300), (40, 1600, 50)] {
            let packed = PackedMatrix::pack(&values(n * k, 5), n, k);
            let x = values(m * k, 9);
            let mut all = vec![0f32; m * n];
            packed.matmul(&x, m, &mut all);
            for i in [0, 1, m / 2, m - 1] {
                let mut one = vec![0f32; n];
                packed.matmul(&x[i * k..(i + 1) * k], 1, &mut one);
                assert_eq!(one, all[i * n..(i + 1) * n], "k={k} m={m} row {i}");
            }
        }
    }

    /// `cargo test --release -p personacore-kernels packed_matmul_bench -- --ignored --nocapture --test-threads=1`:
    /// this kernel against candle's matmul on the default model's shapes.
    #[test]
    #[ignore]
    fn packed_matmul_bench() {
        use candle_core::{Device, Tensor};
        for &(n, k) in &[(576usize, 576usize), (1536, 576), (576, 1536), (49152, 576)] {
            let w = values(n * k, 3);
            let packed = PackedMatrix::pack(&w, n, k);
            let wt = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu).unwrap();
            for &m in &[1usize, 4, 16, 64, 1024] {
                if n == 49152 && m > 16 {
                    continue;
                }
                let x = values(m * k, 5);
                let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
                let mut y = vec![0f32; m * n];
                let iters = (2e9 / (n * k * m) as f64).clamp(5.0, 5000.0) as usize;
                let time = |f: &mut dyn FnMut()| {
                    for _ in 0..iters.div_ceil(10) {
                        f();
                    }
                    let t = std::time::Instant::now();
                    for _ in 0..iters {
                        f();
                    }
                    t.elapsed().as_secs_f64() / iters as f64
                };
                let ours = time(&mut || packed.matmul(std::hint::black_box(&x), m, &mut y));
                let candle = time(&mut || {
                    std::hint::black_box(xt.matmul(&wt.t().unwrap()).unwrap());
                });
                println!(
                    "[{m},{k}] x [{n},{k}]^T: ours {:.1} us ({:.1} GB/s, {:.1} GFLOP/s), candle {:.1} us ({:.1} GFLOP/s), ratio {:.2}x",
                    ours * 1e6,
                    (n * k * 4) as f64 / ours / 1e9,
                    (2 * n * k * m) as f64 / ours / 1e9,
                    candle * 1e6,
                    (2 * n * k * m) as f64 / candle / 1e9,
                    candle / ours
                );
            }
        }
    }

    /// `cargo test --release -p personacore-kernels swiglu_matmul_bench -- --ignored --nocapture`:
    /// the fused gate/up product with SwiGLU on the default model's MLP shape.
    #[test]
    #[ignore]
    fn swiglu_matmul_bench() {
        let (inter, k) = (1536usize, 576usize);
        let (gate, up) = (values(inter * k, 3), values(inter * k, 4));
        let packed = PackedMatrix::interleave(&PackedMatrix::pack(&gate, inter, k), &PackedMatrix::pack(&up, inter, k))
            .expect("interleaved");
        for &m in &[1usize, 16, 64, 512, 1024] {
            let x = values(m * k, 5);
            let mut y = vec![0f32; m * inter];
            let iters = (4e9 / (2 * inter * k * m) as f64).clamp(5.0, 5000.0) as usize;
            for _ in 0..iters.div_ceil(10) {
                packed.matmul_swiglu(&x, m, &mut y);
            }
            let t = std::time::Instant::now();
            for _ in 0..iters {
                packed.matmul_swiglu(std::hint::black_box(&x), m, &mut y);
            }
            let s = t.elapsed().as_secs_f64() / iters as f64;
            println!(
                "swiglu [{m},{k}] x [2x{inter},{k}]^T: {:.1} us, {:.1} GFLOP/s",
                s * 1e6,
                (4 * inter * k * m) as f64 / s / 1e9
            );
        }
    }
}

#[cfg(test)]
mod attention_shapes_bench {
    use super::*;

    /// `RAYON_NUM_THREADS=1 cargo test --release -p personacore-kernels attention_products_bench
    /// -- --ignored --nocapture`: the two products of an f32 prompt attention's unit (192 query
    /// rows, 64 values per head, a key block of 240 or 120) and a deep one, in GFLOP/s.
    #[test]
    #[ignore = "timing; run with --ignored --nocapture"]
    fn attention_products_bench() {
        for (m, d, nk) in [(192usize, 64usize, 240usize), (192, 1536, 240), (192, 64, 120)] {
            let f = |i: usize| ((i * 37 % 101) as f32 / 50.0) - 1.0;
            let keys = PackedRows::pack(&(0..nk * d).map(f).collect::<Vec<_>>(), nk, d);
            let q = PackedMatrix::pack(&(0..m * d).map(|i| f(i + 3)).collect::<Vec<_>>(), m, d);
            let v = PackedMatrix::pack_transposed(&(0..nk * d).map(|i| f(i + 5)).collect::<Vec<_>>(), nk, d);
            let mut s = vec![0f32; nk * m];
            let mut acc = vec![0f32; m * d];
            let iters = 200_000_000 / (m * d * nk);
            let mut best = [f64::MAX; 2];
            for _ in 0..5 {
                let t = std::time::Instant::now();
                for _ in 0..iters {
                    for p in 0..m / 32 {
                        q.matmul_rows_panel(&keys, nk, p, &mut s[p * nk * 32..][..nk * 32]);
                    }
                }
                best[0] = best[0].min(t.elapsed().as_secs_f64() / iters as f64);
                s.iter_mut().for_each(|x| *x *= 1e-3);
                let t = std::time::Instant::now();
                for _ in 0..iters {
                    v.accumulate_by_columns(&s, m, m, nk, &mut acc);
                }
                best[1] = best[1].min(t.elapsed().as_secs_f64() / iters as f64);
            }
            let fl = (2 * m * d * nk) as f64;
            eprintln!("m{m} d{d} nk{nk}: QK {:.1} GFLOP/s | PV {:.1} GFLOP/s", fl / best[0] / 1e9, fl / best[1] / 1e9);
        }
    }
}
