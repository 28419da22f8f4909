//! The one error type of the engine. Each variant is a kind the Python bindings map to its own
//! exception class (a subclass of `personacore.PersonacoreError`) with an exhaustive `match`
//! (rust/personacore-py/src/errors.rs), so callers can tell a missing file from a corrupt one from
//! bad input without parsing messages. Adding a variant fails the bindings' build until it is mapped.

use std::path::{Path, PathBuf};

/// Result alias used throughout the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every way the engine can fail. Messages name the offending path, field or value.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A path that should exist does not.
    #[error("file not found: {}", .0.display())]
    NotFound(PathBuf),
    /// An I/O failure while reading or writing a path.
    #[error("i/o error on {}: {source}", path.display())]
    Io {
        /// The path being read or written.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A model/weights file that exists but cannot be parsed (random bytes, truncated, wrong tensor shapes).
    #[error("invalid model file {}: {msg}", path.display())]
    InvalidModelFile {
        /// The offending file.
        path: PathBuf,
        /// What was wrong with it.
        msg: String,
    },
    /// A config (config.json or GGUF metadata) that is malformed or inconsistent.
    #[error("invalid model config: {0}")]
    Config(String),
    /// An architecture the engine does not implement.
    #[error("unsupported architecture '{0}' (supported: llama, mistral, qwen2, qwen3, qwen2_moe, qwen3_moe, gemma2, gemma3)")]
    UnsupportedArchitecture(String),
    /// A tokenizer that cannot be built or used (unknown GGUF pre-tokenizer, bad tokenizer.json).
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// A chat template that fails to parse or render.
    #[error("chat template error: {0}")]
    ChatTemplate(String),
    /// Arguments the caller passed that cannot be used (ids out of range, empty input, mismatched counts).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A failure inside the tensor library that is not the caller's fault.
    #[error("compute error: {0}")]
    Compute(String),
}

impl Error {
    /// One error of each variant, in declaration order (the bindings test their exception map
    /// with these).
    pub fn samples() -> Vec<Error> {
        let path = PathBuf::from("sample/path");
        vec![
            Error::NotFound(path.clone()),
            Error::Io { path: path.clone(), source: std::io::Error::other("sample i/o failure") },
            Error::invalid_file(&path, "sample"),
            Error::Config("sample".into()),
            Error::UnsupportedArchitecture("sample".into()),
            Error::Tokenizer("sample".into()),
            Error::ChatTemplate("sample".into()),
            Error::InvalidInput("sample".into()),
            Error::Compute("sample".into()),
        ]
    }

    /// An `Io` error for `path`, or `NotFound` when the OS says the path does not exist.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound(path.to_path_buf())
        } else {
            Error::Io { path: path.to_path_buf(), source }
        }
    }

    /// An `InvalidModelFile` error for `path`.
    pub fn invalid_file(path: &Path, msg: impl std::fmt::Display) -> Self {
        Error::InvalidModelFile { path: path.to_path_buf(), msg: msg.to_string() }
    }

    /// An `InvalidInput` error.
    pub fn input(msg: impl std::fmt::Display) -> Self {
        Error::InvalidInput(msg.to_string())
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Compute(candle_message(&e))
    }
}

/// A candle error's message without the backtrace candle attaches when `RUST_BACKTRACE` is set.
pub fn candle_message(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_message(inner),
        other => {
            let text = other.to_string();
            match text.find("\n   0: ") {
                Some(i) => text[..i].trim_end().to_string(),
                None => text,
            }
        }
    }
}

/// Shorthand for returning `Err(Error::InvalidInput(format!(..)))`.
#[macro_export]
macro_rules! bail_input {
    ($($arg:tt)*) => { return Err($crate::Error::InvalidInput(format!($($arg)*))) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_cover_every_variant_once() {
        let index = |e: &Error| match e {
            Error::NotFound(_) => 0,
            Error::Io { .. } => 1,
            Error::InvalidModelFile { .. } => 2,
            Error::Config(_) => 3,
            Error::UnsupportedArchitecture(_) => 4,
            Error::Tokenizer(_) => 5,
            Error::ChatTemplate(_) => 6,
            Error::InvalidInput(_) => 7,
            Error::Compute(_) => 8,
        };
        let got: Vec<usize> = Error::samples().iter().map(index).collect();
        assert_eq!(got, (0..9).collect::<Vec<_>>());
    }
}
