//! The Gemma 3 family (text decoder, `Gemma3ForCausalLM` / GGUF `gemma3`): what it changes in the
//! shared decoder, and what its `config.json` and GGUF metadata mean.
//!
//! Against the Llama block, Gemma 3
//! - scales the token embeddings by `sqrt(hidden_size)` (row 0 of a capture holds the scaled
//!   embeddings, as transformers returns them);
//! - uses RMSNorm with a `(1 + w)` scale; a llama.cpp GGUF stores `1 + w` already, an HF checkpoint
//!   stores `w` and [`GemmaOptions::norm_offset`] adds the 1 at load;
//! - wraps both halves of a block in norms ("sandwich"):
//!   `h = x + post_attn_norm(attn(input_norm(x)))`, `out = h + post_ffw_norm(mlp(pre_ffw_norm(h)))`,
//!   so the residual stream (`x`, `h`, `out`) is never normed itself;
//! - normalizes q and k per head (like Qwen3), scales attention scores by
//!   `query_pre_attn_scalar^-1/2`;
//! - uses a GeLU (tanh approximation) gated MLP: `down(gelu_tanh(gate(x)) * up(x))`;
//! - interleaves local layers (sliding window, RoPE base `rope_local_base_freq`, 10 000) with
//!   global layers (full causal attention, RoPE base `rope_theta`, 1e6): every
//!   `sliding_window_pattern`-th layer (6) is global, or as `layer_types` lists;
//! - ties the output projection to the (unscaled) embedding matrix.
//!
//! Hidden-state rows follow docs/conventions.md (Layers) unchanged: row 0 is the scaled embedding,
//! row `i` the output of block `i`, the last row the final norm of the last block's output.

use serde::{Deserialize, Serialize};

use crate::config::hf::HfConfig;
use crate::config::{Architecture, DecoderConfig};
use crate::error::{Error, Result};

/// What Gemma 3 adds to the shared decoder config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GemmaOptions {
    /// Window of the local (sliding) layers, in positions: a query sees keys less than this far back.
    pub sliding_window: usize,
    /// Per layer: `true` for a local (sliding-window) layer, `false` for a global one.
    pub sliding_layers: Vec<bool>,
    /// RoPE base of the local layers (the global layers use `rope_theta`).
    pub rope_local_theta: f64,
    /// Attention scores are multiplied by `query_pre_attn_scalar^-1/2`.
    pub query_pre_attn_scalar: f64,
    /// Added to every RMSNorm weight at load (1 for HF checkpoints, 0 for GGUF files, which store `1 + w`).
    pub norm_offset: f64,
    /// `tanh(x / c) · c` on the final logits, when set (Gemma 2; `None` on Gemma 3).
    pub final_logit_softcapping: Option<f64>,
    /// `tanh(s / c) · c` on the scaled attention scores before the mask, when set (Gemma 2).
    #[serde(default)]
    pub attn_logit_softcapping: Option<f64>,
}

impl GemmaOptions {
    /// The attention score scale.
    pub fn attention_scale(&self) -> f64 {
        self.query_pre_attn_scalar.powf(-0.5)
    }

    /// Rejects a layer list that does not match the model.
    pub fn validate(&self, num_layers: usize) -> Result<()> {
        if self.sliding_layers.len() != num_layers {
            return Err(Error::Config(format!(
                "Gemma layer_types lists {} layers, the model has {num_layers}",
                self.sliding_layers.len()
            )));
        }
        let positive = |x: f64| x > 0.0 && x.is_finite();
        let caps = [self.final_logit_softcapping, self.attn_logit_softcapping];
        if caps.iter().flatten().any(|c| !positive(*c)) {
            return Err(Error::Config("Gemma soft-capping values must be positive".into()));
        }
        if self.sliding_window == 0 || !positive(self.query_pre_attn_scalar) || !positive(self.rope_local_theta) {
            return Err(Error::Config(
                "Gemma sliding_window, query_pre_attn_scalar and rope_local_base_freq must be positive".into(),
            ));
        }
        Ok(())
    }
}

/// The layer kinds of `sliding_window_pattern`: every `pattern`-th layer is global.
pub(crate) fn pattern_layers(num_layers: usize, pattern: usize) -> Vec<bool> {
    (0..num_layers).map(|i| pattern == 0 || (i + 1) % pattern != 0).collect()
}

/// The decoder config of a Gemma 3 GGUF, from what [`DecoderConfig::from_gguf`] read: the window
/// moves from every layer to the local ones (pattern 6, as llama.cpp), the local RoPE base is
/// `gemma3.rope.freq_base_swa` or 10 000, the score scale `1/sqrt(head_dim)` (llama.cpp's rule
/// for every size but 27B), and the norms are used as stored.
pub(crate) fn from_gguf(base: DecoderConfig, rope_local_theta: Option<f64>) -> Result<DecoderConfig> {
    let window = base
        .sliding_window
        .ok_or_else(|| Error::Config("Gemma 3 GGUF metadata is missing 'gemma3.attention.sliding_window'".into()))?;
    Ok(DecoderConfig {
        sliding_window: None,
        gemma: Some(GemmaOptions {
            sliding_window: window,
            sliding_layers: pattern_layers(base.num_layers, 6),
            rope_local_theta: rope_local_theta.unwrap_or(10_000.0),
            query_pre_attn_scalar: base.head_dim as f64,
            norm_offset: 0.0,
            final_logit_softcapping: None,
            attn_logit_softcapping: None,
        }),
        ..base
    })
}

/// The Gemma 3 fields of a `config.json` (`gemma3_text`), beyond the shared ones.
#[derive(Debug, Clone, Deserialize)]
struct Gemma3Fields {
    sliding_window: Option<usize>,
    #[serde(default)]
    layer_types: Option<Vec<String>>,
    sliding_window_pattern: Option<usize>,
    rope_local_base_freq: Option<f64>,
    query_pre_attn_scalar: Option<f64>,
    hidden_activation: Option<String>,
    final_logit_softcapping: Option<f64>,
    attn_logit_softcapping: Option<f64>,
}

/// The decoder config of a `Gemma3ForCausalLM` (`gemma3_text`) `config.json`.
pub(crate) fn config(hf: &HfConfig, json: &serde_json::Value) -> Result<DecoderConfig> {
    let g: Gemma3Fields =
        serde_json::from_value(json.clone()).map_err(|e| Error::Config(format!("Gemma 3 config.json: {e}")))?;
    check_activation(g.hidden_activation.as_deref())?;
    let base = hf.decoder(Architecture::Gemma3);
    let sliding_layers = match &g.layer_types {
        Some(types) => parse_layer_types(types)?,
        None => pattern_layers(base.num_layers, g.sliding_window_pattern.unwrap_or(6)),
    };
    // transformers 5 spells the two RoPE bases under `rope_parameters`.
    let rope_base = |kind: &str| json.pointer(&format!("/rope_parameters/{kind}/rope_theta")).and_then(|v| v.as_f64());
    Ok(DecoderConfig {
        rope_theta: rope_base("full_attention").or(hf_rope_theta(json)).unwrap_or(1_000_000.0),
        rope_scaling: None,
        head_dim: hf.head_dim.unwrap_or(256),
        tie_word_embeddings: json.get("tie_word_embeddings").and_then(|v| v.as_bool()).unwrap_or(true),
        qkv_bias: hf.attention_bias,
        o_bias: hf.attention_bias,
        qk_norm: true,
        gemma: Some(GemmaOptions {
            sliding_window: g.sliding_window.unwrap_or(512),
            sliding_layers,
            rope_local_theta: g.rope_local_base_freq.or(rope_base("sliding_attention")).unwrap_or(10_000.0),
            query_pre_attn_scalar: g.query_pre_attn_scalar.unwrap_or(256.0),
            norm_offset: 1.0,
            final_logit_softcapping: g.final_logit_softcapping,
            attn_logit_softcapping: g.attn_logit_softcapping,
        }),
        ..base
    })
}

/// `layer_types` of a Gemma `config.json`: `true` for `sliding_attention`, `false` for `full_attention`.
pub(crate) fn parse_layer_types(types: &[String]) -> Result<Vec<bool>> {
    types
        .iter()
        .map(|t| match t.as_str() {
            "sliding_attention" => Ok(true),
            "full_attention" => Ok(false),
            other => Err(Error::Config(format!("Gemma layer type '{other}' is not supported"))),
        })
        .collect()
}

/// Checks `hidden_activation` (Gemma's MLP is GeLU with the tanh approximation).
pub(crate) fn check_activation(act: Option<&str>) -> Result<()> {
    match act {
        None | Some("gelu_pytorch_tanh") => Ok(()),
        Some(other) => Err(Error::Config(format!("Gemma hidden_activation '{other}' is not supported"))),
    }
}

pub(crate) fn hf_rope_theta(json: &serde_json::Value) -> Option<f64> {
    json.get("rope_theta").and_then(|v| v.as_f64())
}
