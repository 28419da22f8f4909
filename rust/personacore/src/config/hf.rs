//! `config.json` of an HF checkpoint: the fields the families share, read into one struct; each
//! family (`models/llama.rs`, `qwen2.rs`, `qwen3.rs`, `qwen2_moe.rs`, ...) turns it into a [`DecoderConfig`] with its
//! own defaults and switches.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{Architecture, DecoderConfig, Llama3RopeScaling};
use crate::error::{Error, Result};
use crate::models::{gemma2, gemma3, llama, qwen2, qwen2_moe, qwen3, qwen3_moe};

/// The `config.json` fields of every supported family, under their HF names. A field that one
/// family requires and another defaults is optional here: the family asks for it with
/// [`HfConfig::required`] or takes the default of [`HfConfig::decoder`].
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct HfConfig {
    /// Residual width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: Option<usize>,
    /// Explicit head width.
    pub head_dim: Option<usize>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: Option<f64>,
    /// RoPE base.
    pub rope_theta: Option<f64>,
    /// Optional RoPE scaling block.
    pub rope_scaling: Option<serde_json::Value>,
    /// Context window.
    pub max_position_embeddings: Option<usize>,
    /// Whether lm_head is the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v/o projections.
    #[serde(default)]
    pub attention_bias: bool,
    /// Bias on the MLP projections.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Whether the sliding window is used at all (Qwen2, Qwen3).
    #[serde(default)]
    pub use_sliding_window: bool,
    /// Sliding window span.
    pub sliding_window: Option<usize>,
    /// The file read, for error messages.
    #[serde(skip)]
    path: PathBuf,
}

impl HfConfig {
    /// `value`, a field this family requires: the error serde gives for a missing field otherwise.
    pub fn required<T>(&self, value: Option<T>, name: &str) -> Result<T> {
        value.ok_or_else(|| Error::Config(format!("{}: missing field `{name}`", self.path.display())))
    }

    /// The config these fields give with the Llama family's defaults: key/value heads = query
    /// heads, head width = hidden / heads, epsilon 1e-6, RoPE base 10000, Llama-3 RoPE scaling
    /// when the `rope_scaling` block asks for it, a context of 4096; no biases, q/k norm or
    /// window. Each family starts from it and changes what differs.
    pub fn decoder(&self, architecture: Architecture) -> DecoderConfig {
        let heads = self.num_attention_heads;
        DecoderConfig {
            architecture,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(heads),
            head_dim: self.head_dim.unwrap_or(self.hidden_size.checked_div(heads).unwrap_or(0)),
            vocab_size: self.vocab_size,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: self.rope_theta.unwrap_or(10000.0),
            rope_scaling: llama3_scaling(&self.rope_scaling),
            max_position_embeddings: self.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: self.tie_word_embeddings,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            qk_norm: false,
            sliding_window: None,
            gemma: None,
            moe: None,
        }
    }
}

/// Reads a `rope_scaling` block; only the Llama-3 kind changes the frequencies we compute.
fn llama3_scaling(v: &Option<serde_json::Value>) -> Option<Llama3RopeScaling> {
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

impl DecoderConfig {
    /// Reads `config.json` of an HF model directory.
    pub fn from_hf_config(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Config(format!("{} is not valid JSON: {e}", path.display())))?;
        let arch_name = json
            .get("model_type")
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .or_else(|| json.pointer("/architectures/0").and_then(|v| v.as_str()).map(str::to_string))
            .ok_or_else(|| Error::Config(format!("{} has neither 'model_type' nor 'architectures'", path.display())))?;
        let arch = Architecture::parse(&arch_name)?;
        let mut hf: HfConfig =
            serde_json::from_value(json.clone()).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        hf.path = path.to_path_buf();
        let cfg = match arch {
            Architecture::Llama | Architecture::Mistral => llama::config(&hf, arch),
            Architecture::Qwen2 => qwen2::config(&hf)?,
            Architecture::Qwen3 => qwen3::config(&hf)?,
            Architecture::Qwen2Moe => qwen2_moe::config(&hf, &json)?,
            Architecture::Qwen3Moe => qwen3_moe::config(&hf, &json)?,
            Architecture::Gemma2 => gemma2::config(&hf, &json)?,
            Architecture::Gemma3 => gemma3::config(&hf, &json)?,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}
