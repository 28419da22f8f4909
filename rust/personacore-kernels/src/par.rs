//! A tiny fork-join pool for the matmuls: the calling thread works too, helpers join a job only
//! while it is open, and every wait spins briefly, then yields, then parks.
//!
//! Why not rayon or candle's pool: a decode step makes ~200 small matmuls of tens of µs. The rayon
//! global pool parks the caller on a futex per call (a slower decode), and candle's barrier pool
//! spins without yielding, so it collapses when the cores are shared with another process
//! (benches/README.md has the numbers). Here the caller never waits for a helper that has not
//! started: it does all the work itself and closes the job, and only helpers that joined while it
//! was open are waited for (they are then finishing their last chunk).

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;

/// `state`: generation in the high 32 bits, `CLOSED`, and the number of helpers at work.
const CLOSED: u64 = 1 << 31;
const ACTIVE: u64 = CLOSED - 1;
/// Busy-wait iterations, then `yield_now` calls, before a helper parks (uncontended, a
/// decode step's gaps between matmuls are mostly shorter than that, so helpers stay awake).
const SPINS: u32 = 200;
const YIELDS: u32 = 1_000;

type Job = *const (dyn Fn() + Sync);

struct Pool {
    state: AtomicU64,
    /// The current job; written by the caller (holding `lock`) only while no helper is active.
    job: UnsafeCell<Option<Job>>,
    panicked: AtomicBool,
    lock: Mutex<()>,
    helpers: OnceLock<Vec<Thread>>,
}

// SAFETY: `job` is written only by the lock holder while the job is closed with no active
// helper, and read only by helpers that joined the open job (see `run` and `helper`).
unsafe impl Sync for Pool {}

fn pool() -> Option<&'static Pool> {
    static POOL: OnceLock<Option<&'static Pool>> = OnceLock::new();
    *POOL.get_or_init(|| {
        let n = candle_core::utils::get_num_threads().saturating_sub(1);
        if n == 0 {
            return None;
        }
        let pool: &'static Pool = Box::leak(Box::new(Pool {
            state: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            panicked: AtomicBool::new(false),
            lock: Mutex::new(()),
            helpers: OnceLock::new(),
        }));
        let mut helpers = Vec::new();
        for i in 0..n {
            let spawned = std::thread::Builder::new().name(format!("personacore-mm-{i}")).spawn(move || helper(pool));
            match spawned {
                Ok(h) => helpers.push(h.thread().clone()),
                Err(_) => break,
            }
        }
        if helpers.is_empty() {
            return None;
        }
        let _ = pool.helpers.set(helpers);
        Some(pool)
    })
}

/// Threads that run a job: the caller plus the helpers.
pub fn threads() -> usize {
    pool().map_or(1, |p| p.helpers.get().map_or(0, Vec::len) + 1)
}

/// Runs `f` on this thread and on every helper that joins before this thread's call returns;
/// `f` must split its work itself (e.g. a shared cursor) and return when none is left.
pub fn run(f: &(dyn Fn() + Sync)) {
    let Some(pool) = pool() else { return f() };
    // Another thread's job in progress (two models, or two Python threads): work alone.
    let _guard = match pool.lock.try_lock() {
        Ok(g) => g,
        // A panic in an earlier job: the state was still left closed with no helper active.
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => return f(),
    };
    let state = pool.state.load(Ordering::Acquire);
    debug_assert!(state & ACTIVE == 0 && state & CLOSED != 0 || state == 0);
    // SAFETY: we hold the lock and no helper is active (the previous job ended with none), so
    // nobody reads `job`. The lifetime is erased: helpers use it only while joined, and
    // `Close` waits for all of them before this function returns (or unwinds).
    unsafe { *pool.job.get() = Some(std::mem::transmute::<&(dyn Fn() + Sync), &'static (dyn Fn() + Sync)>(f) as Job) };
    let gen = (state >> 32).wrapping_add(1) & 0xFFFF_FFFF;
    pool.state.store(gen << 32, Ordering::Release);
    for h in pool.helpers.get().into_iter().flatten() {
        h.unpark();
    }
    struct Close(&'static Pool);
    impl Drop for Close {
        fn drop(&mut self) {
            let state = &self.0.state;
            state.fetch_or(CLOSED, Ordering::AcqRel);
            let mut n = 0u32;
            while state.load(Ordering::Acquire) & ACTIVE != 0 {
                backoff(&mut n);
            }
        }
    }
    let close = Close(pool);
    f();
    drop(close);
    if pool.panicked.swap(false, Ordering::AcqRel) {
        panic!("a matmul worker panicked");
    }
}

fn backoff(n: &mut u32) {
    *n += 1;
    if *n < SPINS {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

fn helper(pool: &'static Pool) {
    let mut seen = 0u64;
    let mut n = 0u32;
    loop {
        let state = pool.state.load(Ordering::Acquire);
        let gen = state >> 32;
        if gen == seen {
            n += 1;
            if n < SPINS {
                std::hint::spin_loop();
            } else if n < SPINS + YIELDS {
                std::thread::yield_now();
            } else {
                // `run` unparks after publishing a job; a token left from earlier only
                // makes this return at once and go round the loop again.
                std::thread::park();
            }
            continue;
        }
        seen = gen;
        n = 0;
        if state & CLOSED != 0 {
            continue;
        }
        // Join the job unless it closed (or a newer one started) meanwhile.
        if pool.state.compare_exchange(state, state + 1, Ordering::AcqRel, Ordering::Acquire).is_err() {
            seen = gen.wrapping_sub(1); // look again
            continue;
        }
        // SAFETY: joined while open, so `job` is this generation's and stays alive until
        // we leave (the caller waits for ACTIVE to drop to zero).
        let job = unsafe { (*pool.job.get()).expect("job published before the generation") };
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe { (*job)() })).is_err() {
            pool.panicked.store(true, Ordering::Release);
        }
        pool.state.fetch_sub(1, Ordering::Release);
    }
}

/// Calls `f(start, end)` for consecutive ranges of `0..n` of at most `chunk` items, on this
/// thread and the pool's helpers; every range is handed out exactly once.
pub fn for_chunks(n: usize, chunk: usize, f: &(dyn Fn(usize, usize) + Sync)) {
    let chunk = chunk.max(1);
    let cursor = std::sync::atomic::AtomicUsize::new(0);
    run(&|| loop {
        let start = cursor.fetch_add(chunk, Ordering::Relaxed);
        if start >= n {
            break;
        }
        f(start, n.min(start + chunk));
    });
}

/// Calls `f(start, end)` over `0..n` on this thread and the pool's helpers in ranges that shrink
/// as the work runs out (each `remaining / (2 · threads)`, at least `min_chunk`): large first
/// ranges keep per-range costs low, small last ones let a thread whose core is shared with a
/// busy neighbour fall behind without the others waiting for it. Every index is handed out once.
pub fn for_guided(n: usize, min_chunk: usize, f: &(dyn Fn(usize, usize) + Sync)) {
    let (min_chunk, split) = (min_chunk.max(1), 2 * threads());
    let cursor = std::sync::atomic::AtomicUsize::new(0);
    run(&|| {
        let mut start = cursor.load(Ordering::Relaxed);
        while start < n {
            let end = n.min(start + ((n - start) / split).max(min_chunk));
            match cursor.compare_exchange_weak(start, end, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => {
                    f(start, end);
                    start = cursor.load(Ordering::Relaxed);
                }
                Err(now) => start = now,
            }
        }
    });
}

/// Calls `f(start, end)` over `0..n`: all at once on this thread unless `parallel`, else in
/// `parts_per_thread` ranges per pool thread (more ranges than threads even out a busy core).
pub fn for_parts(n: usize, parallel: bool, parts_per_thread: usize, f: &(dyn Fn(usize, usize) + Sync)) {
    if parallel {
        for_chunks(n, n.div_ceil(parts_per_thread * threads()), f);
    } else {
        f(0, n);
    }
}

/// Fixes the CPU thread count once. candle asks for it on every matmul and, when
/// `RAYON_NUM_THREADS` is unset, re-reads `/proc/cpuinfo` each time (measured: ~8% of a decode
/// step); pinning its own default in the environment removes that cost. Call before any compute.
///
/// Also gives candle's own spinning pool for its quantized CPU matmuls no workers
/// (`CANDLE_NUM_THREADS=1` unless set): personacore splits those matmuls by rows over this pool
/// instead, so two pools never spin against each other for the same cores (measured on Gemma 3
/// 270M `quantized=True`, 2 cores: 37% of a decode's samples in candle's barrier wait).
pub fn init_threads() -> usize {
    let n = candle_core::utils::get_num_threads();
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // SAFETY: called once at module initialisation, before the engine starts threads.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: as above.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
    n
}

/// A pointer shared by the workers of a parallel matmul, each writing its own part.
pub struct SyncPtr(pub *mut f32);
// SAFETY: only used to hand disjoint output slices to the pool's workers.
unsafe impl Sync for SyncPtr {}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guided ranges cover `0..n` exactly once, in order of hand-out, each at least `min_chunk`
    /// long but the last, and shrinking.
    #[test]
    fn guided_ranges_cover_everything_once() {
        for (n, min_chunk) in [(0usize, 2usize), (1, 2), (5, 1), (32, 2), (33, 2), (1000, 3), (7, 100)] {
            let seen = Mutex::new(Vec::new());
            for_guided(n, min_chunk, &|a, b| seen.lock().unwrap().push((a, b)));
            let mut ranges = seen.into_inner().unwrap();
            ranges.sort();
            let mut at = 0;
            for (i, &(a, b)) in ranges.iter().enumerate() {
                assert_eq!(a, at, "n={n}: ranges {ranges:?}");
                assert!(b > a && (b - a >= min_chunk || i + 1 == ranges.len()), "n={n}: ranges {ranges:?}");
                at = b;
            }
            assert_eq!(at, n, "n={n}: ranges {ranges:?}");
            let lens: Vec<usize> = ranges.iter().map(|(a, b)| b - a).collect();
            assert!(lens.windows(2).all(|w| w[1] <= w[0]), "n={n}: lengths {lens:?} grow");
        }
    }
}
