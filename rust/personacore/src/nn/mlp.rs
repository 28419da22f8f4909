//! The SwiGLU MLP.

use candle_core::{DType, Tensor};

use super::gated::{GatedLinear, GatedOutput};
use super::linear::Linear;
use super::tensor_kernels::{swiglu, swiglu_fused};
use crate::config::DecoderConfig;
use crate::error::Result;
use crate::weights::WeightSource;

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
