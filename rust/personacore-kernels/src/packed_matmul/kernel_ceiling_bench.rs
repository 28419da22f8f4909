//! Where the f32 kernel's time goes, on one thread, timed in this thread's CPU time (so a
//! shared host's other processes preempting it do not count). `PC_WHAT` picks the measurement:
//!
//! - `fma`: a loop of independent FMAs on registers (the core's FMA peak);
//! - `dpbf16`: the same with AVX512-BF16 pair dot products (`vdpbf16ps`, 32 bf16 products per
//!   instruction), on a CPU that has them: the peak a bf16 kernel without AMX could reach, and a
//!   third of it the peak of `precision="high"`'s split products (three bf16 products per f32 one);
//! - `tile`: one 12-row tile over a panel slice of `PC_KC` steps held in L1 (`PC_MIS` floats
//!   off a 64-byte boundary);
//! - `mm` / `swiglu`: a whole product `[PC_M, PC_K] x [PC_N, PC_K]ᵀ` (gate/up pairs of `PC_N`
//!   each for `swiglu`), best of several calls;
//! - `pack`: the rearranging of `PC_M` rows of `PC_K` for the micro-kernel.
//!
//! Measured (Xeon with AVX-512, 2 cores; CPU time, so absolute numbers read low when the
//! hypervisor steals time, ratios hold): `fma` ~205 GFLOP/s, `tile` ~175 (85%). The same
//! ceiling held for every register tile shape tried in inline assembly (experiments not kept:
//! 12×32, 14×32, 8×48, 6×64, 4×64, 4×96 all at ~170–175 with the slice in L1), and unrolling
//! the k loop by 4 changed nothing: the cost is the loads issued beside the FMAs (24
//! register-only FMAs + 2 vector loads run at the FMA peak; each further load per 24 FMAs costs
//! about 1%, whether a broadcast, a scalar or an unused load).

use super::*;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// This thread's CPU time in seconds.
fn cpu_now() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// `iters` rounds of 24 independent FMAs.
#[target_feature(enable = "avx512f")]
unsafe fn plain_fmas(iters: usize) -> f32 {
    let mut acc = [_mm512_set1_ps(0.0); 24];
    let (a, b) = (_mm512_set1_ps(1.000_000_1), _mm512_set1_ps(1e-7));
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = _mm512_fmadd_ps(*v, a, b);
        }
    }
    _mm512_reduce_add_ps(acc.iter().fold(_mm512_setzero_ps(), |s, v| _mm512_add_ps(s, *v)))
}

/// `iters` rounds of 24 independent bf16 pair dot products (`vdpbf16ps`).
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn plain_dpbf16(iters: usize) -> f32 {
    let mut acc = [_mm512_set1_ps(0.0); 24];
    let a: __m512bh = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3), _mm512_set1_ps(2e-3));
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = _mm512_dpbf16_ps(*v, a, a);
        }
    }
    _mm512_reduce_add_ps(acc.iter().fold(_mm512_setzero_ps(), |s, v| _mm512_add_ps(s, *v)))
}

/// `PC_WHAT=tile RAYON_NUM_THREADS=1 cargo test --release -p personacore-kernels
/// kernel_ceiling_bench -- --ignored --nocapture` (see the module's documentation).
#[test]
#[ignore = "timing; run with --ignored --nocapture"]
fn kernel_ceiling_bench() {
    if !available() {
        return;
    }
    let what = std::env::var("PC_WHAT").unwrap_or_else(|_| "tile".into());
    let fmas = 1usize << env("PC_FMAS_LOG2", 30);
    let f = |i: usize, seed: usize| (((i + seed) * 37 % 101) as f32 / 50.0) - 1.0;
    match what.as_str() {
        "dpbf16" => {
            if !std::is_x86_feature_detected!("avx512bf16") {
                eprintln!("dpbf16: this CPU has no AVX512-BF16");
                return;
            }
            let t = cpu_now();
            // SAFETY: AVX-512 and AVX512-BF16 checked above.
            std::hint::black_box(unsafe { plain_dpbf16(fmas / 24) });
            let s = cpu_now() - t;
            // 32 bf16 products (64 flops) per instruction; a "high" f32 product takes three
            let flops = fmas as f64 * 64.0 / s / 1e9;
            eprintln!("dpbf16: {flops:.1} GFLOP/s of bf16 products, {:.1} GFLOP/s of bf16x3 f32 products", flops / 3.0);
        }
        "fma" | "tile" => {
            let kc = env("PC_KC", 192);
            let raw: Vec<f32> = (0..kc * NR + 16).map(|i| f(i, 1) * 0.01).collect();
            let start = raw.as_ptr().align_offset(64).min(15) + env("PC_MIS", 0);
            let b = &raw[start..start + kc * NR];
            let x: Vec<f32> = (0..kc * MR).map(|i| f(i, 2) * 0.01).collect();
            let mut y = vec![0f32; MR * NR];
            let t = cpu_now();
            if what == "fma" {
                // SAFETY: AVX-512 checked above.
                std::hint::black_box(unsafe { plain_fmas(fmas / 24) });
            } else {
                for _ in 0..fmas / (kc * 24) {
                    // SAFETY: AVX-512 checked above; b is [kc][32], x [kc][12], y [12][32].
                    unsafe { avx512::bench_tile(b.as_ptr(), x.as_ptr(), kc, y.as_mut_ptr()) };
                }
            }
            let s = cpu_now() - t;
            std::hint::black_box(&y);
            eprintln!(
                "{what} kc {kc} misaligned by {} B: {:.1} GFLOP/s",
                4 * env("PC_MIS", 0),
                fmas as f64 * 32.0 / s / 1e9
            );
        }
        "mm" | "swiglu" => {
            let (m, n, k) = (env("PC_M", 1024), env("PC_N", 576), env("PC_K", 576));
            let w: Vec<f32> = (0..n * k).map(|i| f(i, 3)).collect();
            let x: Vec<f32> = (0..m * k).map(|i| f(i, 4)).collect();
            let packed = PackedMatrix::pack(&w, n, k);
            let packed = if what == "mm" { packed } else { PackedMatrix::interleave(&packed, &packed).expect("pairs") };
            let mut y = vec![0f32; m * n];
            let (mut best, mut best_wall) = (f64::MAX, f64::MAX);
            for _ in 0..(fmas * 16 / (m * packed.rows() * k)).max(3) {
                let (t, wall) = (cpu_now(), std::time::Instant::now());
                if what == "mm" {
                    packed.matmul(std::hint::black_box(&x), m, &mut y);
                } else {
                    packed.matmul_swiglu(std::hint::black_box(&x), m, &mut y);
                }
                best = best.min(cpu_now() - t);
                best_wall = best_wall.min(wall.elapsed().as_secs_f64());
            }
            let fl = (2 * m * packed.rows() * k) as f64;
            eprintln!(
                "{what} m {m} n {} k {k}: best {:.1} GFLOP/s (this thread's CPU time), wall {:.1} GFLOP/s",
                packed.rows(),
                fl / best / 1e9,
                fl / best_wall / 1e9
            );
        }
        "pack" => {
            let (m, k) = (env("PC_M", 2048), env("PC_K", 576));
            let x: Vec<f32> = (0..m * k).map(|i| f(i, 5)).collect();
            let mut best = f64::MAX;
            for _ in 0..200 {
                let t = cpu_now();
                std::hint::black_box(PackedRows::pack(std::hint::black_box(&x), m, k));
                best = best.min(cpu_now() - t);
            }
            eprintln!("pack m {m} k {k}: {:.1} us, {:.1} GB/s read", best * 1e6, (m * k * 4) as f64 / best / 1e9);
        }
        other => panic!("PC_WHAT={other}: expected fma, dpbf16, tile, mm, swiglu or pack"),
    }
}
