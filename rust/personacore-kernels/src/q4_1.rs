//! Our own Q4_1 quantized linear layer (`y = x Wᵀ`) for the CPU.
//!
//! candle 0.11's CPU Q4_1 kernel is the scalar `vec_dot_unopt`; this module computes ggml's
//! `ggml_vec_dot_q4_1_q8_1` with SIMD: AVX-512 VNNI when the CPU has it (detected at run time), else
//! AVX2 + FMA + F16C (detected at run time, or known at compile time under `target-cpu=x86-64-v3`), else a
//! portable scalar loop.
//!
//! A GGUF Q4_1 block holds f16 `d`, f16 `m` and 16 bytes of nibbles for 32 weights (value =
//! `d·q + m`; low nibbles are elements 0..16 of the block, high nibbles 16..32). Activations are
//! quantized per row to Q8_1 blocks like ggml (32 values, `d = amax/127`, `q = round(x/d)`,
//! `s = d·Σq`), except that `d` and `s` stay f32 instead of being rounded to f16. One block's dot
//! product is then `d4·d8·Σ q4·q8 + m4·s8`.
//!
//! At load the blocks are repacked (same bytes, no precision change) so that 16 rows are
//! interleaved, as llama.cpp's repacked CPU kernels do: a SIMD register then holds one 4-byte group
//! of nibbles of 16 (or 8) rows, multiplied against 4 broadcast activation bytes; unpacking, scale
//! conversion and accumulation are shared by 16 rows and no horizontal sums are needed.

use half::f16;

use crate::par::{self, SyncPtr};

/// Weights per block.
pub const QK: usize = 32;
/// Bytes per Q4_1 block: f16 d, f16 m, 16 bytes of nibbles.
pub const BLOCK_BYTES: usize = 20;
/// Rows interleaved in the repacked layout.
const G: usize = 16;
/// Bytes of one block of a group of `G` rows in the repacked layout:
/// `d[16]` f16, `m[16]` f16, then for `j` in 0..4 the `j`-th 4 nibble bytes of the 16 rows.
const GROUP_BLOCK_BYTES: usize = G * BLOCK_BYTES;

/// Below this much work (weights × activation rows) a matmul runs on the calling thread alone.
const MIN_PARALLEL_WORK: usize = 64 * 576;
/// Minimum work per chunk handed to a thread.
const MIN_CHUNK_WORK: usize = 32 * 576;

/// Why [`Q4_1Matrix::new`] refused its data: the bytes do not hold a `[rows, cols]` matrix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeError(String);

impl std::fmt::Display for ShapeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ShapeError {}

/// Q4_1 weights `[rows = out, cols = in]` from GGUF/ggml blocks, used for `y = x Wᵀ`.
pub struct Q4_1Matrix {
    /// Repacked blocks: `rows` rounded up to a multiple of 16 (zero rows), groups of 16 rows.
    /// Repacked blocks, on huge pages from 2 MiB on ([`crate::huge_pages`]).
    data: crate::huge_pages::Zeroed<u8>,
    rows: usize,
    cols: usize,
}

impl std::fmt::Debug for Q4_1Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Q4_1Matrix").field("rows", &self.rows).field("cols", &self.cols).finish()
    }
}

/// Offset of block `b` of row `l` (within its group) in a group block: (d, m, nibble dword `j`).
#[inline]
fn d_off(l: usize) -> usize {
    2 * l
}
#[inline]
fn m_off(l: usize) -> usize {
    2 * G + 2 * l
}
#[inline]
fn q_off(l: usize, j: usize) -> usize {
    4 * G + j * 4 * G + 4 * l
}

impl Q4_1Matrix {
    /// Takes GGUF Q4_1 bytes of a `[rows, cols]` matrix (row-major blocks); `cols` must be a
    /// multiple of 32.
    pub fn new(data: &[u8], rows: usize, cols: usize) -> Result<Self, ShapeError> {
        if !cols.is_multiple_of(QK) {
            return Err(ShapeError(format!("Q4_1 matrix: {cols} columns is not a multiple of {QK}")));
        }
        let nb = cols / QK;
        let want = rows * nb * BLOCK_BYTES;
        if data.len() != want {
            return Err(ShapeError(format!(
                "Q4_1 matrix [{rows}, {cols}]: {} bytes of data, expected {want}",
                data.len()
            )));
        }
        let mut packed = crate::huge_pages::Zeroed::<u8>::new(rows.div_ceil(G) * nb * GROUP_BLOCK_BYTES);
        for (r, row) in data.chunks_exact(nb * BLOCK_BYTES).enumerate() {
            let (g, l) = (r / G, r % G);
            for (b, src) in row.chunks_exact(BLOCK_BYTES).enumerate() {
                let dst = &mut packed[(g * nb + b) * GROUP_BLOCK_BYTES..][..GROUP_BLOCK_BYTES];
                dst[d_off(l)..d_off(l) + 2].copy_from_slice(&src[0..2]);
                dst[m_off(l)..m_off(l) + 2].copy_from_slice(&src[2..4]);
                for j in 0..4 {
                    dst[q_off(l, j)..q_off(l, j) + 4].copy_from_slice(&src[4 + 4 * j..8 + 4 * j]);
                }
            }
        }
        Ok(Self { data: packed, rows, cols })
    }

    /// Output features (rows of W).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features (columns of W).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// `x` `[m, cols]` (row-major f32) times Wᵀ: `[m, rows]` row-major.
    ///
    /// # Panics
    /// When `x.len() != m * cols`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_with(select_kernel(), x, m)
    }

    fn matmul_with(&self, kernel: Kernel, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.cols, "Q4_1 matmul: x has {} values, expected {m} x {}", x.len(), self.cols);
        let (rows, cols) = (self.rows, self.cols);
        if m == 0 || rows == 0 {
            return vec![0.0; m * rows];
        }
        let xq = Q8Rows::quantize(x, m, cols);
        let groups = rows.div_ceil(G);
        // Output as [group][x row][16 rows of the group]: each task owns a contiguous slice.
        let mut yt = vec![0f32; groups * G * m];
        let work = rows * cols * m;
        if work < MIN_PARALLEL_WORK {
            kernel(&self.data, 0, groups, &xq, &mut yt);
        } else {
            // Groups are handed out in chunks; see `par` for why not rayon.
            let chunk = groups.div_ceil(4 * par::threads()).max(MIN_CHUNK_WORK.div_ceil(G * cols * m));
            let out = SyncPtr(yt.as_mut_ptr());
            let (data, xq, len) = (&self.data, &xq, yt.len());
            par::for_chunks(groups, chunk, &|g0, g1| {
                let out = &out;
                assert!(g1 * G * m <= len);
                // SAFETY: every chunk of groups is handed out once, so these slices of `yt` never
                // overlap, and `for_chunks` returns only after every worker is done with them.
                let o = unsafe { std::slice::from_raw_parts_mut(out.0.add(g0 * G * m), (g1 - g0) * G * m) };
                kernel(data, g0, g1, xq, o);
            });
        }
        if m == 1 {
            yt.truncate(rows);
            return yt;
        }
        let mut y = vec![0f32; m * rows];
        for (g, blk) in yt.chunks_exact(G * m).enumerate() {
            let n = G.min(rows - g * G);
            for i in 0..m {
                y[i * rows + g * G..][..n].copy_from_slice(&blk[i * G..i * G + n]);
            }
        }
        y
    }

    /// The weights as f32 `[rows, cols]` row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for r in 0..self.rows {
            self.dequantize_row_into(r, &mut out);
        }
        out
    }

    /// Row `r` of the weights as f32 (`cols` values).
    ///
    /// # Panics
    /// When `r >= rows`.
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        assert!(r < self.rows, "Q4_1 row {r} of a matrix of {} rows", self.rows);
        let mut out = Vec::with_capacity(self.cols);
        self.dequantize_row_into(r, &mut out);
        out
    }

    fn dequantize_row_into(&self, r: usize, out: &mut Vec<f32>) {
        let nb = self.cols / QK;
        let (g, l) = (r / G, r % G);
        for b in 0..nb {
            let blk = &self.data[(g * nb + b) * GROUP_BLOCK_BYTES..][..GROUP_BLOCK_BYTES];
            let d = f16::from_le_bytes([blk[d_off(l)], blk[d_off(l) + 1]]).to_f32();
            let m = f16::from_le_bytes([blk[m_off(l)], blk[m_off(l) + 1]]).to_f32();
            let qs = (0..4).flat_map(|j| blk[q_off(l, j)..q_off(l, j) + 4].iter().copied());
            let lo: Vec<f32> = qs.clone().map(|q| (q & 0x0F) as f32 * d + m).collect();
            out.extend(lo);
            out.extend(qs.map(|q| (q >> 4) as f32 * d + m));
        }
    }
}

/// Activation rows quantized to Q8_1 (f32 scales), structure of arrays (also used by
/// [`crate::q8_block`]).
pub(crate) struct Q8Rows {
    /// Blocks per row.
    pub(crate) nb: usize,
    /// `[m, nb * 32]` quantized values.
    pub(crate) qs: Vec<i8>,
    /// `[m, nb]` scales `amax / 127`.
    pub(crate) d: Vec<f32>,
    /// `[m, nb]` `d · Σ qs` per block.
    pub(crate) s: Vec<f32>,
}

impl Q8Rows {
    /// ggml's `quantize_row_q8_1` for each row (f32 scales). Shared by every kernel so they agree.
    pub(crate) fn quantize(x: &[f32], m: usize, cols: usize) -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { Self::quantize_avx2(x, m, cols) };
        }
        Self::quantize_rows(x, m, cols)
    }

    /// [`Self::quantize`] in AVX2 registers, a block of 32 values at a time: the same scale,
    /// the same rounding (half away from zero) and so the same bits for finite inputs. The
    /// portable loop, compiled for the wheel's baseline x86-64, ran scalar and called libm's
    /// `roundf` per value: 16% of a 16-request Q4_1 decode step's CPU.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn quantize_avx2(x: &[f32], m: usize, cols: usize) -> Self {
        use std::arch::x86_64::*;
        let nb = cols / QK;
        let blocks = (m * cols).min(x.len()) / QK;
        let mut qs = vec![0i8; m * cols];
        let mut d = vec![0f32; m * nb];
        let mut s = vec![0f32; m * nb];
        let sign = _mm256_set1_ps(-0.0);
        let half = _mm256_set1_ps(0.5);
        let one = _mm256_set1_ps(1.0);
        // packs_epi32 / packs_epi16 interleave the two 128-bit lanes; this puts them back.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for k in 0..blocks {
            // SAFETY: block `k` is `x[k * QK..(k + 1) * QK]` (`blocks` is clamped to `x`) and
            // the same range of `qs` (length `m * cols` ≥ `blocks * QK`); unaligned loads/stores.
            let p = x.as_ptr().add(k * QK);
            let v =
                [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))];
            let a = v.map(|v| _mm256_andnot_ps(sign, v));
            let mx = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
            let mx4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps::<1>(mx));
            let mx2 = _mm_max_ps(mx4, _mm_movehl_ps(mx4, mx4));
            let amax = _mm_cvtss_f32(_mm_max_ss(mx2, _mm_movehdup_ps(mx2)));
            let db = amax / 127.0;
            let id = if db != 0.0 { 1.0 / db } else { 0.0 };
            let idv = _mm256_set1_ps(id);
            let q = v.map(|v| {
                // round(y) = trunc(y) + sign(y) when |y - trunc(y)| ≥ 0.5 (exact for |y| ≤ 127).
                let y = _mm256_mul_ps(v, idv);
                let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
                let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(y, t));
                let step = _mm256_or_ps(_mm256_and_ps(y, sign), one);
                let up = _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(frac, half), step);
                _mm256_cvtps_epi32(_mm256_add_ps(t, up))
            });
            let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            let sum4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256::<1>(sum));
            let sum2 = _mm_add_epi32(sum4, _mm_shuffle_epi32::<0b01_00_11_10>(sum4));
            let total = _mm_cvtsi128_si32(_mm_add_epi32(sum2, _mm_shuffle_epi32::<0b10_11_00_01>(sum2)));
            let w16 = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
            _mm256_storeu_si256(qs.as_mut_ptr().add(k * QK).cast(), _mm256_permutevar8x32_epi32(w16, order));
            d[k] = db;
            s[k] = db * total as f32;
        }
        Self { nb, qs, d, s }
    }

    #[inline(always)]
    fn quantize_rows(x: &[f32], m: usize, cols: usize) -> Self {
        let nb = cols / QK;
        let mut qs = vec![0i8; m * cols];
        let mut d = vec![0f32; m * nb];
        let mut s = vec![0f32; m * nb];
        for (k, (xs, q)) in x.chunks_exact(QK).zip(qs.chunks_exact_mut(QK)).enumerate() {
            // Eight running maxima so that the loop vectorizes (max is exact: same result).
            let mut mx = [0f32; 8];
            for c in xs.chunks_exact(8) {
                for k in 0..8 {
                    mx[k] = mx[k].max(c[k].abs());
                }
            }
            let amax = mx.iter().fold(0f32, |a, &v| a.max(v));
            let db = amax / 127.0;
            let id = if db != 0.0 { 1.0 / db } else { 0.0 };
            let mut sum = 0i32;
            for (q, &v) in q.iter_mut().zip(xs) {
                *q = (v * id).round() as i8;
                sum += *q as i32;
            }
            d[k] = db;
            s[k] = db * sum as f32;
        }
        Self { nb, qs, d, s }
    }

    pub(crate) fn rows(&self) -> usize {
        self.d.len() / self.nb
    }
}

/// Computes groups `g0..g1` of 16 output rows for every activation row into `out`,
/// laid out `[g1 - g0][m][16]`.
type Kernel = fn(data: &[u8], g0: usize, g1: usize, x: &Q8Rows, out: &mut [f32]);

fn select_kernel() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    {
        if avx512::available() {
            return avx512::groups;
        }
        if avx2::available() {
            return avx2::groups;
        }
    }
    scalar_groups
}

/// Every kernel this CPU can run, by name (for tests and benchmarks).
#[cfg_attr(not(test), allow(dead_code))]
fn kernels() -> Vec<(&'static str, Kernel)> {
    let mut k: Vec<(&'static str, Kernel)> = vec![("scalar", scalar_groups)];
    #[cfg(target_arch = "x86_64")]
    {
        if avx2::available() {
            k.push(("avx2", avx2::groups));
        }
        if avx512::available() {
            k.push(("avx512vnni", avx512::groups));
        }
    }
    k
}

fn check_bounds(data: &[u8], g1: usize, x: &Q8Rows, out: &[f32], g0: usize) {
    assert!(g0 <= g1 && g1 * x.nb * GROUP_BLOCK_BYTES <= data.len() && out.len() >= (g1 - g0) * G * x.rows());
}

/// Portable kernel: see [`Kernel`].
fn scalar_groups(data: &[u8], g0: usize, g1: usize, x: &Q8Rows, out: &mut [f32]) {
    check_bounds(data, g1, x, out, g0);
    let (nb, m) = (x.nb, x.rows());
    for g in g0..g1 {
        for i in 0..m {
            let xq = &x.qs[i * nb * QK..(i + 1) * nb * QK];
            for l in 0..G {
                let mut sumf = 0f32;
                let mut summ = 0f32;
                for b in 0..nb {
                    let blk = &data[(g * nb + b) * GROUP_BLOCK_BYTES..][..GROUP_BLOCK_BYTES];
                    let d4 = f16::from_le_bytes([blk[d_off(l)], blk[d_off(l) + 1]]).to_f32();
                    let m4 = f16::from_le_bytes([blk[m_off(l)], blk[m_off(l) + 1]]).to_f32();
                    let xb = &xq[b * QK..(b + 1) * QK];
                    let mut sumi = 0i32;
                    for j in 0..4 {
                        for t in 0..4 {
                            let q = blk[q_off(l, j) + t];
                            sumi +=
                                (q & 0x0F) as i32 * xb[4 * j + t] as i32 + (q >> 4) as i32 * xb[16 + 4 * j + t] as i32;
                        }
                    }
                    sumf += sumi as f32 * (d4 * x.d[i * nb + b]);
                    summ += m4 * x.s[i * nb + b];
                }
                out[((g - g0) * m + i) * G + l] = sumf + summ;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{check_bounds, Q8Rows, G, GROUP_BLOCK_BYTES, QK};

    pub(super) fn available() -> bool {
        cfg!(all(target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))
            || (is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c"))
    }

    #[inline(always)]
    unsafe fn bcast(p: *const i8) -> __m256i {
        unsafe { _mm256_set1_epi32((p as *const i32).read_unaligned()) }
    }

    /// Half `h` (8 rows) of the group at `gp` against activation rows `i0..i0 + C`: 8 sums per
    /// activation row, stored at `o + 16 c + 8 h`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::needless_range_loop)] // indices keep the lanes of the tile side by side
    unsafe fn tile<const C: usize>(gp: *const u8, h: usize, nb: usize, x: &Q8Rows, i0: usize, o: *mut f32) {
        let mask = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); C];
        for b in 0..nb {
            unsafe {
                let p = gp.add(b * GROUP_BLOCK_BYTES);
                let d4 = _mm256_cvtph_ps(_mm_loadu_si128(p.add(16 * h).cast()));
                let m4 = _mm256_cvtph_ps(_mm_loadu_si128(p.add(2 * G + 16 * h).cast()));
                // Σ over the block of q4·q8 in i16: at most 8 · 2 · 15 · 127 = 30480 < 32768.
                let mut p16 = [_mm256_setzero_si256(); C];
                for j in 0..4 {
                    let w = _mm256_loadu_si256(p.add(4 * G + j * 4 * G + 32 * h).cast());
                    let lo = _mm256_and_si256(w, mask);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(w), mask);
                    for c in 0..C {
                        let xq = x.qs.as_ptr().add(((i0 + c) * nb + b) * QK);
                        p16[c] = _mm256_add_epi16(p16[c], _mm256_maddubs_epi16(lo, bcast(xq.add(4 * j))));
                        p16[c] = _mm256_add_epi16(p16[c], _mm256_maddubs_epi16(hi, bcast(xq.add(16 + 4 * j))));
                    }
                }
                for c in 0..C {
                    let k = (i0 + c) * nb + b;
                    let f = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16[c], ones));
                    acc[c] = _mm256_fmadd_ps(f, _mm256_mul_ps(d4, _mm256_set1_ps(*x.d.get_unchecked(k))), acc[c]);
                    acc[c] = _mm256_fmadd_ps(m4, _mm256_set1_ps(*x.s.get_unchecked(k)), acc[c]);
                }
            }
        }
        for c in 0..C {
            unsafe { _mm256_storeu_ps(o.add(c * G + 8 * h), acc[c]) };
        }
    }

    /// AVX2 kernel: see [`super::Kernel`].
    pub(super) fn groups(data: &[u8], g0: usize, g1: usize, x: &Q8Rows, out: &mut [f32]) {
        check_bounds(data, g1, x, out, g0);
        assert!(available());
        let (nb, m) = (x.nb, x.rows());
        for g in g0..g1 {
            let gp = data[g * nb * GROUP_BLOCK_BYTES..].as_ptr();
            let o = &mut out[(g - g0) * m * G..(g - g0 + 1) * m * G];
            for h in 0..2 {
                for_row_tiles!(m, |i, C| {
                    // SAFETY: bounds checked above (groups in `data`, activation rows in `x`, and
                    // `o` holds `m * 16` values with `i + C <= m`); CPU features checked by `available`.
                    unsafe { tile::<C>(gp, h, nb, x, i, o.as_mut_ptr().add(i * G)) };
                });
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{check_bounds, Q8Rows, G, GROUP_BLOCK_BYTES, QK};

    pub(super) fn available() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("f16c")
            && is_x86_feature_detected!("fma")
    }

    #[inline(always)]
    unsafe fn bcast(p: *const i8) -> __m512i {
        unsafe { _mm512_set1_epi32((p as *const i32).read_unaligned()) }
    }

    /// The 16 rows of the group at `gp` against activation rows `i0..i0 + C`: 16 sums per
    /// activation row, stored at `o + 16 c`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    unsafe fn tile<const C: usize>(gp: *const u8, nb: usize, x: &Q8Rows, i0: usize, o: *mut f32) {
        let mask_lo = _mm512_set1_epi8(0x0F);
        let mask_hi = _mm512_set1_epi8(0xF0u8 as i8);
        let mut acc = [_mm512_setzero_ps(); C];
        let mut accm = [_mm512_setzero_ps(); C];
        for b in 0..nb {
            unsafe {
                let p = gp.add(b * GROUP_BLOCK_BYTES);
                let d4 = _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()));
                let m4 = _mm512_cvtph_ps(_mm256_loadu_si256(p.add(2 * G).cast()));
                let mut lo = [_mm512_setzero_si512(); 4];
                let mut hi = [_mm512_setzero_si512(); 4];
                for j in 0..4 {
                    let w = _mm512_loadu_si512(p.add(4 * G + j * 4 * G).cast());
                    lo[j] = _mm512_and_si512(w, mask_lo);
                    // 16 × the high nibble: no shift here, one exact shift of the sums below.
                    hi[j] = _mm512_and_si512(w, mask_hi);
                }
                for c in 0..C {
                    let xq = x.qs.as_ptr().add(((i0 + c) * nb + b) * QK);
                    // Two dependency chains of unsigned-nibble × signed-byte dot products.
                    let mut s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[0], bcast(xq));
                    let mut s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi[0], bcast(xq.add(16)));
                    for j in 1..4 {
                        s0 = _mm512_dpbusd_epi32(s0, lo[j], bcast(xq.add(4 * j)));
                        s1 = _mm512_dpbusd_epi32(s1, hi[j], bcast(xq.add(16 + 4 * j)));
                    }
                    let k = (i0 + c) * nb + b;
                    // s1 = 16 · Σ hi·q8 (|s1| < 2^31), so the shift is exact.
                    let f = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, _mm512_srai_epi32::<4>(s1)));
                    acc[c] = _mm512_fmadd_ps(f, _mm512_mul_ps(d4, _mm512_set1_ps(*x.d.get_unchecked(k))), acc[c]);
                    accm[c] = _mm512_fmadd_ps(m4, _mm512_set1_ps(*x.s.get_unchecked(k)), accm[c]);
                }
            }
        }
        for c in 0..C {
            unsafe { _mm512_storeu_ps(o.add(c * G).cast(), _mm512_add_ps(acc[c], accm[c])) };
        }
    }

    /// AVX-512 VNNI kernel: see [`super::Kernel`].
    pub(super) fn groups(data: &[u8], g0: usize, g1: usize, x: &Q8Rows, out: &mut [f32]) {
        check_bounds(data, g1, x, out, g0);
        assert!(available());
        let (nb, m) = (x.nb, x.rows());
        for g in g0..g1 {
            let gp = data[g * nb * GROUP_BLOCK_BYTES..].as_ptr();
            let o = &mut out[(g - g0) * m * G..(g - g0 + 1) * m * G];
            for_row_tiles!(m, |i, C| {
                // SAFETY: bounds checked above (groups in `data`, activation rows in `x`, and `o`
                // holds `m * 16` values with `i + C <= m`); CPU features checked by `available`.
                unsafe { tile::<C>(gp, nb, x, i, o.as_mut_ptr().add(i * G)) };
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small deterministic generator (xorshift), uniform in [-1, 1).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
        fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.next()).collect()
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn activation_rows_quantize_to_the_same_bits_with_avx2() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        // Values exactly halfway between two steps too: round() takes them away from zero.
        let mut x = rng.vec(3 * 4 * QK);
        x[5] = 63.5 / 127.0;
        x[6] = -63.5 / 127.0;
        x[QK - 1] = 1.0;
        // An all-zero block (scale 0, values 0) and a tiny one (its own scale).
        x[2 * QK..3 * QK].fill(0.0);
        x[3 * QK] = -1e-30;
        // SAFETY: AVX2 checked above.
        let a = unsafe { Q8Rows::quantize_avx2(&x, 3, 4 * QK) };
        let b = Q8Rows::quantize_rows(&x, 3, 4 * QK);
        assert_eq!(a.qs, b.qs);
        assert_eq!(
            a.d.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            b.d.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(
            a.s.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            b.s.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!((a.qs[5], a.qs[6]), (64, -64));
        assert!(a.qs[2 * QK..3 * QK].iter().all(|&q| q == 0) && a.d[2] == 0.0);
    }

    /// ggml's `quantize_row_q4_1_ref`.
    fn quantize_q4_1(w: &[f32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(w.len() / QK * BLOCK_BYTES);
        for xs in w.chunks_exact(QK) {
            let min = xs.iter().cloned().fold(f32::INFINITY, f32::min);
            let max = xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let d = (max - min) / 15.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
            for j in 0..QK / 2 {
                let q0 = (((xs[j] - min) * id + 0.5) as u8).min(15);
                let q1 = (((xs[j + QK / 2] - min) * id + 0.5) as u8).min(15);
                out.push(q0 | (q1 << 4));
            }
        }
        out
    }

    /// Independent scalar reference: Q8_1 quantization of each x row and the integer dot product,
    /// plus Σ|terms| per output (the scale of float rounding differences).
    fn reference(w: &[u8], rows: usize, cols: usize, x: &[f32], m: usize) -> (Vec<f32>, Vec<f32>) {
        let nb = cols / QK;
        let mut y = vec![0f32; m * rows];
        let mut mag = vec![0f32; m * rows];
        for i in 0..m {
            let xr = &x[i * cols..(i + 1) * cols];
            let mut q8 = vec![0i32; cols];
            let mut d8 = vec![0f32; nb];
            let mut s8 = vec![0f32; nb];
            for b in 0..nb {
                let xs = &xr[b * QK..(b + 1) * QK];
                let amax = xs.iter().map(|v| v.abs()).fold(0f32, f32::max);
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let mut sum = 0;
                for j in 0..QK {
                    q8[b * QK + j] = (xs[j] * id).round() as i32;
                    sum += q8[b * QK + j];
                }
                d8[b] = d;
                s8[b] = d * sum as f32;
            }
            for r in 0..rows {
                let (mut acc, mut accm, mut mg) = (0f32, 0f32, 0f32);
                for b in 0..nb {
                    let blk = &w[(r * nb + b) * BLOCK_BYTES..(r * nb + b + 1) * BLOCK_BYTES];
                    let d4 = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                    let m4 = f16::from_le_bytes([blk[2], blk[3]]).to_f32();
                    let mut sumi = 0i32;
                    for j in 0..QK {
                        let q4 = if j < 16 { blk[4 + j] & 0x0F } else { blk[4 + j - 16] >> 4 } as i32;
                        sumi += q4 * q8[b * QK + j];
                    }
                    acc += sumi as f32 * (d4 * d8[b]);
                    accm += m4 * s8[b];
                    mg += (sumi as f32 * d4 * d8[b]).abs() + (m4 * s8[b]).abs();
                }
                y[i * rows + r] = acc + accm;
                mag[i * rows + r] = mg;
            }
        }
        (y, mag)
    }

    fn check(rows: usize, cols: usize, m: usize, seed: u64) {
        let mut rng = Rng(seed);
        let wf: Vec<f32> = rng.vec(rows * cols).iter().map(|v| v * 0.1 + 0.01).collect();
        let x = rng.vec(m * cols);
        let wq = quantize_q4_1(&wf);
        let q = Q4_1Matrix::new(&wq, rows, cols).unwrap();
        // (b) same quantization and integer dot products: only float summation order may differ.
        let (yr, mag) = reference(&wq, rows, cols, &x, m);
        for (name, kernel) in kernels() {
            let y = q.matmul_with(kernel, &x, m);
            assert_eq!(y.len(), m * rows);
            for k in 0..m * rows {
                let tol = 1e-5 * mag[k] + 1e-6;
                assert!(
                    (y[k] - yr[k]).abs() <= tol,
                    "{name} [{rows}x{cols}, m={m}] y[{k}] = {} vs reference {} (tol {tol})",
                    y[k],
                    yr[k]
                );
            }
        }
        let y = q.matmul(&x, m);

        // (a) against f32 x @ dequantized Wᵀ: only the 8-bit activation error.
        let wd = q.dequantize();
        assert_eq!(wd.len(), rows * cols);
        let mut err2 = 0f64;
        let mut ref2 = 0f64;
        for i in 0..m {
            for r in 0..rows {
                let e: f64 = (0..cols).map(|c| x[i * cols + c] as f64 * wd[r * cols + c] as f64).sum();
                err2 += (y[i * rows + r] as f64 - e).powi(2);
                ref2 += e * e;
            }
        }
        let rel = (err2 / ref2).sqrt();
        // ~0.4% expected (8-bit activations); a handful of outputs is a noisy estimate.
        let tol = if rows * m >= 32 { 1e-2 } else { 2e-2 };
        assert!(rel < tol, "[{rows}x{cols}, m={m}] relative error vs f32 {rel}");
    }

    #[test]
    fn q4_1_matmul_matches_references() {
        let names: Vec<_> = kernels().iter().map(|k| k.0).collect();
        println!("kernels tested: {names:?}");
        let mut seed = 1;
        for &cols in &[32, 576, 1536] {
            for &m in &[1, 3, 17] {
                // 1 and 7: less than a group of 16; 203: not a multiple of 16 or of any task chunk;
                // 1536: the parallel path.
                for &rows in &[1, 7, 203, 1536] {
                    seed += 1;
                    check(rows, cols, m, seed * 7919);
                }
            }
        }
    }

    #[test]
    fn q4_1_dequantize_matches_gguf_layout() {
        let (rows, cols) = (21, 96);
        let mut rng = Rng(5);
        let wq = quantize_q4_1(&rng.vec(rows * cols));
        let w = Q4_1Matrix::new(&wq, rows, cols).unwrap().dequantize();
        for r in 0..rows {
            for c in 0..cols {
                let blk = &wq[(r * cols / QK + c / QK) * BLOCK_BYTES..][..BLOCK_BYTES];
                let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                let mn = f16::from_le_bytes([blk[2], blk[3]]).to_f32();
                let e = c % QK;
                let q = if e < 16 { blk[4 + e] & 0x0F } else { blk[4 + e - 16] >> 4 };
                assert_eq!(w[r * cols + c], q as f32 * d + mn, "({r}, {c})");
            }
        }
    }

    #[test]
    fn q4_1_dequantize_layout() {
        // One block: d = 0.5, m = -1, nibble pair j = (j, 15 - j) -> element j = j, element 16+j = 15-j.
        let mut blk = Vec::new();
        blk.extend_from_slice(&f16::from_f32(0.5).to_le_bytes());
        blk.extend_from_slice(&f16::from_f32(-1.0).to_le_bytes());
        blk.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let q = Q4_1Matrix::new(&blk, 1, 32).unwrap();
        let w = q.dequantize();
        for j in 0..16 {
            assert_eq!(w[j], 0.5 * j as f32 - 1.0);
            assert_eq!(w[16 + j], 0.5 * (15 - j) as f32 - 1.0);
        }
        // x = e_j picks column j (up to the activation quantization, exact for a one-hot row).
        for j in [0, 5, 16, 31] {
            let mut x = vec![0f32; 32];
            x[j] = 1.0;
            let y = q.matmul(&x, 1);
            assert!((y[0] - w[j]).abs() < 1e-6, "column {j}: {} vs {}", y[0], w[j]);
        }
    }

    #[test]
    fn q4_1_rejects_bad_shapes() {
        assert!(Q4_1Matrix::new(&[0; 20], 1, 16).is_err());
        assert!(Q4_1Matrix::new(&[0; 21], 1, 32).is_err());
        assert!(Q4_1Matrix::new(&[0; 40], 2, 32).is_ok());
    }

    /// `cargo test --release -p personacore-kernels q4_1_bench -- --ignored --nocapture --test-threads=1`
    /// (`Q4_1_BENCH_BIG=1` adds a 49152 x 576 matrix, the size of the lm_head).
    #[test]
    #[ignore]
    fn q4_1_bench() {
        let mut rng = Rng(7);
        let big = std::env::var("Q4_1_BENCH_BIG").is_ok();
        let shapes: &[(usize, usize)] =
            if big { &[(1536, 576), (576, 1536), (49152, 576)] } else { &[(1536, 576), (576, 1536)] };
        for &(rows, cols) in shapes {
            let q = Q4_1Matrix::new(&quantize_q4_1(&rng.vec(rows * cols)), rows, cols).unwrap();
            for &m in &[1usize, 16] {
                let x = rng.vec(m * cols);
                for (name, kernel) in kernels() {
                    let iters = if name == "scalar" {
                        20
                    } else if m == 1 {
                        2000
                    } else {
                        200
                    };
                    for _ in 0..iters / 10 {
                        std::hint::black_box(q.matmul_with(kernel, &x, m));
                    }
                    let t = std::time::Instant::now();
                    for _ in 0..iters {
                        std::hint::black_box(q.matmul_with(kernel, std::hint::black_box(&x), m));
                    }
                    let dt = t.elapsed().as_secs_f64() / iters as f64;
                    let gbs = (rows * cols / QK * BLOCK_BYTES) as f64 / dt / 1e9;
                    println!(
                    "{name:>10} [{m},{cols}] x [{rows},{cols}]^T: {:.1} us  ({gbs:.1} GB/s of weights, {:.1} GMAC/s)",
                    dt * 1e6,
                    (rows * cols * m) as f64 / dt / 1e9,
                );
                }
            }
        }
    }

    /// The same shapes through candle's `QMatMul` (its scalar Q4_1 kernel), for comparison:
    /// `cargo test --release -p personacore-kernels q4_1_bench_candle -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn q4_1_bench_candle() {
        use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
        use candle_core::{Device, Module, Tensor};
        let mut rng = Rng(7);
        for &(rows, cols) in &[(1536usize, 576usize), (576, 1536)] {
            let bytes = quantize_q4_1(&rng.vec(rows * cols));
            let storage = QStorage::from_data(std::borrow::Cow::Owned(bytes), &Device::Cpu, GgmlDType::Q4_1).unwrap();
            let qm = QMatMul::from_qtensor(QTensor::new(storage, (rows, cols)).unwrap()).unwrap();
            let x = Tensor::from_vec(rng.vec(cols), (1, cols), &Device::Cpu).unwrap();
            for _ in 0..5 {
                qm.forward(&x).unwrap();
            }
            let iters = 50;
            let t = std::time::Instant::now();
            for _ in 0..iters {
                std::hint::black_box(qm.forward(&x).unwrap());
            }
            let dt = t.elapsed().as_secs_f64() / iters as f64;
            println!("candle QMatMul [1,{cols}] x [{rows},{cols}]^T: {:.1} us", dt * 1e6);
        }
    }
}
