//! CPU compute kernels that candle does not provide fast enough: a fork-join pool tuned for many
//! tiny jobs ([`par`]), an f32 matmul against weights packed at load ([`packed_matmul`]), bf16x3
//! matmuls on AMX tiles ([`amx`]), a one-pass SwiGLU ([`activations`], also applied by both
//! matmuls as they store a gate/up product), RMSNorm fused with the residual add ([`norm`]), the
//! split into rotated heads ([`rope`]), and attention for a decode step ([`attention`]) and for a
//! prompt ([`prompt_attention`]).

pub mod activations;
pub mod amx;
pub mod attention;
pub mod packed_matmul;
pub mod norm;
pub mod par;
pub mod prompt_attention;
pub mod rope;

/// A row-major `[2·inter, cols]` matrix whose blocks of `block` rows alternate between two
/// matrices (gate, up: the layout of the SwiGLU kernels' interleaved weights), split back into
/// the two.
pub fn deinterleave_rows(w: &[f32], cols: usize, block: usize) -> (Vec<f32>, Vec<f32>) {
    let (mut first, mut second) = (Vec::with_capacity(w.len() / 2), Vec::with_capacity(w.len() / 2));
    for (i, rows) in w.chunks(block * cols.max(1)).enumerate() {
        let half = if i % 2 == 0 { &mut first } else { &mut second };
        half.extend_from_slice(rows);
    }
    (first, second)
}
