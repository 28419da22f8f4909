//! `personacore._core.Model`: loading, hidden states, logits, pooling, chat template, export.
//! Each method converts its arguments, releases the GIL, runs the engine, converts back.

use std::path::PathBuf;
use std::sync::Arc;

use numpy::PyArrayDyn;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::args::{GenerateArg, InterventionArg, MonitorArg};
use crate::errors::{detached, guarded, invalid_input};
use crate::generation::{PyGenerationPlan, PySession};
use crate::tensors::HostArray;
use crate::tokenizer::PyTokenizer;
use personacore::hooks::Steering;
use personacore::requests::{
    self, GenerateRequest, LoadRequest, MonitorInput, PoolRequest, PreparedMonitor, SteerRequest,
};
use personacore::Model;

/// A loaded model.
#[pyclass(module = "personacore._core", name = "Model", frozen, weakref)]
pub struct PyModel {
    pub(crate) inner: Arc<Model>,
}

/// Steerings checked against a model, ready for `hidden_states`/`logits`.
#[pyclass(module = "personacore._core", name = "Steerings", frozen)]
pub struct PySteerings {
    inner: Vec<Steering>,
}

/// A monitor checked and resolved against a model, ready for any number of generations.
#[pyclass(module = "personacore._core", name = "PreparedMonitor", frozen)]
pub struct PyPreparedMonitor {
    inner: PreparedMonitor,
}

/// Loads a model from an HF directory or a GGUF file (GIL released while loading).
#[pyfunction]
#[pyo3(signature = (path, dtype="f32".to_string(), quantized=false, device="cpu".to_string(), precision="highest".to_string(), chat_template=None))]
pub fn load_model(
    py: Python<'_>,
    path: PathBuf,
    dtype: String,
    quantized: bool,
    device: String,
    precision: String,
    chat_template: Option<String>,
) -> PyResult<PyModel> {
    let request = LoadRequest { dtype, device, quantized, precision, chat_template };
    let model = detached(py, || Model::load(&path, &request.options()?))?;
    Ok(PyModel { inner: Arc::new(model) })
}

/// `{pooling: float32 array}` of pooled tensors, in the order given.
fn pooled_dict<'py>(py: Python<'py>, arrays: Vec<(String, HostArray)>) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    for (name, arr) in arrays {
        dict.set_item(name, arr.into_numpy(py)?)?;
    }
    Ok(dict)
}

/// Pooled tensors to host arrays.
fn host(out: Vec<(String, candle_core::Tensor)>) -> personacore::Result<Vec<(String, HostArray)>> {
    out.into_iter().map(|(n, t)| Ok((n, HostArray::from_tensor(&t)?))).collect()
}

impl PyModel {
    /// One forward pass over `ids` with optional steerings (`hidden_states` or `logits`), computed
    /// with the GIL released and handed to numpy.
    fn forward<'py>(
        &self,
        py: Python<'py>,
        ids: &[i64],
        steers: Option<PyRef<'py, PySteerings>>,
        pass: fn(&Model, &[u32], Vec<Steering>) -> personacore::Result<candle_core::Tensor>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let steerings = steers.map_or(Vec::new(), |s| s.inner.clone());
        let vocab = self.inner.config().vocab_size;
        let out = detached(py, || {
            HostArray::from_tensor(&pass(&self.inner, &requests::token_ids(ids, "ids", vocab)?, steerings)?)
        })?;
        out.into_numpy(py)
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
    /// `model_sha256` of the files it was loaded from (see docs/conventions.md, Audit log).
    #[getter]
    fn sha256(&self) -> String {
        self.inner.sha256.clone()
    }
    /// Whether matmul weights are kept quantized.
    #[getter]
    fn quantized(&self) -> bool {
        self.inner.quantized
    }
    /// Compute dtype name (`f32`, `f16`, `bf16`).
    #[getter]
    fn dtype(&self) -> &'static str {
        requests::dtype_name(self.inner.options.dtype)
    }
    /// Device name (`cpu`, `cuda:N`).
    #[getter]
    fn device(&self) -> String {
        requests::device_name(&self.inner.options.device)
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
    fn chat_text(&self, messages: &Bound<'_, PyAny>, add_generation_prompt: bool) -> PyResult<String> {
        let value: serde_json::Value = pythonize::depythonize(messages)
            .map_err(|e| invalid_input(format!("messages must be JSON-like (dicts, lists, strs, numbers): {e}")))?;
        guarded(|| self.inner.chat_text(&value, add_generation_prompt))
    }

    /// Checks steer dicts against the model (no compute) for `hidden_states`/`logits`.
    fn prepare_steering(&self, py: Python<'_>, steers: Vec<InterventionArg>) -> PyResult<PySteerings> {
        let specs = crate::args::specs(steers);
        Ok(PySteerings { inner: detached(py, || requests::forward_steerings(&self.inner, &specs))? })
    }

    /// Residual stream at every layer, with optional steerings applied: float32 `[num_layers + 1, len, hidden]`.
    #[pyo3(signature = (ids, steers=None))]
    fn hidden_states<'py>(
        &self,
        py: Python<'py>,
        ids: Vec<i64>,
        steers: Option<PyRef<'py, PySteerings>>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        self.forward(py, &ids, steers, Model::hidden_states)
    }

    /// Logits at every position, with optional steerings applied: float32 `[len, vocab]`.
    #[pyo3(signature = (ids, steers=None))]
    fn logits<'py>(
        &self,
        py: Python<'py>,
        ids: Vec<i64>,
        steers: Option<PyRef<'py, PySteerings>>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        self.forward(py, &ids, steers, Model::logits)
    }

    /// Checks a generation against the model (no compute): prompts, settings, steers, monitor
    /// (a monitor dict, or one from `prepare_monitor`: not both).
    #[pyo3(signature = (prompts, params, steers, monitor=None, audit_log=None, audit_fsync=None, prepared_monitor=None))]
    #[allow(clippy::too_many_arguments)] // the Python keyword arguments, one each
    fn prepare_generation(
        &self,
        py: Python<'_>,
        prompts: Vec<Vec<i64>>,
        params: GenerateArg,
        steers: Vec<InterventionArg>,
        monitor: Option<MonitorArg>,
        audit_log: Option<PathBuf>,
        audit_fsync: Option<String>,
        prepared_monitor: Option<PyRef<'_, PyPreparedMonitor>>,
    ) -> PyResult<PyGenerationPlan> {
        let monitor = match (monitor, prepared_monitor) {
            (Some(_), Some(_)) => return Err(invalid_input("give a monitor or a prepared monitor, not both")),
            (Some(m), None) => Some(MonitorInput::Spec(m.into())),
            (None, Some(p)) => Some(MonitorInput::Prepared(p.inner.clone())),
            (None, None) => None,
        };
        let request = GenerateRequest {
            prompts,
            args: params.into(),
            steers: steers.into_iter().map(SteerRequest::from).collect(),
            monitor,
            audit_log,
            audit_fsync,
        };
        Ok(PyGenerationPlan::new(detached(py, || request.prepare(self.inner.clone()))?))
    }

    /// A monitor dict checked and resolved for this model once (its vectors normalised and laid
    /// out for scoring), for `prepare_generation(prepared_monitor=...)`.
    fn prepare_monitor(&self, py: Python<'_>, monitor: MonitorArg) -> PyResult<PyPreparedMonitor> {
        let spec = personacore::hooks::spec::MonitorSpec::from(monitor);
        let inner = detached(py, || PreparedMonitor::new(spec, &self.inner))?;
        Ok(PyPreparedMonitor { inner })
    }

    /// The layers each vector of a monitor dict is scored at on this model, as (name, layers) pairs.
    fn monitor_layers(&self, py: Python<'_>, monitor: MonitorArg) -> PyResult<Vec<(String, Vec<usize>)>> {
        let spec = personacore::hooks::spec::MonitorSpec::from(monitor);
        detached(py, || spec.layers_for(&self.inner))
    }

    /// Starts a prepared generation (allocates its cache; no forward pass yet).
    fn generate_start(&self, py: Python<'_>, plan: PyRef<'_, PyGenerationPlan>) -> PyResult<PySession> {
        plan.start(py)
    }

    /// A continuous-batching scheduler over this model (limits checked by the engine).
    fn scheduler(&self, config: crate::serving::SchedulerArg) -> PyResult<crate::serving::PyScheduler> {
        let c = personacore::generation::SchedulerConfig::new(
            &self.inner,
            config.max_batch,
            config.max_tokens_in_flight,
            config.prefill_chunk,
        )
        .map_err(crate::errors::to_py)?;
        Ok(crate::serving::PyScheduler::new(personacore::generation::Scheduler::new(self.inner.clone(), c)))
    }

    /// Pooled activations of `prompt ++ response` sequences: {pooling: float32 `[n, rows, hidden]`}
    /// (rows: all `num_layers + 1`, or `layers` in their order).
    #[pyo3(signature = (sequences, prompt_lens, poolings, batch_size=8, layers=None))]
    fn pool<'py>(
        &self,
        py: Python<'py>,
        sequences: Vec<Vec<i64>>,
        prompt_lens: Vec<usize>,
        poolings: Vec<String>,
        batch_size: i64,
        layers: Option<Vec<i64>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let arrays = detached(py, || {
            host(requests::pool_sequences(
                &self.inner,
                &sequences,
                &prompt_lens,
                &poolings,
                batch_size,
                layers.as_deref(),
            )?)
        })?;
        pooled_dict(py, arrays)
    }

    /// Pooled activations of (prompt ids, response ids) pairs: {pooling: float32 `[n, rows, hidden]`}
    /// (rows: all `num_layers + 1`, or `layers` in their order).
    #[pyo3(signature = (prompts, responses, poolings, batch_size=8, layers=None))]
    fn pool_pairs<'py>(
        &self,
        py: Python<'py>,
        prompts: Vec<Vec<i64>>,
        responses: Vec<Vec<i64>>,
        poolings: Vec<String>,
        batch_size: i64,
        layers: Option<Vec<i64>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let request = PoolRequest { prompts, responses, poolings, batch_size, layers };
        let arrays = detached(py, || host(request.run(&self.inner)?))?;
        pooled_dict(py, arrays)
    }

    /// Writes an HF-style directory (config.json, f32 model.safetensors, tokenizer files).
    fn save_hf(&self, py: Python<'_>, out_dir: PathBuf) -> PyResult<()> {
        detached(py, || self.inner.save_hf(&out_dir))
    }
}
