//! Captures: every layer's full hidden states, or pooled means computed inside the forward pass.

use candle_core::{DType, Tensor};

use super::{HookPoint, Hooks};
use crate::error::Result;

/// Records the residual stream at every capture row (see docs/conventions.md, Layers):
/// `num_layers + 1` tensors of shape `[batch, seq, hidden]`.
pub struct HiddenStates {
    num_layers: usize,
    rows: Vec<Option<Tensor>>,
}

impl HiddenStates {
    /// An empty capture for a model with `num_layers` blocks.
    pub fn new(num_layers: usize) -> Self {
        Self { num_layers, rows: vec![None; num_layers + 1] }
    }

    /// `[num_layers + 1, batch, seq, hidden]` in f32.
    pub fn stacked(self) -> Result<Tensor> {
        stack_rows(self.rows, 0)
    }
}

impl Hooks for HiddenStates {
    fn at(&mut self, point: HookPoint, x: &Tensor) -> Result<Option<Tensor>> {
        if let Some(row) = point.row(self.num_layers) {
            self.rows[row] = Some(x.clone());
        }
        Ok(None)
    }
}

/// Weighted sums over positions at capture rows, computed as one small batched matmul per
/// row: `weights [batch, k, seq] @ x [batch, seq, hidden] -> [batch, k, hidden]`. With weights
/// `1/count` over a set of positions this is the mean over those positions (the poolings).
/// Never holds more than `[batch, k, hidden]` per row. With a selection of rows, only those are
/// computed and the forward pass may stop after the deepest one.
pub struct PooledMeans {
    num_layers: usize,
    weights: Tensor,
    /// The rows returned, in order (every row when built with [`PooledMeans::new`]).
    selected: Vec<usize>,
    rows: Vec<Option<Tensor>>,
}

impl PooledMeans {
    /// Every row; `weights`: `[batch, k, seq]`, in the model's compute dtype.
    pub fn new(num_layers: usize, weights: Tensor) -> Self {
        Self::rows(num_layers, weights, (0..=num_layers).collect())
    }

    /// Only the capture rows `selected` (each in `0..=num_layers`; returned in this order).
    pub fn rows(num_layers: usize, weights: Tensor, selected: Vec<usize>) -> Self {
        Self { num_layers, weights, selected, rows: vec![None; num_layers + 1] }
    }

    /// `[batch, k, rows selected, hidden]` in f32 (`num_layers + 1` rows unless selected).
    pub fn stacked(self) -> Result<Tensor> {
        let rows = self.selected.iter().map(|&r| self.rows.get(r).cloned().flatten()).collect();
        stack_rows(rows, 2)
    }
}

impl Hooks for PooledMeans {
    fn at(&mut self, point: HookPoint, x: &Tensor) -> Result<Option<Tensor>> {
        if let Some(row) = point.row(self.num_layers).filter(|r| self.selected.contains(r)) {
            let x32 = x.to_dtype(DType::F32)?;
            self.rows[row] = Some(self.weights.matmul(&x32)?);
        }
        Ok(None)
    }

    fn last_row(&self) -> Option<usize> {
        self.selected.iter().copied().max()
    }
}

/// Stacks every capture row along `dim` as f32; a row the forward pass never reached is an error.
fn stack_rows(rows: Vec<Option<Tensor>>, dim: usize) -> Result<Tensor> {
    let rows: Vec<Tensor> = rows
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.ok_or_else(|| crate::Error::Compute(format!("capture row {i} was never filled"))))
        .collect::<Result<_>>()?;
    Ok(Tensor::stack(&rows, dim)?.to_dtype(DType::F32)?)
}
