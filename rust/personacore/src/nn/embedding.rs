//! The token embedding table: dense, or kept quantized with only the looked-up rows dequantized.
//!
//! A quantized table matters when the model ties its output projection to it: Gemma 3 270M's
//! 262,144 × 640 table is 62% of the model's weights, 671 MB as f32 against 138 MB as Q6_K. The
//! quantized table and the tied output projection then share one copy of the blocks.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{QStorage, QTensor};
use candle_core::{DType, Device, Tensor};

use personacore_kernels::q4_1::Q4_1Matrix;
use personacore_kernels::q8_block::Q8BlockMatrix;

use crate::error::{Error, Result};

/// A `[vocab, hidden]` table whose rows are looked up by token id.
#[derive(Debug, Clone)]
pub struct Embedding {
    table: Table,
    rows: usize,
    cols: usize,
}

#[derive(Debug, Clone)]
enum Table {
    /// Dense rows in the compute dtype, on the compute device.
    Dense(Tensor),
    /// GGUF blocks on the CPU (never straddling rows), in row blocks of `part_rows` rows (the
    /// last may be shorter); rows are dequantized to f32 on lookup and converted to `dtype` on
    /// `device`.
    Quantized { parts: Vec<Arc<QTensor>>, part_rows: usize, row_bytes: usize, dtype: DType, device: Device },
    /// A Q4_1 table in our kernel's layout (shared with a tied output projection).
    Q4_1 { weight: Arc<Q4_1Matrix>, dtype: DType, device: Device },
    /// A Q5_0 / Q5_1 / Q8_0 table in our kernel's layout (shared with a tied output projection).
    Q8Block { weight: Arc<Q8BlockMatrix>, dtype: DType, device: Device },
}

impl Embedding {
    /// A dense table `[vocab, hidden]`.
    pub fn dense(weight: Tensor) -> Result<Self> {
        let (rows, cols) = weight.dims2()?;
        Ok(Self { table: Table::Dense(weight), rows, cols })
    }

    /// A quantized CPU table `[vocab, hidden]` given in row blocks of `part_rows` rows (stacked in
    /// order; the last may be shorter); looked-up rows come out as `dtype` on `device`.
    pub fn quantized(parts: Vec<Arc<QTensor>>, part_rows: usize, dtype: DType, device: &Device) -> Result<Self> {
        let (mut rows, mut cols, mut row_bytes) = (0, 0, 0);
        for (i, p) in parts.iter().enumerate() {
            let (r, c) = p.shape().dims2()?;
            let bytes = p.storage_size_in_bytes();
            let whole = r > 0 && bytes.is_multiple_of(r) && c.is_multiple_of(p.dtype().block_size());
            if !whole || (i + 1 < parts.len() && r != part_rows) || (i > 0 && (c != cols || bytes / r != row_bytes)) {
                return Err(Error::Compute(format!(
                    "quantized embedding part {i} [{r}, {c}] of {:?} does not continue a table of {part_rows}-row blocks",
                    p.dtype()
                )));
            }
            (rows, cols, row_bytes) = (rows + r, c, bytes / r);
        }
        Ok(Self { table: Table::Quantized { parts, part_rows, row_bytes, dtype, device: device.clone() }, rows, cols })
    }

    /// A Q4_1 table held in [`Q4_1Matrix`]'s layout (the one a tied output projection runs on).
    pub fn q4_1(weight: Arc<Q4_1Matrix>, dtype: DType, device: &Device) -> Self {
        let (rows, cols) = (weight.rows(), weight.cols());
        Self { table: Table::Q4_1 { weight, dtype, device: device.clone() }, rows, cols }
    }

    /// A Q5_0 / Q5_1 / Q8_0 table held in [`Q8BlockMatrix`]'s layout.
    pub fn q8_block(weight: Arc<Q8BlockMatrix>, dtype: DType, device: &Device) -> Self {
        let (rows, cols) = (weight.rows(), weight.cols());
        Self { table: Table::Q8Block { weight, dtype, device: device.clone() }, rows, cols }
    }

    /// Vocabulary size (rows).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Hidden size (columns).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Whether the table is kept quantized.
    pub fn is_quantized(&self) -> bool {
        !matches!(self.table, Table::Dense(_))
    }

    /// The rows of `ids` (any shape of u32 ids, flattened): `[n, hidden]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let ids = ids.flatten_all()?;
        match &self.table {
            Table::Dense(w) => Ok(w.index_select(&ids, 0)?),
            Table::Quantized { parts, part_rows, row_bytes, dtype, device } => {
                let t = self.gather(&ids, |id, out| {
                    let part = &parts[id / part_rows];
                    let data = part.data()?;
                    let r = id % part_rows;
                    let row = &data[r * row_bytes..(r + 1) * row_bytes];
                    let storage = QStorage::from_data(Cow::Borrowed(row), &Device::Cpu, part.dtype())?;
                    let q = QTensor::new(storage, (1, self.cols))?;
                    out.extend(q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?);
                    Ok(())
                })?;
                Ok(t.to_dtype(*dtype)?.to_device(device)?)
            }
            Table::Q4_1 { weight, dtype, device } => {
                let t = self.gather(&ids, |id, out| {
                    out.extend(weight.dequantize_row(id));
                    Ok(())
                })?;
                Ok(t.to_dtype(*dtype)?.to_device(device)?)
            }
            Table::Q8Block { weight, dtype, device } => {
                let t = self.gather(&ids, |id, out| {
                    out.extend(weight.dequantize_row(id));
                    Ok(())
                })?;
                Ok(t.to_dtype(*dtype)?.to_device(device)?)
            }
        }
    }

    /// `[n, cols]` f32 on the CPU from the rows `row` appends for each of the ids.
    fn gather(&self, ids: &Tensor, mut row: impl FnMut(usize, &mut Vec<f32>) -> Result<()>) -> Result<Tensor> {
        let ids = ids.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        let mut out = Vec::with_capacity(ids.len() * self.cols);
        for &id in &ids {
            let id = id as usize;
            if id >= self.rows {
                return Err(Error::input(format!(
                    "token id {id} is out of range for a vocabulary of {} tokens",
                    self.rows
                )));
            }
            row(id, &mut out)?;
        }
        Ok(Tensor::from_vec(out, (ids.len(), self.cols), &Device::Cpu)?)
    }

    /// The whole table as a dense tensor in the compute dtype (for export).
    pub fn dense_weight(&self) -> Result<Tensor> {
        match &self.table {
            Table::Dense(w) => Ok(w.clone()),
            Table::Quantized { parts, dtype, device, .. } => {
                let ws = parts.iter().map(|p| p.dequantize(&Device::Cpu)).collect::<candle_core::Result<Vec<_>>>()?;
                Ok(Tensor::cat(&ws, 0)?.to_dtype(*dtype)?.to_device(device)?)
            }
            Table::Q4_1 { weight, dtype, device } => {
                let w = Tensor::from_vec(weight.dequantize(), (self.rows, self.cols), &Device::Cpu)?;
                Ok(w.to_dtype(*dtype)?.to_device(device)?)
            }
            Table::Q8Block { weight, dtype, device } => {
                let w = Tensor::from_vec(weight.dequantize(), (self.rows, self.cols), &Device::Cpu)?;
                Ok(w.to_dtype(*dtype)?.to_device(device)?)
            }
        }
    }
}
