//! CPU compute kernels that candle does not provide fast enough: a fork-join pool tuned for many
//! tiny jobs ([`par`]), an f32 matmul against weights packed at load ([`packed_matmul`]) and a
//! one-pass SwiGLU ([`activations`]).

pub mod activations;
pub mod amx;
pub mod attention;
pub mod packed_matmul;
pub mod par;
