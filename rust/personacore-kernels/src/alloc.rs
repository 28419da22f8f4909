//! glibc's allocator told to keep large freed buffers for reuse.
//!
//! Every layer of a forward pass allocates its activations afresh (the kernels return new
//! vectors that candle tensors own): at a 4,096-token pooled capture that is ~10 to 25 MB per
//! buffer, several per layer. glibc serves requests above its mmap threshold (128 KiB at start,
//! raised by each freed mapping up to 32 MiB) with a fresh `mmap` and gives them back with
//! `munmap` on free, so every layer's buffers arrive as new pages the kernel must clear (10% of
//! such a pass in `perf`), and freed memory at the top of the heap beyond the trim threshold is
//! returned to the system only to be requested again by the next layer.
//!
//! [`keep_freed_buffers`] fixes the mmap threshold at glibc's maximum (half its 64 MiB heap size)
//! and raises the trim threshold, so those buffers come from the heap and their pages are reused
//! layer after layer.

/// Requests up to this size come from the heap (glibc refuses more than half its heap size).
pub const MMAP_THRESHOLD: usize = 32 << 20;
/// Free memory at the top of the heap kept for reuse rather than returned to the system.
pub const TRIM_THRESHOLD: usize = 512 << 20;

/// Fixes glibc's mmap threshold at [`MMAP_THRESHOLD`] and its trim threshold at
/// [`TRIM_THRESHOLD`]; returns whether both settings took. Leaves the allocator as it is, and
/// returns `false`, where the environment sets either value already (`MALLOC_MMAP_THRESHOLD_`,
/// `MALLOC_TRIM_THRESHOLD_`, or the `glibc.malloc` tunables in `GLIBC_TUNABLES`) and on targets
/// other than glibc.
///
/// Safe at any time: `mallopt` only changes which free memory glibc keeps and where it places
/// large blocks (under its own arena lock); nothing allocated moves, and memory kept after a
/// long pass is reused by later allocations of any size in the process. The cost is resident
/// memory: up to [`TRIM_THRESHOLD`] of free heap may stay mapped after the largest pass (the
/// peak itself does not grow: those pages were in use at the peak).
pub fn keep_freed_buffers() -> bool {
    let set_by_user =
        ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"].iter().any(|v| std::env::var_os(v).is_some())
            || std::env::var("GLIBC_TUNABLES")
                .is_ok_and(|t| t.contains("malloc.mmap_threshold") || t.contains("malloc.trim_threshold"));
    if set_by_user {
        return false;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt takes two plain integers and only changes glibc's allocation policy
        // (see above); both values fit a c_int.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// glibc takes both settings (it refuses an mmap threshold above half its heap size), and
    /// allocation still works across the threshold afterwards.
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_accepts_the_settings() {
        if std::env::var_os("GLIBC_TUNABLES").is_some()
            || std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some()
            || std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_some()
        {
            return;
        }
        assert!(keep_freed_buffers());
        for n in [1usize << 10, MMAP_THRESHOLD / 4 - 8, MMAP_THRESHOLD / 4 + 8, MMAP_THRESHOLD] {
            let v = vec![1.5f32; n];
            assert_eq!(v.iter().map(|x| *x as f64).sum::<f64>(), 1.5 * n as f64);
        }
    }
}
