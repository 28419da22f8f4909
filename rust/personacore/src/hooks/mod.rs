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

    /// The deepest capture row this hook needs (rows as [`HookPoint::row`]), when nothing past
    /// it matters to it; `None` (the default) when it needs the whole forward pass. A forward
    /// that returns no logits and fills no cache stops once every hook's row is reached.
    fn last_row(&self) -> Option<usize> {
        None
    }

    /// Whether this hook reads or changes the activation at `point`. A forward that needs the
    /// logits of the last position only runs the last layer for that position alone when no
    /// hook reads the last rows; `true` (the default) keeps every position.
    fn reads(&self, _point: HookPoint) -> bool {
        true
    }
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

    fn last_row(&self) -> Option<usize> {
        self.0.iter().map(|h| h.last_row()).try_fold(0, |deepest, row| Some(deepest.max(row?)))
    }

    fn reads(&self, point: HookPoint) -> bool {
        self.0.iter().any(|h| h.reads(point))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    struct Needs(Option<usize>);
    impl Hooks for Needs {
        fn at(&mut self, _: HookPoint, _: &Tensor) -> Result<Option<Tensor>> {
            Ok(None)
        }
        fn last_row(&self) -> Option<usize> {
            self.0
        }
    }

    /// A chain may stop only where all its hooks may, after the deepest row any of them needs.
    #[test]
    fn a_chain_needs_the_deepest_row_of_its_hooks() {
        let (mut a, mut b, mut all) = (Needs(Some(3)), Needs(Some(7)), Needs(None));
        assert_eq!(HookChain(vec![&mut a, &mut b]).last_row(), Some(7));
        assert_eq!(HookChain(vec![&mut a, &mut all, &mut b]).last_row(), None);
        let w = Tensor::zeros((1, 1, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert_eq!(PooledMeans::rows(30, w.clone(), vec![20, 3]).last_row(), Some(20));
        assert_eq!(PooledMeans::new(30, w).last_row(), Some(30));
    }
}
