//! The decoder-only transformer: embeddings, the layer loop (which calls the hooks), the final
//! norm and the output projection. The residual stream is the `x` that flows through `forward`.

use candle_core::{DType, Device, Tensor};

use crate::config::DecoderConfig;
use crate::error::{Error, Result};
use crate::hooks::{HookPoint, Hooks};
use crate::nn::{AttentionMask, DecoderBlock, Embedding, KvStore, LayerKvCache, Linear, RmsNorm, RotaryEmbedding};
use crate::weights::WeightSource;

/// Which logits a forward pass computes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogitsMode {
    /// None (activation capture only: skips the vocabulary projection).
    None,
    /// Only at the last position of each sequence.
    Last,
    /// Only at the last position of these sequences (batch rows, ascending): a decode batch whose
    /// other rows are only scored (a finished request's last token) skips their vocabulary
    /// projection.
    LastOf(Vec<usize>),
    /// At every position.
    All,
}

/// One forward pass's inputs for a batch.
pub struct ForwardInput {
    /// Token ids `[batch, seq]` (u32).
    pub ids: Tensor,
    /// Position of each token `[batch, seq]` (u32), for RoPE.
    pub positions: Tensor,
    /// Which keys each position sees (causal by shape, or an additive `[batch or 1, 1, seq,
    /// keys]` tensor), or `None` when every position sees every key.
    pub mask: Option<AttentionMask>,
}

/// The KV caches of every layer.
pub struct KvCache {
    /// One cache per block.
    pub layers: Vec<LayerKvCache>,
}

impl KvCache {
    /// Positions stored so far.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.len())
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The per-layer key/value stores of one forward pass.
pub trait LayerStores {
    /// The store of block `i`.
    fn layer(&mut self, i: usize) -> &mut dyn KvStore;
}

impl LayerStores for KvCache {
    fn layer(&mut self, i: usize) -> &mut dyn KvStore {
        &mut self.layers[i]
    }
}

/// A loaded decoder-only language model.
pub struct Transformer {
    /// Normalized configuration.
    pub config: DecoderConfig,
    embed_tokens: Embedding,
    blocks: Vec<DecoderBlock>,
    norm: RmsNorm,
    lm_head: Linear,
    rotary: RotaryEmbedding,
    /// Gemma's local layers' RoPE tables (their own base).
    rotary_local: Option<RotaryEmbedding>,
    /// Gemma's embedding scale, `sqrt(hidden_size)`.
    embed_scale: Option<f64>,
    dtype: DType,
    device: Device,
}

impl Transformer {
    /// Loads every weight (HF names) from `w`, computing in `dtype` on `device`.
    pub fn load(w: &dyn WeightSource, config: DecoderConfig, dtype: DType, device: &Device) -> Result<Self> {
        let (v, h) = (config.vocab_size, config.hidden_size);
        let embed_tokens = w.embedding("model.embed_tokens", v, h, dtype)?;
        let blocks =
            (0..config.num_layers).map(|i| DecoderBlock::load(w, i, &config, dtype)).collect::<Result<Vec<_>>>()?;
        let norm_offset = config.gemma.as_ref().map_or(0.0, |g| g.norm_offset);
        let norm = RmsNorm::load_with_offset(w, "model.norm", h, config.rms_norm_eps, norm_offset, dtype)?;
        let lm_head = if !config.tie_word_embeddings && w.contains("lm_head.weight") {
            w.linear("lm_head", v, h, false, dtype)?
        } else if config.tie_word_embeddings {
            w.linear("model.embed_tokens", v, h, false, dtype)?
        } else {
            return Err(crate::Error::invalid_file(
                w.origin(),
                "missing tensor 'lm_head.weight' (tie_word_embeddings is false)",
            ));
        };
        let rotary = RotaryEmbedding::new(&config, dtype, device)?;
        let rotary_local = match &config.gemma {
            Some(g) => {
                let local = DecoderConfig { rope_theta: g.rope_local_theta, rope_scaling: None, ..config.clone() };
                Some(RotaryEmbedding::new(&local, dtype, device)?)
            }
            None => None,
        };
        // transformers keeps the scale as a float32 tensor, then casts it to the weights' dtype.
        let embed_scale = config.gemma.as_ref().map(|_| (h as f32).sqrt() as f64);
        Ok(Self {
            config,
            embed_tokens,
            blocks,
            norm,
            lm_head,
            rotary,
            rotary_local,
            embed_scale,
            dtype,
            device: device.clone(),
        })
    }

    /// Compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// An empty KV cache for `batch` sequences of up to `capacity` positions.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> Result<KvCache> {
        let c = &self.config;
        let layers = (0..c.num_layers)
            .map(|_| LayerKvCache::new(batch, c.num_kv_heads, capacity, c.head_dim, self.dtype, &self.device))
            .collect::<Result<_>>()?;
        Ok(KvCache { layers })
    }

    /// Runs the model on `input`, calling `hooks` at every hook point. Returns logits
    /// `[batch, seq or 1, vocab]` (f32; `[rows, 1, vocab]` for `LastOf(rows)`) unless `logits` is
    /// `None` or names no row.
    pub fn forward(
        &self,
        input: &ForwardInput,
        hooks: &mut dyn Hooks,
        mut cache: Option<&mut dyn LayerStores>,
        logits: LogitsMode,
    ) -> Result<Option<Tensor>> {
        let (b, t) = input.ids.dims2()?;
        let (cos, sin) = self.rotary.tables(&input.positions)?;
        let local = match (&self.rotary_local, &self.config.gemma) {
            (Some(r), Some(g)) => {
                let (cos, sin) = r.tables(&input.positions)?;
                let mask = self.sliding_window_mask(input.mask.as_ref(), &input.positions, t, g.sliding_window)?;
                Some((cos, sin, mask, &g.sliding_layers))
            }
            _ => None,
        };
        let mut x = self.embed_tokens.forward(&input.ids)?.reshape((b, t, ()))?;
        if let Some(scale) = self.embed_scale {
            x = (x * scale)?;
        }
        x = hooks.at(HookPoint::Embed, &x)?.unwrap_or(x);
        // A capture that needs only the first rows ends the pass there (no logits, no cache).
        let num_layers = self.blocks.len();
        let stop = match (&logits, &cache) {
            (LogitsMode::None, None) => hooks.last_row().filter(|r| *r < num_layers),
            _ => None,
        };
        if stop == Some(0) {
            return Ok(None);
        }
        // The logits of the last position need the last layer's output there only: when no hook
        // reads the last rows, that layer's queries, attention output and MLP run for the last
        // position alone (every position's keys and values still reach the cache).
        let last_only = matches!(logits, LogitsMode::Last | LogitsMode::LastOf(_))
            && t > 1
            && !hooks.reads(HookPoint::ResidPost(num_layers - 1))
            && !hooks.reads(HookPoint::FinalNorm);
        for (i, block) in self.blocks.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| c.layer(i));
            let last = last_only && i + 1 == num_layers;
            x = match &local {
                Some((lcos, lsin, lmask, sliding)) if sliding[i] => {
                    block.forward(&x, lcos, lsin, lmask.as_ref(), layer_cache, last)?
                }
                _ => block.forward(&x, &cos, &sin, input.mask.as_ref(), layer_cache, last)?,
            };
            x = hooks.at(HookPoint::ResidPost(i), &x)?.unwrap_or(x);
            if stop == Some(i + 1) {
                return Ok(None);
            }
        }
        let mut normed = self.norm.forward(&x)?;
        normed = hooks.at(HookPoint::FinalNorm, &normed)?.unwrap_or(normed);
        let out = match logits {
            LogitsMode::None => return Ok(None),
            LogitsMode::Last => {
                let rows = normed.dim(1)?;
                normed.narrow(1, rows - 1, 1)?
            }
            LogitsMode::LastOf(keep) => {
                let rows = normed.dim(1)?;
                let last = normed.narrow(1, rows - 1, 1)?;
                if keep.len() == b {
                    last
                } else if keep.is_empty() {
                    return Ok(None);
                } else {
                    let idx = keep.iter().map(|&r| u32::try_from(r)).collect::<std::result::Result<Vec<_>, _>>();
                    let idx = idx.map_err(|_| Error::Compute("logits row index beyond u32".into()))?;
                    last.index_select(&Tensor::new(idx, last.device())?, 0)?
                }
            }
            LogitsMode::All => normed,
        };
        let logits = self.lm_head.forward(&out)?.to_dtype(DType::F32)?;
        match self.config.gemma.as_ref().and_then(|g| g.final_logit_softcapping) {
            Some(cap) => Ok(Some(((logits / cap)?.tanh()? * cap)?)),
            None => Ok(Some(logits)),
        }
    }

    /// The causal mask of `t` positions after `past` cached ones (with the sliding window if the
    /// model has one), described by its shape, or `None` when `t == 1` and no window applies.
    pub fn causal_mask(&self, t: usize, past: usize) -> Result<Option<AttentionMask>> {
        let window = self.config.sliding_window;
        if t == 1 && window.is_none_or(|w| past + t <= w) {
            return Ok(None);
        }
        Ok(Some(AttentionMask::causal(t, past, window, Vec::new(), self.dtype, &self.device)))
    }

    /// The causal mask of `t` positions after `past` cached ones in sequences with `left_pads`
    /// padding slots each (a pad position sees only itself), with the model's sliding window.
    pub fn padded_causal_mask(&self, t: usize, past: usize, left_pads: &[usize]) -> AttentionMask {
        AttentionMask::causal(t, past, self.config.sliding_window, left_pads.to_vec(), self.dtype, &self.device)
    }

    /// The mask of a local (sliding-window) layer: `mask` plus the window (a query sees keys fewer
    /// than `window` slots before its own). Without a mask (one unpadded sequence) the `t` new
    /// tokens take the last slots and the keys number the last position + 1. `None` when no
    /// query has more than `window` keys and there was no mask.
    fn sliding_window_mask(
        &self,
        mask: Option<&AttentionMask>,
        positions: &Tensor,
        t: usize,
        window: usize,
    ) -> Result<Option<AttentionMask>> {
        if let Some(m) = mask {
            return Ok(Some(m.with_window(window)?));
        }
        let s = positions.max_all()?.to_dtype(DType::U32)?.to_scalar::<u32>()? as usize + 1;
        if s <= window {
            return Ok(None);
        }
        let past = s.checked_sub(t).ok_or_else(|| {
            crate::Error::Compute(format!("{t} new positions without a mask, but the last position is {}", s - 1))
        })?;
        Ok(Some(AttentionMask::causal(t, past, Some(window), Vec::new(), self.dtype, &self.device)))
    }

    /// Every weight under its HF name, dense f32 (for export to safetensors). Not available for
    /// Gemma yet (its sandwich norms and `(1 + w)` scales are not exported).
    pub fn named_weights(&self) -> Result<Vec<(String, Tensor)>> {
        if self.config.gemma.is_some() {
            return Err(crate::Error::input("exporting a Gemma model's weights is not supported yet"));
        }
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        let mut out = vec![("model.embed_tokens.weight".to_string(), f(&self.embed_tokens.dense_weight()?)?)];
        for (i, b) in self.blocks.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.input_layernorm.weight"), f(b.input_layernorm.weight())?));
            out.push((format!("{p}.post_attention_layernorm.weight"), f(b.post_attention_layernorm.weight())?));
            for (n, w, bias) in b.self_attn.projection_weights()? {
                out.push((format!("{p}.self_attn.{n}.weight"), w));
                if let Some(bias) = bias {
                    out.push((format!("{p}.self_attn.{n}.bias"), f(&bias)?));
                }
            }
            if let Some((qn, kn)) = b.self_attn.qk_norms() {
                out.push((format!("{p}.self_attn.q_norm.weight"), f(qn.weight())?));
                out.push((format!("{p}.self_attn.k_norm.weight"), f(kn.weight())?));
            }
            for (n, w, bias) in b.mlp.named_weights()? {
                out.push((format!("{p}.mlp.{n}.weight"), w));
                if let Some(bias) = bias {
                    out.push((format!("{p}.mlp.{n}.bias"), f(&bias)?));
                }
            }
        }
        out.push(("model.norm.weight".to_string(), f(self.norm.weight())?));
        if !self.config.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), self.lm_head.dense_weight()?));
        }
        Ok(out)
    }
}
