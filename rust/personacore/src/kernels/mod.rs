//! CPU compute kernels that candle does not provide fast enough for decoding: a fork-join pool
//! tuned for many tiny jobs ([`par`]) and an f32 matmul for a few activation rows
//! ([`small_matmul`]).

pub mod par;
pub mod small_matmul;
