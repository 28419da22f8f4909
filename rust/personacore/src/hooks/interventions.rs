//! Interventions on the residual stream: add a direction, ablate it, or cap the projection on it,
//! at chosen layers and positions, for chosen sequences of a batch.

use candle_core::{DType, Device, Tensor, D};

use crate::error::{Error, Result};

/// Which positions of a forward pass an intervention touches (see docs/conventions.md, Positions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Positions {
    /// Every position of every forward pass.
    All,
    /// Every position of the prefill pass only.
    Prompt,
    /// The last position of every forward pass.
    Response,
}

impl Positions {
    /// Parses `all`, `prompt`, `response`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "all" => Ok(Positions::All),
            "prompt" => Ok(Positions::Prompt),
            "response" => Ok(Positions::Response),
            _ => Err(Error::input(format!("unknown positions '{name}' (expected 'all', 'prompt' or 'response')"))),
        }
    }
}

/// What an intervention does to the residual stream `x` with direction `v`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InterventionKind {
    /// `x + coef · v` (v unnormalised, as persona_vectors).
    Add {
        /// Scale of the added vector.
        coef: f32,
    },
    /// `x − (x·v̂) v̂`: remove the component along v.
    Ablate,
    /// Clamp the scalar projection `x·v̂` into `[min, max]`.
    Cap {
        /// Lower bound, if any.
        min: Option<f32>,
        /// Upper bound, if any.
        max: Option<f32>,
    },
}

/// One intervention at one capture row (= layer, 1..num_layers-1).
#[derive(Debug, Clone)]
pub struct Intervention {
    /// Capture row / layer it acts on.
    pub layer: usize,
    /// The operation.
    pub kind: InterventionKind,
    /// The direction, `[hidden]`, in the model dtype (unit-normalised for ablate/cap).
    pub direction: Tensor,
    /// Positions it touches.
    pub positions: Positions,
}

impl Intervention {
    /// Builds an intervention from a raw f32 direction; rejects NaN/inf and zero vectors where a unit vector is needed.
    pub fn new(
        layer: usize,
        kind: InterventionKind,
        direction: &[f32],
        positions: Positions,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if direction.iter().any(|x| !x.is_finite()) {
            return Err(Error::input(format!("steering vector at layer {layer} contains NaN or inf")));
        }
        let coef_ok = match kind {
            InterventionKind::Add { coef } => coef.is_finite(),
            InterventionKind::Ablate => true,
            InterventionKind::Cap { min, max } => {
                (min.is_some() || max.is_some())
                    && min.is_none_or(f32::is_finite)
                    && max.is_none_or(f32::is_finite)
                    && !matches!((min, max), (Some(a), Some(b)) if a > b)
            }
        };
        if !coef_ok {
            return Err(Error::input(format!("intervention at layer {layer}: the coefficient must be finite; a cap needs min and/or max, finite, with min <= max")));
        }
        let mut d = direction.to_vec();
        if !matches!(kind, InterventionKind::Add { .. }) {
            let norm = d.iter().map(|x| x * x).sum::<f32>().sqrt();
            if norm == 0.0 {
                return Err(Error::input(format!("cannot ablate or cap along a zero vector (layer {layer})")));
            }
            d.iter_mut().for_each(|x| *x /= norm);
        }
        let n = d.len();
        Ok(Self { layer, kind, direction: Tensor::from_vec(d, n, device)?.to_dtype(dtype)?, positions })
    }

    /// Applies the intervention to `x` `[batch, seq, hidden]`. `seq_weights` `[batch, 1, 1]` selects the
    /// sequences it applies to (1 = on, 0 = off); `prefill` says whether this is a pass over the
    /// prompt, and `ends_prompt` whether that pass holds the prompt's last token (a prompt read in
    /// chunks ends in its last chunk only: `"response"` steering starts there).
    pub fn apply(
        &self,
        x: &Tensor,
        seq_weights: Option<&Tensor>,
        prefill: bool,
        ends_prompt: bool,
    ) -> Result<Option<Tensor>> {
        let (_, t, _) = x.dims3()?;
        let pos_mask = match (self.positions, prefill) {
            (Positions::Prompt, false) => return Ok(None),
            (Positions::Response, true) if !ends_prompt => return Ok(None),
            (Positions::Response, _) if t > 1 => {
                let mut m = vec![0f32; t];
                m[t - 1] = 1.0;
                Some(Tensor::from_vec(m, (1, t, 1), x.device())?.to_dtype(x.dtype())?)
            }
            _ => None,
        };
        let delta = match self.kind {
            InterventionKind::Add { coef } => (self.direction.clone() * coef as f64)?.reshape((1, 1, ()))?,
            InterventionKind::Ablate | InterventionKind::Cap { .. } => {
                let proj = x.broadcast_mul(&self.direction.reshape((1, 1, ()))?)?.sum_keepdim(D::Minus1)?; // [b, t, 1]
                let change = match self.kind {
                    InterventionKind::Cap { min, max } => {
                        let lo = min.map(|m| m as f64).unwrap_or(f64::NEG_INFINITY);
                        let hi = max.map(|m| m as f64).unwrap_or(f64::INFINITY);
                        (proj.clamp(lo, hi)? - &proj)?
                    }
                    _ => proj.neg()?,
                };
                change.broadcast_mul(&self.direction.reshape((1, 1, ()))?)?
            }
        };
        let delta = match pos_mask {
            Some(m) => delta.broadcast_mul(&m)?,
            None => delta,
        };
        let delta = match seq_weights {
            Some(w) => delta.broadcast_mul(w)?,
            None => delta,
        };
        Ok(Some(x.broadcast_add(&delta)?))
    }
}
