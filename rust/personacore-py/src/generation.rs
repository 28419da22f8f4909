//! `personacore._core.Session`: a generation in progress, stepped from Python (GIL released per
//! step) or run to completion; and `GenerationPlan`, a generation checked but not started.

use numpy::PyArrayDyn;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::errors::detached;
use crate::tensors::HostArray;
use personacore::generation::{Event, SequenceResult, Session, StepOutput, TokenLogprobs};
use personacore::hooks::spec::ScoreGroups;
use personacore::requests::PreparedGeneration;

/// A generation whose arguments the engine has checked; `Model.generate_start` starts it.
#[pyclass(module = "personacore._core", name = "GenerationPlan", frozen)]
pub struct PyGenerationPlan {
    prepared: PreparedGeneration,
}

impl PyGenerationPlan {
    /// Wraps a prepared generation.
    pub fn new(prepared: PreparedGeneration) -> Self {
        Self { prepared }
    }

    /// The checked generation.
    pub fn prepared(&self) -> &PreparedGeneration {
        &self.prepared
    }

    /// Starts a session from (a copy of) the plan, with the GIL released.
    pub fn start(&self, py: Python<'_>) -> PyResult<PySession> {
        let groups = ScoreGroups::new(&self.prepared.columns());
        let prepared = self.prepared.clone();
        let session = detached(py, move || prepared.start())?;
        Ok(PySession { session, groups })
    }
}

#[pymethods]
impl PyGenerationPlan {
    /// The layers each monitored name is scored at, as (name, layers) pairs in score order.
    #[getter]
    fn score_layers(&self) -> Vec<(String, Vec<usize>)> {
        ScoreGroups::new(&self.prepared.columns()).layers
    }
}

/// A generation in progress.
#[pyclass(module = "personacore._core", name = "Session")]
pub struct PySession {
    session: Session,
    groups: ScoreGroups,
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

fn events_list<'py>(py: Python<'py>, events: &[Event]) -> PyResult<Bound<'py, PyList>> {
    let list = PyList::empty(py);
    for e in events {
        list.append(event_dict(py, e)?)?;
    }
    Ok(list)
}

/// `{name: float32 [n, layers]}` of a row-major `[n, columns]` score table.
fn scores<'py>(py: Python<'py>, groups: &ScoreGroups, table: &[f32]) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (name, shape, data) in groups.split(table) {
        let arr: Bound<'py, PyArrayDyn<f32>> = HostArray::new(data, shape.to_vec()).into_numpy(py)?;
        d.set_item(name, arr)?;
    }
    Ok(d)
}

/// One token's log-probabilities for Python: `(token, logprob, [(id, logprob), ...])`.
type LogprobTuple = (u32, f32, Vec<(u32, f32)>);

/// Log-probabilities as a list of [`LogprobTuple`].
fn logprobs_list(lps: Vec<TokenLogprobs>) -> Vec<LogprobTuple> {
    lps.into_iter().map(|lp| (lp.token, lp.logprob, lp.top)).collect()
}

/// One step's output as a dict: token, text, finish_reason, scores, events, and logprobs and
/// prompt_logprobs when the step has any.
pub fn step_dict<'py>(py: Python<'py>, groups: &ScoreGroups, o: StepOutput) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("token", o.token)?;
    d.set_item("text", o.text)?;
    d.set_item("finish_reason", o.finish_reason.map(|r| r.name()))?;
    d.set_item("scores", scores(py, groups, &o.scores)?)?;
    d.set_item("sinks", o.sinks)?;
    d.set_item("events", events_list(py, &o.events)?)?;
    if !o.logprobs.is_empty() {
        // only when asked for: the step dicts are built per token and request, under the GIL
        d.set_item("logprobs", logprobs_list(o.logprobs))?;
    }
    if !o.prompt_logprobs.is_empty() {
        d.set_item("prompt_logprobs", logprobs_list(o.prompt_logprobs))?;
    }
    Ok(d)
}

/// A sequence's result as a dict: token_ids, text, finish_reason, prompt_len, scores, sinks, events,
/// logprobs, prompt_logprobs.
pub fn result_dict<'py>(py: Python<'py>, groups: &ScoreGroups, r: SequenceResult) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("token_ids", r.token_ids)?;
    d.set_item("text", r.text)?;
    d.set_item("finish_reason", r.finish_reason.map(|f| f.name()))?;
    d.set_item("prompt_len", r.prompt_len)?;
    d.set_item("scores", scores(py, groups, &r.scores)?)?;
    d.set_item("sinks", r.sinks)?;
    d.set_item("events", events_list(py, &r.events)?)?;
    d.set_item("logprobs", logprobs_list(r.logprobs))?;
    d.set_item("prompt_logprobs", logprobs_list(r.prompt_logprobs))?;
    Ok(d)
}

#[pymethods]
impl PySession {
    /// One forward pass and one token per unfinished sequence; `None` when done.
    fn step<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyList>>> {
        let session = &mut self.session;
        let Some(outs) = detached(py, || session.step())? else { return Ok(None) };
        let list = PyList::empty(py);
        for o in outs {
            list.append(step_dict(py, &self.groups, o)?)?;
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
        self.session.columns()
    }

    /// The layers each monitored name is scored at, as (name, layers) pairs in score order.
    #[getter]
    fn score_layers(&self) -> Vec<(String, Vec<usize>)> {
        self.groups.layers.clone()
    }

    /// Per-sequence results.
    fn results<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(py);
        for r in self.session.results() {
            list.append(result_dict(py, &self.groups, r)?)?;
        }
        Ok(list)
    }
}
