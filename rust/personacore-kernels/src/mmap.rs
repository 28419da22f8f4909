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
