//! Live monitoring: the scalar projection `a·v/‖v‖` of the residual stream onto a bank of vectors,
//! one small matmul per monitored layer, computed inside the forward pass.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use personacore_kernels::projection::project_rows;

use crate::error::{Error, Result};

/// One column of the score table: a named vector at one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct MonitorColumn {
    /// Vector name.
    pub name: String,
    /// Capture row (0..=num_layers).
    pub layer: usize,
}

/// One monitored row's projections `[batch, seq, k]` and residual norms (repeated per column),
/// f32: on the host for a few CPU rows, as tensors otherwise (see [`MonitorBank::project`]).
#[derive(Debug, Clone)]
pub enum Projection {
    /// Row-major values and their dims `(batch, seq, k)`.
    Host { scores: Vec<f32>, norms: Vec<f32>, dims: (usize, usize, usize) },
    /// Scores and norms as `[batch, seq, k]` tensors.
    Tensors(Tensor, Tensor),
}

impl Projection {
    /// Scores and norms as `[batch, seq, k]` tensors on `device`.
    pub fn into_tensors(self, device: &Device) -> Result<(Tensor, Tensor)> {
        Ok(match self {
            Self::Host { scores, norms, dims } => {
                (Tensor::from_vec(scores, dims, device)?, Tensor::from_vec(norms, dims, device)?)
            }
            Self::Tensors(s, n) => (s, n),
        })
    }
}

/// Host projections of a few rows: scores and norms row by row (`rows` × `k` each), and the `k`
/// columns they fill.
pub type HostProjection = (Vec<f32>, Vec<f32>, Arc<[usize]>);

/// Inputs of at most this many rows are projected on the host (see [`MonitorBank::project`]).
const HOST_ROWS: usize = 64;

/// The unit vectors monitored at one capture row.
#[derive(Debug, Clone)]
struct RowVectors {
    /// `[hidden, k]`, the model's dtype and device.
    matrix: Tensor,
    /// `[k, hidden]` f32, row-major.
    host: Vec<f32>,
    /// Output column of each of the k (shared, so a decode step can hold them while it writes
    /// into the plans that own this bank).
    cols: Arc<[usize]>,
}

impl RowVectors {
    /// Per row of `x` (whole rows of `hidden` f32 values): its `k` scores, and its norm repeated
    /// `k` times, row by row ([`project_rows`]).
    fn project_host(&self, x: &[f32], hidden: usize) -> (Vec<f32>, Vec<f32>) {
        let (mut scores, mut norms) = (Vec::new(), Vec::new());
        project_rows(x, hidden, &self.host, &mut scores, &mut norms);
        (scores, norms)
    }
}

/// The vectors to project on, grouped by layer.
#[derive(Debug, Clone)]
pub struct MonitorBank {
    /// Columns in output order.
    pub columns: Vec<MonitorColumn>,
    /// Per capture row: the unit vectors `[hidden, k]` for candle, the same `[k, hidden]` on the
    /// host for [`project_rows`], and the column index of each of the k; shared with the banks
    /// of other requests that monitor the same vectors there (see [`Self::share_vectors`]).
    by_row: Vec<Option<Arc<RowVectors>>>,
    /// Whether attention-sink positions count for alerts and conditions (see [`SinkDetector`]).
    pub include_sinks: bool,
}

impl MonitorBank {
    /// `entries`: (name, layer, direction `[hidden]`). Directions are normalised here.
    pub fn new(
        entries: Vec<(String, usize, Vec<f32>)>,
        num_layers: usize,
        hidden: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let mut grouped: Vec<Vec<(usize, Vec<f32>)>> = vec![Vec::new(); num_layers + 1];
        let mut columns = Vec::new();
        for (name, layer, mut v) in entries {
            if layer > num_layers {
                return Err(Error::input(format!("monitor '{name}': layer {layer} is outside 0..={num_layers}")));
            }
            if v.len() != hidden {
                return Err(Error::input(format!("monitor '{name}': vector has width {}, expected {hidden}", v.len())));
            }
            if v.iter().any(|x| !x.is_finite()) {
                return Err(Error::input(format!("monitor '{name}': vector at layer {layer} contains NaN or inf")));
            }
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            if norm == 0.0 {
                return Err(Error::input(format!("monitor '{name}': vector at layer {layer} is zero")));
            }
            v.iter_mut().for_each(|x| *x /= norm);
            grouped[layer].push((columns.len(), v));
            columns.push(MonitorColumn { name, layer });
        }
        let by_row = grouped
            .into_iter()
            .map(|g| {
                if g.is_empty() {
                    return Ok(None);
                }
                let k = g.len();
                let cols: Arc<[usize]> = g.iter().map(|(c, _)| *c).collect();
                let flat: Vec<f32> = g.into_iter().flat_map(|(_, v)| v).collect();
                let m = Tensor::from_vec(flat.clone(), (k, hidden), device)?.t()?.contiguous()?.to_dtype(dtype)?;
                Ok(Some(Arc::new(RowVectors { matrix: m, host: flat, cols })))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { columns, by_row, include_sinks: false })
    }

    /// Whether nothing is monitored.
    pub fn is_empty(&self) -> bool {
        self.columns.is_empty()
    }

    /// Whether some vector is monitored at capture row `row`.
    pub fn monitors(&self, row: usize) -> bool {
        matches!(self.by_row.get(row), Some(Some(_)))
    }

    /// Takes over `other`'s vectors at every capture row where both banks monitor the same
    /// vectors into the same columns (equal values), so that requests monitoring the same vectors
    /// hold one copy and a decode step projects their rows together
    /// ([`Self::shares_row`], [`Self::project_host`]). Both banks must belong to one model.
    pub fn share_vectors(&mut self, other: &MonitorBank) {
        for (mine, theirs) in self.by_row.iter_mut().zip(&other.by_row) {
            if let (Some(a), Some(b)) = (mine.as_mut(), theirs) {
                if !Arc::ptr_eq(a, b) && a.cols == b.cols && a.host == b.host {
                    *a = Arc::clone(b);
                }
            }
        }
    }

    /// Whether this bank and `other` hold the same vectors (one shared copy) at capture row `row`.
    pub fn shares_row(&self, other: &MonitorBank, row: usize) -> bool {
        match (self.by_row.get(row), other.by_row.get(row)) {
            (Some(Some(a)), Some(Some(b))) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// Host projections at capture row `row` of `x`, whole rows of `hidden` f32 values: per row,
    /// its `k` scores and its norm repeated `k` times (row by row), and the `k` columns; `None`
    /// when nothing is monitored there. A row's values do not depend on the other rows.
    pub fn project_host(&self, row: usize, x: &[f32], hidden: usize) -> Option<HostProjection> {
        let Some(Some(rv)) = self.by_row.get(row) else { return None };
        let (scores, norms) = rv.project_host(x, hidden);
        Some((scores, norms, Arc::clone(&rv.cols)))
    }

    /// Projections at capture row `row` of `x` `[batch, seq, hidden]`: `[batch, seq, k]` (f32), the
    /// residual norms `‖x‖` repeated per column `[batch, seq, k]` (f32, for [`SinkDetector`]) and the
    /// columns they fill, or `None` when nothing is monitored there.
    ///
    /// A few f32 rows on the CPU (a decode step's, one request's at a time under continuous
    /// batching) are projected in plain loops ([`project_rows`]); larger inputs (a prompt) through
    /// candle's matmul.
    pub fn project(&self, row: usize, x: &Tensor) -> Result<Option<(Projection, &[usize])>> {
        let Some(Some(rv)) = self.by_row.get(row) else { return Ok(None) };
        let (b, t, h) = x.dims3()?;
        let k = rv.cols.len();
        if x.device().is_cpu() && x.dtype() == DType::F32 && b * t <= HOST_ROWS {
            let data = x.flatten_all()?.to_vec1::<f32>()?;
            let (scores, norms) = rv.project_host(&data, h);
            return Ok(Some((Projection::Host { scores, norms, dims: (b, t, k) }, &rv.cols[..])));
        }
        let s = x.reshape((b * t, h))?.matmul(&rv.matrix)?.reshape((b, t, k))?.to_dtype(DType::F32)?;
        let norms = x.to_dtype(DType::F32)?.sqr()?.sum_keepdim(2)?.sqrt()?.broadcast_as((b, t, k))?;
        Ok(Some((Projection::Tensors(s, norms.contiguous()?), &rv.cols[..])))
    }
}

/// How far above the median a residual norm must be for its position to count as an attention
/// sink: measured on the default model (SmolLM2-135M-Instruct), position 0 has 15–175× the median
/// norm at layers 12–29 (25,102 vs 143 at layer 12) and a second "massive activation" token of the
/// system prompt 6.8–8.2× at layers 3–6, while no other position of the impolite trait's evaluation
/// rollouts exceeds 1.37× at layers 12–30. 5 separates the two groups with room on both sides.
pub const SINK_NORM_RATIO: f32 = 5.0;

/// Marks attention-sink positions of one sequence, one position at a time, in order.
///
/// The rule: position 0 is always a sink; position `p ≥ 1` is a sink when, at any monitored
/// column, its residual norm is above [`SINK_NORM_RATIO`] × the median norm of positions `1..=p`
/// at that column's layer. It reads only positions up to `p`, so a prompt pass, a stream and a
/// batch mark the same positions. Sinks carry no information about a trait (their projection is a
/// large multiple of any trait score, from their norm alone), so alerts, conditions and summaries
/// skip them unless the monitor keeps them (`include_sinks`).
#[derive(Debug, Clone, Default)]
pub struct SinkDetector {
    /// Per monitored layer (columns at one layer share the residual norm): the first column
    /// there and the running median of the norms of positions `1..` so far.
    layers: Vec<(usize, RunningMedian)>,
    next: usize,
}

impl SinkDetector {
    /// A detector for a sequence whose first position is yet to come, over monitor `columns`.
    pub fn new(columns: &[MonitorColumn]) -> Self {
        let mut layers: Vec<(usize, usize)> = Vec::new(); // (layer, first column)
        for (c, col) in columns.iter().enumerate() {
            if !layers.iter().any(|(l, _)| *l == col.layer) {
                layers.push((col.layer, c));
            }
        }
        Self { layers: layers.into_iter().map(|(_, c)| (c, RunningMedian::default())).collect(), next: 0 }
    }

    /// Takes the next position's norms (one per column) and says whether it is a sink. Costs
    /// O(log p) per monitored layer at position `p`.
    pub fn push(&mut self, norms: &[f32]) -> bool {
        let position = self.next;
        self.next += 1;
        if position == 0 {
            return true;
        }
        let mut sink = false;
        for (col, median) in self.layers.iter_mut() {
            let n = norms[*col];
            median.push(n);
            sink |= n > SINK_NORM_RATIO * median.median();
        }
        sink
    }
}

/// The median of a growing set of values, kept in two heaps (the lower half as a max-heap, the
/// upper half as a min-heap): O(log n) per value instead of a sorted list's O(n).
#[derive(Debug, Clone, Default)]
struct RunningMedian {
    low: BinaryHeap<TotalF32>,
    high: BinaryHeap<Reverse<TotalF32>>,
}

impl RunningMedian {
    fn push(&mut self, x: f32) {
        match self.low.peek() {
            Some(top) if TotalF32(x) > *top => self.high.push(Reverse(TotalF32(x))),
            _ => self.low.push(TotalF32(x)),
        }
        // keep |low| == |high| or |low| == |high| + 1
        if self.low.len() > self.high.len() + 1 {
            if let Some(v) = self.low.pop() {
                self.high.push(Reverse(v));
            }
        } else if self.high.len() > self.low.len() {
            if let Some(Reverse(v)) = self.high.pop() {
                self.low.push(v);
            }
        }
    }

    /// The median of the values so far (the mean of the two middle ones for an even count);
    /// NaN before the first value.
    fn median(&self) -> f32 {
        match (self.low.peek(), self.high.peek()) {
            (Some(l), Some(Reverse(h))) if self.low.len() == self.high.len() => 0.5 * (l.0 + h.0),
            (Some(l), _) => l.0,
            _ => f32::NAN,
        }
    }
}

/// An `f32` ordered by [`f32::total_cmp`] (so NaN norms have a place in the heaps).
#[derive(Debug, Clone, Copy)]
struct TotalF32(f32);

impl PartialEq for TotalF32 {
    fn eq(&self, other: &Self) -> bool {
        self.0.total_cmp(&other.0).is_eq()
    }
}
impl Eq for TotalF32 {}
impl PartialOrd for TotalF32 {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for TotalF32 {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn columns(layers: &[usize]) -> Vec<MonitorColumn> {
        layers.iter().enumerate().map(|(i, &layer)| MonitorColumn { name: format!("v{i}"), layer }).collect()
    }

    #[test]
    fn sinks_are_position_zero_and_norm_outliers() {
        // two columns at different layers, a third at the first one's layer (same norms)
        let mut d = SinkDetector::new(&columns(&[3, 12]));
        let norms = [[25_000.0, 800.0], [143.0, 80.0], [150.0, 90.0], [140.0, 650.0], [160.0, 85.0], [900.0, 85.0]];
        let marks: Vec<bool> = norms.iter().map(|n| d.push(n)).collect();
        assert_eq!(marks, [true, false, false, true, false, true]);
        let mut shared = SinkDetector::new(&columns(&[3, 12, 3]));
        let marks: Vec<bool> = norms.iter().map(|n| shared.push(&[n[0], n[1], n[0]])).collect();
        assert_eq!(marks, [true, false, false, true, false, true]);
    }

    /// Banks of equal vectors share them row by row after `share_vectors`, banks of other values
    /// do not; a multi-row host projection gives each row the values of projecting it alone,
    /// checked against f64 dot products.
    #[test]
    fn equal_banks_share_and_project_rows_independently() -> Result<()> {
        let (hidden, layers) = (20, 4);
        let dir = |seed: usize| -> Vec<f32> { (0..hidden).map(|i| ((i * 7 + seed * 13) % 11) as f32 - 5.0).collect() };
        let entries = |s: usize| {
            vec![("a".to_string(), 1, dir(s)), ("b".to_string(), 1, dir(s + 1)), ("a".to_string(), 3, dir(s))]
        };
        let bank = |s: usize| MonitorBank::new(entries(s), layers, hidden, DType::F32, &Device::Cpu);
        let (first, mut same, mut other) = (bank(0)?, bank(0)?, bank(5)?);
        assert!(!same.shares_row(&first, 1));
        same.share_vectors(&first);
        other.share_vectors(&first);
        assert!(same.shares_row(&first, 1) && same.shares_row(&first, 3));
        assert!(!same.shares_row(&first, 2), "nothing is monitored at row 2");
        assert!(!other.shares_row(&first, 1) && !other.shares_row(&first, 3));
        let x: Vec<f32> = (0..3 * hidden).map(|i| (i as f32 * 0.37).sin()).collect();
        let (scores, norms, cols) = first.project_host(1, &x, hidden).expect("row 1 is monitored");
        assert_eq!(&cols[..], &[0, 1]);
        for r in 0..3 {
            let row = &x[r * hidden..][..hidden];
            let (alone, alone_norms, _) = first.project_host(1, row, hidden).expect("row 1 is monitored");
            assert_eq!((&scores[2 * r..][..2], &norms[2 * r..][..2]), (&alone[..], &alone_norms[..]));
            let norm = row.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt();
            for (j, seed) in [0, 1].into_iter().enumerate() {
                let d = dir(seed);
                let len = d.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt();
                let want = row.iter().zip(&d).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum::<f64>() / len;
                assert!((f64::from(alone[j]) - want).abs() < 1e-5, "row {r} column {j}: {} vs {want}", alone[j]);
                assert!((f64::from(alone_norms[j]) - norm).abs() < 1e-5);
            }
        }
        assert!(first.project_host(2, &x, hidden).is_none());
        Ok(())
    }

    /// The running median equals the median of the sorted values after every push.
    #[test]
    fn running_median_matches_sorting() {
        let mut m = RunningMedian::default();
        let mut seen: Vec<f32> = Vec::new();
        let mut x = 12345u64;
        for i in 0..500 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let v = if i % 50 == 7 { 3.0 } else { ((x >> 40) % 1000) as f32 / 7.0 };
            m.push(v);
            seen.push(v);
            seen.sort_by(f32::total_cmp);
            let k = seen.len();
            let want = if k % 2 == 1 { seen[k / 2] } else { 0.5 * (seen[k / 2 - 1] + seen[k / 2]) };
            assert_eq!(m.median(), want, "after {k} values");
        }
    }
}
