//! `personacore._core.Session`: a generation in progress, stepped from Python (GIL released per
//! step) or run to completion; plus the conversion of steer/monitor dicts into engine plans.

use std::sync::Arc;

use numpy::PyReadonlyArray2;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::errors::{detached, guarded};
use crate::tensors::HostArray;
use personacore::generation::{Event, GenerateParams, SamplingParams, Session};
use personacore::hooks::{Condition, Intervention, InterventionKind, MonitorBank, Positions, Steering};
use personacore::{Error, Model};

/// `d[key]` converted to `T`; a missing key or a wrong type is an `InvalidInputError` naming the key.
fn get<'py, T: FromPyObjectOwned<'py>>(d: &Bound<'py, PyDict>, key: &str) -> PyResult<T> {
    match d.get_item(key)? {
        Some(v) => v.extract::<T>().map_err(|e| {
            let e: PyErr = e.into();
            crate::errors::to_py(Error::input(format!("'{key}': {e}")))
        }),
        None => Err(crate::errors::to_py(Error::input(format!("missing key '{key}'")))),
    }
}

fn rows(arr: PyReadonlyArray2<'_, f32>) -> Vec<Vec<f32>> {
    arr.as_array().rows().into_iter().map(|r| r.to_vec()).collect()
}

/// Builds steerings from the Python dicts (see `personacore/steering.py`); `monitor_names` are
/// the monitor columns (name, layer) that conditions may refer to.
pub fn steerings_from_py(
    model: &Model,
    steers: &Bound<'_, PyList>,
    batch: usize,
    monitor_columns: &[(String, usize)],
) -> PyResult<Vec<Steering>> {
    let t = &model.transformer;
    let mut out = Vec::new();
    for item in steers.iter() {
        let d = item.cast_into::<PyDict>().map_err(PyErr::from)?;
        let name: String = get(&d, "name")?;
        let kind_name: String = get(&d, "kind")?;
        let kind = match kind_name.as_str() {
            "add" => InterventionKind::Add { coef: get(&d, "coef")? },
            "ablate" => InterventionKind::Ablate,
            "cap" => InterventionKind::Cap { min: get(&d, "min")?, max: get(&d, "max")? },
            other => return Err(crate::errors::to_py(Error::input(format!("unknown steering kind '{other}'")))),
        };
        let layers: Vec<usize> = get(&d, "layers")?;
        let vectors: PyReadonlyArray2<'_, f32> = get(&d, "vectors")?;
        let vectors = rows(vectors);
        let positions: String = get(&d, "positions")?;
        let sequences: Vec<usize> = match d.get_item("sequences")? {
            Some(v) if !v.is_none() => v.extract()?,
            _ => (0..batch).collect(),
        };
        let when: Option<Bound<'_, PyDict>> = match d.get_item("when")? {
            Some(v) if !v.is_none() => Some(v.cast_into::<PyDict>().map_err(PyErr::from)?),
            _ => None,
        };
        let steering = guarded(|| {
            let positions = Positions::parse(&positions)?;
            if vectors.len() != layers.len() {
                return Err(Error::input(format!(
                    "steer '{name}': {} vectors for {} layers",
                    vectors.len(),
                    layers.len()
                )));
            }
            let hidden = model.config().hidden_size;
            let interventions = layers
                .iter()
                .zip(&vectors)
                .map(|(&l, v)| {
                    if v.len() != hidden {
                        return Err(Error::input(format!(
                            "steer '{name}': vector width {} != hidden size {hidden}",
                            v.len()
                        )));
                    }
                    Intervention::new(l, kind, v, positions, t.dtype(), t.device())
                })
                .collect::<personacore::Result<Vec<_>>>()?;
            let mut seq_mask = vec![false; batch];
            for &s in &sequences {
                *seq_mask.get_mut(s).ok_or_else(|| {
                    Error::input(format!("steer '{name}': sequence {s} is not in the batch of {batch}"))
                })? = true;
            }
            Ok(Steering { name: name.clone(), interventions, sequences: seq_mask, condition: None })
        })?;
        let condition = match when {
            None => None,
            Some(w) => {
                let monitor: String = get(&w, "monitor")?;
                let layer: usize = get(&w, "layer")?;
                let column =
                    monitor_columns.iter().position(|(n, l)| *n == monitor && *l == layer).ok_or_else(|| {
                        crate::errors::to_py(Error::input(format!(
                            "steer '{name}': no monitor '{monitor}' at layer {layer}"
                        )))
                    })?;
                Some(Condition {
                    column,
                    above: get(&w, "above")?,
                    below: get(&w, "below")?,
                    hysteresis: get(&w, "hysteresis")?,
                })
            }
        };
        out.push(Steering { condition, ..steering });
    }
    Ok(out)
}

/// Builds the monitor bank and per-column thresholds from the Python dict.
fn monitor_from_py(model: &Model, d: &Bound<'_, PyDict>) -> PyResult<(MonitorBank, Vec<Option<f32>>)> {
    let names: Vec<String> = get(d, "names")?;
    let layers: Vec<Vec<usize>> = get(d, "layers")?;
    let vectors: Vec<PyReadonlyArray2<'_, f32>> = get(d, "vectors")?;
    let thresholds: std::collections::HashMap<String, f32> = match d.get_item("thresholds")? {
        Some(v) if !v.is_none() => v.extract()?,
        _ => Default::default(),
    };
    let vectors: Vec<Vec<Vec<f32>>> = vectors.into_iter().map(rows).collect();
    guarded(|| {
        if names.len() != layers.len() || names.len() != vectors.len() {
            return Err(Error::input("monitor: names, layers and vectors must have the same length"));
        }
        if let Some(unknown) = thresholds.keys().find(|k| !names.contains(k)) {
            return Err(Error::input(format!("monitor threshold for unknown vector '{unknown}'")));
        }
        let mut entries = Vec::new();
        let mut thr = Vec::new();
        for ((name, ls), vs) in names.iter().zip(&layers).zip(vectors) {
            if ls.len() != vs.len() {
                return Err(Error::input(format!("monitor '{name}': {} vectors for {} layers", vs.len(), ls.len())));
            }
            for (&l, v) in ls.iter().zip(vs) {
                entries.push((name.clone(), l, v));
                thr.push(thresholds.get(name).copied());
            }
        }
        let c = model.config();
        let t = &model.transformer;
        Ok((MonitorBank::new(entries, c.num_layers, c.hidden_size, t.dtype(), t.device())?, thr))
    })
}

fn event_dict<'py>(py: Python<'py>, e: &Event) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("kind", e.kind.name())?;
    d.set_item("sequence", e.sequence)?;
    d.set_item("position", e.position)?;
    d.set_item("step", e.step)?;
    d.set_item("vector", &e.vector)?;
    d.set_item("layer", e.layer)?;
    d.set_item("score", e.score)?;
    d.set_item("threshold", e.threshold)?;
    d.set_item("coef", e.coef)?;
    d.set_item("steer", &e.steer)?;
    Ok(d)
}

fn scores_array<'py>(py: Python<'py>, data: Vec<f32>, n: usize, cols: usize) -> PyResult<Bound<'py, PyAny>> {
    let t = guarded(|| Ok(candle_core::Tensor::from_vec(data, (n, cols), &candle_core::Device::Cpu)?))?;
    Ok(guarded(|| HostArray::from_tensor(&t))?.into_numpy(py)?.into_any())
}

/// A generation in progress.
#[pyclass(module = "personacore._core", name = "Session")]
pub struct PySession {
    session: Session,
    columns: Vec<(String, usize)>,
}

/// Starts a generation (validates everything; computes nothing yet).
pub fn start(
    py: Python<'_>,
    model: &Arc<Model>,
    prompts: Vec<Vec<i64>>,
    params: &Bound<'_, PyDict>,
    steers: &Bound<'_, PyList>,
    monitor: Option<&Bound<'_, PyDict>>,
    audit_log: Option<std::path::PathBuf>,
) -> PyResult<PySession> {
    let vocab = model.config().vocab_size;
    let prompts = guarded(|| {
        prompts
            .into_iter()
            .enumerate()
            .map(|(i, p)| crate::model::ids_u32(p, &format!("prompt {i}"), vocab))
            .collect::<personacore::Result<Vec<_>>>()
    })?;
    let max_new: i64 = get(params, "max_new_tokens")?;
    if max_new <= 0 {
        return Err(crate::errors::to_py(Error::input(format!("max_new_tokens must be at least 1, got {max_new}"))));
    }
    let gp = GenerateParams {
        max_new_tokens: max_new as usize,
        sampling: SamplingParams {
            temperature: get(params, "temperature")?,
            top_p: get(params, "top_p")?,
            top_k: get(params, "top_k")?,
        },
        seed: get(params, "seed")?,
        stop: get(params, "stop")?,
        ignore_eos: get(params, "ignore_eos")?,
    };
    let monitor = monitor.map(|m| monitor_from_py(model, m)).transpose()?;
    let columns: Vec<(String, usize)> =
        monitor.as_ref().map_or(Vec::new(), |(b, _)| b.columns.iter().map(|c| (c.name.clone(), c.layer)).collect());
    let steerings = steerings_from_py(model, steers, prompts.len(), &columns)?;
    let model = model.clone();
    let session = detached(py, move || Session::new(model, prompts, gp, steerings, monitor, audit_log.as_deref()))?;
    Ok(PySession { session, columns })
}

#[pymethods]
impl PySession {
    /// One forward pass and one token per unfinished sequence; `None` when done.
    fn step<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyList>>> {
        let session = &mut self.session;
        let Some(outs) = detached(py, || session.step())? else { return Ok(None) };
        let list = PyList::empty(py);
        for o in outs {
            let d = PyDict::new(py);
            d.set_item("token", o.token)?;
            d.set_item("text", o.text)?;
            d.set_item("finish_reason", o.finish_reason.map(|r| r.name()))?;
            d.set_item("scores", scores_array(py, o.scores, o.n_positions, self.columns.len())?)?;
            let ev = PyList::empty(py);
            for e in &o.events {
                ev.append(event_dict(py, e)?)?;
            }
            d.set_item("events", ev)?;
            list.append(d)?;
        }
        Ok(Some(list))
    }

    /// Runs to completion, releasing the GIL for each step and checking for Ctrl-C between steps.
    fn run(&mut self, py: Python<'_>) -> PyResult<()> {
        loop {
            let session = &mut self.session;
            if detached(py, || session.step())?.is_none() {
                return Ok(());
            }
            py.check_signals()?;
        }
    }

    /// Whether every sequence has finished.
    #[getter]
    fn done(&self) -> bool {
        self.session.done()
    }

    /// Monitor columns as (name, layer) pairs.
    #[getter]
    fn columns(&self) -> Vec<(String, usize)> {
        self.columns.clone()
    }

    /// Per-sequence results.
    fn results<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(py);
        let ncols = self.columns.len();
        for r in self.session.results() {
            let d = PyDict::new(py);
            d.set_item("token_ids", r.token_ids)?;
            d.set_item("text", r.text)?;
            d.set_item("finish_reason", r.finish_reason.map(|f| f.name()))?;
            d.set_item("prompt_len", r.prompt_len)?;
            let n = r.scores.len().checked_div(ncols).unwrap_or(0);
            let scores = PyDict::new(py);
            let mut names: Vec<&String> = Vec::new();
            for (name, _) in &self.columns {
                if !names.contains(&name) {
                    names.push(name);
                }
            }
            for name in names {
                let idx: Vec<usize> =
                    self.columns.iter().enumerate().filter(|(_, c)| &c.0 == name).map(|(i, _)| i).collect();
                let data: Vec<f32> =
                    (0..n).flat_map(|row| idx.iter().map(move |&c| row * ncols + c)).map(|k| r.scores[k]).collect();
                scores.set_item(name, scores_array(py, data, n, idx.len())?)?;
            }
            d.set_item("scores", scores)?;
            let ev = PyList::empty(py);
            for e in &r.events {
                ev.append(event_dict(py, e)?)?;
            }
            d.set_item("events", ev)?;
            list.append(d)?;
        }
        Ok(list)
    }
}
