//! Requests as a caller (the Python binding) hands them over: plain integers, floats, strings and
//! the steering/monitor specs of [`crate::hooks::spec`]. Each is checked here, once, with an
//! `InvalidInput` error naming the argument, and turned into what the engine runs (token ids,
//! [`LoadOptions`], [`GenerateParams`], a [`Session`], pooled tensors).

use std::path::PathBuf;
use std::sync::{Arc, OnceLock, Weak};

use candle_core::{DType, Device, DeviceLocation, Tensor};

use crate::bail_input;
use crate::error::{Error, Result};
use crate::fingerprint::vector_sha256;
use crate::generation::{AuditFsync, AuditSpec, GenerateParams, SamplingParams, Session};
use crate::hooks::spec::{InterventionSpec, MonitorSpec, ResolvedMonitor};
use crate::hooks::Steering;
use crate::nn::MatmulPrecision;
use crate::pipeline::{parse_device, parse_dtype, LoadOptions, Model, Pooling};

/// The error for token id `id` at `pos` of `what`, outside `[0, vocab)`.
pub fn id_out_of_range(what: &str, pos: usize, id: i64, vocab: usize) -> Error {
    Error::input(format!("{what}[{pos}] = {id} is out of range: token ids must be in [0, {vocab})"))
}

/// Token ids as given (any integers) as engine ids, each in `[0, vocab)`.
pub fn token_ids(ids: &[i64], what: &str, vocab: usize) -> Result<Vec<u32>> {
    ids.iter()
        .enumerate()
        .map(|(pos, &id)| {
            u32::try_from(id)
                .ok()
                .filter(|&v| (v as usize) < vocab)
                .ok_or_else(|| id_out_of_range(what, pos, id, vocab))
        })
        .collect()
}

/// How to load a model, by name: `dtype` (see [`parse_dtype`]), `device` (see [`parse_device`]),
/// `precision` (`"highest"` or `"high"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadRequest {
    /// Compute dtype name or alias.
    pub dtype: String,
    /// Device name.
    pub device: String,
    /// Keep GGUF weights quantized.
    pub quantized: bool,
    /// Matmul precision name.
    pub precision: String,
    /// A chat template replacing the model's own.
    pub chat_template: Option<String>,
}

impl LoadRequest {
    /// The load options it names.
    pub fn options(&self) -> Result<LoadOptions> {
        Ok(LoadOptions {
            dtype: parse_dtype(&self.dtype)?,
            quantized: self.quantized,
            device: parse_device(&self.device)?,
            precision: MatmulPrecision::parse(&self.precision)?,
            chat_template: self.chat_template.clone(),
        })
    }
}

/// The canonical name of a compute dtype: `f32`, `f16`, `bf16` (others by candle's name).
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => other.as_str(),
    }
}

/// The canonical name of a device: `cpu`, `cuda:N`, `metal:N`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        DeviceLocation::Cpu => "cpu".to_string(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Steerings for one forward pass (`hidden_states`, `logits`): unconditional, one sequence.
pub fn forward_steerings(model: &Model, specs: &[InterventionSpec]) -> Result<Vec<Steering>> {
    specs.iter().map(|s| s.resolve(model, &[0], 1, None)).collect()
}

/// Parses pooling names, dropping repeats (first occurrence kept).
fn poolings(names: &[String]) -> Result<Vec<(String, Pooling)>> {
    let mut out: Vec<(String, Pooling)> = Vec::new();
    for name in names {
        let p = Pooling::parse(name)?;
        if !out.iter().any(|(_, q)| *q == p) {
            out.push((name.clone(), p));
        }
    }
    Ok(out)
}

/// Pools `sequences` (whose first `prompt_lens[i]` tokens are the prompt) as [`Model::pool`] does;
/// returns `(pooling name, [n, num_layers + 1, hidden] tensor)` in the order asked, repeats dropped.
pub fn pool_sequences(
    model: &Model,
    sequences: &[Vec<i64>],
    prompt_lens: &[usize],
    pooling_names: &[String],
    batch_size: i64,
    layers: Option<&[i64]>,
) -> Result<Vec<(String, Tensor)>> {
    let vocab = model.config().vocab_size;
    let seqs = sequences
        .iter()
        .enumerate()
        .map(|(i, s)| token_ids(s, &format!("sequences[{i}]"), vocab))
        .collect::<Result<Vec<_>>>()?;
    pool_ids(model, &seqs, prompt_lens, pooling_names, batch_size, layers)
}

/// Capture rows named by `layers` (each in `0..=num_layers`, at least one), in their order.
fn pool_rows(model: &Model, layers: &[i64]) -> Result<Vec<usize>> {
    let n = model.config().num_layers;
    if layers.is_empty() {
        bail_input!("layers is empty: give at least one layer to pool at, or None for all");
    }
    layers
        .iter()
        .map(|&l| match usize::try_from(l) {
            Ok(r) if r <= n => Ok(r),
            _ => Err(Error::input(format!("layer {l} is outside 0..={n} (the model's capture rows)"))),
        })
        .collect()
}

fn pool_ids(
    model: &Model,
    seqs: &[Vec<u32>],
    prompt_lens: &[usize],
    pooling_names: &[String],
    batch_size: i64,
    layers: Option<&[i64]>,
) -> Result<Vec<(String, Tensor)>> {
    let kinds = poolings(pooling_names)?;
    if batch_size < 1 {
        bail_input!("batch_size must be an int >= 1, got {batch_size}");
    }
    let rows = layers.map(|l| pool_rows(model, l)).transpose()?;
    let only: Vec<Pooling> = kinds.iter().map(|(_, p)| *p).collect();
    let out = model.pool(seqs, prompt_lens, &only, batch_size as usize, rows.as_deref())?;
    Ok(kinds.into_iter().map(|(n, _)| n).zip(out).collect())
}

/// Pooled activations of (prompt, response) token-id pairs (see [`Model::pool`]): the checks
/// name `prompts[i]` / `responses[i]`.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolRequest {
    /// Prompt ids, one list per sample.
    pub prompts: Vec<Vec<i64>>,
    /// Response ids, one list per sample.
    pub responses: Vec<Vec<i64>>,
    /// `response_avg`, `prompt_avg`, `prompt_last`.
    pub poolings: Vec<String>,
    /// Sequences per forward pass (>= 1).
    pub batch_size: i64,
    /// Capture rows to pool at, in this order (`None`: all `num_layers + 1`).
    pub layers: Option<Vec<i64>>,
}

impl PoolRequest {
    /// Checks the request and pools: `(pooling name, [n, num_layers + 1, hidden])` per pooling.
    pub fn run(&self, model: &Model) -> Result<Vec<(String, Tensor)>> {
        let (np, nr) = (self.prompts.len(), self.responses.len());
        if np != nr {
            bail_input!("prompts and responses must have the same length: got {np} prompts and {nr} responses");
        }
        if np == 0 {
            bail_input!("prompts is empty: at least one (prompt, response) pair is needed");
        }
        let kinds = poolings(&self.poolings)?;
        let (vocab, ctx) = (model.config().vocab_size, model.config().max_position_embeddings);
        let (mut seqs, mut lens) = (Vec::with_capacity(np), Vec::with_capacity(np));
        for (k, (p, r)) in self.prompts.iter().zip(&self.responses).enumerate() {
            let mut ids = token_ids(p, &format!("prompts[{k}]"), vocab)?;
            if ids.is_empty() {
                bail_input!("prompts[{k}] is empty: a prompt needs at least one token");
            }
            let response = token_ids(r, &format!("responses[{k}]"), vocab)?;
            if response.is_empty() && kinds.iter().any(|(_, p)| *p == Pooling::ResponseAvg) {
                bail_input!("responses[{k}] is empty: 'response_avg' needs at least one response token");
            }
            lens.push(ids.len());
            ids.extend(response);
            if ids.len() > ctx {
                bail_input!(
                    "sample {k} has {} tokens, more than the model's max_position_embeddings ({ctx})",
                    ids.len()
                );
            }
            seqs.push(ids);
        }
        pool_ids(model, &seqs, &lens, &self.poolings, self.batch_size, self.layers.as_deref())
    }
}

/// Generation settings as given (see [`GenerateParams`]).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateArgs {
    /// Tokens to generate at most (>= 1).
    pub max_new_tokens: i64,
    /// 0 = greedy; finite, >= 0.
    pub temperature: f64,
    /// Nucleus mass in (0, 1].
    pub top_p: f64,
    /// Keep the k most likely tokens (>= 0; 0 = off).
    pub top_k: i64,
    /// Seed in `[0, 2**64 - 1]`.
    pub seed: i128,
    /// Stop strings (each non-empty).
    pub stop: Vec<String>,
    /// Keep going past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// OpenAI presence penalty in [-2, 2].
    pub presence_penalty: f64,
    /// OpenAI frequency penalty in [-2, 2].
    pub frequency_penalty: f64,
    /// `(token id, value)` pairs added to the logits, values in [-100, 100].
    pub logit_bias: Vec<(i64, f64)>,
    /// Top log-probabilities per token, in [0, 20]; `None`: none reported.
    pub logprobs: Option<i64>,
    /// Top log-probabilities per prompt token, in [0, 20]; `None`: none reported.
    pub prompt_logprobs: Option<i64>,
}

impl GenerateArgs {
    /// The engine's parameters; integer ranges are checked here, the floats and stop strings by
    /// [`Session::check_inputs`].
    pub fn params(&self) -> Result<GenerateParams> {
        let max_new_tokens = usize::try_from(self.max_new_tokens).unwrap_or(0);
        if max_new_tokens == 0 {
            bail_input!("max_new_tokens must be an int >= 1, got {}", self.max_new_tokens);
        }
        let Ok(top_k) = usize::try_from(self.top_k) else {
            bail_input!("top_k must be an int >= 0, got {}", self.top_k);
        };
        let Ok(seed) = u64::try_from(self.seed) else {
            bail_input!("seed must be an int in [0, {}], got {}", u64::MAX, self.seed);
        };
        let mut logit_bias = Vec::with_capacity(self.logit_bias.len());
        for &(id, value) in &self.logit_bias {
            let Ok(id) = u32::try_from(id) else {
                bail_input!("logit_bias keys must be token ids >= 0, got {id}");
            };
            logit_bias.push((id, value as f32));
        }
        let top = |k: Option<i64>, what: &str| -> Result<Option<usize>> {
            match k.map(usize::try_from) {
                None => Ok(None),
                Some(Ok(k)) => Ok(Some(k)),
                Some(Err(_)) => bail_input!("{what} must be an int >= 0, got {}", k.unwrap_or_default()),
            }
        };
        let logprobs = top(self.logprobs, "top logprobs")?;
        let prompt_logprobs = top(self.prompt_logprobs, "prompt_logprobs")?;
        Ok(GenerateParams {
            max_new_tokens,
            sampling: SamplingParams {
                temperature: self.temperature as f32,
                top_p: self.top_p as f32,
                top_k,
                presence_penalty: self.presence_penalty as f32,
                frequency_penalty: self.frequency_penalty as f32,
                logit_bias,
            },
            seed,
            stop: self.stop.clone(),
            ignore_eos: self.ignore_eos,
            logprobs,
            prompt_logprobs,
        })
    }
}

/// One steering of a generation: its spec and the batch members it applies to (`None`: all).
#[derive(Debug, Clone, PartialEq)]
pub struct SteerRequest {
    /// The intervention.
    pub spec: InterventionSpec,
    /// Batch indices it applies to.
    pub sequences: Option<Vec<usize>>,
}

/// A monitor checked and resolved for one model once, for any number of requests: its vectors
/// are converted, normalised and laid out for the projection once instead of per request
/// (`pc.Monitor` keeps one per model it is used with). Cloning shares it.
#[derive(Debug, Clone)]
pub struct PreparedMonitor {
    spec: Arc<MonitorSpec>,
    resolved: Arc<ResolvedMonitor>,
    /// The model it was resolved for (compared by address; the weak count keeps that address
    /// from being reused by another model).
    model: Weak<Model>,
    /// `(name, sha256)` of each vector, for audit logs; computed on first use.
    digests: Arc<OnceLock<Vec<(String, String)>>>,
}

impl PreparedMonitor {
    /// Checks and resolves `spec` for `model` (the checks of an unprepared monitor, once).
    pub fn new(spec: MonitorSpec, model: &Arc<Model>) -> Result<Self> {
        let resolved = spec.resolve(model)?;
        Ok(Self {
            spec: Arc::new(spec),
            resolved: Arc::new(resolved),
            model: Arc::downgrade(model),
            digests: Arc::new(OnceLock::new()),
        })
    }

    /// The resolved monitor, if it was prepared for `model`.
    fn resolved_for(&self, model: &Arc<Model>) -> Result<&ResolvedMonitor> {
        if !std::ptr::eq(self.model.as_ptr(), Arc::as_ptr(model)) {
            bail_input!("this monitor was prepared for another model; prepare it for the model in use");
        }
        Ok(&self.resolved)
    }

    /// `(name, sha256)` of each monitored vector.
    fn digests(&self) -> Vec<(String, String)> {
        self.digests.get_or_init(|| monitor_digests(&self.spec)).clone()
    }
}

impl PartialEq for PreparedMonitor {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.resolved, &other.resolved)
    }
}

/// `(name, sha256)` of each vector of a monitor (what an audit log records).
fn monitor_digests(spec: &MonitorSpec) -> Vec<(String, String)> {
    spec.vectors.iter().map(|v| (v.name.clone(), vector_sha256(&v.vector.shape, &v.vector.data))).collect()
}

/// A generation's monitor: a spec checked with the generation, or one prepared before.
#[derive(Debug, Clone, PartialEq)]
pub enum MonitorInput {
    /// Checked and resolved for this generation.
    Spec(MonitorSpec),
    /// Resolved once for the model ([`PreparedMonitor`]).
    Prepared(PreparedMonitor),
}

/// A generation as given: prompts, settings, steerings, a monitor, an audit-log path.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// Prompt ids, one list per sequence.
    pub prompts: Vec<Vec<i64>>,
    /// Settings.
    pub args: GenerateArgs,
    /// Steerings.
    pub steers: Vec<SteerRequest>,
    /// Monitor bank, if any.
    pub monitor: Option<MonitorInput>,
    /// JSONL file events are appended to.
    pub audit_log: Option<PathBuf>,
    /// When it is `fsync`ed: `"request"` (default), `"event"` or `"never"`.
    pub audit_fsync: Option<String>,
}

/// A generation whose every value has been checked; [`PreparedGeneration::start`] allocates it.
#[derive(Clone)]
pub struct PreparedGeneration {
    pub(crate) model: Arc<Model>,
    pub(crate) prompts: Vec<Vec<u32>>,
    pub(crate) params: GenerateParams,
    pub(crate) steerings: Vec<Steering>,
    pub(crate) monitor: Option<ResolvedMonitor>,
    pub(crate) audit: Option<AuditSpec>,
}

impl GenerateRequest {
    /// Checks everything against `model`; computes and allocates nothing.
    pub fn prepare(&self, model: Arc<Model>) -> Result<PreparedGeneration> {
        let vocab = model.config().vocab_size;
        let prompts = self
            .prompts
            .iter()
            .enumerate()
            .map(|(i, p)| token_ids(p, &format!("prompts[{i}]"), vocab))
            .collect::<Result<Vec<_>>>()?;
        let params = self.args.params()?;
        Session::check_inputs(&model, &prompts, &params)?;
        let fsync = self.audit_fsync.as_deref().map(AuditFsync::parse).transpose()?.unwrap_or_default();
        let audit_log = self.audit_log.as_deref().map(audit_path).transpose()?;
        let monitor = match &self.monitor {
            None => None,
            Some(MonitorInput::Spec(spec)) => Some(spec.resolve(&model)?),
            Some(MonitorInput::Prepared(p)) => Some(p.resolved_for(&model)?.clone()),
        };
        let batch = prompts.len();
        let all: Vec<usize> = (0..batch).collect();
        let steerings = self
            .steers
            .iter()
            .map(|s| s.spec.resolve(&model, s.sequences.as_deref().unwrap_or(&all), batch, monitor.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        let audit = audit_log.map(|path| AuditSpec {
            path,
            fsync,
            vectors: match &self.monitor {
                None => Vec::new(),
                Some(MonitorInput::Spec(spec)) => monitor_digests(spec),
                Some(MonitorInput::Prepared(p)) => p.digests(),
            },
            steers: self
                .steers
                .iter()
                .map(|s| (s.spec.name.clone(), vector_sha256(&s.spec.vector.shape, &s.spec.vector.data)))
                .collect(),
        });
        Ok(PreparedGeneration { model, prompts, params, steerings, monitor, audit })
    }
}

/// An audit-log path made absolute: not a directory, in a directory that exists.
fn audit_path(path: &std::path::Path) -> Result<PathBuf> {
    let path = std::path::absolute(path).map_err(|e| Error::io(path, e))?;
    if path.is_dir() {
        bail_input!("audit_log '{}' is a directory; give a file path (JSONL)", path.display());
    }
    match path.parent() {
        Some(parent) if !parent.is_dir() => {
            bail_input!("audit_log directory '{}' does not exist", parent.display())
        }
        _ => Ok(path),
    }
}

impl PreparedGeneration {
    /// Monitor columns `(name, layer)` in score order.
    pub fn columns(&self) -> Vec<(String, usize)> {
        self.monitor.as_ref().map_or(Vec::new(), |m| m.bank.columns.iter().map(|c| (c.name.clone(), c.layer)).collect())
    }

    /// Allocates the session (KV cache, audit log); no forward pass runs yet.
    pub fn start(self) -> Result<Session> {
        let monitor = self.monitor.map(|m| (m.bank, m.thresholds));
        Session::new(self.model, self.prompts, self.params, self.steerings, monitor, self.audit.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_ids_name_the_position() {
        assert_eq!(token_ids(&[0, 9], "ids", 10).unwrap(), vec![0, 9]);
        let msg = token_ids(&[1, -1], "ids", 10).unwrap_err().to_string();
        assert!(msg.contains("ids[1] = -1 is out of range") && msg.contains("[0, 10)"), "{msg}");
        assert!(token_ids(&[10], "ids", 10).is_err());
    }

    #[test]
    fn dtype_aliases_and_names() {
        for (name, dt) in [("fp32", DType::F32), ("half", DType::F16), ("BFloat16", DType::BF16)] {
            assert_eq!(parse_dtype(name).unwrap(), dt);
        }
        assert!(parse_dtype("f64").unwrap_err().to_string().contains("'f64'"));
        assert_eq!(dtype_name(parse_dtype("float16").unwrap()), "f16");
        assert_eq!(device_name(&parse_device(" CPU ").unwrap()), "cpu");
        assert!(parse_device("tpu").unwrap_err().to_string().contains("'tpu'"));
    }

    #[test]
    fn generate_args_ranges() {
        let ok = GenerateArgs {
            max_new_tokens: 4,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            stop: vec![],
            ignore_eos: false,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: vec![],
            logprobs: None,
            prompt_logprobs: None,
        };
        assert_eq!(ok.params().unwrap().max_new_tokens, 4);
        let p = GenerateArgs { logit_bias: vec![(5, -100.0)], logprobs: Some(3), ..ok.clone() }.params().unwrap();
        assert_eq!((p.sampling.logit_bias, p.logprobs), (vec![(5, -100.0)], Some(3)));
        for (bad, word) in [
            (GenerateArgs { max_new_tokens: 0, ..ok.clone() }, "max_new_tokens"),
            (GenerateArgs { top_k: -1, ..ok.clone() }, "top_k"),
            (GenerateArgs { seed: -1, ..ok.clone() }, "seed"),
            (GenerateArgs { logit_bias: vec![(-1, 1.0)], ..ok.clone() }, "logit_bias"),
            (GenerateArgs { logprobs: Some(-2), ..ok.clone() }, "logprobs"),
            (GenerateArgs { prompt_logprobs: Some(-1), ..ok.clone() }, "prompt_logprobs"),
        ] {
            assert!(bad.params().unwrap_err().to_string().contains(word));
        }
    }
}
