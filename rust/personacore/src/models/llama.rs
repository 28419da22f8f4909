//! The Llama family (Llama 2/3.x, SmolLM2, Mistral): what its `config.json` means.
//!
//! The block itself is the shared pre-norm decoder block of `nn/`; Llama uses it with no q/k/v
//! bias (unless `attention_bias`), no q/k norm, and Llama-3 RoPE scaling when configured. A
//! llama.cpp GGUF of this architecture has its Q/K rows permuted (see `weights::gguf`).

use crate::config::hf::HfConfig;
use crate::config::{Architecture, DecoderConfig};

/// The decoder config of a `LlamaForCausalLM` / `MistralForCausalLM` `config.json`: the shared
/// defaults, `attention_bias` and `mlp_bias` on Llama (Mistral checkpoints never carry biases),
/// the sliding window on Mistral.
pub(crate) fn config(hf: &HfConfig, arch: Architecture) -> DecoderConfig {
    let llama = arch == Architecture::Llama;
    DecoderConfig {
        qkv_bias: hf.attention_bias && llama,
        o_bias: hf.attention_bias && llama,
        mlp_bias: hf.mlp_bias && llama,
        sliding_window: if arch == Architecture::Mistral { hf.sliding_window } else { None },
        ..hf.decoder(arch)
    }
}
