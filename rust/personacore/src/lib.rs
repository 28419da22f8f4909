//! personacore: a transformer engine that reads and steers every layer of a language model.
//!
//! Load a model ([`Model::load`]) from an HF directory or a GGUF file, then read its residual
//! stream at every layer ([`Model::hidden_states`]), pool it over prompt/response tokens inside the
//! forward pass ([`Model::pool`]), or hook the layer loop ([`hooks`]). Layer and position
//! conventions follow transformers' `output_hidden_states` (see docs/conventions.md, Layers and
//! Positions).
//!
//! No `unsafe` here: the CPU kernels and file maps that need it live in `personacore-kernels`.

#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod fingerprint;
pub mod generation;
pub mod hooks;
pub mod models;
pub mod nn;
pub mod pipeline;
pub mod requests;
pub mod tokenizer;
pub mod weights;

pub use error::{Error, Result};
pub use nn::MatmulPrecision;
pub use personacore_kernels::alloc::keep_freed_buffers;
pub use personacore_kernels::par::init_threads;
pub use pipeline::{
    avx2_enabled, cuda_available, cuda_compiled, parse_device, parse_dtype, LoadOptions, Model, Pooling,
};
