//! `personacore._core.Model`: loading, hidden states, logits, pooling, chat template, export.

use std::path::PathBuf;
use std::sync::Arc;

use numpy::PyArrayDyn;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::errors::{detached, guarded};
use crate::generation::PySession;
use crate::tensors::HostArray;
use crate::tokenizer::PyTokenizer;
use personacore::{LoadOptions, Model, Pooling};

/// A loaded model.
#[pyclass(module = "personacore._core", name = "Model", frozen)]
pub struct PyModel {
    pub(crate) inner: Arc<Model>,
    dtype: String,
    device: String,
}

/// Loads a model from an HF directory or a GGUF file (GIL released while loading).
#[pyfunction]
#[pyo3(signature = (path, dtype="f32", quantized=false, device="cpu", precision="highest"))]
pub fn load_model(
    py: Python<'_>,
    path: PathBuf,
    dtype: &str,
    quantized: bool,
    device: &str,
    precision: &str,
) -> PyResult<PyModel> {
    let opts = guarded(|| {
        Ok(LoadOptions {
            dtype: personacore::parse_dtype(dtype)?,
            quantized,
            device: personacore::parse_device(device)?,
            precision: personacore::MatmulPrecision::parse(precision)?,
        })
    })?;
    let model = detached(py, || Model::load(&path, &opts))?;
    Ok(PyModel { inner: Arc::new(model), dtype: dtype.to_string(), device: device.to_string() })
}

pub(crate) fn ids_u32(ids: Vec<i64>, what: &str, vocab: usize) -> personacore::Result<Vec<u32>> {
    ids.iter()
        .enumerate()
        .map(|(pos, &id)| {
            u32::try_from(id).ok().filter(|&v| (v as usize) < vocab).ok_or_else(|| {
                personacore::Error::input(format!(
                    "{what}: token id {id} at position {pos} is out of range (vocab_size {vocab})"
                ))
            })
        })
        .collect()
}

impl PyModel {
    fn steerings(&self, steers: Option<&Bound<'_, PyList>>) -> PyResult<Vec<personacore::hooks::Steering>> {
        match steers {
            Some(list) => crate::generation::steerings_from_py(&self.inner, list, 1, &[]),
            None => Ok(Vec::new()),
        }
    }
}

#[pymethods]
impl PyModel {
    /// Number of decoder blocks.
    #[getter]
    fn num_layers(&self) -> usize {
        self.inner.config().num_layers
    }
    /// Residual stream width.
    #[getter]
    fn hidden_size(&self) -> usize {
        self.inner.config().hidden_size
    }
    /// Rows of the embedding matrix.
    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.config().vocab_size
    }
    /// Family name (`llama`, `mistral`, `qwen2`, `qwen3`).
    #[getter]
    fn architecture(&self) -> &'static str {
        self.inner.config().architecture.name()
    }
    /// Context window.
    #[getter]
    fn max_position_embeddings(&self) -> usize {
        self.inner.config().max_position_embeddings
    }
    /// Matmul precision asked for at load (`"highest"` or `"high"`).
    #[getter]
    fn precision(&self) -> &'static str {
        self.inner.options.precision.name()
    }

    /// Whether matmul weights are kept quantized.
    #[getter]
    fn quantized(&self) -> bool {
        self.inner.quantized
    }
    /// Compute dtype name.
    #[getter]
    fn dtype(&self) -> &str {
        &self.dtype
    }
    /// Device name.
    #[getter]
    fn device(&self) -> &str {
        &self.device
    }
    /// Whether the checkpoint has a chat template.
    #[getter]
    fn has_chat_template(&self) -> bool {
        self.inner.chat_template.is_some()
    }
    /// The normalized config as a JSON string (HF config.json layout).
    #[getter]
    fn config_json(&self) -> String {
        self.inner.config().to_hf_config().to_string()
    }
    /// The tokenizer.
    #[getter]
    fn tokenizer(&self) -> PyTokenizer {
        PyTokenizer { model: self.inner.clone() }
    }

    /// Renders chat `messages` (a list of dicts) with the model's template.
    #[pyo3(signature = (messages, add_generation_prompt=true))]
    fn chat_text(&self, py: Python<'_>, messages: &Bound<'_, PyAny>, add_generation_prompt: bool) -> PyResult<String> {
        let json: String = py.import("json")?.call_method1("dumps", (messages,))?.extract()?;
        guarded(|| {
            let value: serde_json::Value = serde_json::from_str(&json)
                .map_err(|e| personacore::Error::input(format!("messages are not JSON-serialisable: {e}")))?;
            self.inner.chat_text(&value, add_generation_prompt)
        })
    }

    /// Residual stream at every layer, with optional steer dicts applied: float32 `[num_layers + 1, len, hidden]`.
    #[pyo3(signature = (ids, steers=None))]
    fn hidden_states<'py>(
        &self,
        py: Python<'py>,
        ids: Vec<i64>,
        steers: Option<&Bound<'py, PyList>>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let vocab = self.inner.config().vocab_size;
        let steerings = self.steerings(steers)?;
        let out = detached(py, || {
            HostArray::from_tensor(&self.inner.hidden_states(&ids_u32(ids, "ids", vocab)?, steerings)?)
        })?;
        out.into_numpy(py)
    }

    /// Logits at every position, with optional steer dicts applied: float32 `[len, vocab]`.
    #[pyo3(signature = (ids, steers=None))]
    fn logits<'py>(
        &self,
        py: Python<'py>,
        ids: Vec<i64>,
        steers: Option<&Bound<'py, PyList>>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let vocab = self.inner.config().vocab_size;
        let steerings = self.steerings(steers)?;
        let out =
            detached(py, || HostArray::from_tensor(&self.inner.logits(&ids_u32(ids, "ids", vocab)?, steerings)?))?;
        out.into_numpy(py)
    }

    /// Starts a generation for a batch of prompts (see `personacore/generation.py`).
    #[pyo3(signature = (prompts, params, steers, monitor=None, audit_log=None))]
    fn generate_start(
        &self,
        py: Python<'_>,
        prompts: Vec<Vec<i64>>,
        params: &Bound<'_, PyDict>,
        steers: &Bound<'_, PyList>,
        monitor: Option<&Bound<'_, PyDict>>,
        audit_log: Option<PathBuf>,
    ) -> PyResult<PySession> {
        crate::generation::start(py, &self.inner, prompts, params, steers, monitor, audit_log)
    }

    /// Pooled activations of `prompt ++ response` sequences: {pooling: float32 `[n, num_layers + 1, hidden]`}.
    #[pyo3(signature = (sequences, prompt_lens, poolings, batch_size=8))]
    fn pool<'py>(
        &self,
        py: Python<'py>,
        sequences: Vec<Vec<i64>>,
        prompt_lens: Vec<usize>,
        poolings: Vec<String>,
        batch_size: usize,
    ) -> PyResult<Bound<'py, PyDict>> {
        let vocab = self.inner.config().vocab_size;
        let arrays = detached(py, || {
            let kinds = poolings.iter().map(|p| Pooling::parse(p)).collect::<personacore::Result<Vec<_>>>()?;
            let seqs = sequences
                .into_iter()
                .enumerate()
                .map(|(i, s)| ids_u32(s, &format!("sequence {i}"), vocab))
                .collect::<personacore::Result<Vec<_>>>()?;
            let out = self.inner.pool(&seqs, &prompt_lens, &kinds, batch_size)?;
            out.iter().map(HostArray::from_tensor).collect::<personacore::Result<Vec<_>>>()
        })?;
        let dict = PyDict::new(py);
        for (name, arr) in poolings.iter().zip(arrays) {
            dict.set_item(name, arr.into_numpy(py)?)?;
        }
        Ok(dict)
    }

    /// Writes an HF-style directory (config.json, f32 model.safetensors, tokenizer files).
    fn save_hf(&self, py: Python<'_>, out_dir: PathBuf) -> PyResult<()> {
        detached(py, || self.inner.save_hf(&out_dir))
    }
}
