//! `y = x Wᵀ` in f32 for a few activation rows (decoding: one row per sequence of the batch).
//!
//! candle's CPU matmul goes through the `gemm` crate, which packs its operands on every call and
//! runs the one-row case on a single core: a decode step of a small model then streams its
//! weights at about half the memory bandwidth of two cores, and at batch 16 most of the time goes
//! into packing. Here the weight stays in its checkpoint layout (`[out, in]`, rows contiguous, no
//! copy): each task takes a run of 4 weight rows, computes their dot products with up to 4
//! activation rows at a time in 16 AVX-512 accumulators, and sums the lanes once per tile. Runs of
//! rows are shared between cores with [`par`](super::par). Larger `m` (prefill) stays with gemm,
//! whose packed kernels win once the weight is reused across many rows.

use super::par::{self, SyncPtr};

/// Most activation rows this kernel is used for; beyond it gemm's packed kernels are faster.
pub const MAX_ROWS: usize = 16;
/// Weight rows per tile.
const NR: usize = 4;
/// Activation rows per tile.
const MR: usize = 4;
/// Below this many multiply-adds a matmul runs on the calling thread alone.
const MIN_PARALLEL_WORK: usize = 32 * 1024;
/// Minimum multiply-adds per chunk handed to a thread.
const MIN_CHUNK_WORK: usize = 16 * 1024;

/// Whether this CPU runs the kernel (AVX-512F and DQ, detected at run time).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512dq")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `y[m, n] = x[m, k] · w[n, k]ᵀ`, all row-major f32, split across the matmul pool.
///
/// # Panics
/// When the CPU lacks AVX-512 (check [`available`]) or a slice length does not match its shape.
pub fn matmul(w: &[f32], n: usize, k: usize, x: &[f32], m: usize, y: &mut [f32]) {
    assert!(available(), "small_matmul needs AVX-512");
    assert_eq!(w.len(), n * k, "weight has {} values, expected {n} x {k}", w.len());
    assert_eq!(x.len(), m * k, "input has {} values, expected {m} x {k}", x.len());
    assert_eq!(y.len(), m * n, "output has {} values, expected {m} x {n}", y.len());
    if m == 0 || n == 0 {
        return;
    }
    let tiles = n.div_ceil(NR);
    let out = SyncPtr(y.as_mut_ptr());
    let run = |t0: usize, t1: usize| {
        let out = &out;
        // SAFETY: AVX-512 checked above; the slices' lengths were checked against n, k, m; each
        // call writes only the columns of its own tiles, and distinct calls get distinct tiles.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            avx512::rows(w, k, x, m, n, t0 * NR, (t1 * NR).min(n), out.0)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (t0, t1, out);
    };
    let work = n * k * m;
    if work < MIN_PARALLEL_WORK {
        run(0, tiles);
    } else {
        let chunk = tiles.div_ceil(4 * par::threads()).max(MIN_CHUNK_WORK.div_ceil(NR * k * m));
        par::for_chunks(tiles, chunk, &run);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{MR, NR};

    /// Output columns `j0..j1` of `y` (`[m, n]`) for all `m` rows.
    ///
    /// # Safety
    /// AVX-512F/DQ present; `w` is `[n, k]`, `x` is `[m, k]`, `y` points to `m * n` floats and no
    /// one else writes columns `j0..j1` meanwhile.
    #[target_feature(enable = "avx512f,avx512dq")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn rows(w: &[f32], k: usize, x: &[f32], m: usize, n: usize, j0: usize, j1: usize, y: *mut f32) {
        let mut j = j0;
        while j < j1 {
            let nr = NR.min(j1 - j);
            // A short last tile repeats its last row; only `nr` columns are stored.
            let mut wp = [w.as_ptr(); NR];
            for (c, p) in wp.iter_mut().enumerate() {
                *p = w.as_ptr().add((j + c.min(nr - 1)) * k);
            }
            let mut i = 0;
            while i < m {
                let xp = x.as_ptr().add(i * k);
                let yp = y.add(i * n + j);
                match m - i {
                    1 => tile::<1>(wp, xp, k, yp, n, nr),
                    2 => tile::<2>(wp, xp, k, yp, n, nr),
                    3 => tile::<3>(wp, xp, k, yp, n, nr),
                    _ => tile::<MR>(wp, xp, k, yp, n, nr),
                }
                i += MR;
            }
            j += NR;
        }
    }

    /// `R` activation rows (from `xp`, stride `k`) against the `NR` weight rows `wp`; stores
    /// `nr` columns of each of the `R` output rows (from `yp`, stride `ldy`).
    ///
    /// Written out row by row (constant indices only) so that the 4·R accumulators stay in
    /// registers; loops over the accumulator array made LLVM spill them to the stack.
    #[target_feature(enable = "avx512f,avx512dq")]
    #[inline]
    unsafe fn tile<const R: usize>(wp: [*const f32; NR], xp: *const f32, k: usize, yp: *mut f32, ldy: usize, nr: usize) {
        let z = _mm512_setzero_ps();
        let (mut a0, mut a1, mut a2, mut a3) = ([z; NR], [z; NR], [z; NR], [z; NR]);
        // One 16-lane step at `kk` (lanes outside `mask` read as zero).
        macro_rules! step {
            ($kk:expr, $mask:expr) => {{
                let (kk, mask): (usize, __mmask16) = ($kk, $mask);
                let w0 = _mm512_maskz_loadu_ps(mask, wp[0].add(kk));
                let w1 = _mm512_maskz_loadu_ps(mask, wp[1].add(kk));
                let w2 = _mm512_maskz_loadu_ps(mask, wp[2].add(kk));
                let w3 = _mm512_maskz_loadu_ps(mask, wp[3].add(kk));
                macro_rules! fma4 {
                    ($acc:ident, $r:expr) => {
                        if R > $r {
                            let xv = _mm512_maskz_loadu_ps(mask, xp.add($r * k + kk));
                            $acc[0] = _mm512_fmadd_ps(xv, w0, $acc[0]);
                            $acc[1] = _mm512_fmadd_ps(xv, w1, $acc[1]);
                            $acc[2] = _mm512_fmadd_ps(xv, w2, $acc[2]);
                            $acc[3] = _mm512_fmadd_ps(xv, w3, $acc[3]);
                        }
                    };
                }
                fma4!(a0, 0);
                fma4!(a1, 1);
                fma4!(a2, 2);
                fma4!(a3, 3);
            }};
        }
        let mut kk = 0;
        while kk + 16 <= k {
            step!(kk, !0);
            kk += 16;
        }
        if kk < k {
            step!(kk, (1u16 << (k - kk)) - 1);
        }
        for (r, acc_r) in [a0, a1, a2, a3].iter().take(R).enumerate() {
            let sums = hsum4(acc_r);
            let dst = yp.add(r * ldy);
            if nr == NR {
                _mm_storeu_ps(dst, sums);
            } else {
                let mut tmp = [0f32; NR];
                _mm_storeu_ps(tmp.as_mut_ptr(), sums);
                std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, nr);
            }
        }
    }

    /// The lane sums of four vectors, as one 4-lane vector.
    #[target_feature(enable = "avx512f,avx512dq")]
    #[inline]
    unsafe fn hsum4(v: &[__m512; NR]) -> __m128 {
        let mut q = [_mm_setzero_ps(); NR];
        for c in 0..NR {
            let h = _mm256_add_ps(_mm512_castps512_ps256(v[c]), _mm512_extractf32x8_ps::<1>(v[c]));
            q[c] = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
        }
        _mm_hadd_ps(_mm_hadd_ps(q[0], q[1]), _mm_hadd_ps(q[2], q[3]))
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

    /// Every row count up to MAX_ROWS, widths with and without a 16-lane tail, output widths
    /// with a short last tile, small (one thread) and large (pool) problems, against f64 sums.
    #[test]
    fn small_matmul_matches_f64_reference() {
        if !available() {
            eprintln!("no AVX-512: small_matmul not used on this CPU");
            return;
        }
        for &(n, k) in &[(1usize, 1usize), (5, 7), (9, 33), (64, 576), (1538, 576), (576, 1536), (130, 100)] {
            let w = values(n * k, (n * 31 + k) as u64);
            for m in 1..=MAX_ROWS {
                let x = values(m * k, (m * 7 + k) as u64);
                let mut y = vec![f32::NAN; m * n];
                matmul(&w, n, k, &x, m, &mut y);
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k).map(|t| x[i * k + t] as f64 * w[j * k + t] as f64).sum();
                        let got = y[i * n + j] as f64;
                        assert!((got - want).abs() <= 1e-4 * (1.0 + want.abs()), "n={n} k={k} m={m} y[{i},{j}] = {got}, want {want}");
                    }
                }
            }
        }
    }

    /// `cargo test --release -p personacore small_matmul_bench -- --ignored --nocapture --test-threads=1`:
    /// this kernel against candle's matmul on the default model's shapes.
    #[test]
    #[ignore]
    fn small_matmul_bench() {
        use candle_core::{Device, Tensor};
        for &(n, k) in &[(576usize, 576usize), (1536, 576), (576, 1536), (49152, 576)] {
            let w = values(n * k, 3);
            let wt = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu).unwrap();
            for &m in &[1usize, 4, 8, 16, 32] {
                let x = values(m * k, 5);
                let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
                let mut y = vec![0f32; m * n];
                let iters = (2e9 / (n * k * m) as f64).clamp(20.0, 5000.0) as usize;
                let time = |f: &mut dyn FnMut()| {
                    for _ in 0..iters / 10 {
                        f();
                    }
                    let t = std::time::Instant::now();
                    for _ in 0..iters {
                        f();
                    }
                    t.elapsed().as_secs_f64() / iters as f64
                };
                let ours = time(&mut || matmul(&w, n, k, std::hint::black_box(&x), m, &mut y));
                let candle = time(&mut || {
                    std::hint::black_box(xt.matmul(&wt.t().unwrap()).unwrap());
                });
                println!(
                    "[{m},{k}] x [{n},{k}]^T: ours {:.1} us ({:.1} GB/s, {:.1} GFLOP/s), candle {:.1} us, ratio {:.2}x",
                    ours * 1e6,
                    (n * k * 4) as f64 / ours / 1e9,
                    (2 * n * k * m) as f64 / ours / 1e9,
                    candle * 1e6,
                    candle / ours
                );
            }
        }
    }
}
