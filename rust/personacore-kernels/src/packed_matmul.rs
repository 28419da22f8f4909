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
    data: Panels,
}

/// A matrix's panels, starting on a 64-byte boundary: each k step of a panel (32 f32, 128
/// bytes) is then two whole cache lines, so the micro-kernel's two vector loads per step never
/// straddle a line (the allocator aligns to 16 bytes only, and a split load costs a second L1
/// access). Measured on one core at 2,048 rows, panels 16 bytes off a line against aligned:
/// `[576, 576]` 150.6 → 153.6 GFLOP/s, `[1536, 576]` 142.6 → 146.5, `[576, 1536]` 141.4 → 142.2
/// (medians of 4 alternated runs, CPU time). From 2 MiB on, on huge pages
/// ([`crate::huge_pages`]: a decode step streams every panel once).
type Panels = crate::huge_pages::ZeroedF32;

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
        let mut data = Panels::new(panels * cols * NR);
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
        let mut data = Panels::new(panels * cols * NR);
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
        let mut data = Panels::new(2 * gate.data.len());
        let pairs =
            data.chunks_exact_mut(2 * panel).zip(gate.data.chunks_exact(panel).zip(up.data.chunks_exact(panel)));
        for (pair, (g, u)) in pairs {
            let (gate_panel, up_panel) = pair.split_at_mut(panel);
            gate_panel.copy_from_slice(g);
            up_panel.copy_from_slice(u);
        }
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
        for (bi, block) in tiles.chunks(MC / MR).enumerate() {
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
                        // The first panel of a block reads its rows from L3 (later panels find
                        // them in L2), one tile's slice after another, `12 · k` values apart:
                        // fetch the next tile's slice (the next block's first, after the last)
                        // while this tile runs. Measured on one core at 2,000 rows with the
                        // panel chunks of two threads: +1 to +3% ([576, 576], [960, 576], down,
                        // gate/up), +6% at 8,000 rows (gate/up).
                        let next =
                            if p == p0 { block.get(t + 1).or_else(|| tiles.get((bi + 1) * (MC / MR))) } else { None };
                        let pfx = next.map_or(std::ptr::null(), |&(i2, r2)| xt.as_ptr().wrapping_add(i2 * k + k0 * r2));
                        tile_of_height(r, t == 0, b, xp, r, kc, yp, ldy, cols, k0 > 0, pfx);
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
                        tile_of_height(r, t == 0, b, xp, ldx, steps, yp, n, cols, true, std::ptr::null());
                    }
                }
            }
        }
    }

    /// Bench hook: one 12-row tile, not first, overwriting `y` (`[12][32]`).
    #[cfg(test)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn bench_tile(b: *const f32, xp: *const f32, kc: usize, yp: *mut f32) {
        tile::<MR, false>(b, xp, MR, kc, yp, NR, NR, false, std::ptr::null())
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
        pfx: *const f32,
    ) {
        match (r, first) {
            (MR, true) => tile::<MR, true>(b, xp, ldx, kc, yp, ldy, cols, acc, pfx),
            (MR, false) => tile::<MR, false>(b, xp, ldx, kc, yp, ldy, cols, acc, pfx),
            (8, true) => tile::<8, true>(b, xp, ldx, kc, yp, ldy, cols, acc, pfx),
            (8, false) => tile::<8, false>(b, xp, ldx, kc, yp, ldy, cols, acc, pfx),
            (4, true) => tile::<4, true>(b, xp, ldx, kc, yp, ldy, cols, acc, pfx),
            (4, false) => tile::<4, false>(b, xp, ldx, kc, yp, ldy, cols, acc, pfx),
            (2, true) => tile::<2, true>(b, xp, ldx, kc, yp, ldy, cols, acc, pfx),
            (2, false) => tile::<2, false>(b, xp, ldx, kc, yp, ldy, cols, acc, pfx),
            (_, true) => tile::<1, true>(b, xp, ldx, kc, yp, ldy, cols, acc, pfx),
            (_, false) => tile::<1, false>(b, xp, ldx, kc, yp, ldy, cols, acc, pfx),
        }
    }

    /// `R` rows of `y` (from `yp`, stride `ldy`, `cols` valid columns) += or = a row tile of `x`
    /// given by columns (`xp`: `[kc][ldx]`, the tile's `R` values of step `kk` at `xp + kk·ldx`;
    /// `ldx = R` for a tile rearranged by [`pack_rows`](super::pack_rows)) times a panel slice
    /// `b` (`[kc][32]`). `FIRST`: the first tile over this slice, which brings it in from memory
    /// (later tiles find it in L1). `pfx`, unless null: the start of the next tile's `[kc][R]`
    /// rows, fetched into L2 a line per step as this tile runs (prefetches never fault; L2, not
    /// L1, so that the panel slice the block's tiles share keeps its place in L1).
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
        pfx: *const f32,
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
        let fetch_rows = !pfx.is_null();
        for kk in 0..kc {
            if fetch_rows {
                _mm_prefetch::<_MM_HINT_T1>(pfx.wrapping_add(kk * R) as *const i8);
            }
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
mod tests;

#[cfg(test)]
mod attention_shapes_bench;

#[cfg(test)]
mod kernel_ceiling_bench;
