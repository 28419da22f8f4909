//! CPU compute kernels that candle does not provide fast enough, and all of personacore's
//! `unsafe` code: a fork-join pool tuned for many tiny jobs ([`par`]), an f32 matmul against
//! weights packed at load ([`packed_matmul`]), bf16x3 matmuls on AMX tiles ([`amx`]), SIMD
//! matmuls on GGUF Q4_1 ([`q4_1`]) and Q5_0 / Q5_1 / Q8_0 weights ([`q8_block`]), candle's Q4_K /
//! Q6_K matmul on a tensor's blocks in place ([`kquant`]), a one-pass
//! SwiGLU ([`activations`], also applied by both f32 matmuls as they store a gate/up product), RMSNorm fused with the residual add ([`norm`]), the split
//! into rotated heads ([`rope`]), attention for a decode step ([`attention`]) and for a prompt
//! ([`prompt_attention`]), the monitor's projections of a few rows ([`projection`]), the
//! read-only file maps of the weight readers ([`mmap`]) and glibc's allocator settings for large
//! activation buffers ([`alloc`]).
//!
//! Every kernel works on plain `f32` slices behind a safe function; the `*_to_vec` forms return
//! a new vector that the kernel writes in full without zeroing it first.
// On other architectures (aarch64) the x86 SIMD paths are compiled out, which leaves their
// helpers and some of their inputs unused there.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code, unused_variables, unused_macros, unused_mut))]

/// Runs `tile::<C>` over activation rows four at a time, then the 1–3 left over (the row tiles of
/// the quantized matmuls, [`q4_1`] and `q8_block`).
macro_rules! for_row_tiles {
    ($m:expr, |$i:ident, $c:ident| $body:expr) => {{
        let mut $i = 0;
        while $i + 4 <= $m {
            const $c: usize = 4;
            $body;
            $i += 4;
        }
        match $m - $i {
            3 => {
                const $c: usize = 3;
                $body
            }
            2 => {
                const $c: usize = 2;
                $body
            }
            1 => {
                const $c: usize = 1;
                $body
            }
            _ => {}
        }
    }};
}

pub mod activations;
pub mod alloc;
pub mod amx;
pub mod attention;
mod column_softmax;
mod head_group;
pub mod huge_pages;
pub mod kquant;
pub mod mmap;
pub mod norm;
pub mod packed_matmul;
pub mod par;
pub mod projection;
pub mod prompt_attention;
pub mod q4_1;
pub mod q8_block;
pub mod rope;

/// A new vector of `len` floats, all of them written by `fill`, which gets them unzeroed: at a
/// pooled batch's sizes (megabytes per activation) zeroing every output first cost ~3% of a
/// forward pass.
///
/// # Safety
/// `fill` must write every value of the slice it is given and read none before writing it.
pub(crate) unsafe fn vec_written_by(len: usize, fill: impl FnOnce(&mut [f32])) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(len);
    // SAFETY: the capacity holds `len` floats; the caller's `fill` writes all of them before
    // anything reads them, so the vector's values are initialised when its length is set.
    unsafe {
        fill(std::slice::from_raw_parts_mut(v.as_mut_ptr(), len));
        v.set_len(len);
    }
    v
}

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
