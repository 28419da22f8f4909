//! The one error type of the engine. Each variant is a kind the Python bindings map to its own
//! exception class (a subclass of `personacore.PersonacoreError`), so callers can tell a missing
//! file from a corrupt one from bad input without parsing messages.

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
    #[error("unsupported architecture '{0}' (supported: llama, mistral, qwen2, qwen3)")]
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
    /// Stable name of the kind, used by the bindings to choose the Python exception class.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::NotFound(_) => "NotFound",
            Error::Io { .. } => "Io",
            Error::InvalidModelFile { .. } => "InvalidModelFile",
            Error::Config(_) => "Config",
            Error::UnsupportedArchitecture(_) => "UnsupportedArchitecture",
            Error::Tokenizer(_) => "Tokenizer",
            Error::ChatTemplate(_) => "ChatTemplate",
            Error::InvalidInput(_) => "InvalidInput",
            Error::Compute(_) => "Compute",
        }
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
