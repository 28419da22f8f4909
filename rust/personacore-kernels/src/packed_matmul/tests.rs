//! Tests and timing benches of the packed f32 matmul.

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
        assert_eq!(*PackedMatrix::pack_transposed(&a, ra, ca).data, *PackedMatrix::pack(&at, ca, ra).data, "{ra}x{ca}");
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

/// Every way of building a matrix puts its panels on a 64-byte boundary, whatever the
/// allocator returned.
#[test]
fn panels_start_on_a_cache_line() {
    for (rows, cols) in [(1usize, 1usize), (32, 3), (64, 576), (96, 17)] {
        let a = PackedMatrix::pack(&values(rows * cols, 1), rows, cols);
        let t = PackedMatrix::pack_transposed(&values(rows * cols, 2), cols, rows);
        assert_eq!(a.data.as_ptr() as usize % 64, 0, "pack {rows}x{cols}");
        assert_eq!(t.data.as_ptr() as usize % 64, 0, "pack_transposed {rows}x{cols}");
        assert_eq!(a.data.len(), rows.div_ceil(NR) * cols * NR);
        if rows.is_multiple_of(NR) {
            let g = PackedMatrix::interleave(&a, &PackedMatrix::pack(&values(rows * cols, 3), rows, cols)).unwrap();
            assert_eq!(g.data.as_ptr() as usize % 64, 0, "interleave {rows}x{cols}");
            assert_eq!(g.unpack_interleaved().0, a.unpack());
        }
    }
}
