//! Hands candle tensors to numpy: one copy out of the tensor storage into a `Vec`, whose buffer
//! numpy then owns (no further copy).

use numpy::ndarray::{ArrayD, IxDyn};
use numpy::{PyArray, PyArrayDyn};
use pyo3::prelude::*;

/// A tensor's f32 data and shape, extracted without holding the GIL.
pub struct HostArray {
    data: Vec<f32>,
    shape: Vec<usize>,
}

impl HostArray {
    /// Row-major `data` of shape `shape`.
    pub fn new(data: Vec<f32>, shape: Vec<usize>) -> Self {
        Self { data, shape }
    }

    /// Copies `t` (any dtype, any device) into host f32 memory.
    pub fn from_tensor(t: &candle_core::Tensor) -> personacore::Result<Self> {
        let t = t.to_device(&candle_core::Device::Cpu)?.to_dtype(candle_core::DType::F32)?;
        let shape = t.dims().to_vec();
        let data = t.flatten_all()?.to_vec1::<f32>()?;
        Ok(Self { data, shape })
    }

    /// Moves the buffer into a numpy array.
    pub fn into_numpy(self, py: Python<'_>) -> PyResult<Bound<'_, PyArrayDyn<f32>>> {
        let arr = ArrayD::from_shape_vec(IxDyn(&self.shape), self.data)
            .map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(e.to_string()))?;
        Ok(PyArray::from_owned_array(py, arr))
    }
}
