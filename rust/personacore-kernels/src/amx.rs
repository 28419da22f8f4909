//! `y = x Wᵀ` for f32 data on Intel AMX tiles, at "high" precision (bf16x3).
//!
//! Every f32 value `v` is split into two bf16 values, `hi = bf16(v)` and `lo = bf16(v − hi)`, which
//! together carry 16 significant bits. A product is then `x_hi·w_hi + x_hi·w_lo + x_lo·w_hi`
//! (the `x_lo·w_lo` term is below 2⁻¹⁶ of it), each term a bf16 dot product accumulated in f32
//! by `TDPBF16PS`. The relative error of a dot product is ~1e-5 instead of f32's ~1e-7; this is
//! one of the schemes torch's `set_float32_matmul_precision("high")` allows (torch itself keeps
//! plain f32 on CPUs). One AMX tile multiply does 16 × 16 × 32 multiply-adds, so even three of
//! them per product outrun the f32 FMA units on large batches.
//!
//! The weight (`[n, k]`, n and k multiples of 32) is packed at load into panels of 16 output
//! columns; per 32-wide slice of `k` a panel holds a `hi` tile and a `lo` tile of 16 rows × 64
//! bytes in the pair-interleaved layout `TDPBF16PS` reads (row `r`, column `c` = the weights of
//! `k = 2r, 2r+1` for output `c`). The activations are split per call into the same tiles (per
//! block of 16 rows, per k slice: `hi`, then `lo`). Accumulators: two row blocks of 16 × two
//! panels (four C tiles), so consecutive tile multiplies are independent; the eight operand
//! tiles of a k slice are each loaded once (tile loads, not multiplies, are what the unit waits
//! on), and results leave through a contiguous scratch. Threads share out the panel pairs, or,
//! from 256 rows on, the rows, in ranges that shrink as the work runs out, so that a core slowed
//! by a neighbour does not leave the other waiting. Each output row goes through the same
//! sequence of tile operations whatever `m` is, so a row's result does not depend on the other
//! rows of the batch. Measurements: benches/README.md.

use super::par::{self, SyncPtr};

/// Output columns per panel (one tile of f32).
const PANEL: usize = 16;
/// `k` per tile multiply (32 bf16 = 64 bytes per tile row).
const KT: usize = 32;
/// bf16 values per tile (16 rows × 32).
const TILE: usize = 16 * KT;
/// Bytes of split activations per cache block (`rows × k × 4`): the block stays in L2 (2 MiB
/// per core here) while the panels pass.
const BLOCK_BYTES: usize = 1 << 20;
/// From this many rows on, threads split the rows instead of the panels.
const ROW_SPLIT_MIN: usize = 256;
/// Fewest 32-row units a thread takes at a time when splitting rows: each range streams the
/// weight from L3 once and then reuses each panel pair from L2 for all its rows, so ranges stay
/// at least 128 rows long.
const ROW_SPLIT_MIN_CHUNK: usize = 4;
/// Below this many multiply-adds a matmul runs on the calling thread alone.
const MIN_PARALLEL_WORK: usize = 64 * 1024;

/// Whether this CPU and OS run AMX-BF16 tiles (CPUID, XCR0 tile state, and Linux's permission
/// to use tile data, requested once for the process).
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(detect)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    use std::arch::x86_64::{__cpuid_count, _xgetbv};
    // SAFETY: cpuid is always present on x86_64; xgetbv only after checking OSXSAVE.
    unsafe {
        let leaf1 = __cpuid_count(1, 0);
        // AVX512-BF16 (every CPU with AMX-BF16 has it) splits the activations: `split_rows`.
        let avx512 = std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512bf16");
        if leaf1.ecx & (1 << 27) == 0 || !avx512 {
            return false;
        }
        let leaf7 = __cpuid_count(7, 0);
        let (amx_bf16, amx_tile) = (leaf7.edx & (1 << 22) != 0, leaf7.edx & (1 << 24) != 0);
        if !(amx_bf16 && amx_tile && xsave_enabled()) {
            return false;
        }
        let xcr0 = _xgetbv(0);
        if xcr0 & (0b11 << 17) != (0b11 << 17) {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn xsave_enabled() -> bool {
    std::is_x86_feature_detected!("xsave")
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// `v` rounded to the nearest bf16 (ties to even), as bits; NaN stays NaN. Branch-free, so
/// that loops over it vectorize.
#[inline(always)]
fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    let nan = (b & 0x7fff_ffff) > 0x7f80_0000;
    (if nan { (b >> 16) | 0x40 } else { rounded }) as u16
}

/// `(hi, lo)` with `hi = bf16(v)`, `lo = bf16(v − hi)` (`lo = 0` when `hi` is not finite).
#[inline(always)]
fn split(v: f32) -> (u16, u16) {
    let hi = bf16_bits(v);
    let finite = hi & 0x7f80 != 0x7f80;
    let lo = bf16_bits(v - widen(hi));
    (hi, if finite { lo } else { 0 })
}

#[inline(always)]
fn widen(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// A weight `W` `[rows = out, cols = in]` split into bf16 pairs and packed for AMX.
pub struct AmxMatrix {
    rows: usize,
    cols: usize,
    /// Per panel of 16 outputs, per 32-wide k slice: the `hi` tile then the `lo` tile.
    data: Vec<u16>,
}

impl std::fmt::Debug for AmxMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmxMatrix").field("rows", &self.rows).field("cols", &self.cols).finish()
    }
}

impl AmxMatrix {
    /// Whether a `[rows, cols]` weight fits the tile layout (both multiples of 32).
    pub fn supports(rows: usize, cols: usize) -> bool {
        rows > 0 && cols > 0 && rows.is_multiple_of(2 * PANEL) && cols.is_multiple_of(KT)
    }

    /// Splits and packs a row-major `[rows, cols]` weight.
    ///
    /// # Panics
    /// When `w.len() != rows * cols` or the shape is not [`supported`](Self::supports).
    pub fn pack(w: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(w.len(), rows * cols, "weight has {} values, expected {rows} x {cols}", w.len());
        assert!(
            Self::supports(rows, cols),
            "AMX packing needs rows and cols that are multiples of 32, got {rows} x {cols}"
        );
        let slices = cols / KT;
        let mut data = vec![0u16; rows * cols * 2];
        for (p, panel) in data.chunks_exact_mut(slices * 2 * TILE).enumerate() {
            for (s, pair) in panel.chunks_exact_mut(2 * TILE).enumerate() {
                let (hi, lo) = pair.split_at_mut(TILE);
                let (mut sh, mut sl) = ([0u16; KT], [0u16; KT]);
                for c in 0..PANEL {
                    // split the 32 values in a row (a loop that vectorizes), then place the pairs
                    let src = &w[(p * PANEL + c) * cols + s * KT..][..KT];
                    for ((v, h), l) in src.iter().zip(&mut sh).zip(&mut sl) {
                        (*h, *l) = split(*v);
                    }
                    for j in 0..KT / 2 {
                        let at = j * 2 * PANEL + 2 * c;
                        hi[at..at + 2].copy_from_slice(&sh[2 * j..2 * j + 2]);
                        lo[at..at + 2].copy_from_slice(&sl[2 * j..2 * j + 2]);
                    }
                }
            }
        }
        Self { rows, cols, data }
    }

    /// The matrices' rows one after the other (`[Σ rows, cols]`), without re-splitting; `None`
    /// when `parts` is empty or their `cols` differ.
    pub fn stack(parts: &[&AmxMatrix]) -> Option<Self> {
        let cols = parts.first()?.cols;
        if parts.iter().any(|p| p.cols != cols) {
            return None;
        }
        // Each part is whole 16-row panels, stored panel after panel: the stack is the concatenation.
        let data = parts.iter().flat_map(|p| p.data.iter().copied()).collect();
        Some(Self { rows: parts.iter().map(|p| p.rows).sum(), cols, data })
    }

    /// Output features (rows of W).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features (columns of W).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The weight back in row-major `[rows, cols]`, as `hi + lo` (16 significant bits).
    pub fn unpack(&self) -> Vec<f32> {
        let (rows, cols) = (self.rows, self.cols);
        let slices = cols / KT;
        let mut w = vec![0f32; rows * cols];
        for (r, row) in w.chunks_exact_mut(cols).enumerate() {
            let (p, c) = (r / PANEL, r % PANEL);
            for (kk, v) in row.iter_mut().enumerate() {
                let base = (p * slices + kk / KT) * 2 * TILE;
                let at = (kk % KT / 2) * 2 * PANEL + 2 * c + kk % 2;
                *v = widen(self.data[base + at]) + widen(self.data[base + TILE + at]);
            }
        }
        w
    }

    /// `y[m, rows] = x[m, cols] · Wᵀ` (row-major), split across the matmul pool.
    ///
    /// # Panics
    /// When AMX is not [`available`] or a length does not match.
    pub fn matmul(&self, x: &[f32], m: usize, y: &mut [f32]) {
        self.matmul_leading(x, m, self.rows, y);
    }

    /// `y[m, n] = x[m, cols] · W[..n]ᵀ`: the product with the first `n` rows of `W` only (`n` a
    /// multiple of 32 up to `rows`: whole panel pairs, which the packing stores first).
    ///
    /// # Panics
    /// As [`matmul`](Self::matmul), and for any other `n`.
    pub fn matmul_leading(&self, x: &[f32], m: usize, n: usize, y: &mut [f32]) {
        assert!(
            n <= self.rows && n.is_multiple_of(2 * PANEL),
            "{n} leading rows of {} are not whole panel pairs",
            self.rows
        );
        assert_eq!(y.len(), m * n, "output has {} values, expected {m} x {n}", y.len());
        self.run(x, m, n, y.as_mut_ptr(), false);
    }

    /// The gate and up projections of a SwiGLU MLP (`[inter, cols]` each) as one matrix whose
    /// 16-output panels alternate gate, up (so every panel pair the kernel multiplies is a gate
    /// panel and its up panel), for [`matmul_swiglu`](Self::matmul_swiglu); `None` when the two
    /// differ in shape.
    pub fn interleave(gate: &AmxMatrix, up: &AmxMatrix) -> Option<Self> {
        if (gate.rows, gate.cols) != (up.rows, up.cols) {
            return None;
        }
        let panel = gate.cols / KT * 2 * TILE;
        let data = gate
            .data
            .chunks_exact(panel)
            .zip(up.data.chunks_exact(panel))
            .flat_map(|(g, u)| g.iter().chain(u))
            .copied()
            .collect();
        Some(Self { rows: 2 * gate.rows, cols: gate.cols, data })
    }

    /// The gate and up weights (row-major `[inter, cols]` each, as `hi + lo`) of a matrix built
    /// by [`interleave`](Self::interleave).
    pub fn unpack_interleaved(&self) -> (Vec<f32>, Vec<f32>) {
        super::deinterleave_rows(&self.unpack(), self.cols, PANEL)
    }

    /// `out[m, rows/2] = silu(x Gᵀ) ⊙ (x Uᵀ)` for a matrix built by [`interleave`](Self::interleave):
    /// the activation is applied as each block leaves the tiles, so the `[m, 2·inter]` product
    /// never reaches memory.
    ///
    /// # Panics
    /// As [`matmul`](Self::matmul).
    pub fn matmul_swiglu(&self, x: &[f32], m: usize, out: &mut [f32]) {
        assert_eq!(out.len(), m * self.rows / 2, "output has {} values, expected {m} x {}", out.len(), self.rows / 2);
        self.run(x, m, self.rows, out.as_mut_ptr(), true);
    }

    /// [`matmul`](Self::matmul) into a new `[m, rows]` vector (not zeroed first: every value
    /// is written by the tiles).
    ///
    /// # Panics
    /// As [`matmul`](Self::matmul).
    pub fn matmul_to_vec(&self, x: &[f32], m: usize) -> Vec<f32> {
        // SAFETY: `run` stores every row block of every panel pair: all `m × rows` values (rows
        // is a multiple of 32, each tile store writes all of a block's rows).
        unsafe { super::vec_written_by(m * self.rows, |y| self.run(x, m, self.rows, y.as_mut_ptr(), false)) }
    }

    /// [`matmul_swiglu`](Self::matmul_swiglu) into a new `[m, rows/2]` vector.
    ///
    /// # Panics
    /// As [`matmul`](Self::matmul).
    pub fn matmul_swiglu_to_vec(&self, x: &[f32], m: usize) -> Vec<f32> {
        // SAFETY: the interleaved kernel writes all `m × rows/2` values of its output.
        unsafe { super::vec_written_by(m * (self.rows / 2), |out| self.matmul_swiglu(x, m, out)) }
    }

    /// Writes `y` (`m × n` floats at `y`) from the first `n` rows of `W` (a multiple of 32), or,
    /// `gated`, the SwiGLU of each gate/up panel pair (`m × n/2` floats).
    fn run(&self, x: &[f32], m: usize, n: usize, y: *mut f32, gated: bool) {
        let k = self.cols;
        assert!(available(), "AMX matmul needs AMX-BF16 tiles");
        assert_eq!(x.len(), m * k, "input has {} values, expected {m} x {k}", x.len());
        if m == 0 {
            return;
        }
        let pairs = n / (2 * PANEL);
        let width = if gated { n / 2 } else { n };
        let out = SyncPtr(y);
        let threads = par::threads();
        if threads > 1 && m >= ROW_SPLIT_MIN {
            // Many rows: each thread splits and multiplies its own rows against all panels,
            // so the split input stays in the core that wrote it (the weight is read-only and
            // shared through L3).
            let units = m.div_ceil(32);
            let rows_of = |u0: usize, u1: usize| {
                let (r0, r1) = (u0 * 32, (u1 * 32).min(m));
                let xs = split_rows(&x[r0 * k..r1 * k], r1 - r0, k, false);
                let out = &out;
                // SAFETY: as below, with rows r0..r1 (handed out once) instead of pairs.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    tiles::pairs(&self.data, n, k, &xs, r1 - r0, 0, pairs, out.0.add(r0 * width), gated)
                };
            };
            par::for_guided(units, ROW_SPLIT_MIN_CHUNK, &rows_of);
            return;
        }
        let xs = split_rows(x, m, k, n * k * m >= MIN_PARALLEL_WORK);
        self.run_split(&xs, m, n, y, gated);
    }

    /// As [`run`](Self::run) for rows already split by [`split_rows`] (`xs` holds `m` rows of
    /// `cols`), the threads sharing out the panel pairs.
    fn run_split(&self, xs: &[u16], m: usize, n: usize, y: *mut f32, gated: bool) {
        let k = self.cols;
        debug_assert_eq!(xs.len(), m.div_ceil(16) * (k / KT) * 2 * TILE);
        let pairs = n / (2 * PANEL);
        let out = SyncPtr(y);
        let run = |q0: usize, q1: usize| {
            let out = &out;
            // SAFETY: AMX checked by the callers (permission granted for the process); `xs`
            // holds m rows of k split values, `y` holds m × n floats (callers); each call
            // writes only the columns of its own panel pairs, and distinct calls get distinct
            // pairs.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                tiles::pairs(&self.data, n, k, xs, m, q0, q1, out.0, gated)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (q0, q1, out, xs);
        };
        par::for_parts(pairs, n * k * m >= MIN_PARALLEL_WORK, 2, &run);
    }

    /// `y[m, rows] = x · Wᵀ` for rows `x` split once by [`AmxRows::split`] (the product of
    /// [`matmul`](Self::matmul), to the bit, without splitting `x` again for each matrix).
    ///
    /// # Panics
    /// When `x` has other than `cols` columns or `y` is not `[x.rows(), rows]`.
    pub fn matmul_rows(&self, x: &AmxRows, y: &mut [f32]) {
        assert_eq!(x.cols, self.cols, "split rows have {} columns, the matrix {}", x.cols, self.cols);
        assert_eq!(y.len(), x.rows * self.rows, "output has {} values, expected {} x {}", y.len(), x.rows, self.rows);
        if x.rows > 0 {
            self.run_split(&x.data, x.rows, self.rows, y.as_mut_ptr(), false);
        }
    }
}

/// Activation rows `x` `[rows, cols]` split once into bf16 pairs in the tile layout, for
/// several products with [`AmxMatrix`]es of `cols` columns ([`AmxMatrix::matmul_rows`]; a
/// prompt attention multiplies one block of query rows by every block of keys it sees).
pub struct AmxRows {
    rows: usize,
    cols: usize,
    data: Vec<u16>,
}

impl std::fmt::Debug for AmxRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmxRows").field("rows", &self.rows).field("cols", &self.cols).finish()
    }
}

impl AmxRows {
    /// Splits a row-major `[rows, cols]` `x` (on the calling thread).
    ///
    /// # Panics
    /// When AMX is not [`available`], `cols` is not a multiple of 32 or `x.len() != rows * cols`.
    pub fn split(x: &[f32], rows: usize, cols: usize) -> Self {
        assert!(available(), "AMX matmul needs AMX-BF16 tiles");
        assert!(cols.is_multiple_of(KT), "AMX rows need cols that are a multiple of 32, got {cols}");
        assert_eq!(x.len(), rows * cols, "input has {} values, expected {rows} x {cols}", x.len());
        Self { rows, cols, data: split_rows(x, rows, cols, false) }
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

/// `x` `[m, k]` split into tiles: per block of 16 rows, per 32-wide k slice, the `hi` tile then
/// the `lo` tile (16 rows × 32 bf16 bits, contiguous; rows past `m` are zero). Needs AMX
/// [`available`] (which includes AVX512-BF16).
fn split_rows(x: &[f32], m: usize, k: usize, parallel: bool) -> Vec<u16> {
    let blocks = m.div_ceil(16);
    let block_len = k / KT * 2 * TILE;
    let mut out: Vec<u16> = Vec::with_capacity(blocks * block_len);
    let dst = SyncPtr(out.as_mut_ptr().cast::<f32>());
    let conv = |b0: usize, b1: usize| {
        let dst = &dst;
        for b in b0..b1 {
            let row0 = b * 16;
            let rows = 16.min(m - row0);
            // SAFETY: AVX512-BF16 is part of `available`, which every caller checked; block b
            // owns out[b · block_len ..][.. block_len] (within the capacity), handed out once;
            // the rows read are below m.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                split_avx512::block(x[row0 * k..].as_ptr(), rows, k, dst.0.cast::<u16>().add(b * block_len))
            };
            #[cfg(not(target_arch = "x86_64"))]
            unreachable!("AMX is only available on x86-64 ({dst:p}, {rows} rows)");
        }
    };
    par::for_parts(blocks, parallel && m * k >= MIN_PARALLEL_WORK, 2, &conv);
    // SAFETY: every block wrote all of its `block_len` values (rows below m split, the rest zero).
    unsafe { out.set_len(blocks * block_len) };
    out
}

#[cfg(target_arch = "x86_64")]
mod split_avx512 {
    use std::arch::x86_64::*;

    use super::{KT, TILE};

    /// Splits `rows` (≤ 16) rows of `k` floats at `x` into one row block of tiles at `dst`
    /// (`k / 32` slices of `hi` then `lo` tile; rows `rows..16` zero). `VCVTNE2PS2BF16` rounds
    /// to nearest even like [`super::split`], keeps NaN quiet NaN, and treats values below f32's
    /// smallest normal (< 1.2e-38) as zero.
    ///
    /// # Safety
    /// AVX512F/BW/BF16 present; `x` valid for `rows × k` reads, `dst` for `k / 32 · 2 · TILE`
    /// writes; `k` a multiple of 32.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn block(x: *const f32, rows: usize, k: usize, dst: *mut u16) {
        unsafe {
            let exponent = _mm512_set1_epi16(0x7f80);
            for s in 0..k / KT {
                let (hi, lo) = (dst.add(s * 2 * TILE), dst.add(s * 2 * TILE + TILE));
                for r in 0..rows {
                    let src = x.add(r * k + s * KT);
                    let (a, b) = (_mm512_loadu_ps(src), _mm512_loadu_ps(src.add(16)));
                    let h: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(b, a));
                    // hi widened back to f32: bf16 bits in the high half of each lane
                    let wa = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(h)));
                    let wb = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64::<1>(h)));
                    let (ra, rb) =
                        (_mm512_sub_ps(a, _mm512_castsi512_ps(wa)), _mm512_sub_ps(b, _mm512_castsi512_ps(wb)));
                    let l: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(rb, ra));
                    let finite = _mm512_cmpneq_epi16_mask(_mm512_and_si512(h, exponent), exponent);
                    _mm512_storeu_si512(hi.add(r * KT).cast(), h);
                    _mm512_storeu_si512(lo.add(r * KT).cast(), _mm512_maskz_mov_epi16(finite, l));
                }
                // rows past m: zeros (they only feed output rows that are never stored)
                for r in rows..16 {
                    _mm512_storeu_si512(hi.add(r * KT).cast(), _mm512_setzero_si512());
                    _mm512_storeu_si512(lo.add(r * KT).cast(), _mm512_setzero_si512());
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod tiles {
    use std::arch::asm;

    use super::{BLOCK_BYTES, KT, PANEL, TILE};

    /// The 64-byte tile configuration (palette 1): tiles 0–3 are C (`rows` × 16 f32), 4–5 A
    /// (`rows` × 32 bf16), 6–7 B (16 × 32 bf16 in pairs).
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    impl TileConfig {
        fn new(rows: usize) -> Self {
            let mut c = TileConfig { palette: 1, start_row: 0, reserved: [0; 14], colsb: [0; 16], rows: [0; 16] };
            for t in 0..8 {
                c.colsb[t] = 64;
                c.rows[t] = if t >= 6 { 16 } else { rows as u8 };
            }
            c
        }

        /// # Safety
        /// AMX available and permitted.
        unsafe fn load(&self) {
            unsafe { asm!("ldtilecfg [{}]", in(reg) self as *const Self, options(nostack, readonly)) };
        }
    }

    /// Columns of panel pairs `q0..q1` of `y` (`[m, n]`) for all rows; `gated`: `y` is
    /// `[m, n/2]` and pair `q` becomes its columns `16q..16q+16`, `silu(gate) · up`.
    ///
    /// # Safety
    /// AMX-BF16 available and permitted; `data` holds an `[n, k]` [`super::AmxMatrix`], `xs`
    /// is `[m, k]` split by `split_rows`, `y` points to `m * n` floats (`m * n / 2` gated), and
    /// no one else writes these panels' columns meanwhile.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn pairs(
        data: &[u16],
        n: usize,
        k: usize,
        xs: &[u16],
        m: usize,
        q0: usize,
        q1: usize,
        y: *mut f32,
        gated: bool,
    ) {
        let slices = k / KT;
        let panel_len = slices * 2 * TILE;
        let full = TileConfig::new(16);
        let mut configured = 0usize;
        // zeroed once per call, not per block (only what the tiles stored is read back)
        let mut scratch = Scratch([0.0; 4 * 256]);
        // whole pairs of row blocks, 32 at least
        let mb = (BLOCK_BYTES / (4 * k) / 32).max(1) * 32;
        for r0 in (0..m).step_by(mb) {
            let r1 = m.min(r0 + mb);
            for q in q0..q1 {
                let b0 = data[2 * q * panel_len..].as_ptr();
                let b1 = data[(2 * q + 1) * panel_len..].as_ptr();
                let mut i = r0;
                while i < r1 {
                    // Two row blocks share one configuration: a short second block only
                    // happens at the end, and runs alone after a single full one.
                    let rows = (r1 - i).min(16);
                    let two = r1 - i >= 32;
                    if configured != rows {
                        unsafe {
                            if rows == 16 {
                                full.load()
                            } else {
                                TileConfig::new(rows).load()
                            }
                        };
                        configured = rows;
                    }
                    let a = xs[(i / 16) * slices * 2 * TILE..].as_ptr();
                    let (c, width) = if gated {
                        (unsafe { y.add(i * n / 2 + q * PANEL) }, n / 2)
                    } else {
                        (unsafe { y.add(i * n + 2 * q * PANEL) }, n)
                    };
                    let step = Step {
                        a,
                        a_next: slices * 2 * TILE,
                        b0,
                        b1,
                        c,
                        c_stride: 4 * width,
                        rows,
                        gated,
                        scratch: &mut scratch,
                    };
                    unsafe { step.run(slices, two) };
                    i += if two { 32 } else { rows };
                }
            }
        }
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }

    /// One block of `y`: C tiles 0/1 (the 16 rows at `a`, panels `b0`/`b1`) and, for two row
    /// blocks, 2/3 (the next 16 rows, `a_next` values further).
    struct Step {
        a: *const u16,
        a_next: usize,
        b0: *const u16,
        b1: *const u16,
        /// `y` at the block's first row and column; `c_stride` bytes between rows.
        c: *mut f32,
        c_stride: usize,
        /// Rows per block (the tile configuration's).
        rows: usize,
        /// `b0`, `b1` are a gate panel and its up panel: store `silu(gate) · up`, 16 columns.
        gated: bool,
        /// Where the C tiles are stored on their way out.
        scratch: *mut Scratch,
    }

    impl Step {
        /// Accumulates `slices` k slices into the block, from zero, and stores it.
        ///
        /// # Safety
        /// Tiles configured for the block's row count; pointers valid for what they read/write.
        #[inline(always)]
        unsafe fn run(&self, slices: usize, two: bool) {
            let (c, c2, cs) = (self.c, unsafe { self.c.byte_add(16 * self.c_stride) }, self.c_stride);
            let bs = 64usize;
            unsafe {
                asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
                for s in 0..slices {
                    let (pa, pa2) = (self.a.add(2 * TILE * s), self.a.add(self.a_next + 2 * TILE * s));
                    let (p0, p1) = (self.b0.add(2 * TILE * s), self.b1.add(2 * TILE * s));
                    // Every C tile takes (x_hi, w_lo), (x_hi, w_hi), (x_lo, w_hi) in this order
                    // for every row. The operand tiles are visited along the path w_lo – x_hi
                    // – w_hi – x_lo, so each of them is loaded once per slice: 8 tile loads per
                    // 12 multiplies with two row blocks (tile loads, not multiplies, are what
                    // this unit waits on).
                    if two {
                        asm!(
                            "tileloadd tmm6, [{b0l} + {sb}*1]",
                            "tileloadd tmm4, [{ah} + {sb}*1]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tileloadd tmm7, [{b1l} + {sb}*1]",
                            "tdpbf16ps tmm1, tmm4, tmm7",
                            "tileloadd tmm5, [{a2h} + {sb}*1]",
                            "tdpbf16ps tmm2, tmm5, tmm6",
                            "tdpbf16ps tmm3, tmm5, tmm7",
                            "tileloadd tmm6, [{b0h} + {sb}*1]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tdpbf16ps tmm2, tmm5, tmm6",
                            "tileloadd tmm7, [{b1h} + {sb}*1]",
                            "tdpbf16ps tmm1, tmm4, tmm7",
                            "tdpbf16ps tmm3, tmm5, tmm7",
                            "tileloadd tmm4, [{al} + {sb}*1]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tdpbf16ps tmm1, tmm4, tmm7",
                            "tileloadd tmm5, [{a2l} + {sb}*1]",
                            "tdpbf16ps tmm2, tmm5, tmm6",
                            "tdpbf16ps tmm3, tmm5, tmm7",
                            ah = in(reg) pa, al = in(reg) pa.add(TILE), a2h = in(reg) pa2, a2l = in(reg) pa2.add(TILE),
                            b0h = in(reg) p0, b0l = in(reg) p0.add(TILE), b1h = in(reg) p1, b1l = in(reg) p1.add(TILE),
                            sb = in(reg) bs,
                            options(nostack, readonly),
                        );
                    } else {
                        asm!(
                            "tileloadd tmm6, [{b0l} + {sb}*1]",
                            "tileloadd tmm4, [{ah} + {sb}*1]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tileloadd tmm7, [{b1l} + {sb}*1]",
                            "tdpbf16ps tmm1, tmm4, tmm7",
                            "tileloadd tmm6, [{b0h} + {sb}*1]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tileloadd tmm7, [{b1h} + {sb}*1]",
                            "tdpbf16ps tmm1, tmm4, tmm7",
                            "tileloadd tmm4, [{al} + {sb}*1]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tdpbf16ps tmm1, tmm4, tmm7",
                            ah = in(reg) pa, al = in(reg) pa.add(TILE),
                            b0h = in(reg) p0, b0l = in(reg) p0.add(TILE), b1h = in(reg) p1, b1l = in(reg) p1.add(TILE),
                            sb = in(reg) bs,
                            options(nostack, readonly),
                        );
                    }
                }
                // Through a contiguous scratch: a tile store with the output's row stride
                // costs several times one into 64-byte rows (strides of 4 KiB multiples put
                // all 16 rows in one L1 set), and the copy out is cheap.
                let sp = (*self.scratch).0.as_mut_ptr();
                asm!(
                    "tilestored [{p} + {s}*1], tmm0",
                    "tilestored [{p} + {s}*1 + 1024], tmm1",
                    p = in(reg) sp, s = in(reg) 64usize,
                    options(nostack),
                );
                if two {
                    asm!(
                        "tilestored [{p} + {s}*1 + 2048], tmm2",
                        "tilestored [{p} + {s}*1 + 3072], tmm3",
                        p = in(reg) sp, s = in(reg) 64usize,
                        options(nostack),
                    );
                }
                let blocks: &[(usize, *mut f32)] = if two { &[(0, c), (2, c2)] } else { &[(0, c)] };
                for &(t, dst) in blocks {
                    for r in 0..self.rows {
                        let row = dst.byte_add(r * cs);
                        if self.gated {
                            let gate = std::slice::from_raw_parts(sp.add(t * 256 + r * 16), PANEL);
                            let up = std::slice::from_raw_parts(sp.add((t + 1) * 256 + r * 16), PANEL);
                            crate::activations::swiglu_row(gate, up, std::slice::from_raw_parts_mut(row, PANEL));
                        } else {
                            std::ptr::copy_nonoverlapping(sp.add(t * 256 + r * 16), row, PANEL);
                            std::ptr::copy_nonoverlapping(sp.add((t + 1) * 256 + r * 16), row.add(PANEL), PANEL);
                        }
                    }
                }
            }
        }
    }

    /// Four C tiles of 16 × 16 f32, one after the other.
    #[repr(C, align(64))]
    struct Scratch([f32; 4 * 256]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Max |y − exact| over max |exact| row by row must stay at bf16x3 level.
    fn check(m: usize, n: usize, k: usize) {
        if !available() {
            eprintln!("AMX not available: skipped");
            return;
        }
        let x = lcg(1 + m as u64, m * k);
        let w = lcg(7 + n as u64, n * k);
        let a = AmxMatrix::pack(&w, n, k);
        let mut y = vec![f32::NAN; m * n];
        a.matmul(&x, m, &mut y);
        assert_eq!(a.matmul_to_vec(&x, m), y, "m={m}: a fresh output equals a NaN-filled one");
        for i in 0..m {
            let exact: Vec<f64> =
                (0..n).map(|j| (0..k).map(|kk| x[i * k + kk] as f64 * w[j * k + kk] as f64).sum()).collect();
            let scale = exact.iter().fold(0f64, |s, v| s.max(v.abs()));
            for j in 0..n {
                let err = (y[i * n + j] as f64 - exact[j]).abs();
                assert!(
                    err <= 2e-5 * scale.max(1.0),
                    "m={m} n={n} k={k} row {i} col {j}: {} vs {} (scale {scale})",
                    y[i * n + j],
                    exact[j]
                );
            }
        }
    }

    #[test]
    fn matches_f64_at_block_edges() {
        for m in [1, 2, 15, 16, 17, 31, 32, 33, 48, 127, 128, 129, 200] {
            check(m, 64, 96);
        }
        check(40, 960, 576);
        check(300, 64, 1536);
    }

    #[test]
    fn rows_do_not_depend_on_the_batch() {
        if !available() {
            return;
        }
        let (n, k) = (96, 64);
        let x = lcg(3, 37 * k);
        let a = AmxMatrix::pack(&lcg(4, n * k), n, k);
        let mut all = vec![0f32; 37 * n];
        a.matmul(&x, 37, &mut all);
        for i in 0..37 {
            let mut one = vec![0f32; n];
            a.matmul(&x[i * k..(i + 1) * k], 1, &mut one);
            assert_eq!(one, all[i * n..(i + 1) * n], "row {i}");
        }
    }

    /// Rows split once and multiplied by several matrices give, to the bit, what `matmul` gives
    /// splitting them per call (below and above the row-split threshold).
    #[test]
    fn split_once_equals_split_per_call() {
        if !available() {
            return;
        }
        let k = 64;
        for m in [1usize, 17, 192, 300] {
            let x = lcg(40 + m as u64, m * k);
            let rows = AmxRows::split(&x, m, k);
            assert_eq!((rows.rows(), rows.cols()), (m, k));
            for n in [32usize, 64, 256] {
                let a = AmxMatrix::pack(&lcg(50 + n as u64, n * k), n, k);
                let mut once = vec![f32::NAN; m * n];
                a.matmul_rows(&rows, &mut once);
                assert_eq!(once, a.matmul_to_vec(&x, m), "m={m} n={n}");
            }
        }
    }

    /// SwiGLU applied as the blocks leave the tiles equals the two products followed by the
    /// activation, on the panel-pair and the row-split paths, and rows do not depend on the batch.
    #[test]
    fn swiglu_epilogue_equals_separate_products() {
        if !available() {
            return;
        }
        let (inter, k) = (96, 128);
        let (g, u) = (lcg(31, inter * k), lcg(32, inter * k));
        let (ag, au) = (AmxMatrix::pack(&g, inter, k), AmxMatrix::pack(&u, inter, k));
        let both = AmxMatrix::interleave(&ag, &au).expect("same shape");
        assert_eq!(both.unpack_interleaved(), (ag.unpack(), au.unpack()));
        for m in [1usize, 17, 33, 300] {
            let x = lcg(m as u64, m * k);
            let mut out = vec![f32::NAN; m * inter];
            both.matmul_swiglu(&x, m, &mut out);
            let (yg, yu) = (ag.matmul_to_vec(&x, m), au.matmul_to_vec(&x, m));
            let mut want = vec![0f32; m * inter];
            crate::activations::swiglu(&yg, inter, &yu, inter, m, inter, &mut want);
            assert_eq!(out, want, "m={m}");
            let mut last = vec![0f32; inter];
            both.matmul_swiglu(&x[(m - 1) * k..], 1, &mut last);
            assert_eq!(last, out[(m - 1) * inter..], "m={m}: last row alone");
        }
    }

    #[test]
    fn stacking_equals_packing_the_stacked_weight() {
        let (a, b) = (lcg(21, 32 * 64), lcg(22, 64 * 64));
        let stacked =
            AmxMatrix::stack(&[&AmxMatrix::pack(&a, 32, 64), &AmxMatrix::pack(&b, 64, 64)]).expect("same cols");
        let whole = AmxMatrix::pack(&[a, b].concat(), 96, 64);
        assert_eq!((stacked.rows(), stacked.cols()), (96, 64));
        assert_eq!(stacked.data, whole.data);
    }

    /// The vector split of the activations equals the scalar split of the weights, value by value
    /// (normal values, huge ones that round to infinity, infinities, NaN; rows past m zero).
    #[test]
    fn row_split_equals_scalar_split() {
        if !available() {
            return;
        }
        let (m, k) = (21, 96);
        let mut x: Vec<f32> = lcg(5, m * k).iter().map(|v| v * 1e3).collect();
        x[3] = f32::INFINITY;
        x[40] = f32::NEG_INFINITY;
        x[77] = f32::NAN;
        x[100] = f32::MAX;
        x[101] = -3.3e38;
        x[102] = 1.5e-38;
        let xs = split_rows(&x, m, k, false);
        assert_eq!(xs.len(), 2 * (k / KT) * 2 * TILE);
        for i in 0..32 {
            for kk in 0..k {
                let at = (i / 16) * (k / KT) * 2 * TILE + (kk / KT) * 2 * TILE + (i % 16) * KT + kk % KT;
                let (h, l) = (xs[at], xs[at + TILE]);
                if i >= m {
                    assert_eq!((h, l), (0, 0), "row {i} past m");
                } else if x[i * k + kk].is_nan() {
                    assert!(widen(h).is_nan() && l == 0);
                } else {
                    assert_eq!((h, l), split(x[i * k + kk]), "row {i} col {kk}: {}", x[i * k + kk]);
                }
            }
        }
    }

    #[test]
    fn split_pairs_round_trip() {
        let w = lcg(9, 64 * 32);
        let a = AmxMatrix::pack(&w, 64, 32);
        let back = a.unpack();
        for (v, b) in w.iter().zip(&back) {
            assert!((v - b).abs() <= v.abs() * 2f32.powi(-16), "{v} vs {b}");
        }
        assert_eq!(split(f32::INFINITY), (0x7f80, 0));
        assert!(widen(split(f32::NAN).0).is_nan());
    }

    #[test]
    #[ignore = "timing; run with --ignored --nocapture"]
    fn amx_matmul_bench() {
        if !available() {
            return;
        }
        for (m, n, k) in [
            (32, 32, 576),
            (32, 32, 128),
            (128, 256, 576),
            (1024, 3072, 576),
            (1024, 576, 1536),
            (1024, 960, 576),
            (16, 3072, 576),
            (1, 3072, 576),
            (16, 49152, 576),
        ] {
            let x = lcg(1, m * k);
            let w = lcg(2, n * k);
            let a = AmxMatrix::pack(&w, n, k);
            let p = super::super::packed_matmul::PackedMatrix::pack(&w, n, k);
            let mut y = vec![0f32; m * n];
            let reps = (2e10 / (m * n * k) as f64).clamp(3.0, 2000.0) as usize;
            let time = |f: &mut dyn FnMut()| {
                f();
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    f();
                }
                t.elapsed().as_secs_f64() / reps as f64
            };
            let ta = time(&mut || a.matmul(&x, m, &mut y));
            let ts = time(&mut || drop(std::hint::black_box(split_rows(&x, m, k, true))));
            let tp = time(&mut || p.matmul(&x, m, &mut y));
            let gf = |t: f64| 2.0 * (m * n * k) as f64 / t / 1e9;
            eprintln!("m={m:5} n={n:5} k={k:5}: split {:7.1} us amx {:8.1} us {:7.1} GFLOP/s | f32 packed {:8.1} us {:7.1} GFLOP/s | {:.2}x", ts * 1e6, ta * 1e6, gf(ta), tp * 1e6, gf(tp), tp / ta);
        }
    }
}
