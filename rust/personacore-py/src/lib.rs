//! Python bindings of the personacore engine: the private module `personacore._core`.
//! The binding only converts: typed argument structs in (args.rs), the GIL released around the
//! engine call, numpy arrays and dicts out, one error map (errors.rs). Every value is checked in
//! the engine. The contract is written down in python/personacore/_core.pyi.

mod args;
mod errors;
mod generation;
mod model;
mod serving;
mod tensors;
mod tokenizer;

use pyo3::prelude::*;

/// Number of CPU threads the engine computes with.
#[pyfunction]
fn num_threads() -> usize {
    candle_core::utils::get_num_threads()
}

/// Whether this CPU has AVX2 (detected at run time): candle's vectorised CPU kernels are in use.
#[pyfunction]
fn avx2_enabled() -> bool {
    personacore::avx2_enabled()
}

/// Whether `precision="high"` changes anything here (AMX-BF16 present and usable).
#[pyfunction]
fn amx_available() -> bool {
    personacore::MatmulPrecision::high_available()
}

/// Whether this build was compiled with CUDA support (the `cuda` feature).
#[pyfunction]
fn cuda_compiled() -> bool {
    personacore::cuda_compiled()
}

/// Whether `device="cuda"` works here: a CUDA build, and the driver and CUDA libraries load and
/// open device 0.
#[pyfunction]
fn cuda_available(py: Python<'_>) -> bool {
    py.detach(personacore::cuda_available)
}

/// The native module.
#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    personacore::init_threads();
    personacore::keep_freed_buffers();
    errors::init(m.py())?;
    m.add_function(wrap_pyfunction!(model::load_model, m)?)?;
    m.add_function(wrap_pyfunction!(args::check_intervention, m)?)?;
    m.add_function(wrap_pyfunction!(args::resolve_intervention, m)?)?;
    m.add_function(wrap_pyfunction!(args::check_when, m)?)?;
    m.add_function(wrap_pyfunction!(args::check_monitor, m)?)?;
    m.add_function(wrap_pyfunction!(errors::_error_samples, m)?)?;
    m.add_function(wrap_pyfunction!(avx2_enabled, m)?)?;
    m.add_function(wrap_pyfunction!(amx_available, m)?)?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_compiled, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_available, m)?)?;
    m.add_class::<model::PyModel>()?;
    m.add_class::<tokenizer::PyTokenizer>()?;
    m.add_class::<model::PySteerings>()?;
    m.add_class::<model::PyPreparedMonitor>()?;
    m.add_class::<generation::PySession>()?;
    m.add_class::<generation::PyGenerationPlan>()?;
    m.add_class::<serving::PyScheduler>()?;
    Ok(())
}
