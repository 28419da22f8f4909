//! Rotary position embeddings: the cos/sin tables, with Llama-3 frequency scaling.

use candle_core::{DType, Device, Tensor};

use crate::config::DecoderConfig;
use crate::error::Result;

/// Precomputed RoPE tables (`rotate_half` convention, as transformers).
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    /// `[max_positions, head_dim/2]`
    cos: Tensor,
    /// `[max_positions, head_dim/2]`
    sin: Tensor,
}

impl RotaryEmbedding {
    /// Builds the tables for every position of the context window.
    pub fn new(cfg: &DecoderConfig, dtype: DType, device: &Device) -> Result<Self> {
        let d = cfg.head_dim;
        let mut inv_freq: Vec<f64> = (0..d / 2).map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / d as f64)).collect();
        if let Some(s) = &cfg.rope_scaling {
            // transformers' _compute_llama3_parameters
            let old = s.original_max_position_embeddings as f64;
            let low_wavelen = old / s.low_freq_factor;
            let high_wavelen = old / s.high_freq_factor;
            for f in inv_freq.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *f;
                if wavelen > low_wavelen {
                    *f /= s.factor;
                } else if wavelen >= high_wavelen {
                    let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                    *f = (1.0 - smooth) * *f / s.factor + smooth * *f;
                }
            }
        }
        let n = cfg.max_position_embeddings;
        let mut angles = Vec::with_capacity(n * d / 2);
        for p in 0..n {
            for f in &inv_freq {
                // transformers computes the angle in float32
                angles.push((p as f32) * (*f as f32));
            }
        }
        let angles = Tensor::from_vec(angles, (n, d / 2), device)?;
        Ok(Self { cos: angles.cos()?.to_dtype(dtype)?, sin: angles.sin()?.to_dtype(dtype)? })
    }

    /// `(cos, sin)` for `positions` `[batch, seq]` (u32), each `[batch, seq, head_dim/2]`.
    pub fn tables(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, t) = positions.dims2()?;
        let flat = positions.flatten_all()?;
        let cos = self.cos.index_select(&flat, 0)?.reshape((b, t, ()))?;
        let sin = self.sin.index_select(&flat, 0)?.reshape((b, t, ()))?;
        Ok((cos, sin))
    }
}
