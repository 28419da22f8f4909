//! The Llama family (Llama 2/3.x, SmolLM2, Mistral): `config.json` as those checkpoints write it.
//!
//! The block itself is the shared pre-norm decoder block of `layers.rs`; Llama uses it with
//! no q/k/v bias (unless `attention_bias`), no q/k norm, and Llama-3 RoPE scaling when configured.

use serde::Deserialize;

use super::config::{Architecture, DecoderConfig, Llama3RopeScaling};

/// `config.json` of `LlamaForCausalLM` / `MistralForCausalLM`.
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    /// Residual width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (defaults to query heads).
    pub num_key_value_heads: Option<usize>,
    /// Explicit head width (defaults to hidden / heads).
    pub head_dim: Option<usize>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// Optional RoPE scaling block.
    pub rope_scaling: Option<serde_json::Value>,
    /// Context window.
    #[serde(default = "default_ctx")]
    pub max_position_embeddings: usize,
    /// Whether lm_head is the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v/o projections.
    #[serde(default)]
    pub attention_bias: bool,
    /// Bias on the MLP projections.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Mistral sliding window.
    pub sliding_window: Option<usize>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10000.0
}
fn default_ctx() -> usize {
    4096
}

/// Reads a `rope_scaling` block; only the Llama-3 kind changes the frequencies we compute.
pub(crate) fn llama3_scaling(v: &Option<serde_json::Value>) -> Option<Llama3RopeScaling> {
    let v = v.as_ref()?;
    let kind = v.get("rope_type").or_else(|| v.get("type"))?.as_str()?;
    if kind != "llama3" {
        return None;
    }
    Some(Llama3RopeScaling {
        factor: v.get("factor")?.as_f64()?,
        low_freq_factor: v.get("low_freq_factor")?.as_f64()?,
        high_freq_factor: v.get("high_freq_factor")?.as_f64()?,
        original_max_position_embeddings: v.get("original_max_position_embeddings")?.as_u64()? as usize,
    })
}

impl LlamaConfig {
    /// The normalized decoder config (Llama or Mistral).
    pub fn into_decoder(self, arch: Architecture) -> DecoderConfig {
        let heads = self.num_attention_heads;
        DecoderConfig {
            architecture: arch,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(heads),
            head_dim: self.head_dim.unwrap_or(self.hidden_size.checked_div(heads).unwrap_or(0)),
            vocab_size: self.vocab_size,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            rope_scaling: llama3_scaling(&self.rope_scaling),
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            // Mistral checkpoints never carry biases.
            qkv_bias: self.attention_bias && arch == Architecture::Llama,
            o_bias: self.attention_bias && arch == Architecture::Llama,
            mlp_bias: self.mlp_bias && arch == Architecture::Llama,
            qk_norm: false,
            sliding_window: if arch == Architecture::Mistral { self.sliding_window } else { None },
        }
    }
}
