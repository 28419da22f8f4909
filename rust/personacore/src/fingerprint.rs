//! Content hashes for receipts: a vector's `vector_sha256` and a model's `model_sha256`, as
//! defined in docs/conventions.md (Audit log) so that anyone can recompute them with hashlib.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Files up to this size are hashed whole; larger ones by [`SAMPLES`] blocks.
pub const WHOLE_FILE_LIMIT: u64 = 8 << 20;
/// Blocks read from a larger file, evenly spaced from its first byte to its last.
pub const SAMPLES: u64 = 64;
/// Bytes per block.
pub const BLOCK: u64 = 64 << 10;

/// Lowercase hex of a digest.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of `"f32le " + dims joined by " " + "\n"` followed by the values as little-endian f32,
/// row-major: the hash of a vector of shape `shape` exactly as the engine received it.
pub fn vector_sha256(shape: &[usize], data: &[f32]) -> String {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let mut h = Sha256::new();
    h.update(format!("f32le {}\n", dims.join(" ")).as_bytes());
    for x in data {
        h.update(x.to_le_bytes());
    }
    hex(&h.finalize())
}

/// The files that make a model: a `.gguf` file itself; in a directory, `config.json` and every
/// `*.safetensors` file (top level), sorted by file name.
pub fn model_files(source: &Path) -> Result<Vec<PathBuf>> {
    if !source.is_dir() {
        return Ok(vec![source.to_path_buf()]);
    }
    let entries = std::fs::read_dir(source).map_err(|e| Error::io(source, e))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io(source, e))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if path.is_file() && (name == "config.json" || name.ends_with(".safetensors")) {
            files.push(path);
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

/// sha256 over the model's files (see [`model_files`]), each contributing
/// `"<file name>\n<size in bytes>\n"` then its bytes: all of them when the file is at most
/// [`WHOLE_FILE_LIMIT`], otherwise [`SAMPLES`] blocks of [`BLOCK`] bytes at offsets
/// `k * (size - BLOCK) / (SAMPLES - 1)` (integer division), `k = 0 .. SAMPLES - 1`.
/// Reads at most 4 MiB per file, so it is cheap at load, and it changes with the header
/// (names, dtypes, shapes) and with any retraining that touches the sampled blocks.
pub fn model_sha256(source: &Path) -> Result<String> {
    let mut h = Sha256::new();
    for path in model_files(source)? {
        let mut file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        let size = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        h.update(format!("{name}\n{size}\n").as_bytes());
        if size <= WHOLE_FILE_LIMIT {
            let mut buf = Vec::with_capacity(size as usize);
            file.read_to_end(&mut buf).map_err(|e| Error::io(&path, e))?;
            h.update(&buf);
            continue;
        }
        let mut block = vec![0u8; BLOCK as usize];
        for k in 0..SAMPLES {
            let offset = k * (size - BLOCK) / (SAMPLES - 1);
            file.seek(SeekFrom::Start(offset)).map_err(|e| Error::io(&path, e))?;
            file.read_exact(&mut block).map_err(|e| Error::io(&path, e))?;
            h.update(&block);
        }
    }
    Ok(hex(&h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_hash_covers_shape_and_values() {
        let a = vector_sha256(&[2, 2], &[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(a.len(), 64);
        assert_ne!(a, vector_sha256(&[4], &[1.0, 2.0, 3.0, 4.0]));
        assert_ne!(a, vector_sha256(&[2, 2], &[1.0, 2.0, 3.0, 4.5]));
        // sha256(b"f32le 1\n" + (1.0f32).to_le_bytes()), computed with Python's hashlib.
        assert_eq!(vector_sha256(&[1], &[1.0]), "5905e9c76d5222d04f73a1305a63f0235ada9e566f1bb876410867fe612e5c0c");
    }
}
