//! The Qwen3-MoE family (`Qwen3MoeForCausalLM`, `qwen3_moe`): Qwen3's attention (explicit
//! `head_dim`, RMSNorm on q and k per head) with a sparse mixture of experts in place of the MLP
//! on the layers `decoder_sparse_step` and `mlp_only_layers` mark sparse (see `nn/moe.rs`).
//!
//! The residual stream, and with it every hook (capture, steering, monitoring), is the Llama
//! block's: the experts act inside the block, before its second residual addition.

use serde::Deserialize;

use super::qwen2::qwen_decoder;
use crate::config::hf::HfConfig;
use crate::config::{Architecture, DecoderConfig};
use crate::error::{Error, Result};
use crate::nn::MoeOptions;

/// The mixture-of-experts fields of a Qwen2-MoE or Qwen3-MoE `config.json`; a field left out
/// takes the family's transformers default (see [`MoeDefaults`]).
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct MoeFields {
    /// transformers 5 writes `num_local_experts` (its name for `num_experts`).
    #[serde(alias = "num_local_experts")]
    num_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    moe_intermediate_size: Option<usize>,
    #[serde(default)]
    norm_topk_prob: bool,
    decoder_sparse_step: Option<usize>,
    #[serde(default)]
    mlp_only_layers: Option<Vec<usize>>,
    shared_expert_intermediate_size: Option<usize>,
    hidden_act: Option<String>,
}

/// A family's transformers defaults for the mixture-of-experts fields.
pub(crate) struct MoeDefaults {
    /// Family name for error messages.
    pub family: &'static str,
    /// `num_experts`.
    pub num_experts: usize,
    /// `num_experts_per_tok`.
    pub num_experts_per_tok: usize,
    /// `moe_intermediate_size`.
    pub moe_intermediate_size: usize,
    /// `shared_expert_intermediate_size` when the family has a shared expert.
    pub shared_expert_intermediate_size: Option<usize>,
}

/// The MoE options of a `config.json` under a family's defaults; `norm_topk_prob` is false
/// unless set (both families' transformers default), `decoder_sparse_step` 1, no dense layers.
pub(crate) fn moe_options(json: &serde_json::Value, num_layers: usize, d: &MoeDefaults) -> Result<MoeOptions> {
    let f: MoeFields =
        serde_json::from_value(json.clone()).map_err(|e| Error::Config(format!("{} config.json: {e}", d.family)))?;
    match f.hidden_act.as_deref() {
        None | Some("silu") => {}
        Some(other) => return Err(Error::Config(format!("{} hidden_act '{other}' is not supported", d.family))),
    }
    let num_experts = f.num_experts.unwrap_or(d.num_experts);
    let sparse_layers = MoeOptions::sparse_layer_pattern(
        num_layers,
        num_experts,
        f.decoder_sparse_step.unwrap_or(1),
        f.mlp_only_layers.as_deref().unwrap_or(&[]),
    )?;
    Ok(MoeOptions {
        num_experts,
        num_experts_per_tok: f.num_experts_per_tok.unwrap_or(d.num_experts_per_tok),
        moe_intermediate_size: f.moe_intermediate_size.unwrap_or(d.moe_intermediate_size),
        norm_topk_prob: f.norm_topk_prob,
        sparse_layers,
        shared_expert_intermediate_size: d
            .shared_expert_intermediate_size
            .map(|default| f.shared_expert_intermediate_size.unwrap_or(default)),
    })
}

/// The RoPE base of a Qwen MoE `config.json`: `rope_theta`, or transformers 5's
/// `rope_parameters.rope_theta`, or 10 000 (the transformers default of both MoE families).
/// RoPE types other than the default (YaRN and others) are refused rather than computed wrongly.
pub(crate) fn moe_rope_theta(hf: &HfConfig, json: &serde_json::Value, family: &str) -> Result<f64> {
    let scaling = json.get("rope_parameters").or(hf.rope_scaling.as_ref()).filter(|v| !v.is_null());
    if let Some(kind) = scaling.and_then(|v| v.get("rope_type").or_else(|| v.get("type"))).and_then(|v| v.as_str()) {
        if kind != "default" {
            return Err(Error::Config(format!("{family} with RoPE type '{kind}' is not supported")));
        }
    }
    Ok(hf
        .rope_theta
        .or_else(|| json.pointer("/rope_parameters/rope_theta").and_then(|v| v.as_f64()))
        .unwrap_or(10_000.0))
}

/// The decoder config of a `Qwen3MoeForCausalLM` `config.json`: Qwen3's attention (q/k norms, a
/// bias on q/k/v/o with `attention_bias`) and the MoE options (defaults 128 experts, top-8,
/// expert width 768, as transformers).
pub(crate) fn config(hf: &HfConfig, json: &serde_json::Value) -> Result<DecoderConfig> {
    let family = "Qwen3-MoE";
    let base = qwen_decoder(hf, Architecture::Qwen3Moe, family, 10_000.0)?;
    let defaults = MoeDefaults {
        family,
        num_experts: 128,
        num_experts_per_tok: 8,
        moe_intermediate_size: 768,
        shared_expert_intermediate_size: None,
    };
    Ok(DecoderConfig {
        rope_theta: moe_rope_theta(hf, json, family)?,
        rope_scaling: None,
        qkv_bias: hf.attention_bias,
        o_bias: hf.attention_bias,
        qk_norm: true,
        moe: Some(moe_options(json, base.num_layers, &defaults)?),
        ..base
    })
}

/// The MoE options of a `qwen3moe` / `qwen2moe` GGUF (llama.cpp's keys `{arch}.expert_count`,
/// `expert_used_count`, `expert_feed_forward_length`, `expert_shared_feed_forward_length`): a
/// layer is sparse when it has a router (`blk.{i}.ffn_gate_inp`); the picked probabilities are
/// renormalised as llama.cpp does (`expert_weights_norm` when present, else always for
/// `qwen3moe`, never for `qwen2moe`); a shared expert when layer tensors `ffn_up_shexp` exist.
pub(crate) fn gguf_moe_options(
    base: &DecoderConfig,
    content: &candle_core::quantized::gguf_file::Content,
    get_u: &dyn Fn(&str) -> Result<usize>,
    expert_weights_norm: Option<bool>,
) -> Result<MoeOptions> {
    let has = |i: usize, t: &str| content.tensor_infos.contains_key(&format!("blk.{i}.{t}.weight"));
    let sparse_layers: Vec<bool> = (0..base.num_layers).map(|i| has(i, "ffn_gate_inp")).collect();
    let shared = (0..base.num_layers).any(|i| has(i, "ffn_up_shexp"));
    Ok(MoeOptions {
        num_experts: get_u("expert_count")?,
        num_experts_per_tok: get_u("expert_used_count")?,
        moe_intermediate_size: get_u("expert_feed_forward_length")?,
        norm_topk_prob: expert_weights_norm.unwrap_or(base.architecture == Architecture::Qwen3Moe),
        sparse_layers,
        shared_expert_intermediate_size: if shared { Some(get_u("expert_shared_feed_forward_length")?) } else { None },
    })
}
