//! The gate and up projections of a SwiGLU MLP, with the activation applied by the matmul
//! kernel as it stores each tile when both weights are packed the same way.
//!
//! Unfused, a 1024-token prompt through a 576 → 2 × 1536 MLP writes a 12 MiB gate/up product
//! only to read it back for `silu(gate) · up`; here the weights' panels alternate gate, up
//! ([`PackedMatrix::interleave`], [`AmxMatrix::interleave`]) and the kernel writes the activation
//! directly.

use std::sync::Arc;

use candle_core::{Device, Tensor};

use personacore_kernels::amx::AmxMatrix;
use personacore_kernels::packed_matmul::PackedMatrix;

use super::linear::{with_f32_rows, Linear, LinearGroup, LinearWeight};
use crate::error::Result;

/// `gate_proj` and `up_proj` of a SwiGLU MLP.
#[derive(Debug, Clone)]
pub struct GatedLinear {
    kind: GatedKind,
}

#[derive(Debug, Clone)]
enum GatedKind {
    /// f32, panels interleaved: SwiGLU in the packed matmul's epilogue.
    Packed(Arc<PackedMatrix>),
    /// bf16x3 on AMX, panels interleaved: SwiGLU as the tiles are stored.
    Amx(Arc<AmxMatrix>),
    /// Anything else (quantized, dense, biased, odd widths): the two projections as a group.
    Group(LinearGroup<2>),
}

/// What [`GatedLinear::forward`] produced.
pub enum GatedOutput {
    /// `silu(gate) · up`, `[.., inter]`.
    Activated(Tensor),
    /// Gate and up side by side, `[.., 2 · inter]` (the activation is still to apply).
    Fused(Tensor),
    /// Gate and up, `[.., inter]` each (the activation is still to apply).
    Parts(Tensor, Tensor),
}

impl GatedLinear {
    /// Interleaves `gate` and `up` when both are packed f32 (or both AMX) without bias and of a
    /// width the kernel's panels divide; groups them otherwise.
    pub fn new(gate: Linear, up: Linear) -> Result<Self> {
        if gate.bias.is_none() && up.bias.is_none() {
            let kind = match (&gate.weight, &up.weight) {
                (LinearWeight::Packed(g), LinearWeight::Packed(u)) => {
                    PackedMatrix::interleave(g, u).map(|w| GatedKind::Packed(Arc::new(w)))
                }
                (LinearWeight::Amx(g), LinearWeight::Amx(u)) => {
                    AmxMatrix::interleave(g, u).map(|w| GatedKind::Amx(Arc::new(w)))
                }
                _ => None,
            };
            if let Some(kind) = kind {
                return Ok(Self { kind });
            }
        }
        Ok(Self { kind: GatedKind::Group(LinearGroup::new([gate, up])?) })
    }

    /// Both projections applied to `x` `[.., in]`, activated when the kernels do it.
    pub fn forward(&self, x: &Tensor) -> Result<GatedOutput> {
        let group = match &self.kind {
            GatedKind::Group(group) => group,
            GatedKind::Packed(p) => return activated(x, p.rows() / 2, |xs, m| p.matmul_swiglu_to_vec(xs, m)),
            GatedKind::Amx(a) => return activated(x, a.rows() / 2, |xs, m| a.matmul_swiglu_to_vec(xs, m)),
        };
        if let Some(fused) = group.forward_fused(x) {
            return Ok(GatedOutput::Fused(fused?));
        }
        let [gate, up] = group.forward(x)?;
        Ok(GatedOutput::Parts(gate, up))
    }

    /// The gate's and the up projection's dense f32 weights `[inter, in]` and biases (for export).
    pub fn weights(&self) -> Result<Vec<(Tensor, Option<Tensor>)>> {
        let (gate, up, cols) = match &self.kind {
            GatedKind::Group(group) => return group.weights(),
            GatedKind::Packed(p) => {
                let (g, u) = p.unpack_interleaved();
                (g, u, p.cols())
            }
            GatedKind::Amx(a) => {
                let (g, u) = a.unpack_interleaved();
                (g, u, a.cols())
            }
        };
        let inter = gate.len() / cols.max(1);
        let dense = |w: Vec<f32>| Tensor::from_vec(w, (inter, cols), &Device::Cpu);
        Ok(vec![(dense(gate)?, None), (dense(up)?, None)])
    }
}

/// `x` `[.., in]` through an interleaved kernel into `[.., inter]`.
fn activated(x: &Tensor, inter: usize, kernel: impl FnOnce(&[f32], usize) -> Vec<f32>) -> Result<GatedOutput> {
    let dims = x.dims();
    let Some((&inp, lead)) = dims.split_last() else {
        return Err(crate::Error::Compute("MLP input has no feature axis".into()));
    };
    let rows: usize = lead.iter().product();
    let y = with_f32_rows(&x.reshape((rows, inp))?, |xs| kernel(xs, rows))?;
    let shape: Vec<usize> = lead.iter().copied().chain([inter]).collect();
    Ok(GatedOutput::Activated(Tensor::from_vec(y, shape, x.device())?.to_dtype(x.dtype())?))
}
