//! CPU compute kernels that candle does not provide fast enough: a fork-join pool tuned for many
//! tiny jobs ([`par`]), an f32 matmul against weights packed at load ([`packed_matmul`]), bf16x3
//! matmuls on AMX tiles ([`amx`]), a one-pass SwiGLU ([`activations`]), RMSNorm fused with the
//! residual add ([`norm`]), the split into rotated
//! heads ([`rope`]), and attention for a decode step ([`attention`]) and for a prompt
//! ([`prompt_attention`]).

pub mod activations;
pub mod amx;
pub mod attention;
pub mod packed_matmul;
pub mod norm;
pub mod par;
pub mod prompt_attention;
pub mod rope;
