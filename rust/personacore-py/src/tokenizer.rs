//! `personacore._core.Tokenizer`: the model's tokenizer.

use std::sync::Arc;

use pyo3::prelude::*;

use crate::errors::guarded;

/// The tokenizer of a loaded model (shares the model's memory).
#[pyclass(module = "personacore._core", name = "Tokenizer", frozen)]
pub struct PyTokenizer {
    pub(crate) model: Arc<personacore::Model>,
}

impl PyTokenizer {
    fn tok(&self) -> &personacore::tokenizer::Tokenizer {
        &self.model.tokenizer
    }
}

#[pymethods]
impl PyTokenizer {
    /// Token ids of `text`.
    #[pyo3(signature = (text, add_special_tokens=false))]
    fn encode(&self, py: Python<'_>, text: String, add_special_tokens: bool) -> PyResult<Vec<u32>> {
        crate::errors::detached(py, || self.tok().encode(&text, add_special_tokens))
    }

    /// Text of `ids` (each in `[0, vocab_size)`).
    #[pyo3(signature = (ids, skip_special_tokens=false))]
    fn decode(&self, ids: Vec<i64>, skip_special_tokens: bool) -> PyResult<String> {
        let tok = self.tok();
        guarded(|| tok.decode(&personacore::requests::token_ids(&ids, "ids", tok.vocab_size())?, skip_special_tokens))
    }

    /// Id of a token string, if it is in the vocabulary.
    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tok().token_to_id(token)
    }

    /// Token string of an id, if it exists.
    fn id_to_token(&self, id: u32) -> Option<String> {
        self.tok().id_to_token(id)
    }

    /// The bytes a token stands for (a split character's piece included), if the id exists.
    fn token_bytes<'py>(&self, py: Python<'py>, id: u32) -> Option<Bound<'py, pyo3::types::PyBytes>> {
        self.tok().token_bytes(id).map(|b| pyo3::types::PyBytes::new(py, &b))
    }

    /// Number of tokens, added tokens included.
    #[getter]
    fn vocab_size(&self) -> usize {
        self.tok().vocab_size()
    }

    /// Ids that end generation.
    #[getter]
    fn eos_token_ids(&self) -> Vec<u32> {
        self.tok().eos_token_ids().to_vec()
    }

    /// Beginning-of-sequence id, if any.
    #[getter]
    fn bos_token_id(&self) -> Option<u32> {
        self.tok().bos_token().map(|(_, id)| id)
    }
}
