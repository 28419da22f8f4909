//! Read-only memory maps of weight files: the GGUF reader's map and candle's memory-mapped
//! safetensors. Mapping is `unsafe` because another process could truncate or rewrite the file
//! while it is mapped; like every mmap-based loader, personacore relies on model files not
//! changing while a model is alive.

use std::fs::File;
use std::path::Path;

use candle_core::safetensors::MmapedSafetensors;
pub use memmap2::Mmap;

/// A read-only map of `file`.
pub fn map_file(file: &File) -> std::io::Result<Mmap> {
    // SAFETY: the file is opened read-only by the caller and not modified by this process; see
    // the module documentation for the assumption about other processes.
    unsafe { Mmap::map(file) }
}

/// The safetensors files at `paths`, memory-mapped and their headers parsed (candle's
/// [`MmapedSafetensors::multi`]: a tensor name found in several files is read from the last).
pub fn safetensors_files<P: AsRef<Path>>(paths: &[P]) -> candle_core::Result<MmapedSafetensors> {
    // SAFETY: read-only maps, as `map_file`.
    unsafe { MmapedSafetensors::multi(paths) }
}

/// Drops the map's resident pages of `start..start + len` (clamped to the map) from this
/// process: they stop counting toward its resident memory and are read from the file again if
/// touched. For a loader that copies each tensor out of the map once. Failures are ignored (the
/// pages then simply stay resident until the map is dropped).
pub fn release_pages(map: &Mmap, start: usize, len: usize) {
    let start = start.min(map.len());
    let len = len.min(map.len() - start);
    if len == 0 {
        return;
    }
    // SAFETY: the map is a read-only file mapping: MADV_DONTNEED drops its pages, and a later
    // access faults in the same bytes from the file (the assumption of the module documentation),
    // so every reference into the map keeps seeing the same values. The range lies in the map.
    let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len) };
}

/// Returns the free memory of the C heap to the system (glibc's `malloc_trim`): after a loader
/// frees many small allocations (a GGUF's metadata arrays), their pages otherwise stay resident.
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free pages of the allocator's own heap; it is safe to
    // call at any time from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}
