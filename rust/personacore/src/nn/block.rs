//! One pre-norm decoder block, shared by every family.

use candle_core::{DType, Tensor};

use super::attention::Attention;
use super::kv_cache::KvStore;
use super::mask::AttentionMask;
use super::moe::FeedForward;
use super::norm::RmsNorm;
use super::tensor_kernels::residual_add;
use crate::config::DecoderConfig;
use crate::error::Result;
use crate::weights::WeightSource;

/// One pre-norm decoder block: `h = x + attn(norm(x)); out = h + mlp(norm(h))`; with Gemma's
/// sandwich norms `h = x + post_attn(attn(norm(x))); out = h + post_ffw(mlp(norm(h)))`.
#[derive(Debug, Clone)]
pub struct DecoderBlock {
    /// Norm before attention.
    pub input_layernorm: RmsNorm,
    /// Self-attention.
    pub self_attn: Attention,
    /// Norm before the MLP (Llama's `post_attention_layernorm`, Gemma's `pre_feedforward_layernorm`).
    pub post_attention_layernorm: RmsNorm,
    /// The MLP: dense, or a sparse mixture of experts.
    pub mlp: FeedForward,
    /// Gemma's norms on the attention and MLP outputs, before each is added to the stream.
    pub sandwich: Option<SandwichNorms>,
}

/// The norms Gemma applies to the outputs of attention and of the MLP.
#[derive(Debug, Clone)]
pub struct SandwichNorms {
    /// On the attention output (HF `post_attention_layernorm` in Gemma checkpoints).
    pub post_attention: RmsNorm,
    /// On the MLP output (HF `post_feedforward_layernorm`).
    pub post_feedforward: RmsNorm,
}

impl DecoderBlock {
    /// Loads block `i` (`model.layers.{i}.*`).
    pub fn load(w: &dyn WeightSource, i: usize, cfg: &DecoderConfig, dtype: DType) -> Result<Self> {
        let p = format!("model.layers.{i}");
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        let offset = cfg.gemma.as_ref().map_or(0.0, |g| g.norm_offset);
        let norm = |name: &str| RmsNorm::load_with_offset(w, &format!("{p}.{name}"), h, eps, offset, dtype);
        let (pre_mlp, sandwich) = if cfg.gemma.is_some() {
            let sandwich = SandwichNorms {
                post_attention: norm("post_attention_layernorm")?,
                post_feedforward: norm("post_feedforward_layernorm")?,
            };
            (norm("pre_feedforward_layernorm")?, Some(sandwich))
        } else {
            (norm("post_attention_layernorm")?, None)
        };
        Ok(Self {
            input_layernorm: norm("input_layernorm")?,
            self_attn: Attention::load(w, &format!("{p}.self_attn"), cfg, dtype)?,
            post_attention_layernorm: pre_mlp,
            mlp: FeedForward::load(w, &format!("{p}.mlp"), i, cfg, dtype)?,
            sandwich,
        })
    }

    /// Residual stream in, residual stream out (`[b, t, hidden]`); with `last_only` the stream
    /// out is the last position's alone (`[b, 1, hidden]`), while every position's keys and
    /// values go to the cache.
    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&AttentionMask>,
        cache: Option<&mut dyn KvStore>,
        last_only: bool,
    ) -> Result<Tensor> {
        let normed = self.input_layernorm.forward(x)?;
        let mut attn = self.self_attn.forward(&normed, cos, sin, mask, cache, last_only)?;
        if let Some(s) = &self.sandwich {
            attn = s.post_attention.forward(&attn)?;
        }
        let t = x.dim(1)?;
        let last;
        let x = if last_only && t > 1 {
            last = x.narrow(1, t - 1, 1)?.contiguous()?;
            &last
        } else {
            x
        };
        let (h, normed) = self.post_attention_layernorm.add_forward(x, &attn)?;
        let mut mlp = self.mlp.forward(&normed)?;
        if let Some(s) = &self.sandwich {
            mlp = s.post_feedforward.forward(&mlp)?;
        }
        residual_add(&h, &mlp)
    }
}
