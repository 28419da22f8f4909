//! The Qwen3 family: explicit `head_dim` and an RMSNorm on q and k per head before RoPE.

use super::qwen2::qwen_decoder;
use crate::config::hf::HfConfig;
use crate::config::{Architecture, DecoderConfig};
use crate::error::Result;

/// The decoder config of a `Qwen3ForCausalLM` `config.json`: Qwen2's requirements, RoPE base
/// 1e6 by default, RMSNorm on q and k per head, a bias on q/k/v/o with `attention_bias`.
pub(crate) fn config(hf: &HfConfig) -> Result<DecoderConfig> {
    Ok(DecoderConfig {
        qkv_bias: hf.attention_bias,
        o_bias: hf.attention_bias,
        qk_norm: true,
        ..qwen_decoder(hf, Architecture::Qwen3, "Qwen3", 1_000_000.0)?
    })
}
