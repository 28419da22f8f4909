//! The layers of a pre-norm decoder, shared by every family: token embeddings (dense or
//! quantized), linear layers (dense, packed for the CPU kernels, quantized), RMSNorm, rotary
//! embeddings, grouped-query attention over a per-layer KV cache, the SwiGLU MLP, the sparse
//! mixture-of-experts feed-forward, and the
//! decoder block that joins them.
//!
//! Family differences are data, not code paths: q/k/v bias (Qwen2) and per-head q/k RMSNorm
//! (Qwen3) are optional fields read from the checkpoint. `tensor_kernels` applies the CPU kernels
//! of `personacore-kernels` (which work on plain slices) to candle tensors.

pub mod attention;
pub mod block;
pub mod embedding;
pub mod gated;
pub mod kv_cache;
pub mod linear;
pub mod mask;
pub mod mlp;
pub mod moe;
pub mod norm;
pub mod rope;
mod tensor_kernels;

pub use attention::Attention;
pub use block::DecoderBlock;
pub use embedding::Embedding;
pub use gated::{GatedLinear, GatedOutput};
pub use kv_cache::{KvStore, LayerKvCache};
pub use linear::{Linear, LinearGroup, MatmulPrecision};
pub use mask::{AttentionMask, CausalMask};
pub use mlp::Mlp;
pub use moe::{FeedForward, MoeOptions, SparseMoe};
pub use norm::RmsNorm;
pub use rope::RotaryEmbedding;
