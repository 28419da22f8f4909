//! Maps engine errors (and caught panics) to the Python exception classes defined in
//! `personacore.errors`, looked up by name so the hierarchy lives in Python.

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyType;

/// The Python class name for an engine error kind.
fn class_name(kind: &str) -> &'static str {
    match kind {
        "NotFound" => "ModelNotFoundError",
        "Io" => "PersonacoreIOError",
        "InvalidModelFile" => "InvalidModelFileError",
        "Config" => "ConfigError",
        "UnsupportedArchitecture" => "UnsupportedArchitectureError",
        "Tokenizer" => "TokenizerError",
        "ChatTemplate" => "ChatTemplateError",
        "InvalidInput" => "InvalidInputError",
        "Compute" => "ComputeError",
        _ => "InternalError",
    }
}

/// Builds the `personacore.errors.<class>` exception carrying `msg`.
fn py_error(class: &str, msg: String) -> PyErr {
    Python::attach(|py| {
        let cls = py
            .import("personacore.errors")
            .and_then(|m| m.getattr(class))
            .and_then(|c| c.cast_into::<PyType>().map_err(PyErr::from));
        match cls {
            Ok(cls) => PyErr::from_type(cls, msg),
            Err(_) => PyRuntimeError::new_err(format!("{class}: {msg}")),
        }
    })
}

/// Converts an engine error to its Python exception.
pub fn to_py(e: personacore::Error) -> PyErr {
    py_error(class_name(e.kind()), e.to_string())
}

/// Runs `f`, turning engine errors and panics into Python exceptions (no panic crosses into Python).
pub fn guarded<T>(f: impl FnOnce() -> personacore::Result<T>) -> PyResult<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(to_py(e)),
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(py_error("InternalError", format!("internal error in the engine (please report): {what}")))
        }
    }
}

/// Runs `f` with the GIL released, guarded as in [`guarded`].
pub fn detached<T: Send>(py: Python<'_>, f: impl FnOnce() -> personacore::Result<T> + Send) -> PyResult<T> {
    py.detach(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)))
        .map_err(|p| {
            let what = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
            py_error(
                "InternalError",
                format!("internal error in the engine (please report): {}", what.unwrap_or_default()),
            )
        })?
        .map_err(to_py)
}
