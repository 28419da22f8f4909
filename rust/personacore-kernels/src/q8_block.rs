//! Our own CPU linear layer (`y = x Wᵀ`) for the GGUF types with 32-value blocks of 5 or 8 bits:
//! Q5_0, Q5_1 and Q8_0 (candle 0.11's CPU Q5_0 and Q5_1 dot products are scalar; its Q8_0 kernel
//! keeps a second, repacked copy of the weights beside the original).
//!
//! Every type is a block of 32 unsigned integers `u` with a per-block scale `d` and offset `m`:
//! value = `d·u + m`. Q5_0 (`u` = 5-bit `q`, `m = -16 d`), Q5_1 (`u = q`, `m` stored) and Q8_0
//! (`u = q + 128` for the signed byte `q`, `m = -128 d`). At load 16 rows are interleaved as in
//! [`crate::q4_1`]: a group block holds `d[16]` (f16), for Q5_1 `m[16]` (f16), then the values
//! (see `pack_values`): Q8_0 one byte per value, arranged so that one 64-byte load holds 4 values
//! of each of the 16 rows; Q5_0/Q5_1 the fifth bits as one 32-bit word per row and the low 4 bits
//! as nibbles in the same arrangement. Every type keeps exactly its GGUF size.
//!
//! Activations are quantized per row to 8 bits per block (`d = amax/127`, `s = d·Σq`, f32 scales;
//! the Q8_1 rule shared with [`crate::q4_1`]), so one block's dot product is
//! `dw·dx·Σ u·q + m·Σq·dx` = `dw·dx·Σ u·q + m·s`. The AVX-512 VNNI kernel (`vpdpbusd`: unsigned
//! weight byte × signed activation byte) computes 16 rows per instruction; the portable loop
//! computes the same sums.

use half::f16;

use crate::par::{self, SyncPtr};
use crate::q4_1::Q8Rows;

/// Values per block.
pub const QK: usize = 32;
/// Rows interleaved in the repacked layout.
const G: usize = 16;

/// Below this much work (weights × activation rows) a matmul runs on the calling thread alone.
const MIN_PARALLEL_WORK: usize = 64 * 576;
/// Minimum work per chunk handed to a thread.
const MIN_CHUNK_WORK: usize = 32 * 576;

/// The GGUF types this module runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockType {
    /// d (f16), qh (u32: bit 4 of each value), qs (16 bytes of low nibbles); value = d·(q − 16).
    Q5_0,
    /// d, m (f16), qh, qs; value = d·q + m.
    Q5_1,
    /// d (f16), 32 signed bytes; value = d·q.
    Q8_0,
}

impl BlockType {
    /// Bytes of one GGUF block of this type.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
        }
    }

    /// Whether blocks store their own offset `m` (else `m = offset_factor · d`).
    fn has_min(self) -> bool {
        self == Self::Q5_1
    }

    /// `m / d` for the types whose offset is implied by the scale.
    fn offset_factor(self) -> f32 {
        match self {
            Self::Q5_0 => -16.0,
            Self::Q5_1 => 0.0,
            Self::Q8_0 => -128.0,
        }
    }

    /// Whether values have 5 bits (held as 4-bit nibbles plus a word of fifth bits per row).
    fn five_bit(self) -> bool {
        self != Self::Q8_0
    }

    /// Bytes of one group block (16 rows × 32 values) in the repacked layout.
    fn group_block_bytes(self) -> usize {
        if self.five_bit() {
            header_bytes(self) + 4 * G + G * QK / 2
        } else {
            header_bytes(self) + G * QK
        }
    }

    /// The unsigned values `u` and (d, m) of one GGUF block.
    fn unpack(self, blk: &[u8]) -> ([u8; QK], f32, f32) {
        let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
        let mut u = [0u8; QK];
        match self {
            Self::Q8_0 => {
                for (o, &q) in u.iter_mut().zip(&blk[2..2 + QK]) {
                    *o = (q as i8 as i16 + 128) as u8;
                }
                (u, d, -128.0 * d)
            }
            Self::Q5_0 | Self::Q5_1 => {
                let (m, rest) = if self == Self::Q5_1 {
                    (f16::from_le_bytes([blk[2], blk[3]]).to_f32(), &blk[4..])
                } else {
                    (-16.0 * d, &blk[2..])
                };
                let qh = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                let qs = &rest[4..4 + QK / 2];
                for j in 0..QK / 2 {
                    u[j] = (qs[j] & 0x0F) | ((((qh >> j) & 1) as u8) << 4);
                    u[j + QK / 2] = (qs[j] >> 4) | ((((qh >> (j + QK / 2)) & 1) as u8) << 4);
                }
                (u, d, m)
            }
        }
    }
}

/// Bytes before the values in a group block: `d[16]` and, for Q5_1, `m[16]` (f16).
fn header_bytes(t: BlockType) -> usize {
    if t.has_min() {
        4 * G
    } else {
        2 * G
    }
}

/// Why [`Q8BlockMatrix::new`] refused its data: the bytes do not hold a `[rows, cols]` matrix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeError(String);

impl std::fmt::Display for ShapeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ShapeError {}

/// Q5_0 / Q5_1 / Q8_0 weights `[rows = out, cols = in]` from GGUF blocks, used for `y = x Wᵀ`.
pub struct Q8BlockMatrix {
    /// Repacked group blocks: `rows` rounded up to a multiple of 16 (zero rows).
    /// Repacked blocks, on huge pages from 2 MiB on ([`crate::huge_pages`]).
    data: crate::huge_pages::Zeroed<u8>,
    ty: BlockType,
    rows: usize,
    cols: usize,
}

impl std::fmt::Debug for Q8BlockMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Q8BlockMatrix")
            .field("type", &self.ty)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish()
    }
}

/// Whether this CPU runs the fast kernel (AVX-512 VNNI); elsewhere a caller may prefer candle's.
pub fn fast_kernel_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx512::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl Q8BlockMatrix {
    /// Takes GGUF bytes of a `[rows, cols]` matrix of type `ty` (row-major blocks); `cols` must
    /// be a multiple of 32.
    pub fn new(data: &[u8], ty: BlockType, rows: usize, cols: usize) -> Result<Self, ShapeError> {
        Self::new_streamed(data, ty, rows, cols, |_| {})
    }

    /// [`Q8BlockMatrix::new`], calling `consumed(n)` each time the first `n` bytes of `data`
    /// have been repacked (so that a loader can release them while the rest is read).
    pub fn new_streamed(
        data: &[u8],
        ty: BlockType,
        rows: usize,
        cols: usize,
        mut consumed: impl FnMut(usize),
    ) -> Result<Self, ShapeError> {
        if !cols.is_multiple_of(QK) {
            return Err(ShapeError(format!("{ty:?} matrix: {cols} columns is not a multiple of {QK}")));
        }
        let nb = cols / QK;
        let want = rows * nb * ty.block_bytes();
        if data.len() != want {
            return Err(ShapeError(format!(
                "{ty:?} matrix [{rows}, {cols}]: {} bytes of data, expected {want}",
                data.len()
            )));
        }
        let gbb = ty.group_block_bytes();
        let hdr = header_bytes(ty);
        let mut packed = crate::huge_pages::Zeroed::<u8>::new(rows.div_ceil(G) * nb * gbb);
        if nb > 0 {
            let row_bytes = nb * ty.block_bytes();
            for (r, row) in data.chunks_exact(row_bytes).enumerate() {
                if r % (64 * G) == 0 && r > 0 {
                    consumed(r * row_bytes);
                }
                let (g, l) = (r / G, r % G);
                for (b, src) in row.chunks_exact(ty.block_bytes()).enumerate() {
                    let dst = &mut packed[(g * nb + b) * gbb..][..gbb];
                    dst[2 * l..2 * l + 2].copy_from_slice(&src[0..2]);
                    if ty.has_min() {
                        dst[2 * G + 2 * l..2 * G + 2 * l + 2].copy_from_slice(&src[2..4]);
                    }
                    let (u, _, _) = ty.unpack(src);
                    pack_values(ty, &mut dst[hdr..], l, &u);
                }
            }
        }
        consumed(data.len());
        Ok(Self { data: packed, ty, rows, cols })
    }

    /// Output features (rows of W).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features (columns of W).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The GGUF type of the weights.
    pub fn block_type(&self) -> BlockType {
        self.ty
    }

    /// Bytes held (the repacked weights).
    pub fn size_in_bytes(&self) -> usize {
        self.data.len()
    }

    /// `x` `[m, cols]` (row-major f32) times Wᵀ: `[m, rows]` row-major.
    ///
    /// # Panics
    /// When `x.len() != m * cols`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_with(select_kernel(), x, m)
    }

    fn matmul_with(&self, kernel: Kernel, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(
            x.len(),
            m * self.cols,
            "{:?} matmul: x has {} values, expected {m} x {}",
            self.ty,
            x.len(),
            self.cols
        );
        let (rows, cols) = (self.rows, self.cols);
        if m == 0 || rows == 0 {
            return vec![0.0; m * rows];
        }
        let xq = Q8Rows::quantize(x, m, cols);
        let groups = rows.div_ceil(G);
        // Output as [group][x row][16 rows of the group]: each task owns a contiguous slice.
        let mut yt = vec![0f32; groups * G * m];
        let work = rows * cols * m;
        let ty = self.ty;
        if work < MIN_PARALLEL_WORK {
            kernel(ty, &self.data, 0, groups, &xq, &mut yt);
        } else {
            let chunk = groups.div_ceil(4 * par::threads()).max(MIN_CHUNK_WORK.div_ceil(G * cols * m));
            let out = SyncPtr(yt.as_mut_ptr());
            let (data, xq, len) = (&self.data, &xq, yt.len());
            par::for_chunks(groups, chunk, &|g0, g1| {
                let out = &out;
                assert!(g1 * G * m <= len);
                // SAFETY: every chunk of groups is handed out once, so these slices of `yt` never
                // overlap, and `for_chunks` returns only after every worker is done with them.
                let o = unsafe { std::slice::from_raw_parts_mut(out.0.add(g0 * G * m), (g1 - g0) * G * m) };
                kernel(ty, data, g0, g1, xq, o);
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

    /// Row `r` of the weights as f32 (`cols` values).
    ///
    /// # Panics
    /// When `r >= rows`.
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        assert!(r < self.rows, "{:?} row {r} of a matrix of {} rows", self.ty, self.rows);
        let nb = self.cols / QK;
        let (gbb, hdr) = (self.ty.group_block_bytes(), header_bytes(self.ty));
        let (g, l) = (r / G, r % G);
        let mut out = Vec::with_capacity(self.cols);
        for b in 0..nb {
            let blk = &self.data[(g * nb + b) * gbb..][..gbb];
            let (d, m) = scales(self.ty, blk, l);
            out.extend((0..QK).map(|e| d * value(self.ty, &blk[hdr..], l, e) as f32 + m));
        }
        out
    }

    /// The weights as f32 `[rows, cols]` row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        (0..self.rows).flat_map(|r| self.dequantize_row(r)).collect()
    }
}

/// Writes row `l`'s 32 values `u` into the value area `q` of a group block. 8-bit: for `j` in
/// 0..8 the bytes `64 j + 4 l + t` = `u[4 j + t]`. 5-bit: the fifth bits as one little-endian
/// word per row (`4 l`), then at `64 + 64 j + 4 l + t` the nibbles of `u[4 j + t]` (low) and
/// `u[16 + 4 j + t]` (high), for `j` in 0..4.
fn pack_values(ty: BlockType, q: &mut [u8], l: usize, u: &[u8; QK]) {
    if ty.five_bit() {
        let qh = u.iter().enumerate().fold(0u32, |h, (e, &v)| h | (((v >> 4) as u32 & 1) << e));
        q[4 * l..4 * l + 4].copy_from_slice(&qh.to_le_bytes());
        for j in 0..4 {
            for t in 0..4 {
                q[4 * G + 64 * j + 4 * l + t] = (u[4 * j + t] & 0x0F) | (u[16 + 4 * j + t] << 4);
            }
        }
    } else {
        for j in 0..QK / 4 {
            q[64 * j + 4 * l..][..4].copy_from_slice(&u[4 * j..4 * j + 4]);
        }
    }
}

/// Value `e` of row `l` from the value area `q` of a group block (see [`pack_values`]).
fn value(ty: BlockType, q: &[u8], l: usize, e: usize) -> u8 {
    if ty.five_bit() {
        let qh = u32::from_le_bytes([q[4 * l], q[4 * l + 1], q[4 * l + 2], q[4 * l + 3]]);
        let (j, t) = ((e % 16) / 4, e % 4);
        let nib = q[4 * G + 64 * j + 4 * l + t];
        let low = if e < 16 { nib & 0x0F } else { nib >> 4 };
        low | ((((qh >> e) & 1) as u8) << 4)
    } else {
        q[64 * (e / 4) + 4 * l + e % 4]
    }
}

/// (d, m) of row `l` in a group block.
fn scales(ty: BlockType, blk: &[u8], l: usize) -> (f32, f32) {
    let d = f16::from_le_bytes([blk[2 * l], blk[2 * l + 1]]).to_f32();
    let m = if ty.has_min() {
        f16::from_le_bytes([blk[2 * G + 2 * l], blk[2 * G + 2 * l + 1]]).to_f32()
    } else {
        ty.offset_factor() * d
    };
    (d, m)
}

/// Computes groups `g0..g1` of 16 output rows for every activation row into `out`, laid out
/// `[g1 - g0][m][16]`.
type Kernel = fn(ty: BlockType, data: &[u8], g0: usize, g1: usize, x: &Q8Rows, out: &mut [f32]);

fn select_kernel() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    {
        if avx512::available() {
            return avx512::groups;
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
        if avx512::available() {
            k.push(("avx512vnni", avx512::groups));
        }
    }
    k
}

fn check_bounds(ty: BlockType, data: &[u8], g0: usize, g1: usize, x: &Q8Rows, out: &[f32]) {
    assert!(g0 <= g1 && g1 * x.nb * ty.group_block_bytes() <= data.len() && out.len() >= (g1 - g0) * G * x.rows());
}

/// Portable kernel: see [`Kernel`].
fn scalar_groups(ty: BlockType, data: &[u8], g0: usize, g1: usize, x: &Q8Rows, out: &mut [f32]) {
    check_bounds(ty, data, g0, g1, x, out);
    let (nb, m) = (x.nb, x.rows());
    let (gbb, hdr) = (ty.group_block_bytes(), header_bytes(ty));
    for g in g0..g1 {
        for i in 0..m {
            let xq = &x.qs[i * nb * QK..(i + 1) * nb * QK];
            for l in 0..G {
                let (mut sumf, mut summ) = (0f32, 0f32);
                for b in 0..nb {
                    let blk = &data[(g * nb + b) * gbb..][..gbb];
                    let (d, mw) = scales(ty, blk, l);
                    let xb = &xq[b * QK..(b + 1) * QK];
                    let mut sumi = 0i32;
                    for (e, &xe) in xb.iter().enumerate() {
                        sumi += value(ty, &blk[hdr..], l, e) as i32 * xe as i32;
                    }
                    sumf += sumi as f32 * (d * x.d[i * nb + b]);
                    summ += mw * x.s[i * nb + b];
                }
                out[((g - g0) * m + i) * G + l] = sumf + summ;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{check_bounds, BlockType, Q8Rows, G, QK};

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

    /// A group block's 16 scales `d` and offsets `m` (stored as f16 after `d` when `HAS_MIN`,
    /// else `factor · d`).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    unsafe fn block_scales<const HAS_MIN: bool>(p: *const u8, factor: f32) -> (__m512, __m512) {
        // SAFETY (caller): `p` is a group block's start, whose header holds `d[16]` (and `m[16]`).
        unsafe {
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()));
            let mw = if HAS_MIN {
                _mm512_cvtph_ps(_mm256_loadu_si256(p.add(2 * G).cast()))
            } else {
                _mm512_mul_ps(dw, _mm512_set1_ps(factor))
            };
            (dw, mw)
        }
    }

    /// Adds one block's 16 integer dot products `sums` against activation block `k` to the
    /// scaled sums `acc` and the offset sums `accm` (`d · d_x · Σ u·q` and `m · s_x`).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    unsafe fn accumulate(
        acc: &mut __m512,
        accm: &mut __m512,
        sums: __m512i,
        dw: __m512,
        mw: __m512,
        x: &Q8Rows,
        k: usize,
    ) {
        // SAFETY (caller): `k` indexes a block of `x` (`x.d` and `x.s` hold one value per block).
        unsafe {
            let f = _mm512_cvtepi32_ps(sums);
            *acc = _mm512_fmadd_ps(f, _mm512_mul_ps(dw, _mm512_set1_ps(*x.d.get_unchecked(k))), *acc);
            *accm = _mm512_fmadd_ps(mw, _mm512_set1_ps(*x.s.get_unchecked(k)), *accm);
        }
    }

    /// The 16 rows of the group at `gp` against activation rows `i0..i0 + C`: 16 sums per
    /// activation row, stored at `o + 16 c`. `HAS_MIN`: the group blocks store `m[16]`; else
    /// `m = factor · d`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    unsafe fn tile<const C: usize, const HAS_MIN: bool>(
        gp: *const u8,
        gbb: usize,
        factor: f32,
        nb: usize,
        x: &Q8Rows,
        i0: usize,
        o: *mut f32,
    ) {
        let hdr = if HAS_MIN { 4 * G } else { 2 * G };
        let mut acc = [_mm512_setzero_ps(); C];
        let mut accm = [_mm512_setzero_ps(); C];
        for b in 0..nb {
            unsafe {
                let p = gp.add(b * gbb);
                let (dw, mw) = block_scales::<HAS_MIN>(p, factor);
                let q = p.add(hdr);
                let mut w = [_mm512_setzero_si512(); QK / 4];
                for (j, wj) in w.iter_mut().enumerate() {
                    *wj = _mm512_loadu_si512(q.add(64 * j).cast());
                }
                for c in 0..C {
                    let xq = x.qs.as_ptr().add(((i0 + c) * nb + b) * QK);
                    // Two dependency chains of unsigned-byte × signed-byte dot products; each
                    // lane sums 32 products of at most 255 · 127: no overflow.
                    let mut s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], bcast(xq));
                    let mut s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[1], bcast(xq.add(4)));
                    for j in (2..QK / 4).step_by(2) {
                        s0 = _mm512_dpbusd_epi32(s0, w[j], bcast(xq.add(4 * j)));
                        s1 = _mm512_dpbusd_epi32(s1, w[j + 1], bcast(xq.add(4 * j + 4)));
                    }
                    let k = (i0 + c) * nb + b;
                    accumulate(&mut acc[c], &mut accm[c], _mm512_add_epi32(s0, s1), dw, mw, x, k);
                }
            }
        }
        for c in 0..C {
            unsafe { _mm512_storeu_ps(o.add(c * G).cast(), _mm512_add_ps(acc[c], accm[c])) };
        }
    }

    /// [`tile`] for the 5-bit layout: each group block's values are rebuilt from the nibbles and
    /// the fifth-bit words (one per row) before the dot products; see `super::pack_values`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    unsafe fn tile5<const C: usize, const HAS_MIN: bool>(
        gp: *const u8,
        gbb: usize,
        factor: f32,
        nb: usize,
        x: &Q8Rows,
        i0: usize,
        o: *mut f32,
    ) {
        let hdr = if HAS_MIN { 4 * G } else { 2 * G };
        let mask_lo = _mm512_set1_epi8(0x0F);
        let sixteen = _mm512_set1_epi8(0x10);
        // Byte t of every word tests bit t; the shuffle copies byte 0 of each word to its 4 bytes.
        let bits = _mm512_set1_epi32(0x0804_0201);
        let (b1, b2, b3) = (0x0404_0404, 0x0808_0808, 0x0C0C_0C0C);
        let spread = _mm512_set_epi32(b3, b2, b1, 0, b3, b2, b1, 0, b3, b2, b1, 0, b3, b2, b1, 0);
        let mut acc = [_mm512_setzero_ps(); C];
        let mut accm = [_mm512_setzero_ps(); C];
        for b in 0..nb {
            unsafe {
                let p = gp.add(b * gbb);
                let (dw, mw) = block_scales::<HAS_MIN>(p, factor);
                let qh = _mm512_loadu_si512(p.add(hdr).cast());
                let q = p.add(hdr + 4 * G);
                let mut lo = [_mm512_setzero_si512(); 4];
                let mut hi = [_mm512_setzero_si512(); 4];
                for j in 0..4 {
                    let w = _mm512_loadu_si512(q.add(64 * j).cast());
                    let l4 = _mm512_and_si512(w, mask_lo);
                    let h4 = _mm512_and_si512(_mm512_srli_epi16::<4>(w), mask_lo);
                    let sl = _mm512_srlv_epi32(qh, _mm512_set1_epi32(4 * j as i32));
                    let sh = _mm512_srlv_epi32(qh, _mm512_set1_epi32(16 + 4 * j as i32));
                    let kl = _mm512_test_epi8_mask(_mm512_shuffle_epi8(sl, spread), bits);
                    let kh = _mm512_test_epi8_mask(_mm512_shuffle_epi8(sh, spread), bits);
                    lo[j] = _mm512_mask_add_epi8(l4, kl, l4, sixteen);
                    hi[j] = _mm512_mask_add_epi8(h4, kh, h4, sixteen);
                }
                for c in 0..C {
                    let xq = x.qs.as_ptr().add(((i0 + c) * nb + b) * QK);
                    let mut s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[0], bcast(xq));
                    let mut s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi[0], bcast(xq.add(16)));
                    for j in 1..4 {
                        s0 = _mm512_dpbusd_epi32(s0, lo[j], bcast(xq.add(4 * j)));
                        s1 = _mm512_dpbusd_epi32(s1, hi[j], bcast(xq.add(16 + 4 * j)));
                    }
                    let k = (i0 + c) * nb + b;
                    accumulate(&mut acc[c], &mut accm[c], _mm512_add_epi32(s0, s1), dw, mw, x, k);
                }
            }
        }
        for c in 0..C {
            unsafe { _mm512_storeu_ps(o.add(c * G).cast(), _mm512_add_ps(acc[c], accm[c])) };
        }
    }

    /// AVX-512 VNNI kernel: see [`super::Kernel`].
    pub(super) fn groups(ty: BlockType, data: &[u8], g0: usize, g1: usize, x: &Q8Rows, out: &mut [f32]) {
        check_bounds(ty, data, g0, g1, x, out);
        assert!(available());
        let (nb, m) = (x.nb, x.rows());
        let gbb = ty.group_block_bytes();
        let factor = ty.offset_factor();
        for g in g0..g1 {
            let gp = data[g * nb * gbb..].as_ptr();
            let o = &mut out[(g - g0) * m * G..(g - g0 + 1) * m * G];
            for_row_tiles!(m, |i, C| {
                // SAFETY: bounds checked above (groups in `data`, activation rows in `x`, and `o`
                // holds `m * 16` values with `i + C <= m`); CPU features checked by `available`.
                unsafe {
                    let out = o.as_mut_ptr().add(i * G);
                    match (ty.five_bit(), ty.has_min()) {
                        (true, true) => tile5::<C, true>(gp, gbb, factor, nb, x, i, out),
                        (true, false) => tile5::<C, false>(gp, gbb, factor, nb, x, i, out),
                        (false, true) => tile::<C, true>(gp, gbb, factor, nb, x, i, out),
                        (false, false) => tile::<C, false>(gp, gbb, factor, nb, x, i, out),
                    }
                };
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
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| ((self.next() + 1.0) * 128.0) as u8).collect()
        }
    }

    const TYPES: [BlockType; 3] = [BlockType::Q5_0, BlockType::Q5_1, BlockType::Q8_0];

    /// Random GGUF blocks of `ty` with sane f16 scales (|d| ~ 0.01, |m| ~ 0.1).
    fn random_blocks(ty: BlockType, rows: usize, cols: usize, rng: &mut Rng) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..rows * cols / QK {
            let mut blk = rng.bytes(ty.block_bytes());
            blk[0..2].copy_from_slice(&f16::from_f32(0.01 * rng.next()).to_le_bytes());
            if ty == BlockType::Q5_1 {
                blk[2..4].copy_from_slice(&f16::from_f32(0.1 * rng.next()).to_le_bytes());
            }
            out.extend(blk);
        }
        out
    }

    /// ggml's dequantize_row_q5_0 / q5_1 / q8_0, written from the block layouts directly.
    fn ggml_dequantize(ty: BlockType, blk: &[u8]) -> Vec<f32> {
        let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
        match ty {
            BlockType::Q8_0 => blk[2..34].iter().map(|&q| d * (q as i8) as f32).collect(),
            BlockType::Q5_0 | BlockType::Q5_1 => {
                let (m, off) = if ty == BlockType::Q5_1 {
                    (Some(f16::from_le_bytes([blk[2], blk[3]]).to_f32()), 4)
                } else {
                    (None, 2)
                };
                let qh = u32::from_le_bytes(blk[off..off + 4].try_into().unwrap());
                let qs = &blk[off + 4..off + 20];
                let mut v = vec![0f32; 32];
                for j in 0..16 {
                    let x0 = ((qs[j] & 0x0F) as u32 | ((qh >> j) & 1) << 4) as i32;
                    let x1 = ((qs[j] >> 4) as u32 | ((qh >> (j + 12)) & 0x10)) as i32;
                    match m {
                        Some(m) => {
                            v[j] = x0 as f32 * d + m;
                            v[j + 16] = x1 as f32 * d + m;
                        }
                        None => {
                            v[j] = (x0 - 16) as f32 * d;
                            v[j + 16] = (x1 - 16) as f32 * d;
                        }
                    }
                }
                v
            }
        }
    }

    #[test]
    fn dequantize_matches_ggml() {
        let mut rng = Rng(3);
        for ty in TYPES {
            let (rows, cols) = (19, 96);
            let raw = random_blocks(ty, rows, cols, &mut rng);
            let q = Q8BlockMatrix::new(&raw, ty, rows, cols).unwrap();
            let want: Vec<f32> = raw.chunks_exact(ty.block_bytes()).flat_map(|b| ggml_dequantize(ty, b)).collect();
            let got = q.dequantize();
            for (k, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!((a - b).abs() <= 1e-6 * b.abs().max(1e-3), "{ty:?} [{k}] {a} vs {b}");
            }
        }
    }

    /// Every kernel against f64 `x · dequantized Wᵀ`: within what rounding the activations to 8
    /// bits (half a step of amax/127 per value) can move each output, and against each other.
    #[test]
    fn matmul_matches_references() {
        let names: Vec<_> = kernels().iter().map(|k| k.0).collect();
        println!("kernels tested: {names:?}");
        let mut rng = Rng(11);
        for ty in TYPES {
            for &cols in &[32usize, 640] {
                for &m in &[1usize, 3, 6] {
                    for &rows in &[1usize, 7, 203, 1024] {
                        let raw = random_blocks(ty, rows, cols, &mut rng);
                        let q = Q8BlockMatrix::new(&raw, ty, rows, cols).unwrap();
                        let w = q.dequantize();
                        let x = rng.vec(m * cols);
                        let outs: Vec<_> = kernels().iter().map(|(n, k)| (*n, q.matmul_with(*k, &x, m))).collect();
                        for i in 0..m {
                            let xr = &x[i * cols..(i + 1) * cols];
                            // Per block: |error of a value| <= amax/254, times Σ|w| of the block.
                            let mut bound = vec![0f64; rows];
                            let mut exact = vec![0f64; rows];
                            for r in 0..rows {
                                let wr = &w[r * cols..(r + 1) * cols];
                                for b in 0..cols / QK {
                                    let xs = &xr[b * QK..(b + 1) * QK];
                                    let ws = &wr[b * QK..(b + 1) * QK];
                                    let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
                                    let sw: f64 = ws.iter().map(|v| v.abs() as f64).sum();
                                    bound[r] += amax / 254.0 * sw;
                                    exact[r] += xs.iter().zip(ws).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>();
                                }
                            }
                            for (name, y) in &outs {
                                for r in 0..rows {
                                    let got = y[i * rows + r] as f64;
                                    let tol = 1.01 * bound[r] + 1e-5;
                                    assert!(
                                        (got - exact[r]).abs() <= tol,
                                        "{name} {ty:?} [{rows}x{cols}, m={m}] y[{i},{r}] = {got} vs {} (tol {tol})",
                                        exact[r]
                                    );
                                }
                            }
                            // The kernels compute the same integer sums: only float order differs.
                            let (_, first) = &outs[0];
                            for (name, y) in &outs[1..] {
                                for r in 0..rows {
                                    let (a, b) = (y[i * rows + r], first[i * rows + r]);
                                    assert!(
                                        (a - b).abs() <= 1e-4 * (bound[r] as f32 * 254.0).max(1e-3),
                                        "{name} vs scalar: {a} vs {b}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rejects_bad_shapes() {
        assert!(Q8BlockMatrix::new(&[0; 34], BlockType::Q8_0, 1, 16).is_err());
        assert!(Q8BlockMatrix::new(&[0; 33], BlockType::Q8_0, 1, 32).is_err());
        assert!(Q8BlockMatrix::new(&[0; 44], BlockType::Q5_0, 2, 32).is_ok());
    }

    /// `cargo test --release -p personacore-kernels q8_block_bench -- --ignored --nocapture --test-threads=1`
    #[test]
    #[ignore]
    fn q8_block_bench() {
        use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
        use candle_core::{Device, Module, Tensor};
        let mut rng = Rng(7);
        for (ty, gt) in [(BlockType::Q5_0, GgmlDType::Q5_0), (BlockType::Q8_0, GgmlDType::Q8_0)] {
            for &(rows, cols) in &[(2048usize, 640usize), (32768, 640)] {
                let raw = random_blocks(ty, rows, cols, &mut rng);
                let q = Q8BlockMatrix::new(&raw, ty, rows, cols).unwrap();
                let storage = QStorage::from_data(std::borrow::Cow::Borrowed(&raw[..]), &Device::Cpu, gt).unwrap();
                let qm = QMatMul::from_qtensor(QTensor::new(storage, (rows, cols)).unwrap()).unwrap();
                let x = rng.vec(cols);
                let xt = Tensor::from_vec(x.clone(), (1, cols), &Device::Cpu).unwrap();
                let time = |f: &dyn Fn()| {
                    for _ in 0..5 {
                        f();
                    }
                    let t = std::time::Instant::now();
                    for _ in 0..50 {
                        f();
                    }
                    t.elapsed().as_secs_f64() / 50.0 * 1e6
                };
                let ours = time(&|| {
                    std::hint::black_box(q.matmul(&x, 1));
                });
                let theirs = time(&|| {
                    std::hint::black_box(qm.forward(&xt).unwrap());
                });
                println!("{ty:?} [1,{cols}] x [{rows},{cols}]^T: ours {ours:.1} us, candle {theirs:.1} us");
            }
        }
    }
}
