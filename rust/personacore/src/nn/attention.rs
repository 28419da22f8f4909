//! Grouped-query self-attention with rotary embeddings, optional q/k bias (Qwen2) and per-head
//! q/k RMSNorm (Qwen3), over a preallocated KV cache.

use candle_core::{DType, Tensor};

use super::kv_cache::LayerKvCache;
use super::linear::{Linear, LinearGroup};
use super::norm::RmsNorm;
use super::tensor_kernels::{kv_view, softmax_cpu, split_heads_cpu, with_f32_views};
use crate::config::DecoderConfig;
use crate::error::Result;
use crate::weights::WeightSource;

/// Grouped-query self-attention.
#[derive(Debug, Clone)]
pub struct Attention {
    /// q_proj, k_proj, v_proj (fused into one matmul when packed).
    qkv: LinearGroup<3>,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    /// Loads `{prefix}.{q,k,v,o}_proj` (and q/k norms when the config has them).
    pub fn load(w: &dyn WeightSource, prefix: &str, cfg: &DecoderConfig, dtype: DType) -> Result<Self> {
        let (h, nh, nkv, hd) = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let norm = |n: &str| RmsNorm::load(w, &format!("{prefix}.{n}"), hd, cfg.rms_norm_eps, dtype);
        Ok(Self {
            qkv: LinearGroup::new([
                w.linear(&format!("{prefix}.q_proj"), nh * hd, h, cfg.qkv_bias, dtype)?,
                w.linear(&format!("{prefix}.k_proj"), nkv * hd, h, cfg.qkv_bias, dtype)?,
                w.linear(&format!("{prefix}.v_proj"), nkv * hd, h, cfg.qkv_bias, dtype)?,
            ])?,
            o_proj: w.linear(&format!("{prefix}.o_proj"), h, nh * hd, cfg.o_bias, dtype)?,
            q_norm: if cfg.qk_norm { Some(norm("q_norm")?) } else { None },
            k_norm: if cfg.qk_norm { Some(norm("k_norm")?) } else { None },
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
        })
    }

    /// `x` `[b, t, hidden]`; `cos`/`sin` `[b, t, head_dim/2]`; `mask` additive, `[b, 1, t, s]`
    /// (or `None` when every query may see every key); `cache` holds earlier positions.
    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut LayerKvCache>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let [q, k, v] = self.qkv.forward(x)?;
        let split = match self.q_norm {
            None => split_heads_cpu([&q, &k, &v], [nh, nkv, nkv], hd, cos, sin)?,
            Some(_) => None,
        };
        let (q, k, v) = match split {
            Some(qkv) => qkv,
            None => {
                let heads = |y: Tensor, n: usize| -> Result<Tensor> { Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?) };
                let (mut q, mut k) = (heads(q, nh)?, heads(k, nkv)?);
                if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
                    q = qn.forward(&q)?;
                    k = kn.forward(&k)?;
                }
                let q = candle_nn::rotary_emb::rope(&q.contiguous()?, cos, sin)?;
                let k = candle_nn::rotary_emb::rope(&k.contiguous()?, cos, sin)?;
                (q, k, heads(v, nkv)?)
            }
        };
        let (k, v) = match cache {
            Some(c) => c.append(&k, &v)?,
            None => (k, v.contiguous()?),
        };
        if t == 1 {
            if let Some(out) = self.decode_step(&q, &k, &v, mask)? {
                return self.o_proj.forward(&out);
            }
        }
        if let Some(out) = self.prompt_step(&q, &k, &v, mask)? {
            return self.o_proj.forward(&out);
        }
        let s = k.dim(2)?;
        // Query heads are grouped by the kv head they share: fold the group into the query
        // axis so K/V are used without copies.
        let g = nh / nkv;
        let q = q.reshape((b, nkv, g * t, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = q.matmul(&k.t()?)?;
        let probs = match softmax_cpu(&scores, mask, scale as f32, g * t, t)? {
            Some(p) => p,
            None => {
                let scores = (scores * scale)?;
                let scores = match mask {
                    Some(m) => scores.reshape((b, nkv, g, t, s))?.broadcast_add(&m.unsqueeze(1)?)?.reshape((
                        b,
                        nkv,
                        g * t,
                        s,
                    ))?,
                    None => scores,
                };
                candle_nn::ops::softmax_last_dim(&scores)?
            }
        };
        let out = probs.matmul(&v)?; // [b, nkv, g*t, hd]
        let out = out.reshape((b, nh, t, hd))?.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        self.o_proj.forward(&out)
    }

    /// One query position per sequence on the CPU in f32: [`personacore_kernels::attention`] straight into
    /// `[b, 1, heads · head_dim]`; `None` when the tensors are not laid out for it.
    fn decode_step(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Option<Tensor>> {
        use personacore_kernels::attention::{decode_attention, DecodeShape};
        let Some(kv) = kv_view(q, k, v) else { return Ok(None) };
        let (b, _, s, hd) = k.dims4()?;
        let shape = DecodeShape { batch: b, heads: self.num_heads, kv_heads: self.num_kv_heads, head_dim: hd, keys: s };
        let q = q.contiguous()?;
        let mut out = vec![0f32; b * self.num_heads * hd];
        let ran = with_f32_views(&q, k, v, mask, |q, k, v, mask| {
            decode_attention(q, k, v, kv, mask, shape, 1.0 / (hd as f32).sqrt(), &mut out)
        })?;
        Ok(ran.then(|| Tensor::from_vec(out, (b, 1, self.num_heads * hd), k.device())).transpose()?)
    }

    /// Many query positions per sequence on the CPU in f32: [`personacore_kernels::prompt_attention`]
    /// straight into `[b, t, heads · head_dim]`; `None` when the tensors are not laid out for it
    /// (or the CPU lacks the kernel), so that candle's ops run instead.
    fn prompt_step(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Option<Tensor>> {
        use personacore_kernels::prompt_attention::{available, prompt_attention_to_vec, PromptShape};
        let Some(kv) = kv_view(q, k, v).filter(|_| available()) else { return Ok(None) };
        let (b, _, s, hd) = k.dims4()?;
        let t = q.dim(2)?;
        if let Some(md) = mask.map(|m| m.dims()) {
            if md.len() != 4 || md[1..] != [1, t, s] || (md[0] != 1 && md[0] != b) {
                return Ok(None);
            }
        }
        let shape = PromptShape {
            batch: b,
            heads: self.num_heads,
            kv_heads: self.num_kv_heads,
            head_dim: hd,
            queries: t,
            keys: s,
        };
        let q = q.contiguous()?;
        let mut out = None;
        with_f32_views(&q, k, v, mask, |q, k, v, mask| {
            out = Some(prompt_attention_to_vec(q, k, v, kv, mask, shape, 1.0 / (hd as f32).sqrt()));
        })?;
        Ok(out.map(|o| Tensor::from_vec(o, (b, t, self.num_heads * hd), k.device())).transpose()?)
    }

    /// The projections' dense f32 weights and biases under their HF names, in HF order (for export).
    pub fn projection_weights(&self) -> Result<Vec<(&'static str, Tensor, Option<Tensor>)>> {
        let mut out: Vec<_> =
            ["q_proj", "k_proj", "v_proj"].into_iter().zip(self.qkv.weights()?).map(|(n, (w, b))| (n, w, b)).collect();
        out.push(("o_proj", self.o_proj.dense_weight()?, self.o_proj.bias().cloned()));
        Ok(out)
    }

    /// The per-head q/k norms, if the family has them.
    pub fn qk_norms(&self) -> Option<(&RmsNorm, &RmsNorm)> {
        Some((self.q_norm.as_ref()?, self.k_norm.as_ref()?))
    }
}
