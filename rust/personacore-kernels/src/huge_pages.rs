//! Zeroed buffers (the packed f32 weights, the repacked quantized blocks) whose pages the kernel
//! may back with 2 MiB huge pages.
//!
//! A decode step streams every weight once (~540 MB for the default model in f32). On 4 KiB
//! pages that is ~130,000 page translations per token, most of them TLB misses; on 2 MiB pages a
//! few hundred. Linux gives anonymous memory huge pages at fault time only where the
//! transparent-huge-page mode is `always`, or where the range was marked with
//! `madvise(MADV_HUGEPAGE)` under the common `madvise` mode (Debian, Ubuntu), so a large
//! buffer here is its own mapping, starting on a 2 MiB boundary and marked before its first
//! touch. Measured on the default model (`THP_enabled` `madvise` against `always`, 64 greedy
//! tokens, 2 threads): 1.40–1.45 s against 1.12–1.22 s (benches/README.md, "Huge pages").
//! Where huge pages are off (`never`) the mark changes nothing; a buffer below 2 MiB, a mapping
//! the system refuses, or any buffer while the environment sets `PERSONACORE_HUGE_PAGES=0`, is a
//! plain `Vec`.

/// Size of a huge page on x86-64 Linux, and the smallest buffer given its own mapping.
pub const HUGE_PAGE: usize = 2 << 20;

/// Element types whose all-zero bit pattern is a valid value (what a fresh mapping holds).
pub trait Zero: Copy + Default + Send + Sync + 'static {}
impl Zero for f32 {}
impl Zero for u8 {}

/// `len` zeroed values starting on a 64-byte boundary; from [`HUGE_PAGE`] bytes on, in a mapping
/// of their own marked for huge pages (see the module documentation).
pub struct Zeroed<T: Zero> {
    storage: Storage<T>,
    len: usize,
}

/// Zeroed f32 values (packed weight panels).
pub type ZeroedF32 = Zeroed<f32>;

enum Storage<T> {
    /// A small buffer: a vector and the offset of its first 64-byte boundary.
    Heap(Vec<T>, usize),
    /// An anonymous mapping (`base`, `map_len` bytes) and the 2 MiB boundary inside it.
    #[cfg(target_os = "linux")]
    Map { base: *mut libc::c_void, map_len: usize, start: *mut T },
}

// SAFETY: the buffer owns its memory exclusively (like a `Vec<T>`); the raw pointers of the
// mapping are never shared outside `&self`/`&mut self` borrows.
unsafe impl<T: Zero> Send for Zeroed<T> {}
// SAFETY: as above; shared access is read-only through `Deref`.
unsafe impl<T: Zero> Sync for Zeroed<T> {}

impl<T: Zero> Zeroed<T> {
    /// `len` zeros.
    pub fn new(len: usize) -> Self {
        #[cfg(target_os = "linux")]
        if let Some(storage) = Self::map(len) {
            return Self { storage, len };
        }
        let slack = 64 / std::mem::size_of::<T>().max(1);
        let buf = vec![T::default(); len + slack];
        // The buffer is aligned to its element, so the boundary is less than `slack` values in.
        let start = buf.as_ptr().align_offset(64).min(slack - 1);
        Self { storage: Storage::Heap(buf, start), len }
    }

    /// Whether the buffer is a mapping marked for huge pages (not whether the kernel gave them).
    pub fn is_huge_page_mapping(&self) -> bool {
        !matches!(self.storage, Storage::Heap(..))
    }

    #[cfg(target_os = "linux")]
    fn map(len: usize) -> Option<Storage<T>> {
        let bytes = len.checked_mul(std::mem::size_of::<T>())?;
        if bytes < HUGE_PAGE || std::env::var_os("PERSONACORE_HUGE_PAGES").is_some_and(|v| v == "0") {
            return None;
        }
        let map_len = bytes.checked_add(HUGE_PAGE)?;
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing; the
        // result is checked before use.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return None;
        }
        let skip = (base as usize).next_multiple_of(HUGE_PAGE) - base as usize;
        // SAFETY: `skip < HUGE_PAGE`, so `start .. start + bytes` lies inside the mapping.
        let start = unsafe { base.cast::<u8>().add(skip) };
        // SAFETY: marks pages of our own mapping; failure (e.g. THP compiled out) is harmless.
        unsafe { libc::madvise(start.cast(), bytes, libc::MADV_HUGEPAGE) };
        Some(Storage::Map { base, map_len, start: start.cast() })
    }
}

impl<T: Zero> Drop for Zeroed<T> {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        if let Storage::Map { base, map_len, .. } = self.storage {
            // SAFETY: unmaps exactly the mapping made in `map`, which nothing borrows any more.
            unsafe { libc::munmap(base, map_len) };
        }
    }
}

impl<T: Zero> std::ops::Deref for Zeroed<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match &self.storage {
            Storage::Heap(buf, start) => &buf[*start..*start + self.len],
            // SAFETY: `start` begins `len` values of the mapping (zeroed by the kernel, and zero
            // is a valid `T`), alive as long as `self`.
            #[cfg(target_os = "linux")]
            Storage::Map { start, .. } => unsafe { std::slice::from_raw_parts(*start, self.len) },
        }
    }
}

impl<T: Zero> std::ops::DerefMut for Zeroed<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match &mut self.storage {
            Storage::Heap(buf, start) => &mut buf[*start..*start + self.len],
            // SAFETY: as in `deref`, borrowed mutably through `&mut self`.
            #[cfg(target_os = "linux")]
            Storage::Map { start, .. } => unsafe { std::slice::from_raw_parts_mut(*start, self.len) },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_aligned_and_writable_on_both_paths() {
        for len in [0, 7, 1000, HUGE_PAGE / 4 - 1, HUGE_PAGE / 4, 3 * HUGE_PAGE / 4 + 5] {
            let mut b = ZeroedF32::new(len);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0.0));
            assert!((b.as_ptr() as usize).is_multiple_of(64), "len {len}");
            assert_eq!(b.is_huge_page_mapping(), cfg!(target_os = "linux") && len * 4 >= HUGE_PAGE);
            for (i, x) in b.iter_mut().enumerate() {
                *x = i as f32;
            }
            assert!(b.iter().enumerate().all(|(i, &x)| x == i as f32));
        }
        for len in [3, HUGE_PAGE + 1] {
            let b = Zeroed::<u8>::new(len);
            assert!(b.len() == len && b.iter().all(|&x| x == 0) && (b.as_ptr() as usize).is_multiple_of(64));
        }
    }

    /// Where the system's mode allows them (`always` or `madvise`), the mapping gets huge pages.
    #[test]
    #[cfg(target_os = "linux")]
    fn large_buffers_get_huge_pages_where_the_system_allows() {
        let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
        let mut b = ZeroedF32::new(8 * HUGE_PAGE / 4);
        b.iter_mut().for_each(|x| *x = 1.0);
        let start = b.as_ptr() as usize;
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
        // the mapping's AnonHugePages line (the block whose header range holds `start`)
        let mut in_ours = false;
        let mut huge_kb = None;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((lo, hi)) = range.split_once('-') {
                    if let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16)) {
                        in_ours = (lo..hi).contains(&start);
                        continue;
                    }
                }
            }
            if in_ours {
                if let Some(v) = line.strip_prefix("AnonHugePages:") {
                    huge_kb = v.trim().trim_end_matches(" kB").trim().parse::<usize>().ok();
                }
            }
        }
        if mode.contains("[always]") || mode.contains("[madvise]") {
            assert!(huge_kb.is_some_and(|kb| kb >= 2048), "{huge_kb:?} with {mode}");
        }
    }
}
