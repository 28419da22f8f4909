//! The gated MLP: SwiGLU (Llama, Qwen) or GeLU-tanh (Gemma).

use candle_core::{DType, Tensor};

use super::gated::{GatedLinear, GatedOutput};
use super::linear::Linear;
use super::tensor_kernels::{swiglu, swiglu_fused};
use crate::config::DecoderConfig;
use crate::error::Result;
use crate::weights::WeightSource;

/// The gate and up projections with their activation.
#[derive(Debug, Clone)]
enum GateUp {
    /// gate_proj, up_proj for `silu(gate) * up` (the activation applied by the matmul when both
    /// are packed).
    Silu(GatedLinear),
    /// gate_proj, up_proj for `gelu_tanh(gate) * up`.
    GeluTanh(Linear, Linear),
}

/// Gated MLP: `down(act(gate(x)) * up(x))`, `act` SiLU or GeLU (tanh approximation).
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_up: GateUp,
    down_proj: Linear,
}

impl Mlp {
    /// Loads `{prefix}.{gate,up,down}_proj` of inner width `intermediate_size`.
    pub fn load(w: &dyn WeightSource, prefix: &str, cfg: &DecoderConfig, dtype: DType) -> Result<Self> {
        Self::load_with_width(w, prefix, cfg, cfg.intermediate_size, dtype)
    }

    /// Loads `{prefix}.{gate,up,down}_proj` of inner width `inner` (a mixture-of-experts model's
    /// experts and shared expert have their own widths).
    pub fn load_with_width(
        w: &dyn WeightSource,
        prefix: &str,
        cfg: &DecoderConfig,
        inner: usize,
        dtype: DType,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let gate = w.linear(&format!("{prefix}.gate_proj"), inner, h, cfg.mlp_bias, dtype)?;
        let up = w.linear(&format!("{prefix}.up_proj"), inner, h, cfg.mlp_bias, dtype)?;
        let down = w.linear(&format!("{prefix}.down_proj"), h, inner, cfg.mlp_bias, dtype)?;
        if cfg.gemma.is_some() {
            return Ok(Self { gate_up: GateUp::GeluTanh(gate, up), down_proj: down });
        }
        Self::swiglu(gate, up, down)
    }

    /// A SwiGLU MLP `down(silu(gate(x)) * up(x))` from its three projections.
    pub fn swiglu(gate: Linear, up: Linear, down: Linear) -> Result<Self> {
        Ok(Self { gate_up: GateUp::Silu(GatedLinear::new(gate, up)?), down_proj: down })
    }

    /// `[.., hidden] -> [.., hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let activated = match &self.gate_up {
            GateUp::Silu(gate_up) => match gate_up.forward(x)? {
                GatedOutput::Activated(a) => a,
                GatedOutput::Fused(gate_up) => swiglu_fused(&gate_up)?,
                GatedOutput::Parts(gate, up) => swiglu(&gate, &up)?,
            },
            // candle's `gelu` is the tanh approximation (transformers' gelu_pytorch_tanh).
            GateUp::GeluTanh(gate, up) => (gate.forward(x)?.gelu()? * up.forward(x)?)?,
        };
        self.down_proj.forward(&activated)
    }

    /// The projections' dense f32 weights and biases under their HF names, in HF order (for export).
    pub fn projection_weights(&self) -> Result<Vec<(&'static str, Tensor, Option<Tensor>)>> {
        let gate_up = match &self.gate_up {
            GateUp::Silu(g) => g.weights()?,
            GateUp::GeluTanh(g, u) => {
                vec![(g.dense_weight()?, g.bias().cloned()), (u.dense_weight()?, u.bias().cloned())]
            }
        };
        let mut out: Vec<_> = ["gate_proj", "up_proj"].into_iter().zip(gate_up).map(|(n, (w, b))| (n, w, b)).collect();
        out.push(("down_proj", self.down_proj.dense_weight()?, self.down_proj.bias().cloned()));
        Ok(out)
    }
}
