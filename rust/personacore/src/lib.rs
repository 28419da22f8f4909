//! personacore: a transformer engine that reads and steers every layer of a language model.
//!
//! Load a model ([`Model::load`]) from an HF directory or a GGUF file, then read its residual
//! stream at every layer ([`Model::hidden_states`]), pool it over prompt/response tokens inside the
//! forward pass ([`Model::pool`]), or hook the layer loop ([`hooks`]). Layer and position
//! conventions follow transformers' `output_hidden_states` (see DESIGN §2).

pub mod error;
pub mod generation;
pub mod hooks;
pub mod kernels;
pub mod loading;
pub mod model;
pub mod models;
pub mod requests;
pub mod tokenizer;

pub use error::{Error, Result};
pub use loading::MatmulPrecision;
pub use model::{avx2_enabled, init_threads, parse_device, parse_dtype, LoadOptions, Model, Pooling};
