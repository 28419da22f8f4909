//! Model families and the shared decoder-only [`Transformer`]. Each family file says what that
//! family's `config.json` means (its defaults and switches); every family reduces to one
//! [`DecoderConfig`](crate::config::DecoderConfig) and runs through the shared [`Transformer`],
//! whose layer loop calls the hooks.

pub mod gemma2;
pub mod gemma3;
pub mod llama;
pub mod qwen2;
pub mod qwen2_moe;
pub mod qwen3;
pub mod qwen3_moe;
pub mod transformer;

pub use crate::config::{Architecture, DecoderConfig};
pub use transformer::{ForwardInput, KvCache, LayerStores, LogitsMode, Transformer};
