//! The pieces of a pre-norm decoder block shared by every family: RMSNorm, rotary embeddings,
//! grouped-query attention with a preallocated KV cache, and the SwiGLU MLP.
//!
//! Family differences are data, not code paths: q/k/v bias (Qwen2) and per-head q/k RMSNorm
//! (Qwen3) are optional fields read from the checkpoint.

use candle_core::{DType, Device, Tensor};

use super::config::DecoderConfig;
use super::cpu_ops::{
    kv_view, residual_add, rms_norm, softmax_cpu, split_heads_cpu, swiglu, swiglu_fused, with_f32_views,
};
use crate::error::Result;
use crate::loading::gated::{GatedLinear, GatedOutput};
use crate::loading::{Linear, LinearGroup, WeightSource};

/// RMSNorm: `x / sqrt(mean(x²) + eps) * weight`.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    /// Loads `{name}.weight` of width `dim`.
    pub fn load(w: &dyn WeightSource, name: &str, dim: usize, eps: f64, dtype: DType) -> Result<Self> {
        Ok(Self { weight: w.tensor(&format!("{name}.weight"), &[dim], dtype)?, eps: eps as f32 })
    }

    /// Normalizes over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        match rms_norm(&x, None, &self.weight, self.eps)? {
            Some((_, normed)) => Ok(normed),
            None => Ok(candle_nn::ops::rms_norm(&x, &self.weight, self.eps)?),
        }
    }

    /// `(x + delta, norm(x + delta))`: one pass through [`personacore_kernels::norm`]
    /// for f32 CPU tensors, candle's add and norm otherwise.
    pub fn add_forward(&self, x: &Tensor, delta: &Tensor) -> Result<(Tensor, Tensor)> {
        let (x, delta) = (x.contiguous()?, delta.contiguous()?);
        match rms_norm(&x, Some(&delta), &self.weight, self.eps)? {
            Some((Some(sum), normed)) => Ok((sum, normed)),
            _ => {
                let sum = (x + delta)?;
                let normed = candle_nn::ops::rms_norm(&sum, &self.weight, self.eps)?;
                Ok((sum, normed))
            }
        }
    }

    /// The scale vector.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

/// Precomputed RoPE tables (`rotate_half` convention, as transformers).
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    /// `[max_positions, head_dim/2]`
    cos: Tensor,
    /// `[max_positions, head_dim/2]`
    sin: Tensor,
}

impl RotaryEmbedding {
    /// Builds the tables for every position of the context window.
    pub fn new(cfg: &DecoderConfig, dtype: DType, device: &Device) -> Result<Self> {
        let d = cfg.head_dim;
        let mut inv_freq: Vec<f64> = (0..d / 2).map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / d as f64)).collect();
        if let Some(s) = &cfg.rope_scaling {
            // transformers' _compute_llama3_parameters
            let old = s.original_max_position_embeddings as f64;
            let low_wavelen = old / s.low_freq_factor;
            let high_wavelen = old / s.high_freq_factor;
            for f in inv_freq.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *f;
                if wavelen > low_wavelen {
                    *f /= s.factor;
                } else if wavelen >= high_wavelen {
                    let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                    *f = (1.0 - smooth) * *f / s.factor + smooth * *f;
                }
            }
        }
        let n = cfg.max_position_embeddings;
        let mut angles = Vec::with_capacity(n * d / 2);
        for p in 0..n {
            for f in &inv_freq {
                // transformers computes the angle in float32
                angles.push((p as f32) * (*f as f32));
            }
        }
        let angles = Tensor::from_vec(angles, (n, d / 2), device)?;
        Ok(Self { cos: angles.cos()?.to_dtype(dtype)?, sin: angles.sin()?.to_dtype(dtype)? })
    }

    /// `(cos, sin)` for `positions` `[batch, seq]` (u32), each `[batch, seq, head_dim/2]`.
    pub fn tables(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, t) = positions.dims2()?;
        let flat = positions.flatten_all()?;
        let cos = self.cos.index_select(&flat, 0)?.reshape((b, t, ()))?;
        let sin = self.sin.index_select(&flat, 0)?.reshape((b, t, ()))?;
        Ok((cos, sin))
    }
}

/// Keys and values of one layer for every sequence of a batch, preallocated to a capacity.
#[derive(Debug, Clone)]
pub struct LayerKvCache {
    /// `[batch, kv_heads, capacity, head_dim]`
    k: Tensor,
    /// `[batch, kv_heads, capacity, head_dim]`
    v: Tensor,
    len: usize,
}

impl LayerKvCache {
    /// An empty cache able to hold `capacity` positions.
    pub fn new(
        batch: usize,
        kv_heads: usize,
        capacity: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let z = Tensor::zeros((batch, kv_heads, capacity, head_dim), dtype, device)?;
        Ok(Self { k: z.clone(), v: z.copy()?, len: 0 })
    }

    /// Positions stored so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is stored yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `[batch, kv_heads, t, head_dim]` keys/values in place; returns views of everything stored.
    fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        let cap = self.k.dim(2)?;
        if self.len + t > cap {
            return Err(crate::Error::input(format!("KV cache full: {} + {t} positions > capacity {cap}", self.len)));
        }
        self.k.slice_set(&k.contiguous()?, 2, self.len)?;
        self.v.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len += t;
        Ok((self.k.narrow(2, 0, self.len)?, self.v.narrow(2, 0, self.len)?))
    }
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

/// SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    /// gate_proj, up_proj (the activation applied by the matmul when both are packed).
    gate_up: GatedLinear,
    down_proj: Linear,
}

impl Mlp {
    /// Loads `{prefix}.{gate,up,down}_proj`.
    pub fn load(w: &dyn WeightSource, prefix: &str, cfg: &DecoderConfig, dtype: DType) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_up: GatedLinear::new(
                w.linear(&format!("{prefix}.gate_proj"), i, h, cfg.mlp_bias, dtype)?,
                w.linear(&format!("{prefix}.up_proj"), i, h, cfg.mlp_bias, dtype)?,
            )?,
            down_proj: w.linear(&format!("{prefix}.down_proj"), h, i, cfg.mlp_bias, dtype)?,
        })
    }

    /// `[.., hidden] -> [.., hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let activated = match self.gate_up.forward(x)? {
            GatedOutput::Activated(a) => a,
            GatedOutput::Fused(gate_up) => swiglu_fused(&gate_up)?,
            GatedOutput::Parts(gate, up) => swiglu(&gate, &up)?,
        };
        self.down_proj.forward(&activated)
    }

    /// The projections' dense f32 weights and biases under their HF names, in HF order (for export).
    pub fn projection_weights(&self) -> Result<Vec<(&'static str, Tensor, Option<Tensor>)>> {
        let mut out: Vec<_> =
            ["gate_proj", "up_proj"].into_iter().zip(self.gate_up.weights()?).map(|(n, (w, b))| (n, w, b)).collect();
        out.push(("down_proj", self.down_proj.dense_weight()?, self.down_proj.bias().cloned()));
        Ok(out)
    }
}

/// One pre-norm decoder block: `h = x + attn(norm(x)); out = h + mlp(norm(h))`.
#[derive(Debug, Clone)]
pub struct DecoderBlock {
    /// Norm before attention.
    pub input_layernorm: RmsNorm,
    /// Self-attention.
    pub self_attn: Attention,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm,
    /// The MLP.
    pub mlp: Mlp,
}

impl DecoderBlock {
    /// Loads block `i` (`model.layers.{i}.*`).
    pub fn load(w: &dyn WeightSource, i: usize, cfg: &DecoderConfig, dtype: DType) -> Result<Self> {
        let p = format!("model.layers.{i}");
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            input_layernorm: RmsNorm::load(w, &format!("{p}.input_layernorm"), h, eps, dtype)?,
            self_attn: Attention::load(w, &format!("{p}.self_attn"), cfg, dtype)?,
            post_attention_layernorm: RmsNorm::load(w, &format!("{p}.post_attention_layernorm"), h, eps, dtype)?,
            mlp: Mlp::load(w, &format!("{p}.mlp"), cfg, dtype)?,
        })
    }

    /// Residual stream in, residual stream out (`[b, t, hidden]`).
    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut LayerKvCache>,
    ) -> Result<Tensor> {
        let attn = self.self_attn.forward(&self.input_layernorm.forward(x)?, cos, sin, mask, cache)?;
        let (h, normed) = self.post_attention_layernorm.add_forward(x, &attn)?;
        let mlp = self.mlp.forward(&normed)?;
        residual_add(&h, &mlp)
    }
}
