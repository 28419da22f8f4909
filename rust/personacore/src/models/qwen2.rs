//! The Qwen2 / Qwen2.5 family: Llama layout plus a bias on the q/k/v projections.

use serde::Deserialize;

use super::config::{Architecture, DecoderConfig};
use crate::error::{Error, Result};

/// `config.json` of `Qwen2ForCausalLM`.
#[derive(Debug, Clone, Deserialize)]
pub struct Qwen2Config {
    /// Residual width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// Context window.
    pub max_position_embeddings: usize,
    /// Whether lm_head is the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Whether the sliding window is used at all.
    #[serde(default)]
    pub use_sliding_window: bool,
    /// Sliding window span.
    pub sliding_window: Option<usize>,
}

fn default_theta() -> f64 {
    10000.0
}

impl Qwen2Config {
    /// The normalized decoder config. `use_sliding_window: true` (per-layer windows from
    /// `max_window_layers`) is not implemented and is refused rather than computed wrongly.
    pub fn into_decoder(self) -> Result<DecoderConfig> {
        if self.use_sliding_window {
            return Err(Error::Config(format!(
                "Qwen2 with use_sliding_window=true (window {:?}) is not supported yet",
                self.sliding_window
            )));
        }
        Ok(DecoderConfig {
            architecture: Architecture::Qwen2,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads,
            head_dim: self.hidden_size.checked_div(self.num_attention_heads).unwrap_or(0),
            vocab_size: self.vocab_size,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            rope_scaling: None,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            qkv_bias: true,
            o_bias: false,
            mlp_bias: false,
            qk_norm: false,
            sliding_window: None,
        })
    }
}
