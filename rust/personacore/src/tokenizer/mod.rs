//! Tokenizers and chat templates.
//!
//! A [`Tokenizer`] wraps a HuggingFace `tokenizers::Tokenizer` and comes either from an HF
//! `tokenizer.json` ([`Tokenizer::from_file`], [`load_hf_dir`]) or from GGUF metadata
//! ([`Tokenizer::from_gguf`]: byte-level BPE built the way llama.cpp builds it — see [`gguf`];
//! Gemma's SentencePiece vocabulary built the way transformers builds it — see [`sentencepiece`]).
//! [`chat::ChatTemplate`] renders HF-style Jinja chat templates the way transformers'
//! `apply_chat_template(tokenize=False)` does.

pub mod chat;
pub mod gguf;
pub mod sentencepiece;
pub mod token_bytes;

use std::path::Path;

use crate::error::{Error, Result};

pub use chat::{chat_template_from_gguf, ChatTemplate};
pub use gguf::supported_pre_tokenizers;

/// A text tokenizer: encode/decode plus the ids of the model's BOS and end-of-generation tokens.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// One past the largest id the tokenizer knows (model vocabulary plus added tokens).
    vocab_size: usize,
    bos: Option<(String, u32)>,
    eos_ids: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("bos", &self.bos)
            .field("eos_ids", &self.eos_ids)
            .finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Wraps a built `tokenizers::Tokenizer`; `n_tokens` is a lower bound for the vocabulary
    /// size (the GGUF token count), the real size also counts every added token's id.
    pub(crate) fn from_parts(
        inner: tokenizers::Tokenizer,
        n_tokens: usize,
        bos: Option<(String, u32)>,
        eos_ids: Vec<u32>,
    ) -> Self {
        let max_id = inner.get_vocab(true).values().copied().max();
        let vocab_size = max_id.map_or(0, |m| m as usize + 1).max(n_tokens);
        Tokenizer { inner, vocab_size, bos, eos_ids }
    }

    /// Load an HF `tokenizer.json` file. BOS/EOS are unset; see [`Tokenizer::set_special_tokens`]
    /// (or use [`load_hf_dir`], which reads them from the directory's config files).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        // tokenizers panics on some malformed files instead of returning an error (its decoder
        // deserializer ends in `.expect("Helper")`; found by fuzzing): such a file is a bad
        // tokenizer.json, not a bug of ours, so the panic becomes a Tokenizer error.
        let parsed = std::panic::catch_unwind(|| text.parse::<tokenizers::Tokenizer>()).map_err(|panic| {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Error::Tokenizer(format!("cannot parse {}: the tokenizers library failed on it ({what})", path.display()))
        })?;
        let inner = parsed.map_err(|e| Error::Tokenizer(format!("cannot parse {}: {e}", path.display())))?;
        Ok(Self::from_parts(inner, 0, None, Vec::new()))
    }

    /// Build from GGUF metadata (`tokenizer.ggml.*`): byte-level BPE (`gpt2` model) with the
    /// pre-tokenizer regexes chosen by `tokenizer.ggml.pre`, as llama.cpp does (see [`gguf`] for
    /// the supported pre-tokenizer types and the exact rules), or a Gemma SentencePiece
    /// vocabulary (`llama` model) built as transformers builds it (see [`sentencepiece`]).
    pub fn from_gguf(content: &candle_core::quantized::gguf_file::Content) -> Result<Self> {
        gguf::tokenizer_from_gguf(content)
    }

    /// The tokenizer of a GGUF file: a `tokenizer.json` beside it (`<file stem>.tokenizer.json`,
    /// else `tokenizer.json` in its directory) when there is one, with the GGUF's BOS and end
    /// tokens; otherwise built from the GGUF metadata ([`Tokenizer::from_gguf`]).
    pub fn for_gguf(path: &Path, content: &candle_core::quantized::gguf_file::Content) -> Result<Self> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        let beside = [dir.join(format!("{stem}.tokenizer.json")), dir.join("tokenizer.json")];
        let Some(json) = beside.iter().find(|p| p.is_file()) else {
            return Self::from_gguf(content);
        };
        let mut tok = Self::from_file(json)?;
        let tokens = gguf::gguf_tokens(content)?;
        let n = tokens.len();
        let name = |key: &str| -> Result<Option<String>> {
            Ok(gguf::meta_token_id(content, key, n)?.map(|id| tokens[id as usize].to_string()))
        };
        let bos = name("tokenizer.ggml.bos_token_id")?;
        let mut eos = Vec::new();
        for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            eos.extend(name(key)?);
        }
        tok.set_special_tokens(bos, eos)?;
        Ok(tok)
    }

    /// Token ids of `text`. With `add_special_tokens`, the tokenizer's post-processor adds its
    /// tokens (for a GGUF with `tokenizer.ggml.add_bos_token=true`, a leading BOS). Special-token
    /// text such as `<|im_start|>` in `text` always maps to its single id.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; special tokens are dropped when `skip_special_tokens`. Ids at or above
    /// [`Tokenizer::vocab_size`] are an `InvalidInput` error.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        if let Some((i, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= self.vocab_size) {
            return Err(Error::input(format!(
                "token id {id} at index {i} is out of range (vocab size {})",
                self.vocab_size
            )));
        }
        self.inner.decode(ids, skip_special_tokens).map_err(tok_err)
    }

    /// Id of a token string (the vocabulary form, e.g. `Ġthe` for a byte-level BPE), if any.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The bytes token `id` stands for (see [`token_bytes::token_bytes`]); `None` for an unknown id.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        token_bytes::token_bytes(&self.inner, id)
    }

    /// Vocabulary string of an id, if the id exists.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of token ids, including added tokens (one past the largest id).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The beginning-of-sequence token and its id, if the model has one.
    pub fn bos_token(&self) -> Option<(String, u32)> {
        self.bos.clone()
    }

    /// Ids that end generation: the GGUF's eos (+ eot/eom) ids, or for HF directories the ids
    /// set by [`Tokenizer::set_special_tokens`] plus `generation_config.json`'s `eos_token_id`.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Set the BOS token and the end-of-generation tokens by their strings (used for HF
    /// directories). A string not in the vocabulary is a `Tokenizer` error.
    pub fn set_special_tokens(&mut self, bos: Option<String>, eos: Vec<String>) -> Result<()> {
        let lookup = |what: &str, t: &str| {
            self.token_to_id(t).ok_or_else(|| Error::Tokenizer(format!("{what} token '{t}' is not in the vocabulary")))
        };
        let bos = match bos {
            Some(b) => {
                let id = lookup("bos", &b)?;
                Some((b, id))
            }
            None => None,
        };
        let mut eos_ids = Vec::with_capacity(eos.len());
        for e in &eos {
            let id = lookup("eos", e)?;
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        self.bos = bos;
        self.eos_ids = eos_ids;
        Ok(())
    }

    /// Append end-of-generation ids (deduplicated); ids out of range are a `Tokenizer` error.
    pub(crate) fn add_eos_ids(&mut self, ids: &[u32]) -> Result<()> {
        for &id in ids {
            if id as usize >= self.vocab_size {
                return Err(Error::Tokenizer(format!(
                    "eos token id {id} is out of range (vocab size {})",
                    self.vocab_size
                )));
            }
            if !self.eos_ids.contains(&id) {
                self.eos_ids.push(id);
            }
        }
        Ok(())
    }

    /// Serialize as an HF `tokenizer.json` string (pretty-printed).
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(true).map_err(tok_err)
    }

    /// The wrapped `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    };
    serde_json::from_str(&text).map(Some).map_err(|e| Error::Tokenizer(format!("cannot parse {}: {e}", path.display())))
}

/// A special token in tokenizer_config.json: a string, `{"content": ...}`, or null.
fn config_token(cfg: &serde_json::Value, key: &str) -> Result<Option<String>> {
    match cfg.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => match v.get("content").and_then(|c| c.as_str()) {
            Some(s) => Ok(Some(s.to_string())),
            None => Err(Error::Tokenizer(format!(
                "tokenizer_config.json: '{key}' must be a string or {{\"content\": ...}}, got {v}"
            ))),
        },
    }
}

/// The chat template in tokenizer_config.json: a string, or a list of `{name, template}`
/// from which the one named "default" is taken (none named so: no template).
fn config_chat_template(cfg: &serde_json::Value) -> Result<Option<String>> {
    let bad = |v: &serde_json::Value| {
        Error::ChatTemplate(format!(
            "tokenizer_config.json: 'chat_template' must be a string or a list of {{name, template}}, got {v}"
        ))
    };
    match cfg.get("chat_template") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Array(list)) => {
            for item in list {
                let name = item.get("name").and_then(|n| n.as_str()).ok_or_else(|| bad(item))?;
                let tmpl = item.get("template").and_then(|t| t.as_str()).ok_or_else(|| bad(item))?;
                if name == "default" {
                    return Ok(Some(tmpl.to_string()));
                }
            }
            Ok(None)
        }
        Some(v) => Err(bad(v)),
    }
}

/// Reads an HF model directory's tokenizer files: `tokenizer.json` (required), and from
/// `tokenizer_config.json`: `bos_token` / `eos_token` (string or `{"content": ...}`),
/// `chat_template` (a string, or a list of `{name, template}` -> the one named "default"), or
/// `chat_template.jinja` if present (it wins). `generation_config.json`'s `eos_token_id` (int or
/// list) adds eos ids if present.
pub fn load_hf_dir(dir: &Path) -> Result<(Tokenizer, Option<ChatTemplate>)> {
    if !dir.is_dir() {
        return Err(Error::NotFound(dir.to_path_buf()));
    }
    let mut tok = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
    let cfg = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(serde_json::Value::Null);
    let bos = config_token(&cfg, "bos_token")?;
    let eos = config_token(&cfg, "eos_token")?;
    tok.set_special_tokens(bos.clone(), eos.iter().cloned().collect())?;

    let gen_path = dir.join("generation_config.json");
    if let Some(gen) = read_json(&gen_path)? {
        let bad = || {
            Error::Tokenizer(format!(
                "{}: 'eos_token_id' must be a non-negative integer or a list of them",
                gen_path.display()
            ))
        };
        let to_id = |v: &serde_json::Value| v.as_u64().and_then(|x| u32::try_from(x).ok()).ok_or_else(bad);
        let ids: Vec<u32> = match gen.get("eos_token_id") {
            None | Some(serde_json::Value::Null) => Vec::new(),
            Some(serde_json::Value::Array(a)) => a.iter().map(to_id).collect::<Result<_>>()?,
            Some(v) => vec![to_id(v)?],
        };
        tok.add_eos_ids(&ids)?;
    }

    let jinja_path = dir.join("chat_template.jinja");
    let source = match std::fs::read_to_string(&jinja_path) {
        Ok(s) => Some(s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => config_chat_template(&cfg)?,
        Err(e) => return Err(Error::io(&jinja_path, e)),
    };
    let template = match source {
        Some(s) => Some(ChatTemplate::new(&s, bos, eos)?),
        None => None,
    };
    Ok((tok, template))
}

/// Paths of the test data shared by the tokenizer tests.
#[cfg(test)]
pub(crate) mod testdata {
    use std::path::PathBuf;

    const GGUF_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

    /// The default SmolLM2 GGUF: `$PERSONACORE_TEST_GGUF`, else `$PERSONACORE_CACHE/<file>`, else
    /// `~/.cache/personacore/<file>`. Panics (fails the test) with fetch instructions if absent.
    pub fn gguf_path() -> PathBuf {
        let mut tried = Vec::new();
        if let Some(p) = std::env::var_os("PERSONACORE_TEST_GGUF") {
            tried.push(PathBuf::from(p));
        }
        if let Some(c) = std::env::var_os("PERSONACORE_CACHE") {
            tried.push(PathBuf::from(c).join(GGUF_FILE));
        }
        if let Some(h) = std::env::var_os("HOME") {
            tried.push(PathBuf::from(h).join(".cache/personacore").join(GGUF_FILE));
        }
        match tried.iter().find(|p| p.is_file()) {
            Some(p) => p.clone(),
            None => panic!(
                "test GGUF {GGUF_FILE} not found (tried {tried:?}); fetch it with \
                 `python -m personacore fetch-default` or set PERSONACORE_TEST_GGUF to its path"
            ),
        }
    }

    /// The GGUF's metadata.
    pub fn gguf_content() -> candle_core::quantized::gguf_file::Content {
        let path = gguf_path();
        let mut f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path:?}: {e}"));
        candle_core::quantized::gguf_file::Content::read(&mut f).unwrap_or_else(|e| panic!("read {path:?}: {e}"))
    }

    /// A file from the reference data: `<workspace>/tests/data/<name>`, else
    /// `/work/shared/reference/<name>`. Panics if absent.
    pub fn reference_file(name: &str) -> PathBuf {
        let ws = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data").join(name);
        let shared = PathBuf::from("/work/shared/reference").join(name);
        [ws.clone(), shared.clone()]
            .into_iter()
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("reference file {name} not found in {ws:?} or {shared:?}"))
    }

    /// The transformers-built tokenizer of the SmolLM2 GGUF (the test oracle).
    pub fn oracle() -> tokenizers::Tokenizer {
        let p = reference_file("smollm2_tokenizer.json");
        tokenizers::Tokenizer::from_file(&p).unwrap_or_else(|e| panic!("load {p:?}: {e}"))
    }
}
