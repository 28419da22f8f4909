//! Grouped-query self-attention with rotary embeddings, optional q/k bias (Qwen2) and per-head
//! q/k RMSNorm (Qwen3), over a preallocated KV cache.

use candle_core::{DType, Tensor};
use personacore_kernels::attention::KvStrides;
use personacore_kernels::prompt_attention::{self, Products, PromptMask, PromptShape};

use super::kv_cache::KvStore;
use super::linear::{Linear, LinearGroup, MatmulPrecision};
use super::mask::AttentionMask;
use super::norm::RmsNorm;
use super::tensor_kernels::{
    decode_each, decode_each_applies, kernel_kv_view, softmax_cpu, split_heads_applies, split_heads_cpu, with_f32_views,
};
use crate::config::DecoderConfig;
use crate::error::Result;
use crate::weights::WeightSource;

/// Query × key positions per sequence from which a model at [`MatmulPrecision::High`] runs the
/// prompt kernel's products on AMX tiles ([`Products::Bf16x3`]); smaller prompts keep f32
/// products. Measured on the default model (benches/README.md, "Prompt attention on AMX tiles"):
/// pooled captures of 4 × 512, 2 × 1,024 and 1 × 4,096 tokens cost 6–19% less CPU with the
/// tiles, one of 8 × 128 none (about 5% more in most interleaved runs, though the kernel alone
/// was cheaper). A served prompt's 256-token prefill chunks use them from 1,024 keys on (not
/// measured).
const TILE_MIN_PAIRS: usize = 512 * 512;

/// How one forward call splits the q/k/v projections into heads.
enum HeadSplit {
    /// One pass per projection through the head-split kernel, rotating q and k on the way
    /// (f32 CPU projections, no per-head norm).
    Kernel,
    /// candle's reshape and transpose, the per-head norms, then candle's rotation.
    Candle,
}

/// How one forward call attends, chosen once from the tensors' dtype, device and layout.
enum AttentionPath {
    /// One query position per sequence (a decode step): the decode kernel.
    Decode(KvStrides),
    /// Many query positions (a prompt, a pooled batch): the prompt kernel (AVX-512).
    Prompt(KvStrides),
    /// candle's batched matmuls around the softmax.
    Candle,
}

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
    /// Attention score scale: `1/sqrt(head_dim)`, or Gemma's `query_pre_attn_scalar^-1/2`.
    scale: f32,
    /// Gemma 2's `tanh(s / c) · c` on the scaled scores (candle's ops only).
    softcap: Option<f64>,
    /// How the prompt kernel multiplies prompts of [`TILE_MIN_PAIRS`] query × key positions or more:
    /// bf16x3 on AMX tiles for a model loaded at [`MatmulPrecision::High`] (as its linear
    /// layers), f32 otherwise.
    products: Products,
}

impl Attention {
    /// Loads `{prefix}.{q,k,v,o}_proj` (and q/k norms when the config has them).
    pub fn load(w: &dyn WeightSource, prefix: &str, cfg: &DecoderConfig, dtype: DType) -> Result<Self> {
        let (h, nh, nkv, hd) = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let offset = cfg.gemma.as_ref().map_or(0.0, |g| g.norm_offset);
        let norm =
            |n: &str| RmsNorm::load_with_offset(w, &format!("{prefix}.{n}"), hd, cfg.rms_norm_eps, offset, dtype);
        let scale = cfg.gemma.as_ref().map_or(1.0 / (hd as f64).sqrt(), |g| g.attention_scale()) as f32;
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
            scale,
            softcap: cfg.gemma.as_ref().and_then(|g| g.attn_logit_softcapping),
            products: match w.precision() {
                MatmulPrecision::High => Products::Bf16x3,
                MatmulPrecision::Highest => Products::F32,
            },
        })
    }

    /// `x` `[b, t, hidden]`; `cos`/`sin` `[b, t, head_dim/2]`; `mask` over `s` keys (or `None`
    /// when every query may see every key); `cache` holds earlier positions. With `last_only`,
    /// every position's keys and values still go to the cache (and are attended to), but only
    /// the last position queries: the output is `[b, 1, hidden]`, that position's.
    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&AttentionMask>,
        cache: Option<&mut dyn KvStore>,
        last_only: bool,
    ) -> Result<Tensor> {
        let [q, k, v] = self.qkv.forward(x)?;
        let (q, k, v) = match self.head_split(&q, &k, &v, cos, sin) {
            HeadSplit::Kernel => {
                let (nh, nkv) = (self.num_heads, self.num_kv_heads);
                split_heads_cpu([&q, &k, &v], [nh, nkv, nkv], self.head_dim, cos, sin)?
            }
            HeadSplit::Candle => self.candle_heads(q, k, v, cos, sin)?,
        };
        // The additive tensor, for the paths that read one (built once per mask, when needed).
        let dense = |mask: Option<&AttentionMask>| mask.map(AttentionMask::tensor).transpose();
        let (k, v) = match cache {
            // A decode step over sequences in caches of their own: read each in place (the
            // kernel has no soft-capping).
            Some(c) if c.separate() && self.softcap.is_none() && q.dim(2)? == 1 => {
                let m = dense(mask)?;
                if decode_each_applies(&q, &k, m.as_ref()) {
                    let views = c.append_each(&k, &v)?;
                    let out = decode_each(&q, &views, m.as_ref(), [self.num_heads, self.num_kv_heads], self.scale)?;
                    return self.o_proj.forward(&out);
                }
                c.append(&k, &v)?
            }
            Some(c) => c.append(&k, &v)?,
            None => (k, v.contiguous()?),
        };
        let last_mask;
        let (q, mask) = match q.dim(2)? {
            t if last_only && t > 1 => {
                last_mask = mask.map(AttentionMask::last_query).transpose()?;
                (q.narrow(2, t - 1, 1)?.contiguous()?, last_mask.as_ref())
            }
            _ => (q, mask),
        };
        let out = match self.path(&q, &k, &v, mask)? {
            AttentionPath::Decode(kv) => self.decode_step(&q, &k, &v, kv, dense(mask)?.as_ref())?,
            AttentionPath::Prompt(kv) => self.prompt_step(&q, &k, &v, kv, mask)?,
            AttentionPath::Candle => self.candle_attention(&q, &k, &v, dense(mask)?.as_ref())?,
        };
        self.o_proj.forward(&out)
    }

    /// How this call splits the projections `[b, t, n · head_dim]` into heads.
    fn head_split(&self, q: &Tensor, k: &Tensor, v: &Tensor, cos: &Tensor, sin: &Tensor) -> HeadSplit {
        let heads = [self.num_heads, self.num_kv_heads, self.num_kv_heads];
        if self.q_norm.is_none() && split_heads_applies([q, k, v], heads, self.head_dim, cos, sin) {
            HeadSplit::Kernel
        } else {
            HeadSplit::Candle
        }
    }

    /// Heads `[b, n, t, head_dim]` through candle's ops: reshape and transpose, the per-head q/k
    /// norms when the family has them, then the rotation of q and k.
    fn candle_heads(
        &self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = q.dims3()?;
        let hd = self.head_dim;
        let heads = |y: Tensor, n: usize| -> Result<Tensor> { Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?) };
        let (mut q, mut k) = (heads(q, self.num_heads)?, heads(k, self.num_kv_heads)?);
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        let q = candle_nn::rotary_emb::rope(&q.contiguous()?, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k.contiguous()?, cos, sin)?;
        Ok((q, k, heads(v, self.num_kv_heads)?))
    }

    /// How this call attends, from the heads `[b, heads, t, head_dim]` and the keys and values
    /// (cached ones included): the CPU kernels for f32 CPU tensors laid out for them, candle's
    /// ops otherwise.
    fn path(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&AttentionMask>) -> Result<AttentionPath> {
        if self.softcap.is_some() {
            return Ok(AttentionPath::Candle);
        }
        let Some(kv) = kernel_kv_view(q, k, v, mask.and_then(AttentionMask::as_dense)) else {
            return Ok(AttentionPath::Candle);
        };
        let (b, _, s, _) = k.dims4()?;
        let t = q.dim(2)?;
        if t == 1 {
            // the decode kernels read the mask's tensor: it must be f32 on the CPU as well
            let dense = mask.map(AttentionMask::tensor).transpose()?;
            return Ok(match kernel_kv_view(q, k, v, dense.as_ref()) {
                Some(kv) => AttentionPath::Decode(kv),
                None => AttentionPath::Candle,
            });
        }
        let mask_fits = match mask {
            None => true,
            Some(AttentionMask::Dense(m)) => {
                let md = m.dims();
                md.len() == 4 && md[1..] == [1, t, s] && (md[0] == 1 || md[0] == b)
            }
            Some(AttentionMask::Causal(c)) => c.queries() == t && c.keys() == s && (c.batch() == 1 || c.batch() == b),
        };
        Ok(if prompt_attention::available() && mask_fits { AttentionPath::Prompt(kv) } else { AttentionPath::Candle })
    }

    /// One query position per sequence: [`personacore_kernels::attention`] straight into
    /// `[b, 1, heads · head_dim]`.
    fn decode_step(&self, q: &Tensor, k: &Tensor, v: &Tensor, kv: KvStrides, mask: Option<&Tensor>) -> Result<Tensor> {
        use personacore_kernels::attention::{decode_attention, DecodeShape};
        let (b, _, s, hd) = k.dims4()?;
        let shape = DecodeShape { batch: b, heads: self.num_heads, kv_heads: self.num_kv_heads, head_dim: hd, keys: s };
        let q = q.contiguous()?;
        let mut out = vec![0f32; b * self.num_heads * hd];
        with_f32_views(&q, k, v, mask, |q, k, v, mask| {
            decode_attention(q, k, v, kv, mask, shape, self.scale, &mut out)
        })?;
        Ok(Tensor::from_vec(out, (b, 1, self.num_heads * hd), k.device())?)
    }

    /// Many query positions per sequence: [`personacore_kernels::prompt_attention`] straight
    /// into `[b, t, heads · head_dim]`, its products at the model's precision from
    /// [`TILE_MIN_PAIRS`] query × key positions on.
    fn prompt_step(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        kv: KvStrides,
        mask: Option<&AttentionMask>,
    ) -> Result<Tensor> {
        let (b, _, s, hd) = k.dims4()?;
        let t = q.dim(2)?;
        let shape = PromptShape {
            batch: b,
            heads: self.num_heads,
            kv_heads: self.num_kv_heads,
            head_dim: hd,
            queries: t,
            keys: s,
        };
        let q = q.contiguous()?;
        let mut out = Vec::new();
        let dense = mask.and_then(AttentionMask::as_dense);
        with_f32_views(&q, k, v, dense, |q, k, v, dense| {
            let mask = match (dense, mask) {
                (Some(m), _) => PromptMask::Dense(m),
                (None, Some(AttentionMask::Causal(c))) => PromptMask::Causal(c.rows()),
                (None, _) => PromptMask::None,
            };
            let products = if t * s >= TILE_MIN_PAIRS { self.products } else { Products::F32 };
            out = prompt_attention::prompt_attention_to_vec(q, k, v, kv, mask, shape, self.scale, products);
        })?;
        Ok(Tensor::from_vec(out, (b, t, self.num_heads * hd), k.device())?)
    }

    /// candle's batched matmuls, with the scale, mask and softmax in one kernel pass for f32
    /// on the CPU: `[b, t, heads · head_dim]`.
    fn candle_attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, nh, t, hd) = q.dims4()?;
        let nkv = self.num_kv_heads;
        let s = k.dim(2)?;
        // Query heads are grouped by the kv head they share: fold the group into the query
        // axis so K/V are used without copies.
        let g = nh / nkv;
        let q = q.reshape((b, nkv, g * t, hd))?;
        let scale = self.scale as f64;
        let scores = q.matmul(&k.t()?)?;
        let fused = match self.softcap {
            None => softmax_cpu(&scores, mask, scale as f32, g * t, t)?,
            Some(_) => None,
        };
        let probs = match fused {
            Some(p) => p,
            None => {
                let mut scores = (scores * scale)?;
                if let Some(cap) = self.softcap {
                    scores = ((scores / cap)?.tanh()? * cap)?;
                }
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
        let out = probs.matmul(v)?; // [b, nkv, g*t, hd]
        Ok(out.reshape((b, nh, t, hd))?.transpose(1, 2)?.reshape((b, t, nh * hd))?)
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
