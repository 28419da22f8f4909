//! The decoder config from GGUF metadata (`{arch}.block_count`, `{arch}.embedding_length`, ...),
//! as llama.cpp writes it.

use candle_core::quantized::gguf_file;

use super::{Architecture, DecoderConfig};
use crate::error::{Error, Result};
use crate::weights::gguf::gguf_uint;

impl DecoderConfig {
    /// Reads the config from GGUF metadata (`{arch}.block_count`, `{arch}.embedding_length`, ...).
    pub fn from_gguf(content: &gguf_file::Content, has_output_tensor: bool) -> Result<Self> {
        let md = &content.metadata;
        let arch_name = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .ok_or_else(|| Error::Config("GGUF metadata has no general.architecture".into()))?
            .clone();
        let arch = Architecture::parse(&arch_name)?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let get_u = |k: &str| -> Result<usize> {
            let v = md.get(&key(k)).ok_or_else(|| Error::Config(format!("GGUF metadata is missing '{}'", key(k))))?;
            gguf_uint(v)
                .and_then(|x| usize::try_from(x).ok())
                .ok_or_else(|| Error::Config(format!("GGUF metadata '{}' is not an integer", key(k))))
        };
        let get_f = |k: &str, default: f64| -> Result<f64> {
            match md.get(&key(k)) {
                None => Ok(default),
                Some(v) => v
                    .to_f32()
                    .map(|x| x as f64)
                    .or_else(|_| v.to_f64())
                    .map_err(|_| Error::Config(format!("GGUF metadata '{}' is not a float", key(k)))),
            }
        };
        let hidden = get_u("embedding_length")?;
        let heads = get_u("attention.head_count")?;
        let kv_heads = get_u("attention.head_count_kv").unwrap_or(heads);
        let head_dim = match get_u("attention.key_length") {
            Ok(d) => d,
            Err(_) => hidden.checked_div(heads).unwrap_or(0),
        };
        let vocab = match md.get("tokenizer.ggml.tokens").and_then(|v| v.to_vec().ok()) {
            Some(tokens) => tokens.len(),
            None => get_u("vocab_size")?,
        };
        let cfg = DecoderConfig {
            architecture: arch,
            hidden_size: hidden,
            // A GGUF whose every layer is sparse may leave the dense width out.
            intermediate_size: match (get_u("feed_forward_length"), arch) {
                (Ok(width), _) => width,
                (Err(_), Architecture::Qwen2Moe | Architecture::Qwen3Moe) => get_u("expert_feed_forward_length")?,
                (Err(e), _) => return Err(e),
            },
            num_layers: get_u("block_count")?,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            vocab_size: vocab,
            rms_norm_eps: get_f("attention.layer_norm_rms_epsilon", 1e-6)?,
            rope_theta: get_f("rope.freq_base", 10000.0)?,
            rope_scaling: None,
            max_position_embeddings: get_u("context_length").unwrap_or(4096),
            tie_word_embeddings: !has_output_tensor,
            qkv_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            o_bias: content.tensor_infos.contains_key("blk.0.attn_output.bias"),
            mlp_bias: content.tensor_infos.contains_key("blk.0.ffn_up.bias"),
            qk_norm: content.tensor_infos.contains_key("blk.0.attn_q_norm.weight"),
            sliding_window: get_u("attention.sliding_window").ok(),
            gemma: None,
            moe: None,
        };
        let cfg = match arch {
            Architecture::Gemma3 => {
                let local = md
                    .contains_key(&key("rope.freq_base_swa"))
                    .then(|| get_f("rope.freq_base_swa", 10000.0))
                    .transpose()?;
                crate::models::gemma3::from_gguf(cfg, local)?
            }
            Architecture::Gemma2 => {
                let cap = |k: &str| md.contains_key(&key(k)).then(|| get_f(k, 0.0)).transpose();
                crate::models::gemma2::from_gguf(cfg, cap("attn_logit_softcapping")?, cap("final_logit_softcapping")?)?
            }
            Architecture::Qwen2Moe | Architecture::Qwen3Moe => {
                let bool_key = md.get(&key("expert_weights_norm")).and_then(|v| v.to_bool().ok());
                let moe = crate::models::qwen3_moe::gguf_moe_options(&cfg, content, &|k: &str| get_u(k), bool_key)?;
                DecoderConfig { moe: Some(moe), ..cfg }
            }
            _ => cfg,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}
