//! One pre-norm decoder block, shared by every family.

use candle_core::{DType, Tensor};

use super::attention::Attention;
use super::kv_cache::KvStore;
use super::mlp::Mlp;
use super::norm::RmsNorm;
use super::tensor_kernels::residual_add;
use crate::config::DecoderConfig;
use crate::error::Result;
use crate::weights::WeightSource;

/// One pre-norm decoder block: `h = x + attn(norm(x)); out = h + mlp(norm(h))`.
#[derive(Debug, Clone)]
pub struct DecoderBlock {
    /// Norm before attention.
    pub input_layernorm: RmsNorm,
    /// Self-attention.
    pub self_attn: Attention,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm,
    /// The MLP.
    pub mlp: Mlp,
}

impl DecoderBlock {
    /// Loads block `i` (`model.layers.{i}.*`).
    pub fn load(w: &dyn WeightSource, i: usize, cfg: &DecoderConfig, dtype: DType) -> Result<Self> {
        let p = format!("model.layers.{i}");
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            input_layernorm: RmsNorm::load(w, &format!("{p}.input_layernorm"), h, eps, dtype)?,
            self_attn: Attention::load(w, &format!("{p}.self_attn"), cfg, dtype)?,
            post_attention_layernorm: RmsNorm::load(w, &format!("{p}.post_attention_layernorm"), h, eps, dtype)?,
            mlp: Mlp::load(w, &format!("{p}.mlp"), cfg, dtype)?,
        })
    }

    /// Residual stream in, residual stream out (`[b, t, hidden]`).
    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut dyn KvStore>,
    ) -> Result<Tensor> {
        let attn = self.self_attn.forward(&self.input_layernorm.forward(x)?, cos, sin, mask, cache)?;
        let (h, normed) = self.post_attention_layernorm.add_forward(x, &attn)?;
        let mlp = self.mlp.forward(&normed)?;
        residual_add(&h, &mlp)
    }
}
