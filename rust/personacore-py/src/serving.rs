//! `personacore._core.Scheduler`: the continuous-batching scheduler, driven by the Python engine
//! thread (`personacore.engine.serving.Engine`): `add` a checked generation plan, `step` with the
//! GIL released, `cancel`, `stats`.

use std::collections::HashMap;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::errors::{detached, to_py};
use crate::generation::{result_dict, step_dict, PyGenerationPlan};
use personacore::generation::{AlertPolicy, RequestUpdate, Scheduler};
use personacore::hooks::spec::ScoreGroups;

/// The scheduler's limits as a dict (see `SchedulerConfig`).
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
pub struct SchedulerArg {
    pub max_batch: i64,
    pub max_tokens_in_flight: Option<i64>,
    pub prefill_chunk: i64,
}

/// Requests queued and running over one model.
#[pyclass(module = "personacore._core", name = "Scheduler")]
pub struct PyScheduler {
    scheduler: Scheduler,
    /// Per request id: how its score columns group by name.
    groups: HashMap<u64, ScoreGroups>,
}

impl PyScheduler {
    /// Wraps a scheduler.
    pub fn new(scheduler: Scheduler) -> Self {
        Self { scheduler, groups: HashMap::new() }
    }

    /// `{"id", "step": dict or None, "result": dict or None, "error": exception or None}`.
    fn update<'py>(&mut self, py: Python<'py>, u: RequestUpdate) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("id", u.id)?;
        let ended = u.result.is_some() || u.step.is_err();
        let groups = if ended { self.groups.remove(&u.id) } else { self.groups.get(&u.id).cloned() };
        let groups = groups.unwrap_or_else(|| ScoreGroups::new(&[]));
        match u.step {
            Ok(Some(o)) => d.set_item("step", step_dict(py, &groups, o)?)?,
            Ok(None) => d.set_item("step", py.None())?,
            Err(e) => d.set_item("error", to_py(e).into_value(py))?,
        }
        match u.result {
            Some(r) => d.set_item("result", result_dict(py, &groups, r)?)?,
            None => d.set_item("result", py.None())?,
        }
        Ok(d)
    }
}

#[pymethods]
impl PyScheduler {
    /// Queues a single-prompt plan under an alert policy (`flag`, `steer`, `stop`); returns its id.
    fn add(
        &mut self,
        py: Python<'_>,
        plan: PyRef<'_, PyGenerationPlan>,
        on_alert: &str,
        request_id: String,
    ) -> PyResult<u64> {
        let policy = AlertPolicy::parse(on_alert).map_err(to_py)?;
        let groups = ScoreGroups::new(&plan.prepared().columns());
        let prepared = plan.prepared().clone();
        let scheduler = &mut self.scheduler;
        let id = detached(py, move || scheduler.add(prepared, policy, request_id))?;
        self.groups.insert(id, groups);
        Ok(id)
    }

    /// One step with the GIL released: a list of update dicts, one per request with news.
    fn step<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let scheduler = &mut self.scheduler;
        let updates = detached(py, move || Ok(scheduler.step()))?;
        let list = PyList::empty(py);
        for u in updates {
            list.append(self.update(py, u)?)?;
        }
        Ok(list)
    }

    /// Ends request `id` now; its final update dict, or None if it had already ended.
    fn cancel<'py>(&mut self, py: Python<'py>, id: u64) -> PyResult<Option<Bound<'py, PyDict>>> {
        match self.scheduler.cancel(id) {
            Some(u) => Ok(Some(self.update(py, u)?)),
            None => Ok(None),
        }
    }

    /// Whether a request is queued or running.
    #[getter]
    fn has_work(&self) -> bool {
        self.scheduler.has_work()
    }

    /// KV-cache positions a request reserves (prompt length, max_new_tokens).
    fn positions_needed(&self, prompt_len: usize, max_new_tokens: usize) -> usize {
        self.scheduler.positions_needed(prompt_len, max_new_tokens)
    }

    /// Counters: queued, running, batch_size, tokens_generated, alerts, steer_switches, steps,
    /// tokens_in_flight, max_tokens_in_flight.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.scheduler.stats();
        let d = PyDict::new(py);
        d.set_item("queued", s.queued)?;
        d.set_item("running", s.running)?;
        d.set_item("batch_size", s.batch_size)?;
        d.set_item("tokens_generated", s.tokens_generated)?;
        d.set_item("alerts", s.alerts)?;
        d.set_item("steer_switches", s.steer_switches)?;
        d.set_item("steps", s.steps)?;
        d.set_item("tokens_in_flight", s.tokens_in_flight)?;
        d.set_item("max_tokens_in_flight", s.max_tokens_in_flight)?;
        Ok(d)
    }
}
