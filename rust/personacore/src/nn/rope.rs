//! Rotary position embeddings: the cos/sin tables, with Llama-3 frequency scaling.

use candle_core::{DType, Device, Tensor};

use crate::config::DecoderConfig;
use crate::error::Result;

/// RoPE frequencies (`rotate_half` convention, as transformers); the cos/sin rows of the positions
/// a forward pass reads are computed when it asks for them.
///
/// The rows are not precomputed for the whole context window: a config (or GGUF) declaring a
/// context of 50 million positions made the load take half a minute and gigabytes (found by
/// fuzzing), and a larger one would abort on allocation. Each row is computed exactly as
/// transformers does (the angle `position * inv_freq` in float32, then cos and sin), so the values
/// are the same as a precomputed table's.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    /// `head_dim / 2` inverse frequencies, as float32 (what transformers multiplies with)
    inv_freq: Vec<f32>,
    dtype: DType,
    device: Device,
}

impl RotaryEmbedding {
    /// The frequencies of `cfg` (with Llama-3 scaling when it has `rope_scaling`).
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
        // transformers computes the angle in float32
        let inv_freq = inv_freq.iter().map(|&f| f as f32).collect();
        Ok(Self { inv_freq, dtype, device: device.clone() })
    }

    /// `(cos, sin)` for `positions` `[batch, seq]` (u32), each `[batch, seq, head_dim/2]`.
    pub fn tables(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, t) = positions.dims2()?;
        let half = self.inv_freq.len();
        let mut angles = Vec::with_capacity(b * t * half);
        for p in positions.flatten_all()?.to_vec1::<u32>()? {
            angles.extend(self.inv_freq.iter().map(|f| (p as f32) * f));
        }
        let angles = Tensor::from_vec(angles, (b, t, half), &self.device)?;
        Ok((angles.cos()?.to_dtype(self.dtype)?, angles.sin()?.to_dtype(self.dtype)?))
    }
}
