//! The Gemma 2 family (`Gemma2ForCausalLM` / GGUF `gemma2`): Gemma 3's block (see `gemma3.rs`:
//! scaled embeddings, `(1 + w)` sandwich norms, GeLU-tanh MLP, tied embeddings) without the q/k
//! norms, with local and global layers alternating (even layers local, window `sliding_window`),
//! one RoPE base for both, and soft-capping: `tanh(s / c) · c` on the scaled attention scores
//! before the mask (`attn_logit_softcapping`, 50) and on the final logits
//! (`final_logit_softcapping`, 30).

use serde::Deserialize;

use super::gemma3::{check_activation, hf_rope_theta, parse_layer_types, pattern_layers, GemmaOptions};
use crate::config::hf::HfConfig;
use crate::config::{Architecture, DecoderConfig};
use crate::error::{Error, Result};

/// The Gemma 2 fields of a `config.json`, beyond the shared ones.
#[derive(Debug, Clone, Deserialize)]
struct Gemma2Fields {
    sliding_window: Option<usize>,
    layer_types: Option<Vec<String>>,
    query_pre_attn_scalar: Option<f64>,
    hidden_activation: Option<String>,
    #[serde(default = "default_final_cap")]
    final_logit_softcapping: Option<f64>,
    #[serde(default = "default_attn_cap")]
    attn_logit_softcapping: Option<f64>,
}

fn default_final_cap() -> Option<f64> {
    Some(30.0)
}

fn default_attn_cap() -> Option<f64> {
    Some(50.0)
}

/// The decoder config of a `Gemma2ForCausalLM` `config.json` (transformers' defaults where a
/// field is absent: window 4096, scalar 256, caps 30 and 50).
pub(crate) fn config(hf: &HfConfig, json: &serde_json::Value) -> Result<DecoderConfig> {
    let g: Gemma2Fields =
        serde_json::from_value(json.clone()).map_err(|e| Error::Config(format!("Gemma 2 config.json: {e}")))?;
    check_activation(g.hidden_activation.as_deref())?;
    let base = hf.decoder(Architecture::Gemma2);
    let sliding_layers = match &g.layer_types {
        Some(types) => parse_layer_types(types)?,
        None => pattern_layers(base.num_layers, 2),
    };
    let rope_theta = json
        .pointer("/rope_parameters/rope_theta")
        .and_then(|v| v.as_f64())
        .or(hf_rope_theta(json))
        .unwrap_or(10_000.0);
    Ok(DecoderConfig {
        rope_theta,
        rope_scaling: None,
        head_dim: hf.head_dim.unwrap_or(256),
        tie_word_embeddings: json.get("tie_word_embeddings").and_then(|v| v.as_bool()).unwrap_or(true),
        qkv_bias: hf.attention_bias,
        o_bias: hf.attention_bias,
        qk_norm: false,
        gemma: Some(GemmaOptions {
            sliding_window: g.sliding_window.unwrap_or(4096),
            sliding_layers,
            rope_local_theta: rope_theta,
            query_pre_attn_scalar: g.query_pre_attn_scalar.unwrap_or(256.0),
            norm_offset: 1.0,
            final_logit_softcapping: g.final_logit_softcapping,
            attn_logit_softcapping: g.attn_logit_softcapping,
        }),
        ..base
    })
}

/// The decoder config of a Gemma 2 GGUF from what [`DecoderConfig::from_gguf`] read: the window
/// on the even layers (llama.cpp's pattern 2), one RoPE base, the score scale `1/sqrt(head_dim)`
/// (llama.cpp's rule for every size but 27B), the caps from `gemma2.*_softcapping`, the norms as
/// stored (`1 + w`).
pub(crate) fn from_gguf(base: DecoderConfig, attn_cap: Option<f64>, final_cap: Option<f64>) -> Result<DecoderConfig> {
    let window = base
        .sliding_window
        .ok_or_else(|| Error::Config("Gemma 2 GGUF metadata is missing 'gemma2.attention.sliding_window'".into()))?;
    Ok(DecoderConfig {
        sliding_window: None,
        qk_norm: false,
        gemma: Some(GemmaOptions {
            sliding_window: window,
            sliding_layers: pattern_layers(base.num_layers, 2),
            rope_local_theta: base.rope_theta,
            query_pre_attn_scalar: base.head_dim as f64,
            norm_offset: 0.0,
            final_logit_softcapping: final_cap,
            attn_logit_softcapping: attn_cap,
        }),
        ..base
    })
}
