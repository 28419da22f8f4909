//! Timing of the two products of an f32 prompt attention's unit.

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
