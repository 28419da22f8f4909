//! A loaded model with its tokenizer and chat template (what mistral.rs calls a pipeline): the
//! engine's entry point. `hidden_states`, `logits` and `pool` return rows `0..=num_layers` (see
//! docs/conventions.md, Layers).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::config::{Architecture, DecoderConfig};
use crate::error::{Error, Result};
use crate::hooks::{HiddenStates, HookChain, HookPlan, PooledMeans, Steering};
use crate::models::{ForwardInput, LogitsMode, Transformer};
use crate::nn::MatmulPrecision;
use crate::tokenizer::{self, chat::ChatTemplate, Tokenizer};
use crate::weights::gguf::{GgufFile, GgufWeights};
use crate::weights::safetensors::SafetensorsWeights;

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Compute dtype: `f32` (parity with transformers), `f16`, or `bf16` (GPU only).
    pub dtype: DType,
    /// Keep GGUF weights quantized for the matmuls.
    pub quantized: bool,
    /// Where to compute.
    pub device: Device,
    /// How exactly dense f32 CPU matmuls are computed.
    pub precision: MatmulPrecision,
    /// A Jinja chat template to use instead of the model's own (a base model such as Gemma 3
    /// 270M has none).
    pub chat_template: Option<String>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            quantized: false,
            device: Device::Cpu,
            precision: MatmulPrecision::Highest,
            chat_template: None,
        }
    }
}

/// Parses `"cpu"`, `"cuda"`, `"cuda:N"` (case and surrounding spaces ignored); a CUDA device
/// that this build or this machine cannot open is an input error saying why.
pub fn parse_device(name: &str) -> Result<Device> {
    let key = name.trim().to_lowercase();
    let cuda_index = match key.as_str() {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => Some(0),
        _ => key.strip_prefix("cuda:").and_then(|i| i.parse::<usize>().ok()),
    };
    let Some(i) = cuda_index else {
        return Err(Error::input(format!("unknown device '{name}'; valid devices: 'cpu', 'cuda', 'cuda:N'")));
    };
    open_cuda(i).map_err(|why| Error::input(format!("device '{name}' is not available: {why}")))
}

/// Whether this build can compute on CUDA at all (compiled with the `cuda` feature).
pub fn cuda_compiled() -> bool {
    cfg!(feature = "cuda")
}

/// Whether CUDA device 0 can be used now: a CUDA build ([`cuda_compiled`]) on a machine whose
/// NVIDIA driver and CUDA libraries load and report a device.
pub fn cuda_available() -> bool {
    open_cuda(0).is_ok()
}

/// CUDA device `i`, or why it cannot be opened.
///
/// A build made by scripts/build-cuda.sh loads the driver (`libcuda`) and cuBLAS/cuRAND at run
/// time, and cudarc panics when one of them is missing; that panic is caught here (and kept off
/// stderr) so that a machine without a GPU gets an error, not a crash.
fn open_cuda(i: usize) -> std::result::Result<Device, String> {
    if !cuda_compiled() {
        return Err("this build of personacore has no CUDA support (built without the `cuda` feature; \
                    see docs/gpu.md to build one)"
            .into());
    }
    quiet_panics::install();
    let opened = quiet_panics::QUIET.with(|q| {
        q.set(true);
        let opened = std::panic::catch_unwind(|| Device::new_cuda(i));
        q.set(false);
        opened
    });
    match opened {
        Ok(Ok(device)) => Ok(device),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("the CUDA libraries could not be loaded");
            Err(format!("the NVIDIA driver or a CUDA library could not be loaded: {why}"))
        }
    }
}

/// A panic hook that stays silent on a thread while it probes CUDA (and defers to the hook it
/// replaced otherwise), installed once.
mod quiet_panics {
    use std::cell::Cell;
    use std::sync::Once;

    thread_local! {
        /// Set while this thread opens a CUDA device.
        pub(super) static QUIET: Cell<bool> = const { Cell::new(false) };
    }

    /// Wraps the current panic hook (once per process).
    pub(super) fn install() {
        static INSTALL: Once = Once::new();
        INSTALL.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                if !QUIET.with(Cell::get) {
                    previous(info);
                }
            }));
        });
    }
}

/// Parses a dtype name; the one alias table: `f32`/`float32`/`fp32`, `f16`/`float16`/`fp16`/`half`,
/// `bf16`/`bfloat16` (case ignored).
pub fn parse_dtype(name: &str) -> Result<DType> {
    match name.to_lowercase().as_str() {
        "f32" | "float32" | "fp32" => Ok(DType::F32),
        "f16" | "float16" | "fp16" | "half" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        _ => Err(Error::input(format!("unknown dtype '{name}'; valid dtypes: f32, f16, bf16"))),
    }
}

/// The poolings of docs/conventions.md, Poolings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Mean over response tokens.
    ResponseAvg,
    /// Mean over prompt tokens (chat template included).
    PromptAvg,
    /// The last prompt token.
    PromptLast,
}

impl Pooling {
    /// Parses `response_avg`, `prompt_avg`, `prompt_last`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "response_avg" => Ok(Pooling::ResponseAvg),
            "prompt_avg" => Ok(Pooling::PromptAvg),
            "prompt_last" => Ok(Pooling::PromptLast),
            _ => Err(Error::input(format!(
                "unknown pooling '{name}' (expected 'response_avg', 'prompt_avg' or 'prompt_last')"
            ))),
        }
    }

    /// Position weights of one sequence of length `len` whose prompt is `prompt_len` tokens.
    fn weights(&self, len: usize, prompt_len: usize, padded: usize) -> Vec<f32> {
        let mut w = vec![0f32; padded];
        match self {
            Pooling::ResponseAvg => w[prompt_len..len].fill(1.0 / (len - prompt_len) as f32),
            Pooling::PromptAvg => w[..prompt_len].fill(1.0 / prompt_len as f32),
            Pooling::PromptLast => w[prompt_len - 1] = 1.0,
        }
        w
    }
}

/// A model ready to run: weights, tokenizer, chat template.
pub struct Model {
    /// The network.
    pub transformer: Transformer,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Its chat template, if the checkpoint has one.
    pub chat_template: Option<ChatTemplate>,
    /// Whether matmul weights are kept quantized.
    pub quantized: bool,
    /// Where it was loaded from.
    pub source: PathBuf,
    /// How it was loaded.
    pub options: LoadOptions,
    /// `model_sha256` of its files (see [`crate::fingerprint::model_sha256`]), for receipts.
    pub sha256: String,
}

impl Model {
    /// Loads an HF directory (config.json + safetensors + tokenizer.json) or a `.gguf` file.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Self> {
        if !path.exists() {
            return Err(Error::NotFound(path.to_path_buf()));
        }
        if opts.dtype == DType::BF16 && opts.device.is_cpu() {
            return Err(Error::input(
                "dtype 'bf16' is not supported on CPU (candle has no bf16 CPU matmul); use 'f32' or 'f16'",
            ));
        }
        let mut model = if path.is_dir() { Self::load_hf_dir(path, opts)? } else { Self::load_gguf(path, opts)? };
        if let Some(source) = &opts.chat_template {
            let bos = model.tokenizer.bos_token().map(|(t, _)| t);
            let eos = model.tokenizer.eos_token_ids().first().and_then(|&id| model.tokenizer.id_to_token(id));
            model.chat_template = Some(ChatTemplate::new(source, bos, eos)?);
        }
        Ok(model)
    }

    fn load_hf_dir(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let config = DecoderConfig::from_hf_config(&dir.join("config.json"))?;
        let weights = SafetensorsWeights::open_dir(dir, &opts.device)?.with_precision(opts.precision);
        let transformer = Transformer::load(&weights, config, opts.dtype, &opts.device)?;
        let (tokenizer, chat_template) = tokenizer::load_hf_dir(dir)?;
        Ok(Self {
            transformer,
            tokenizer,
            chat_template,
            quantized: false,
            source: dir.to_path_buf(),
            options: opts.clone(),
            sha256: crate::fingerprint::model_sha256(dir)?,
        })
    }

    fn load_gguf(path: &Path, opts: &LoadOptions) -> Result<Self> {
        let mut file = GgufFile::open(path)?;
        let has_output = file.content.tensor_infos.contains_key("output.weight");
        let config = DecoderConfig::from_gguf(&file.content, has_output)?;
        let tokenizer = Tokenizer::for_gguf(path, &file.content)?;
        let chat_template = tokenizer::chat::chat_template_from_gguf(&file.content)?;
        file.release_metadata_arrays();
        // llama.cpp permutes Q/K rows for the llama architecture only.
        let unpermute = (config.architecture == Architecture::Llama).then_some((config.num_heads, config.num_kv_heads));
        let weights = GgufWeights::new(&file, &opts.device, opts.quantized, unpermute).with_precision(opts.precision);
        let transformer = Transformer::load(&weights, config, opts.dtype, &opts.device)?;
        Ok(Self {
            transformer,
            tokenizer,
            chat_template,
            quantized: opts.quantized,
            source: path.to_path_buf(),
            options: opts.clone(),
            sha256: crate::fingerprint::model_sha256(path)?,
        })
    }

    /// The normalized config.
    pub fn config(&self) -> &DecoderConfig {
        &self.transformer.config
    }

    /// Checks token ids: non-empty, each `< vocab_size`, no longer than the context window.
    pub fn check_ids(&self, ids: &[u32], what: &str) -> Result<()> {
        let c = self.config();
        if ids.is_empty() {
            return Err(Error::input(format!("{what} is empty: at least one token id is needed")));
        }
        if let Some((pos, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= c.vocab_size) {
            return Err(crate::requests::id_out_of_range(what, pos, id.into(), c.vocab_size));
        }
        if ids.len() > c.max_position_embeddings {
            return Err(Error::input(format!(
                "{what} has {} tokens, more than the model's max_position_embeddings ({})",
                ids.len(),
                c.max_position_embeddings
            )));
        }
        Ok(())
    }

    /// Inputs for one unpadded sequence.
    fn single_input(&self, ids: &[u32]) -> Result<ForwardInput> {
        let dev = self.transformer.device();
        let t = ids.len();
        Ok(ForwardInput {
            ids: Tensor::new(ids, dev)?.unsqueeze(0)?,
            positions: Tensor::arange(0u32, t as u32, dev)?.unsqueeze(0)?,
            mask: self.transformer.causal_mask(t, 0)?,
        })
    }

    /// A one-sequence hook plan for `steerings` (applied as in a prefill pass).
    fn steering_plan(&self, steerings: Vec<Steering>) -> Result<HookPlan> {
        let t = &self.transformer;
        HookPlan::new(self.config().num_layers, 1, steerings, None, t.dtype(), t.device())
    }

    /// Every layer's residual stream for `ids`, with `steerings` applied:
    /// `[num_layers + 1, len, hidden]` f32.
    pub fn hidden_states(&self, ids: &[u32], steerings: Vec<Steering>) -> Result<Tensor> {
        self.check_ids(ids, "ids")?;
        let mut plan = self.steering_plan(steerings)?;
        let mut cap = HiddenStates::new(self.config().num_layers);
        let mut hooks = HookChain(vec![&mut plan, &mut cap]);
        self.transformer.forward(&self.single_input(ids)?, &mut hooks, None, LogitsMode::None)?;
        Ok(cap.stacked()?.squeeze(1)?)
    }

    /// Logits at every position with `steerings` applied: `[len, vocab]` f32.
    pub fn logits(&self, ids: &[u32], steerings: Vec<Steering>) -> Result<Tensor> {
        self.check_ids(ids, "ids")?;
        let mut plan = self.steering_plan(steerings)?;
        let out = self.transformer.forward(&self.single_input(ids)?, &mut plan, None, LogitsMode::All)?;
        let out = out.ok_or_else(|| Error::Compute("forward returned no logits".into()))?;
        Ok(out.squeeze(0)?)
    }

    /// Pooled activations for sequences `prompt ++ response`, computed inside the forward pass in
    /// padded batches of `batch_size`, at every capture row or only at `rows` (then the forward
    /// stops after the deepest of them). Returns one `[n, rows, hidden]` f32 tensor per requested
    /// pooling, in the order asked (`rows` = `num_layers + 1`, or the selection in its order).
    pub fn pool(
        &self,
        seqs: &[Vec<u32>],
        prompt_lens: &[usize],
        poolings: &[Pooling],
        batch_size: usize,
        rows: Option<&[usize]>,
    ) -> Result<Vec<Tensor>> {
        if seqs.is_empty() {
            return Err(Error::input("no sequences to pool"));
        }
        if seqs.len() != prompt_lens.len() {
            return Err(Error::input(format!("got {} sequences and {} prompt lengths", seqs.len(), prompt_lens.len())));
        }
        if poolings.is_empty() {
            return Err(Error::input("no poolings requested"));
        }
        if batch_size == 0 {
            return Err(Error::input("batch_size must be at least 1"));
        }
        let num_layers = self.config().num_layers;
        let rows: Vec<usize> = rows.map_or_else(|| (0..=num_layers).collect(), <[usize]>::to_vec);
        if rows.is_empty() {
            return Err(Error::input("no layers to pool at"));
        }
        if let Some(r) = rows.iter().find(|r| **r > num_layers) {
            return Err(Error::input(format!("layer {r} is outside 0..={num_layers} (the model's capture rows)")));
        }
        for (i, (s, &p)) in seqs.iter().zip(prompt_lens).enumerate() {
            self.check_ids(s, &format!("sequence {i}"))?;
            if p == 0 || p > s.len() {
                return Err(Error::input(format!("sequence {i}: prompt length {p} must be in 1..={}", s.len())));
            }
            if p == s.len() && poolings.contains(&Pooling::ResponseAvg) {
                return Err(Error::input(format!("sequence {i}: response is empty, so response_avg is undefined")));
            }
        }
        // Longest first, so each batch pads little.
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].len()));
        let dev = self.transformer.device().clone();
        let mut pooled: Vec<Option<Tensor>> = vec![None; seqs.len()];
        for chunk in order.chunks(batch_size) {
            let t = seqs[chunk[0]].len();
            let (mut ids, mut weights) = (Vec::with_capacity(chunk.len() * t), Vec::new());
            for &i in chunk {
                ids.extend_from_slice(&seqs[i]);
                ids.resize(ids.len() + t - seqs[i].len(), 0);
                for p in poolings {
                    weights.extend(p.weights(seqs[i].len(), prompt_lens[i], t));
                }
            }
            let b = chunk.len();
            // Right padding: real tokens never attend to the pads that follow them.
            let input = ForwardInput {
                ids: Tensor::from_vec(ids, (b, t), &dev)?,
                positions: Tensor::arange(0u32, t as u32, &dev)?.unsqueeze(0)?.repeat((b, 1))?,
                mask: self.transformer.causal_mask(t, 0)?,
            };
            let w = Tensor::from_vec(weights, (b, poolings.len(), t), &dev)?;
            let mut cap = PooledMeans::rows(num_layers, w, rows.clone());
            self.transformer.forward(&input, &mut cap, None, LogitsMode::None)?;
            let out = cap.stacked()?; // [b, k, rows, H]
            for (j, &i) in chunk.iter().enumerate() {
                pooled[i] = Some(out.get(j)?);
            }
        }
        let all: Vec<Tensor> = pooled
            .into_iter()
            .map(|p| p.ok_or_else(|| Error::Compute("sequence not pooled".into())))
            .collect::<Result<_>>()?;
        let all = Tensor::stack(&all, 0)?; // [n, k, rows, H]
        (0..poolings.len()).map(|k| Ok(all.narrow(1, k, 1)?.squeeze(1)?.to_device(&Device::Cpu)?)).collect()
    }

    /// Renders `messages` with the chat template.
    pub fn chat_text(&self, messages: &serde_json::Value, add_generation_prompt: bool) -> Result<String> {
        let tpl = self.chat_template.as_ref().ok_or_else(|| {
            Error::ChatTemplate(format!(
                "model {} has no chat template (a base model); pass one with \
                     load_model(..., chat_template=...) or tokenize plain text instead",
                self.source.display()
            ))
        })?;
        tpl.render(messages, add_generation_prompt)
    }

    /// Writes an HF-style directory (config.json, model.safetensors in f32, tokenizer files).
    /// A model loaded at `High` precision holds its weights as bf16 pairs (16 significant bits),
    /// so the exact weights are read again from its source for the export.
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        if self.options.precision != MatmulPrecision::Highest && MatmulPrecision::high_available() {
            let exact = LoadOptions { precision: MatmulPrecision::Highest, ..self.options.clone() };
            return Model::load(&self.source, &exact)?.save_hf(dir);
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let write = |name: &str, text: String| -> Result<()> {
            let p = dir.join(name);
            std::fs::write(&p, text).map_err(|e| Error::io(&p, e))
        };
        let config =
            serde_json::to_string_pretty(&self.config().to_hf_config()).map_err(|e| Error::Compute(e.to_string()))?;
        write("config.json", config)?;
        let weights: std::collections::HashMap<String, Tensor> = self
            .transformer
            .named_weights()?
            .into_iter()
            .map(|(n, t)| Ok((n, t.to_device(&Device::Cpu)?.contiguous()?)))
            .collect::<Result<_>>()?;
        let st = dir.join("model.safetensors");
        candle_core::safetensors::save(&weights, &st)
            .map_err(|e| Error::io(&st, std::io::Error::other(e.to_string())))?;
        write("tokenizer.json", self.tokenizer.to_json()?)?;
        let mut tc = serde_json::json!({});
        if let Some((bos, _)) = self.tokenizer.bos_token() {
            tc["bos_token"] = serde_json::json!(bos);
        }
        if let Some(&eos) = self.tokenizer.eos_token_ids().first() {
            tc["eos_token"] = serde_json::json!(self.tokenizer.id_to_token(eos));
        }
        let eos_ids = self.tokenizer.eos_token_ids();
        if !eos_ids.is_empty() {
            write("generation_config.json", serde_json::json!({ "eos_token_id": eos_ids }).to_string())?;
        }
        if let Some(t) = &self.chat_template {
            tc["chat_template"] = serde_json::json!(t.source());
        }
        write("tokenizer_config.json", serde_json::to_string_pretty(&tc).map_err(|e| Error::Compute(e.to_string()))?)
    }
}

/// Whether this CPU has AVX2 (candle detects it at run time and then uses its AVX2 kernels).
pub fn avx2_enabled() -> bool {
    candle_core::utils::with_avx()
}
