//! Python bindings of the personacore engine: the private module `personacore._core`.
//! Each file mirrors a core module; the public API is written in Python on top of it.

mod errors;
mod generation;
mod model;
mod tensors;
mod tokenizer;

use pyo3::prelude::*;

/// Number of CPU threads the engine computes with.
#[pyfunction]
fn num_threads() -> usize {
    candle_core::utils::get_num_threads()
}

/// Whether the engine's CPU kernels were compiled with AVX2.
#[pyfunction]
fn avx2_enabled() -> bool {
    personacore::avx2_enabled()
}

/// Whether `precision="high"` changes anything here (AMX-BF16 present and usable).
#[pyfunction]
fn amx_available() -> bool {
    personacore::MatmulPrecision::high_available()
}

/// The native module.
#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    personacore::init_threads();
    m.add_function(wrap_pyfunction!(model::load_model, m)?)?;
    m.add_function(wrap_pyfunction!(avx2_enabled, m)?)?;
    m.add_function(wrap_pyfunction!(amx_available, m)?)?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    m.add_class::<model::PyModel>()?;
    m.add_class::<tokenizer::PyTokenizer>()?;
    m.add_class::<generation::PySession>()?;
    Ok(())
}
