//! Typed argument structs: the dicts `personacore` builds (see python/personacore/_core.pyi) read
//! field by field into Rust types by `#[derive(FromPyObject)]`, then moved into the engine's
//! request types. Nothing here checks a value; the engine does (personacore::hooks::spec,
//! personacore::requests).

use numpy::{PyArrayDyn, PyReadonlyArrayDyn};
use pyo3::prelude::*;

use personacore::hooks::spec::{InterventionSpec, LayerChoice, MonitorSpec, MonitorVector, VectorArg, WhenSpec};
use personacore::requests::{GenerateArgs, SteerRequest};

use crate::tensors::HostArray;

/// A float32 numpy array of any shape, copied out as row-major data and its shape.
pub struct Vector(VectorArg);

impl<'a, 'py> FromPyObject<'a, 'py> for Vector {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        let arr: PyReadonlyArrayDyn<'py, f32> = obj.extract()?;
        let view = arr.as_array();
        Ok(Self(VectorArg { shape: view.shape().to_vec(), data: view.iter().copied().collect() }))
    }
}

/// `pc.When` as a dict.
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
pub struct WhenArg {
    monitor: String,
    above: Option<f64>,
    below: Option<f64>,
    hysteresis: f64,
    layer: Option<i64>,
    min_on: i64,
    min_off: i64,
    mode: String,
    gain: Option<f64>,
}

impl From<WhenArg> for WhenSpec {
    fn from(w: WhenArg) -> Self {
        WhenSpec {
            monitor: w.monitor,
            above: w.above,
            below: w.below,
            hysteresis: w.hysteresis,
            layer: w.layer,
            min_on: w.min_on,
            min_off: w.min_off,
            mode: w.mode,
            gain: w.gain,
        }
    }
}

/// `pc.Steer` / `pc.Ablate` / `pc.Cap` as a dict, with the batch members it applies to.
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
pub struct InterventionArg {
    kind: String,
    name: String,
    coef: Option<f64>,
    min: Option<f64>,
    max: Option<f64>,
    vector: Vector,
    recommended: Option<i64>,
    layers: Option<Vec<i64>>,
    positions: String,
    when: Option<WhenArg>,
    sequences: Option<Vec<usize>>,
}

impl From<InterventionArg> for SteerRequest {
    fn from(a: InterventionArg) -> Self {
        let spec = InterventionSpec {
            kind: a.kind,
            name: a.name,
            coef: a.coef,
            min: a.min,
            max: a.max,
            vector: a.vector.0,
            recommended: a.recommended,
            layers: a.layers,
            positions: a.positions,
            when: a.when.map(WhenSpec::from),
        };
        SteerRequest { spec, sequences: a.sequences }
    }
}

/// The intervention specs of a list of steer dicts (their `sequences` dropped).
pub fn specs(steers: Vec<InterventionArg>) -> Vec<InterventionSpec> {
    steers.into_iter().map(|s| SteerRequest::from(s).spec).collect()
}

/// Monitor layers: `None` (recommended), a name (`"all"`) or a list of layers.
#[derive(FromPyObject)]
pub enum LayersArg {
    /// A name.
    Name(String),
    /// Layers.
    List(Vec<i64>),
}

fn layer_choice(l: Option<LayersArg>) -> LayerChoice {
    match l {
        None => LayerChoice::Recommended,
        Some(LayersArg::Name(n)) => LayerChoice::Named(n),
        Some(LayersArg::List(ls)) => LayerChoice::Layers(ls),
    }
}

/// One vector of a monitor dict.
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
pub struct MonitorVectorArg {
    name: String,
    vector: Vector,
    recommended: Option<i64>,
}

/// `pc.Monitor` as a dict.
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
pub struct MonitorArg {
    vectors: Vec<MonitorVectorArg>,
    layers: Option<LayersArg>,
    layers_by_name: Vec<(String, Option<LayersArg>)>,
    thresholds: Vec<(String, f64)>,
    include_sinks: bool,
}

impl From<MonitorArg> for MonitorSpec {
    fn from(m: MonitorArg) -> Self {
        MonitorSpec {
            vectors: m
                .vectors
                .into_iter()
                .map(|v| MonitorVector { name: v.name, vector: v.vector.0, recommended: v.recommended })
                .collect(),
            layers: layer_choice(m.layers),
            layers_by_name: m.layers_by_name.into_iter().map(|(n, l)| (n, layer_choice(l))).collect(),
            thresholds: m.thresholds,
            include_sinks: m.include_sinks,
        }
    }
}

/// Generation settings as a dict.
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
pub struct GenerateArg {
    max_new_tokens: i64,
    temperature: f64,
    top_p: f64,
    top_k: i64,
    seed: i128,
    stop: Vec<String>,
    ignore_eos: bool,
    presence_penalty: f64,
    frequency_penalty: f64,
    logit_bias: Vec<(i64, f64)>,
    logprobs: Option<i64>,
    prompt_logprobs: Option<i64>,
}

impl From<GenerateArg> for GenerateArgs {
    fn from(g: GenerateArg) -> Self {
        GenerateArgs {
            max_new_tokens: g.max_new_tokens,
            temperature: g.temperature,
            top_p: g.top_p,
            top_k: g.top_k,
            seed: g.seed,
            stop: g.stop,
            ignore_eos: g.ignore_eos,
            presence_penalty: g.presence_penalty,
            frequency_penalty: g.frequency_penalty,
            logit_bias: g.logit_bias,
            logprobs: g.logprobs,
            prompt_logprobs: g.prompt_logprobs,
        }
    }
}

/// Checks a `pc.Steer`/`pc.Ablate`/`pc.Cap` without a model (what the constructors call).
#[pyfunction]
pub fn check_intervention(spec: InterventionArg) -> PyResult<()> {
    let spec = SteerRequest::from(spec).spec;
    crate::errors::guarded(|| spec.check().map(|_| ()))
}

/// Checks a `pc.Steer`/`pc.Ablate`/`pc.Cap` against a model of `num_layers` decoder blocks and
/// width `hidden_size` that is not a personacore model (a transformers model's hooks): every check
/// `Model.prepare_steering` makes but the condition's. Returns the layers and the direction at
/// each, float32 `[len(layers), hidden_size]`.
#[pyfunction]
pub fn resolve_intervention<'py>(
    py: Python<'py>,
    spec: InterventionArg,
    num_layers: usize,
    hidden_size: usize,
) -> PyResult<(Vec<usize>, Bound<'py, PyArrayDyn<f32>>)> {
    let spec = SteerRequest::from(spec).spec;
    let r = crate::errors::guarded(|| spec.resolve_rows(num_layers, hidden_size))?;
    let shape = vec![r.layers.len(), hidden_size];
    let rows = HostArray::new(r.rows.concat(), shape).into_numpy(py)?;
    Ok((r.layers, rows))
}

/// Checks a `pc.When` without a model.
#[pyfunction]
pub fn check_when(when: WhenArg) -> PyResult<()> {
    crate::errors::guarded(|| WhenSpec::from(when).check())
}

/// Checks a `pc.Monitor` without a model.
#[pyfunction]
pub fn check_monitor(monitor: MonitorArg) -> PyResult<()> {
    crate::errors::guarded(|| MonitorSpec::from(monitor).check())
}
