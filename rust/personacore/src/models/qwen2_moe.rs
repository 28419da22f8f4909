//! The Qwen2-MoE family (`Qwen2MoeForCausalLM`, `qwen2_moe`; Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2's
//! attention (a bias on q/k/v with `qkv_bias`, none on o) with a sparse mixture of experts in
//! place of the MLP on the sparse layers, plus a shared expert every token goes through, weighted
//! by `sigmoid(shared_expert_gate(x))` (see `nn/moe.rs`).
//!
//! The residual stream, and with it every hook, is the Llama block's.

use super::qwen2::qwen_decoder;
use super::qwen3_moe::{moe_options, moe_rope_theta, MoeDefaults};
use crate::config::hf::HfConfig;
use crate::config::{Architecture, DecoderConfig};
use crate::error::Result;

/// The decoder config of a `Qwen2MoeForCausalLM` `config.json`: `qkv_bias` (default true) on
/// q/k/v, no bias on o, and the MoE options (defaults 60 experts, top-4, expert width 1408, shared
/// expert width 5632, as transformers).
pub(crate) fn config(hf: &HfConfig, json: &serde_json::Value) -> Result<DecoderConfig> {
    let family = "Qwen2-MoE";
    let base = qwen_decoder(hf, Architecture::Qwen2Moe, family, 10_000.0)?;
    let defaults = MoeDefaults {
        family,
        num_experts: 60,
        num_experts_per_tok: 4,
        moe_intermediate_size: 1408,
        shared_expert_intermediate_size: Some(5632),
    };
    Ok(DecoderConfig {
        rope_theta: moe_rope_theta(hf, json, family)?,
        rope_scaling: None,
        qkv_bias: json.get("qkv_bias").and_then(|v| v.as_bool()).unwrap_or(true),
        o_bias: false,
        moe: Some(moe_options(json, base.num_layers, &defaults)?),
        ..base
    })
}
