//! The sparse mixture-of-experts feed-forward of Qwen2-MoE and Qwen3-MoE, and the choice between
//! it and the dense MLP in each block.
//!
//! A router (`mlp.gate`, `[num_experts, hidden]`, no bias) scores every token; the scores go
//! through a softmax, the `num_experts_per_tok` largest probabilities pick the experts (renormalised
//! to sum to 1 when `norm_topk_prob`), and the block's output is the sum of the picked experts'
//! SwiGLU MLPs weighted by those probabilities. Qwen2-MoE adds a shared expert that sees every
//! token, scaled by `sigmoid(shared_expert_gate(x))`.
//!
//! The compute follows the routing: the rows routed to an expert are gathered, that expert runs
//! once on them (one matmul per projection), and the weighted results are added back to their
//! rows, in expert order as transformers adds them. No expert runs on a token it was not picked for.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::linear::Linear;
use super::mlp::Mlp;
use crate::config::DecoderConfig;
use crate::error::{Error, Result};
use crate::weights::WeightSource;

/// What a mixture-of-experts family adds to the shared decoder config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoeOptions {
    /// Experts per sparse layer.
    pub num_experts: usize,
    /// Experts picked per token (top-k).
    pub num_experts_per_tok: usize,
    /// Inner width of one expert's MLP.
    pub moe_intermediate_size: usize,
    /// Whether the picked probabilities are divided by their sum.
    pub norm_topk_prob: bool,
    /// Per layer: `true` for a sparse (mixture-of-experts) layer, `false` for a dense MLP of
    /// `intermediate_size` (from `decoder_sparse_step` and `mlp_only_layers`).
    pub sparse_layers: Vec<bool>,
    /// Inner width of the shared expert every token goes through (Qwen2-MoE), if any.
    pub shared_expert_intermediate_size: Option<usize>,
}

impl MoeOptions {
    /// Per layer, whether it is sparse: layer `i` is sparse when `(i + 1) % decoder_sparse_step ==
    /// 0` and `i` is not in `mlp_only_layers`, as transformers builds Qwen2-MoE and Qwen3-MoE.
    pub fn sparse_layer_pattern(
        num_layers: usize,
        num_experts: usize,
        decoder_sparse_step: usize,
        mlp_only_layers: &[usize],
    ) -> Result<Vec<bool>> {
        if decoder_sparse_step == 0 {
            return Err(Error::Config("decoder_sparse_step must be positive".into()));
        }
        if let Some(bad) = mlp_only_layers.iter().find(|&&l| l >= num_layers) {
            return Err(Error::Config(format!("mlp_only_layers names layer {bad}, the model has {num_layers}")));
        }
        Ok((0..num_layers)
            .map(|i| !mlp_only_layers.contains(&i) && num_experts > 0 && (i + 1) % decoder_sparse_step == 0)
            .collect())
    }

    /// Rejects options no model can have.
    pub fn validate(&self, num_layers: usize) -> Result<()> {
        if self.sparse_layers.len() != num_layers {
            return Err(Error::Config(format!(
                "the mixture-of-experts layer list has {} layers, the model has {num_layers}",
                self.sparse_layers.len()
            )));
        }
        if self.sparse_layers.iter().any(|&s| s) {
            if self.num_experts == 0 || self.moe_intermediate_size == 0 {
                return Err(Error::Config("num_experts and moe_intermediate_size must be positive".into()));
            }
            if self.num_experts_per_tok == 0 || self.num_experts_per_tok > self.num_experts {
                return Err(Error::Config(format!(
                    "num_experts_per_tok ({}) must be between 1 and num_experts ({})",
                    self.num_experts_per_tok, self.num_experts
                )));
            }
        }
        if self.shared_expert_intermediate_size == Some(0) {
            return Err(Error::Config("shared_expert_intermediate_size must be positive".into()));
        }
        Ok(())
    }
}

/// The experts picked for one token and their weights: softmax over `logits`, the `top_k` largest
/// probabilities (the lower expert index first among equals), divided by their sum when
/// `normalize`. Returned largest first.
pub fn route_token(logits: &[f32], top_k: usize, normalize: bool) -> Vec<(usize, f32)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let total: f32 = exp.iter().sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    // A stable sort keeps the lower index first among equal probabilities.
    order.sort_by(|&a, &b| exp[b].total_cmp(&exp[a]));
    let mut picked: Vec<(usize, f32)> = order.into_iter().take(top_k).map(|e| (e, exp[e] / total)).collect();
    if normalize {
        let sum: f32 = picked.iter().map(|(_, p)| p).sum();
        for (_, p) in &mut picked {
            *p /= sum;
        }
    }
    picked
}

/// The rows routed to one expert and each row's weight.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExpertRows {
    /// Token rows (indices into the flattened `[tokens, hidden]` input), ascending.
    pub rows: Vec<u32>,
    /// The routing weight of each row.
    pub weights: Vec<f32>,
}

/// Routes every token of `logits` (`[tokens, num_experts]`, row-major) with [`route_token`] and
/// groups the result by expert: entry `e` lists the rows that picked expert `e`.
pub fn route_tokens(logits: &[f32], num_experts: usize, top_k: usize, normalize: bool) -> Vec<ExpertRows> {
    let mut by_expert = vec![ExpertRows::default(); num_experts];
    for (row, token_logits) in logits.chunks(num_experts.max(1)).enumerate() {
        for (e, w) in route_token(token_logits, top_k, normalize) {
            by_expert[e].rows.push(row as u32);
            by_expert[e].weights.push(w);
        }
    }
    by_expert
}

/// Qwen2-MoE's shared expert and its gate.
#[derive(Debug, Clone)]
struct SharedExpert {
    mlp: Mlp,
    /// `[1, hidden]`: the token's weight on the shared expert is `sigmoid(gate(x))`.
    gate: Linear,
}

/// A sparse mixture-of-experts feed-forward layer.
#[derive(Debug, Clone)]
pub struct SparseMoe {
    /// Router `[num_experts, hidden]`.
    router: Linear,
    experts: Vec<Mlp>,
    top_k: usize,
    norm_topk_prob: bool,
    shared: Option<SharedExpert>,
}

impl SparseMoe {
    /// Loads `{prefix}.gate`, the experts, and the shared expert when the options have one. The
    /// experts are read in any of three layouts: one `{prefix}.experts.{e}.{gate,up,down}_proj`
    /// each (as Qwen checkpoints store them); transformers 5's in-memory stacks
    /// `{prefix}.experts.gate_up_proj` `[experts, 2 · inner, hidden]` and `{prefix}.experts.down_proj`
    /// `[experts, hidden, inner]`; or one stack per projection, `{prefix}.experts.gate_proj.weight`
    /// `[experts, inner, hidden]` and so on (a GGUF file's `ffn_*_exps`, kept quantized).
    pub fn load(
        w: &dyn WeightSource,
        prefix: &str,
        cfg: &DecoderConfig,
        moe: &MoeOptions,
        dtype: DType,
    ) -> Result<Self> {
        let (h, e, inner) = (cfg.hidden_size, moe.num_experts, moe.moe_intermediate_size);
        let router = w.linear(&format!("{prefix}.gate"), e, h, false, dtype)?;
        let stacked = format!("{prefix}.experts.gate_up_proj");
        let per_projection = format!("{prefix}.experts.gate_proj");
        let experts = if w.contains(&format!("{per_projection}.weight")) {
            let stack = |n: &str, out: usize, inp: usize| {
                w.stacked_linears(&format!("{prefix}.experts.{n}"), e, out, inp, dtype)
            };
            let gates = stack("gate_proj", inner, h)?;
            let ups = stack("up_proj", inner, h)?;
            let downs = stack("down_proj", h, inner)?;
            gates.into_iter().zip(ups).zip(downs).map(|((g, u), d)| Mlp::swiglu(g, u, d)).collect::<Result<Vec<_>>>()?
        } else if w.contains(&stacked) {
            let gate_up = w.tensor(&stacked, &[e, 2 * inner, h], dtype)?;
            let down = w.tensor(&format!("{prefix}.experts.down_proj"), &[e, h, inner], dtype)?;
            let dense = |t: Tensor| Linear::dense_with_precision(t.contiguous()?, None, w.precision());
            (0..e)
                .map(|i| {
                    let gu = gate_up.get(i)?;
                    Mlp::swiglu(
                        dense(gu.narrow(0, 0, inner)?)?,
                        dense(gu.narrow(0, inner, inner)?)?,
                        dense(down.get(i)?)?,
                    )
                })
                .collect::<Result<Vec<_>>>()?
        } else {
            (0..e)
                .map(|i| Mlp::load_with_width(w, &format!("{prefix}.experts.{i}"), cfg, inner, dtype))
                .collect::<Result<Vec<_>>>()?
        };
        let shared = match moe.shared_expert_intermediate_size {
            Some(width) => Some(SharedExpert {
                mlp: Mlp::load_with_width(w, &format!("{prefix}.shared_expert"), cfg, width, dtype)?,
                gate: w.linear(&format!("{prefix}.shared_expert_gate"), 1, h, false, dtype)?,
            }),
            None => None,
        };
        Ok(Self { router, experts, top_k: moe.num_experts_per_tok, norm_topk_prob: moe.norm_topk_prob, shared })
    }

    /// `[.., hidden] -> [.., hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let Some(&hidden) = dims.last() else {
            return Err(Error::Compute("MoE input has no feature axis".into()));
        };
        let xs = x.reshape(((), hidden))?;
        let logits = self.router.forward(&xs)?.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?;
        let routes = route_tokens(&logits.to_vec1::<f32>()?, self.experts.len(), self.top_k, self.norm_topk_prob);
        // Every expert's weighted rows one after the other (expert order), then one scatter-add.
        let mut outputs = Vec::new();
        let mut targets: Vec<u32> = Vec::new();
        for (expert, route) in self.experts.iter().zip(&routes) {
            if route.rows.is_empty() {
                continue;
            }
            let n = route.rows.len();
            let index = Tensor::from_vec(route.rows.clone(), n, x.device())?;
            let weights = Tensor::from_vec(route.weights.clone(), (n, 1), x.device())?.to_dtype(x.dtype())?;
            outputs.push(expert.forward(&xs.index_select(&index, 0)?)?.broadcast_mul(&weights)?);
            targets.extend_from_slice(&route.rows);
        }
        let mut out = xs.zeros_like()?;
        if !outputs.is_empty() {
            let n = targets.len();
            let index = Tensor::from_vec(targets, n, x.device())?;
            out = out.index_add(&index, &Tensor::cat(&outputs, 0)?, 0)?;
        }
        if let Some(shared) = &self.shared {
            let gate = candle_nn::ops::sigmoid(&shared.gate.forward(&xs)?)?;
            out = (out + shared.mlp.forward(&xs)?.broadcast_mul(&gate)?)?;
        }
        Ok(out.reshape(dims)?)
    }

    /// Every weight under its name relative to the layer's `mlp.` (HF per-expert layout), dense
    /// f32, with biases (for export).
    pub fn named_weights(&self) -> Result<Vec<(String, Tensor, Option<Tensor>)>> {
        let mut out = vec![("gate".to_string(), self.router.dense_weight()?, None)];
        for (i, expert) in self.experts.iter().enumerate() {
            for (n, w, b) in expert.projection_weights()? {
                out.push((format!("experts.{i}.{n}"), w, b));
            }
        }
        if let Some(shared) = &self.shared {
            for (n, w, b) in shared.mlp.projection_weights()? {
                out.push((format!("shared_expert.{n}"), w, b));
            }
            out.push(("shared_expert_gate".to_string(), shared.gate.dense_weight()?, None));
        }
        Ok(out)
    }
}

/// A block's feed-forward half: the dense MLP, or a sparse mixture of experts.
#[derive(Debug, Clone)]
pub enum FeedForward {
    /// One gated MLP for every token.
    Dense(Mlp),
    /// Routed experts (Qwen2-MoE, Qwen3-MoE sparse layers).
    Sparse(SparseMoe),
}

impl FeedForward {
    /// Loads block `layer`'s `{prefix}`: sparse when the config's MoE options mark the layer sparse.
    pub fn load(w: &dyn WeightSource, prefix: &str, layer: usize, cfg: &DecoderConfig, dtype: DType) -> Result<Self> {
        match &cfg.moe {
            Some(moe) if moe.sparse_layers.get(layer).copied().unwrap_or(false) => {
                Ok(Self::Sparse(SparseMoe::load(w, prefix, cfg, moe, dtype)?))
            }
            _ => Ok(Self::Dense(Mlp::load(w, prefix, cfg, dtype)?)),
        }
    }

    /// `[.., hidden] -> [.., hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(mlp) => mlp.forward(x),
            Self::Sparse(moe) => moe.forward(x),
        }
    }

    /// Every weight under its name relative to the layer's `mlp.`, dense f32, with biases (for export).
    pub fn named_weights(&self) -> Result<Vec<(String, Tensor, Option<Tensor>)>> {
        match self {
            Self::Dense(mlp) => {
                Ok(mlp.projection_weights()?.into_iter().map(|(n, w, b)| (n.to_string(), w, b)).collect())
            }
            Self::Sparse(moe) => moe.named_weights(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn softmax(x: &[f32]) -> Vec<f32> {
        let e: Vec<f64> = x.iter().map(|&v| (v as f64).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|v| (v / s) as f32).collect()
    }

    #[test]
    fn route_token_picks_the_largest_probabilities() {
        let logits = [0.1f32, 2.0, -1.0, 1.5];
        let p = softmax(&logits);
        let picked = route_token(&logits, 2, false);
        assert_eq!(picked.iter().map(|(e, _)| *e).collect::<Vec<_>>(), vec![1, 3]);
        assert!((picked[0].1 - p[1]).abs() < 1e-6 && (picked[1].1 - p[3]).abs() < 1e-6);
        let normed = route_token(&logits, 2, true);
        let want = [p[1] / (p[1] + p[3]), p[3] / (p[1] + p[3])];
        assert!((normed[0].1 - want[0]).abs() < 1e-6 && (normed[1].1 - want[1]).abs() < 1e-6);
        // Top-1 renormalised is weight 1; all experts renormalised is the softmax itself.
        assert_eq!(route_token(&logits, 1, true), vec![(1, 1.0)]);
        let all = route_token(&logits, 4, true);
        assert!(all.iter().all(|&(e, w)| (w - p[e]).abs() < 1e-6));
    }

    #[test]
    fn route_token_breaks_ties_by_lower_index() {
        assert_eq!(route_token(&[1.0, 3.0, 3.0, 0.0], 1, false)[0].0, 1);
    }

    #[test]
    fn route_tokens_groups_rows_by_expert() {
        // Three tokens, three experts, top-2.
        let logits = [5.0f32, 4.0, 0.0, 0.0, 4.0, 5.0, 5.0, 0.0, 4.0];
        let routes = route_tokens(&logits, 3, 2, true);
        assert_eq!(routes[0].rows, vec![0, 2]);
        assert_eq!(routes[1].rows, vec![0, 1]);
        assert_eq!(routes[2].rows, vec![1, 2]);
        let w = 1.0 / (1.0 + (-1.0f32).exp());
        assert!((routes[0].weights[0] - w).abs() < 1e-6 && (routes[1].weights[0] - (1.0 - w)).abs() < 1e-6);
    }

    #[test]
    fn sparse_layer_pattern_follows_step_and_dense_list() {
        let p = MoeOptions::sparse_layer_pattern(4, 8, 1, &[2]).unwrap();
        assert_eq!(p, vec![true, true, false, true]);
        let p = MoeOptions::sparse_layer_pattern(4, 8, 2, &[]).unwrap();
        assert_eq!(p, vec![false, true, false, true]);
        assert_eq!(MoeOptions::sparse_layer_pattern(2, 0, 1, &[]).unwrap(), vec![false, false]);
        assert!(MoeOptions::sparse_layer_pattern(2, 8, 0, &[]).is_err());
        assert!(MoeOptions::sparse_layer_pattern(2, 8, 1, &[5]).is_err());
    }
}
