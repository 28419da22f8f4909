//! What the layer loop calls after each step: captures (full tensors, pooled means),
//! interventions (add, ablate, cap) and monitor projections. Blocks know nothing of hooks;
//! `Transformer::forward` calls them.

pub mod capture;
pub mod interventions;
pub mod monitor;
pub mod plan;
pub mod points;
pub mod spec;

use candle_core::Tensor;

pub use capture::{HiddenStates, PooledMeans};
pub use interventions::{Intervention, InterventionKind, Positions};
pub use monitor::{MonitorBank, MonitorColumn, SinkDetector, SINK_NORM_RATIO};
pub use plan::{Condition, HookPlan, LoopMode, LoopState, Steering};
pub use points::HookPoint;

use crate::error::Result;

/// Something the layer loop calls at every hook point.
pub trait Hooks {
    /// Sees the activation at `point` (`[batch, seq, hidden]`); returns a replacement to change
    /// the residual stream, or `None` to leave it as it is.
    fn at(&mut self, point: HookPoint, x: &Tensor) -> Result<Option<Tensor>>;
}

/// Runs several hooks in order; each sees what the previous one left.
pub struct HookChain<'a>(pub Vec<&'a mut dyn Hooks>);

impl Hooks for HookChain<'_> {
    fn at(&mut self, point: HookPoint, x: &Tensor) -> Result<Option<Tensor>> {
        let mut cur: Option<Tensor> = None;
        for h in self.0.iter_mut() {
            if let Some(y) = h.at(point, cur.as_ref().unwrap_or(x))? {
                cur = Some(y);
            }
        }
        Ok(cur)
    }
}
