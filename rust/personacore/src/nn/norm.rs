//! RMSNorm, alone or fused with the residual add before it.

use candle_core::{DType, Tensor};

use super::tensor_kernels::rms_norm;
use crate::error::Result;
use crate::weights::WeightSource;

/// RMSNorm: `x / sqrt(mean(x²) + eps) * weight`.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    /// Loads `{name}.weight` of width `dim`.
    pub fn load(w: &dyn WeightSource, name: &str, dim: usize, eps: f64, dtype: DType) -> Result<Self> {
        Ok(Self { weight: w.tensor(&format!("{name}.weight"), &[dim], dtype)?, eps: eps as f32 })
    }

    /// Loads `{name}.weight` and adds `offset` to it: Gemma's `(1 + w)` scale from an HF
    /// checkpoint, which stores `w` (offset 0 is [`RmsNorm::load`]).
    pub fn load_with_offset(
        w: &dyn WeightSource,
        name: &str,
        dim: usize,
        eps: f64,
        offset: f64,
        dtype: DType,
    ) -> Result<Self> {
        let mut norm = Self::load(w, name, dim, eps, dtype)?;
        if offset != 0.0 {
            norm.weight = (norm.weight.to_dtype(DType::F32)? + offset)?.to_dtype(dtype)?;
        }
        Ok(norm)
    }

    /// Normalizes over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        match rms_norm(&x, None, &self.weight, self.eps)? {
            Some((_, normed)) => Ok(normed),
            None => Ok(candle_nn::ops::rms_norm(&x, &self.weight, self.eps)?),
        }
    }

    /// `(x + delta, norm(x + delta))`: one pass through [`personacore_kernels::norm`]
    /// for f32 CPU tensors, candle's add and norm otherwise.
    pub fn add_forward(&self, x: &Tensor, delta: &Tensor) -> Result<(Tensor, Tensor)> {
        let (x, delta) = (x.contiguous()?, delta.contiguous()?);
        match rms_norm(&x, Some(&delta), &self.weight, self.eps)? {
            Some((Some(sum), normed)) => Ok((sum, normed)),
            _ => {
                let sum = (x + delta)?;
                let normed = candle_nn::ops::rms_norm(&sum, &self.weight, self.eps)?;
                Ok((sum, normed))
            }
        }
    }

    /// The scale vector.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}
