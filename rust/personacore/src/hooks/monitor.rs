//! Live monitoring: the scalar projection `a·v/‖v‖` of the residual stream onto a bank of vectors,
//! one small matmul per monitored layer, computed inside the forward pass.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// One column of the score table: a named vector at one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct MonitorColumn {
    /// Vector name.
    pub name: String,
    /// Capture row (0..=num_layers).
    pub layer: usize,
}

/// The vectors to project on, grouped by layer.
#[derive(Debug, Clone)]
pub struct MonitorBank {
    /// Columns in output order.
    pub columns: Vec<MonitorColumn>,
    /// Per capture row: `(unit vectors [hidden, k], column index of each of the k)`.
    by_row: Vec<Option<(Tensor, Vec<usize>)>>,
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
                let cols: Vec<usize> = g.iter().map(|(c, _)| *c).collect();
                let flat: Vec<f32> = g.into_iter().flat_map(|(_, v)| v).collect();
                let m = Tensor::from_vec(flat, (k, hidden), device)?.t()?.contiguous()?.to_dtype(dtype)?;
                Ok(Some((m, cols)))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { columns, by_row })
    }

    /// Whether nothing is monitored.
    pub fn is_empty(&self) -> bool {
        self.columns.is_empty()
    }

    /// Projections at capture row `row` of `x` `[batch, seq, hidden]`: `[batch, seq, k]` (f32) and
    /// the columns they fill, or `None` when nothing is monitored there.
    pub fn project(&self, row: usize, x: &Tensor) -> Result<Option<(Tensor, &[usize])>> {
        let Some(Some((m, cols))) = self.by_row.get(row) else { return Ok(None) };
        let (b, t, h) = x.dims3()?;
        let s = x.reshape((b * t, h))?.matmul(m)?.reshape((b, t, cols.len()))?.to_dtype(DType::F32)?;
        Ok(Some((s, cols)))
    }
}
