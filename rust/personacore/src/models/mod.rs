//! Model families. Each family file mirrors its `config.json`; all reduce to [`DecoderConfig`] and
//! run through the shared [`Transformer`] whose layer loop calls the hooks.

pub mod config;
mod cpu_ops;
pub mod layers;
pub mod llama;
pub mod qwen2;
pub mod qwen3;
pub mod transformer;

pub use config::{Architecture, DecoderConfig};
pub use transformer::{ForwardInput, KvCache, LogitsMode, Transformer};
