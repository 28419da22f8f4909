//! The decoder configuration every family is reduced to, read from an HF `config.json`
//! ([`hf`]: the fields the families share, then each family's own defaults and switches in
//! `models/<family>.rs`) or from GGUF metadata ([`gguf`]).

pub mod gguf;
pub mod hf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
pub use crate::models::gemma3::GemmaOptions;
pub use crate::nn::MoeOptions;

/// The architecture families the engine implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama 2/3.x, SmolLM2 (and other `LlamaForCausalLM` checkpoints).
    Llama,
    /// Mistral (Llama layout with an optional sliding window).
    Mistral,
    /// Qwen2 / Qwen2.5: bias on q/k/v.
    Qwen2,
    /// Qwen3: RMSNorm on q and k per head.
    Qwen3,
    /// Qwen2-MoE: Qwen2's attention, routed experts plus a gated shared expert.
    #[serde(rename = "qwen2_moe")]
    Qwen2Moe,
    /// Qwen3-MoE: Qwen3's attention, routed experts.
    #[serde(rename = "qwen3_moe")]
    Qwen3Moe,
    /// Gemma 2: scaled embeddings, sandwich norms, GeLU-tanh MLP, local and global layers,
    /// attention and final-logit soft-capping.
    Gemma2,
    /// Gemma 3: scaled embeddings, sandwich norms, q/k norms, GeLU-tanh MLP, local and global layers.
    Gemma3,
}

impl Architecture {
    /// The lowercase `model_type` name.
    pub fn name(&self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
            Architecture::Qwen2Moe => "qwen2_moe",
            Architecture::Qwen3Moe => "qwen3_moe",
            Architecture::Gemma2 => "gemma2",
            Architecture::Gemma3 => "gemma3",
        }
    }

    /// Parses a `model_type` / GGUF `general.architecture` / `*ForCausalLM` name.
    pub fn parse(name: &str) -> Result<Self> {
        let n = name.to_ascii_lowercase();
        Ok(match n.trim_end_matches("forcausallm") {
            "llama" => Architecture::Llama,
            "mistral" => Architecture::Mistral,
            "qwen2" => Architecture::Qwen2,
            "qwen3" => Architecture::Qwen3,
            "qwen2_moe" | "qwen2moe" => Architecture::Qwen2Moe,
            "qwen3_moe" | "qwen3moe" => Architecture::Qwen3Moe,
            "gemma2" => Architecture::Gemma2,
            "gemma3" | "gemma3_text" => Architecture::Gemma3,
            _ => return Err(Error::UnsupportedArchitecture(name.to_string())),
        })
    }
}

/// Llama-3 style RoPE frequency scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Llama3RopeScaling {
    /// Overall scaling factor.
    pub factor: f64,
    /// Low-frequency factor.
    pub low_freq_factor: f64,
    /// High-frequency factor.
    pub high_freq_factor: f64,
    /// Context length the model was pre-trained with.
    pub original_max_position_embeddings: usize,
}

/// The normalized configuration of a decoder-only transformer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecoderConfig {
    /// Family.
    pub architecture: Architecture,
    /// Residual stream width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// Optional Llama-3 RoPE scaling.
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Context window.
    pub max_position_embeddings: usize,
    /// Output projection shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (Qwen2; Llama/Qwen3 with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the attention output projection (Llama/Qwen3 with `attention_bias`).
    pub o_bias: bool,
    /// Bias on the MLP projections (Llama with `mlp_bias`).
    pub mlp_bias: bool,
    /// RMSNorm on q and k per head (Qwen3).
    pub qk_norm: bool,
    /// Sliding-window attention span on every layer, if any (Mistral).
    pub sliding_window: Option<usize>,
    /// What the Gemma families add (see `models/gemma3.rs`); `None` for the others.
    #[serde(default)]
    pub gemma: Option<GemmaOptions>,
    /// What the mixture-of-experts families add (see `nn/moe.rs`); `None` for dense models.
    #[serde(default)]
    pub moe: Option<MoeOptions>,
}

impl DecoderConfig {
    /// Rejects configurations no model can have.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(Error::Config(format!("'{name}' must be positive")));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(Error::Config(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            )));
        }
        if let Some(g) = &self.gemma {
            g.validate(self.num_layers)?;
        }
        if let Some(m) = &self.moe {
            m.validate(self.num_layers)?;
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(Error::Config(format!("head_dim ({}) must be even for rotary embeddings", self.head_dim)));
        }
        if !(self.rms_norm_eps.is_finite() && self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(Error::Config("rms_norm_eps and rope_theta must be finite (rope_theta > 0)".into()));
        }
        Ok(())
    }

    /// The `config.json` an HF-style export of this model carries.
    pub fn to_hf_config(&self) -> serde_json::Value {
        let arch_class = match self.architecture {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
            Architecture::Qwen2Moe => "Qwen2MoeForCausalLM",
            Architecture::Qwen3Moe => "Qwen3MoeForCausalLM",
            Architecture::Gemma2 => "Gemma2ForCausalLM",
            Architecture::Gemma3 => "Gemma3ForCausalLM",
        };
        let mut v = serde_json::json!({
            "architectures": [arch_class],
            "model_type": self.architecture.name(),
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        });
        if self.architecture == Architecture::Llama {
            v["attention_bias"] = serde_json::json!(self.qkv_bias);
            v["mlp_bias"] = serde_json::json!(self.mlp_bias);
        }
        if let Some(w) = self.sliding_window {
            v["sliding_window"] = serde_json::json!(w);
        }
        if let Some(m) = &self.moe {
            let dense: Vec<usize> = (0..m.sparse_layers.len()).filter(|&i| !m.sparse_layers[i]).collect();
            v["num_experts"] = serde_json::json!(m.num_experts);
            v["num_experts_per_tok"] = serde_json::json!(m.num_experts_per_tok);
            v["moe_intermediate_size"] = serde_json::json!(m.moe_intermediate_size);
            v["norm_topk_prob"] = serde_json::json!(m.norm_topk_prob);
            v["decoder_sparse_step"] = serde_json::json!(1);
            v["mlp_only_layers"] = serde_json::json!(dense);
            if let Some(s) = m.shared_expert_intermediate_size {
                v["shared_expert_intermediate_size"] = serde_json::json!(s);
            }
            if self.architecture == Architecture::Qwen2Moe {
                v["qkv_bias"] = serde_json::json!(self.qkv_bias);
            } else {
                v["attention_bias"] = serde_json::json!(self.qkv_bias);
            }
        }
        if let Some(g) = &self.gemma {
            if self.architecture == Architecture::Gemma3 {
                v["model_type"] = serde_json::json!("gemma3_text");
                v["rope_local_base_freq"] = serde_json::json!(g.rope_local_theta);
            }
            let layer_types: Vec<&str> =
                g.sliding_layers.iter().map(|&s| if s { "sliding_attention" } else { "full_attention" }).collect();
            v["hidden_act"] = serde_json::json!("gelu_pytorch_tanh");
            v["hidden_activation"] = serde_json::json!("gelu_pytorch_tanh");
            v["sliding_window"] = serde_json::json!(g.sliding_window);
            v["layer_types"] = serde_json::json!(layer_types);
            v["query_pre_attn_scalar"] = serde_json::json!(g.query_pre_attn_scalar);
            v["final_logit_softcapping"] = serde_json::json!(g.final_logit_softcapping);
            v["attn_logit_softcapping"] = serde_json::json!(g.attn_logit_softcapping);
        }
        if let Some(s) = &self.rope_scaling {
            v["rope_scaling"] = serde_json::json!({
                "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            });
        }
        v
    }
}
