//! Q4_K, Q6_K and Q8_0 matmuls on a candle `QTensor`'s blocks in place.
//!
//! candle's `QMatMul::forward` repacks Q4_K weights (and Q6_K ones when more than one input row
//! comes) at its first call into tiles that it keeps beside the original blocks: 1.33× and 1.5×
//! their size, and for Q4_K an AMX copy as well once 32 rows or more come. A quantized model
//! would then hold its k-quant weights two or three times; Q8_0 gets a second copy of the same
//! size, where our own Q8_0 kernel (`q8_block`, AVX-512 VNNI) does not run. candle's compact kernel
//! (`k_quants::matmul`: the input quantized once, to Q8_K or Q8_0, then AVX2 dot products
//! against the blocks as stored) reads them in place; this module runs it on a tensor's own
//! blocks.

use candle_core::quantized::k_quants::{self, BlockQ4K, BlockQ6K, BlockQ8_0, GgmlType};
use candle_core::quantized::{GgmlDType, QTensor};

/// Whether [`compact_matmul`] runs `t`: a CPU tensor `[n, k]` of type Q4_K, Q6_K or Q8_0.
pub fn runs_compact(t: &QTensor) -> bool {
    t.device().is_cpu()
        && matches!(t.dtype(), GgmlDType::Q4K | GgmlDType::Q6K | GgmlDType::Q8_0)
        && t.shape().dims2().is_ok()
}

/// `x Wᵀ` for `x` `[m, k]` (row-major f32) and `W = t` `[n, k]` of a type [`runs_compact`]
/// accepts: `[m, n]`, row-major. Runs on the calling thread (candle's pool has no workers in
/// personacore, see [`crate::par::init_threads`]).
pub fn compact_matmul(t: &QTensor, x: &[f32], m: usize) -> candle_core::Result<Vec<f32>> {
    let (n, k) = t.shape().dims2()?;
    if x.len() != m * k {
        candle_core::bail!("compact_matmul: input of {} values is not [{m}, {k}]", x.len());
    }
    let raw = t.data()?;
    let mut dst = vec![0f32; m * n];
    match t.dtype() {
        GgmlDType::Q4K => k_quants::matmul::<BlockQ4K>((m, k, n), x, blocks(&raw, n, k)?, &mut dst)?,
        GgmlDType::Q6K => k_quants::matmul::<BlockQ6K>((m, k, n), x, blocks(&raw, n, k)?, &mut dst)?,
        GgmlDType::Q8_0 => k_quants::matmul::<BlockQ8_0>((m, k, n), x, blocks(&raw, n, k)?, &mut dst)?,
        other => candle_core::bail!("compact_matmul: {other:?} weights are not run here"),
    }
    Ok(dst)
}

/// `raw` (a CPU `QTensor`'s storage bytes) as the `[n, k]` matrix's blocks of type `T`.
fn blocks<T: GgmlType>(raw: &[u8], n: usize, k: usize) -> candle_core::Result<&[T]> {
    let count = n * k.div_ceil(T::BLCK_SIZE);
    let size = std::mem::size_of::<T>();
    if !k.is_multiple_of(T::BLCK_SIZE) || raw.len() != count * size {
        candle_core::bail!("{:?} storage of {} bytes is not [{n}, {k}] in whole blocks", T::DTYPE, raw.len());
    }
    if !(raw.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()) {
        candle_core::bail!("{:?} storage is not aligned for its blocks", T::DTYPE);
    }
    // SAFETY: the length is `count` whole blocks and the start is aligned for `T` (both checked
    // above); candle's k-quant blocks are plain-old-data (f16 and byte arrays, any bit pattern
    // valid), and the borrow of `raw` bounds the returned slice's lifetime.
    Ok(unsafe { std::slice::from_raw_parts(raw.as_ptr().cast::<T>(), count) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module, Tensor};
    use std::sync::Arc;

    /// A deterministic pseudo-random `[rows, cols]` f32 matrix in [-1, 1).
    fn matrix(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..rows * cols)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// `x Wᵀ` in f64 against the blocks' dequantized values.
    fn reference(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k).map(|c| x[i * k + c] as f64 * w[j * k + c] as f64).sum();
            }
        }
        y
    }

    #[test]
    fn compact_matmul_matches_the_dequantized_weights() {
        let (n, k) = (40, 512);
        for dtype in [GgmlDType::Q4K, GgmlDType::Q6K, GgmlDType::Q8_0] {
            let w = Tensor::from_vec(matrix(n, k, 1), (n, k), &Device::Cpu).unwrap();
            let q = Arc::new(QTensor::quantize(&w, dtype).unwrap());
            assert!(runs_compact(&q));
            let wd: Vec<f32> = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            for m in [1, 3, 17] {
                let x = matrix(m, k, 2 + m as u64);
                let y = compact_matmul(&q, &x, m).unwrap();
                let want = reference(&x, &wd, m, n, k);
                // The input is rounded to 8 bits per value (Q8_K / Q8_0): each term is off by up
                // to ~0.4% of |x| max, ~0.05 rms over 512 terms (outputs are ~7.5 rms).
                let worst = y.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
                assert!(worst < 0.25, "{dtype:?} m={m}: max |diff| {worst}");
                // And it is the product, not something near zero.
                assert!(want.iter().map(|v| v.abs()).fold(0.0, f64::max) > 1.0);
                // candle's own forward (repacked or not) gives the same numbers up to rounding.
                let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
                let theirs: Vec<f32> = candle_core::quantized::QMatMul::from_arc(q.clone())
                    .unwrap()
                    .forward(&xt)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let apart = y.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
                assert!(apart < 1e-2, "{dtype:?} m={m}: {apart} from candle's forward");
            }
        }
    }

    #[test]
    fn compact_matmul_refuses_a_wrong_input_length() {
        let w = Tensor::from_vec(matrix(16, 256, 3), (16, 256), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4K).unwrap();
        let err = compact_matmul(&q, &[0.0; 255], 1).unwrap_err();
        assert!(err.to_string().contains("not [1, 256]"), "{err}");
    }
}
