//! The Qwen2 / Qwen2.5 family: Llama layout plus a bias on the q/k/v projections.

use crate::config::hf::HfConfig;
use crate::config::{Architecture, DecoderConfig};
use crate::error::{Error, Result};

/// The decoder config of a `Qwen2ForCausalLM` `config.json`: a bias on q/k/v, the head width
/// always hidden / heads, no RoPE scaling.
pub(crate) fn config(hf: &HfConfig) -> Result<DecoderConfig> {
    Ok(DecoderConfig {
        head_dim: hf.hidden_size.checked_div(hf.num_attention_heads).unwrap_or(0),
        rope_scaling: None,
        qkv_bias: true,
        ..qwen_decoder(hf, Architecture::Qwen2, "Qwen2", 10000.0)?
    })
}

/// What Qwen2 and Qwen3 share: `num_key_value_heads`, `rms_norm_eps` and
/// `max_position_embeddings` are required, `rope_theta` defaults to the family's, and
/// `use_sliding_window: true` (per-layer windows from `max_window_layers`) is not implemented,
/// so it is refused rather than computed wrongly.
pub(crate) fn qwen_decoder(hf: &HfConfig, arch: Architecture, family: &str, rope_theta: f64) -> Result<DecoderConfig> {
    let num_kv_heads = hf.required(hf.num_key_value_heads, "num_key_value_heads")?;
    let rms_norm_eps = hf.required(hf.rms_norm_eps, "rms_norm_eps")?;
    let max_position_embeddings = hf.required(hf.max_position_embeddings, "max_position_embeddings")?;
    if hf.use_sliding_window {
        return Err(Error::Config(format!(
            "{family} with use_sliding_window=true (window {:?}) is not supported yet",
            hf.sliding_window
        )));
    }
    Ok(DecoderConfig {
        num_kv_heads,
        rms_norm_eps,
        max_position_embeddings,
        rope_theta: hf.rope_theta.unwrap_or(rope_theta),
        ..hf.decoder(arch)
    })
}
