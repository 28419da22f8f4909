//! Engine errors to Python exceptions: one exhaustive `match` on [`personacore::Error`] over the
//! classes of `personacore.errors`, fetched once when the module is initialised.
//!
//! The classes are defined in Python (python/personacore/errors.py), not with `create_exception!`:
//! each derives from two bases (e.g. `ModelNotFoundError(PersonacoreError, FileNotFoundError)`) so
//! that plain `except FileNotFoundError` code keeps working, and `create_exception!` takes one base.

use pyo3::exceptions::PyBaseException;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

use personacore::Error;

/// The exception class of every engine error variant, plus `InternalError` for caught panics.
struct Classes {
    not_found: Py<PyType>,
    io: Py<PyType>,
    invalid_model_file: Py<PyType>,
    config: Py<PyType>,
    unsupported_architecture: Py<PyType>,
    tokenizer: Py<PyType>,
    chat_template: Py<PyType>,
    invalid_input: Py<PyType>,
    compute: Py<PyType>,
    internal: Py<PyType>,
}

static CLASSES: PyOnceLock<Classes> = PyOnceLock::new();

impl Classes {
    fn load(py: Python<'_>) -> PyResult<Self> {
        let module = py.import("personacore.errors")?;
        let class = |name: &str| -> PyResult<Py<PyType>> { Ok(module.getattr(name)?.cast_into::<PyType>()?.unbind()) };
        Ok(Self {
            not_found: class("ModelNotFoundError")?,
            io: class("PersonacoreIOError")?,
            invalid_model_file: class("InvalidModelFileError")?,
            config: class("ConfigError")?,
            unsupported_architecture: class("UnsupportedArchitectureError")?,
            tokenizer: class("TokenizerError")?,
            chat_template: class("ChatTemplateError")?,
            invalid_input: class("InvalidInputError")?,
            compute: class("ComputeError")?,
            internal: class("InternalError")?,
        })
    }

    /// The class of `e`; a new variant fails to compile here until it is mapped.
    fn of(&self, e: &Error) -> &Py<PyType> {
        match e {
            Error::NotFound(_) => &self.not_found,
            Error::Io { .. } => &self.io,
            Error::InvalidModelFile { .. } => &self.invalid_model_file,
            Error::Config(_) => &self.config,
            Error::UnsupportedArchitecture(_) => &self.unsupported_architecture,
            Error::Tokenizer(_) => &self.tokenizer,
            Error::ChatTemplate(_) => &self.chat_template,
            Error::InvalidInput(_) => &self.invalid_input,
            Error::Compute(_) => &self.compute,
        }
    }
}

/// Fetches the exception classes (called once, at module initialisation).
pub fn init(py: Python<'_>) -> PyResult<()> {
    CLASSES.get_or_try_init(py, || Classes::load(py)).map(|_| ())
}

/// `class(msg)` for the class `pick` chooses; an import failure of the classes is raised instead.
fn raise(pick: impl FnOnce(&Classes) -> &Py<PyType>, msg: String) -> PyErr {
    Python::attach(|py| match CLASSES.get_or_try_init(py, || Classes::load(py)) {
        Ok(classes) => PyErr::from_type(pick(classes).bind(py).clone(), msg),
        Err(e) => e,
    })
}

/// Converts an engine error to its Python exception.
pub fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    raise(|c| c.of(&e), msg)
}

/// An `InvalidInputError` for an argument of the wrong type (met while converting, before the engine).
pub fn invalid_input(msg: impl std::fmt::Display) -> PyErr {
    to_py(Error::input(msg))
}

/// The `InternalError` for a caught panic.
fn internal(panic: Box<dyn std::any::Any + Send>) -> PyErr {
    let what = panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".to_string());
    raise(|c| &c.internal, format!("internal error in the engine (please report): {what}"))
}

/// Runs `f`, turning engine errors and panics into Python exceptions (no panic crosses into Python).
pub fn guarded<T>(f: impl FnOnce() -> personacore::Result<T>) -> PyResult<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(internal)?.map_err(to_py)
}

/// Runs `f` with the GIL released, guarded as in [`guarded`].
pub fn detached<T: Send>(py: Python<'_>, f: impl FnOnce() -> personacore::Result<T> + Send) -> PyResult<T> {
    py.detach(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))).map_err(internal)?.map_err(to_py)
}

/// One exception per engine error variant (from `personacore::Error::samples`), then the one a
/// caught panic becomes: what tests check the map with.
#[pyfunction]
pub fn _error_samples(py: Python<'_>) -> Vec<Py<PyBaseException>> {
    let mut out: Vec<PyErr> = Error::samples().into_iter().map(to_py).collect();
    out.extend(guarded(|| -> personacore::Result<()> { panic!("sample panic") }).err());
    out.into_iter().map(|e| e.into_value(py)).collect()
}
