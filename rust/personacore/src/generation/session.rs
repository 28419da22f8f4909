//! The batched decode loop: left-padded prefill into a preallocated KV cache, then one token per
//! step for every unfinished sequence, with steering and monitoring running inside each forward.

use std::sync::Arc;

use candle_core::{Device, Tensor};

use super::events::{AuditLog, Event};
use super::sampling::{Sampler, SamplingParams, TokenLogprobs, MAX_TOP_LOGPROBS};
use super::sequence::{empty_output, EventSite, SeqState};
use crate::error::{Error, Result};
use crate::hooks::{HookPlan, MonitorBank, Steering};
use crate::models::{ForwardInput, KvCache, LogitsMode};
use crate::nn::AttentionMask;
use crate::pipeline::Model;

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// It produced an end-of-sequence token.
    Eos,
    /// Its text reached a stop string.
    Stop,
    /// It reached `max_new_tokens` or the context window.
    Length,
    /// A monitor alert ended it (the serving engine's `on_alert="stop"` policy).
    ContentFilter,
    /// Its caller cancelled it.
    Cancelled,
}

impl FinishReason {
    /// Lowercase name.
    pub fn name(&self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ContentFilter => "content_filter",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// Settings of a generation.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    /// Tokens to generate at most (> 0).
    pub max_new_tokens: usize,
    /// Sampling settings.
    pub sampling: SamplingParams,
    /// Seed; sequence `i` of a batch uses `seed + i`.
    pub seed: u64,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Keep going past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Report each chosen token's log-probability and this many most likely tokens
    /// (`0..=MAX_TOP_LOGPROBS`); `None`: no log-probabilities.
    pub logprobs: Option<usize>,
    /// Report each prompt token's log-probability (after the first, which has no context) and
    /// this many most likely tokens at its position, as `logprobs` does for generated ones; the
    /// prompt pass then projects every position onto the vocabulary. `None`: not reported.
    pub prompt_logprobs: Option<usize>,
}

/// What one step produced for one sequence.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// The token chosen (None if the sequence had already finished).
    pub token: Option<u32>,
    /// New text, cut only at complete UTF-8 characters.
    pub text: String,
    /// Set once the sequence finishes.
    pub finish_reason: Option<FinishReason>,
    /// Monitor scores of the positions forwarded in this step, `[n_positions, n_columns]` row-major.
    pub scores: Vec<f32>,
    /// Number of positions in `scores`.
    pub n_positions: usize,
    /// Per position of `scores`: whether it is an attention sink ([`crate::hooks::SinkDetector`]).
    pub sinks: Vec<bool>,
    /// Events raised in this step.
    pub events: Vec<Event>,
    /// The log-probabilities of the token chosen (when asked for; more than one when steps merged).
    pub logprobs: Vec<TokenLogprobs>,
    /// The log-probabilities of the prompt tokens this step read (prompt positions `1..`, in
    /// order; when asked for).
    pub prompt_logprobs: Vec<TokenLogprobs>,
}

/// A finished sequence.
#[derive(Debug, Clone)]
pub struct SequenceResult {
    /// Generated ids (end-of-sequence token included when it ended the sequence).
    pub token_ids: Vec<u32>,
    /// Generated text (special tokens skipped, cut at the stop string).
    pub text: String,
    /// Why it stopped (`None` while still running).
    pub finish_reason: Option<FinishReason>,
    /// Prompt length in tokens.
    pub prompt_len: usize,
    /// Scores `[prompt_len + n_generated, n_columns]` row-major.
    pub scores: Vec<f32>,
    /// Per scored position: whether it is an attention sink ([`crate::hooks::SinkDetector`]).
    pub sinks: Vec<bool>,
    /// Every event of the sequence.
    pub events: Vec<Event>,
    /// Per generated token, its log-probabilities (empty unless asked for).
    pub logprobs: Vec<TokenLogprobs>,
    /// Per prompt token after the first, its log-probabilities (empty unless asked for).
    pub prompt_logprobs: Vec<TokenLogprobs>,
}

/// One sequence's rows of a forward pass: its scores and residual norms, `[positions][columns]`.
type ScoreRows<'a> = (&'a [Vec<f32>], &'a [Vec<f32>]);

/// A generation in progress for a batch of prompts.
pub struct Session {
    model: Arc<Model>,
    params: GenerateParams,
    plan: HookPlan,
    cache: KvCache,
    /// Left padding of each sequence in the cache.
    pads: Vec<usize>,
    prompts: Vec<Vec<u32>>,
    width: usize,
    thresholds: Vec<Option<f32>>,
    seqs: Vec<SeqState>,
    step: usize,
    audit: Option<AuditLog>,
}

impl Session {
    /// Validates everything and prepares the cache; no forward pass runs until [`Session::step`].
    pub fn new(
        model: Arc<Model>,
        prompts: Vec<Vec<u32>>,
        params: GenerateParams,
        steerings: Vec<Steering>,
        monitor: Option<(MonitorBank, Vec<Option<f32>>)>,
        audit: Option<&super::events::AuditSpec>,
    ) -> Result<Self> {
        Self::check_inputs(&model, &prompts, &params)?;
        let width = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let pads: Vec<usize> = prompts.iter().map(|p| width - p.len()).collect();
        if let Some((_, thr)) = &monitor {
            if thr.iter().flatten().any(|t| !t.is_finite()) {
                return Err(Error::input("monitor thresholds must be finite"));
            }
        }
        let (bank, thresholds) = match monitor {
            Some((b, t)) if !b.is_empty() => (Some(b), t),
            _ => (None, Vec::new()),
        };
        let columns = bank.as_ref().map_or_else(Vec::new, |b| b.columns.clone());
        let t = &model.transformer;
        let plan = HookPlan::new(model.config().num_layers, prompts.len(), steerings, bank, t.dtype(), t.device())?;
        let capacity = width + params.max_new_tokens + 1;
        let cache = t.new_cache(prompts.len(), capacity)?;
        let seqs = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                SeqState::new(
                    p.len(),
                    &columns,
                    Sampler::new(params.sampling.clone(), params.seed.wrapping_add(i as u64)),
                )
            })
            .collect();
        let audit = audit.map(AuditLog::open).transpose()?;
        Ok(Self { model, params, plan, cache, pads, prompts, width, thresholds, seqs, step: 0, audit })
    }

    /// Checks the prompts (ids, room in the context window) and the settings of a generation.
    pub fn check_inputs(model: &Model, prompts: &[Vec<u32>], params: &GenerateParams) -> Result<()> {
        if prompts.is_empty() {
            return Err(Error::input("no prompts to generate from"));
        }
        if params.max_new_tokens == 0 {
            return Err(Error::input("max_new_tokens must be at least 1, got 0"));
        }
        params.sampling.validate()?;
        let vocab = model.config().vocab_size;
        if let Some(&(id, _)) = params.sampling.logit_bias.iter().find(|&&(id, _)| id as usize >= vocab) {
            return Err(Error::input(format!("logit_bias names token {id}, out of range (vocab size {vocab})")));
        }
        if let Some(k) = params.logprobs.filter(|&k| k > MAX_TOP_LOGPROBS) {
            return Err(Error::input(format!("top logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {k}")));
        }
        if let Some(k) = params.prompt_logprobs.filter(|&k| k > MAX_TOP_LOGPROBS) {
            return Err(Error::input(format!("prompt_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {k}")));
        }
        let ctx = model.config().max_position_embeddings;
        for (i, p) in prompts.iter().enumerate() {
            model.check_ids(p, &format!("prompts[{i}]"))?;
            if p.len() >= ctx {
                return Err(Error::input(format!(
                    "prompt {i} has {} tokens: no room to generate in the context window of {ctx} tokens",
                    p.len()
                )));
            }
        }
        if params.stop.iter().any(String::is_empty) {
            return Err(Error::input("stop must be a non-empty str or a list of them, got an empty string"));
        }
        Ok(())
    }

    /// Whether every sequence is finished (and, when monitoring, every token scored).
    pub fn done(&self) -> bool {
        self.seqs.iter().all(|s| s.finished.is_some() && s.last_scored)
    }

    /// Monitor columns (name, layer) in score order.
    pub fn columns(&self) -> Vec<(String, usize)> {
        self.plan.monitor().map_or(Vec::new(), |m| m.columns.iter().map(|c| (c.name.clone(), c.layer)).collect())
    }

    /// The mask for `t` new positions after `past` cached ones: causal, the sliding window, and
    /// each sequence's left padding (a pad position sees only itself, so it stays finite).
    fn mask(&self, t: usize, past: usize) -> Result<Option<AttentionMask>> {
        if self.pads.iter().any(|&p| p > 0) {
            return Ok(Some(self.model.transformer.padded_causal_mask(t, past, &self.pads)));
        }
        self.model.transformer.causal_mask(t, past)
    }

    /// Runs one forward pass (the prefill on the first call) and picks the next token of every
    /// unfinished sequence. Returns one output per sequence, or `None` when already done.
    pub fn step(&mut self) -> Result<Option<Vec<StepOutput>>> {
        if self.done() {
            return Ok(None);
        }
        let dev = self.model.transformer.device().clone();
        let b = self.seqs.len();
        let prefill = self.step == 0;
        let (ids, positions, t) = if prefill {
            let mut ids = Vec::with_capacity(b * self.width);
            let mut pos = Vec::with_capacity(b * self.width);
            for (p, &pad) in self.prompts.iter().zip(&self.pads) {
                ids.extend(std::iter::repeat_n(p[0], pad));
                ids.extend_from_slice(p);
                pos.extend((0..self.width).map(|i| i.saturating_sub(pad) as u32));
            }
            (ids, pos, self.width)
        } else {
            let ids = self.seqs.iter().map(|s| s.generated.last().copied().unwrap_or(0)).collect();
            let pos = self.seqs.iter().map(|s| (s.prompt_len + s.generated.len() - 1) as u32).collect();
            (ids, pos, 1)
        };
        let past = self.cache.len();
        let input = ForwardInput {
            ids: Tensor::from_vec(ids, (b, t), &dev)?,
            positions: Tensor::from_vec(positions, (b, t), &dev)?,
            mask: self.mask(t, past)?,
        };
        self.plan.prefill = prefill;
        let prompt_top = self.params.prompt_logprobs.filter(|_| prefill);
        let mode = if prompt_top.is_some() { LogitsMode::All } else { LogitsMode::Last };
        let out = self
            .model
            .transformer
            .forward(&input, &mut self.plan, Some(&mut self.cache), mode)?
            .ok_or_else(|| Error::Compute("forward returned no logits".into()))?
            .to_device(&Device::Cpu)?;
        // every position's logits `[b][t][vocab]` with prompt_logprobs, and each sequence's last
        let every = if prompt_top.is_some() { Some(out.to_vec3::<f32>()?) } else { None };
        let logits = match every.as_ref() {
            Some(rows) => rows.iter().map(|r| r.last().cloned().unwrap_or_default()).collect(),
            None => out.squeeze(1)?.to_vec2::<f32>()?,
        };
        let scores = match self.plan.take_scores()? {
            Some((s, n)) => Some((s.to_device(&Device::Cpu)?.to_vec3::<f32>()?, n.to_device(&Device::Cpu)?.to_vec3()?)),
            None => None,
        };
        let tokens = self.sample_all(&logits);
        let mut outputs = Vec::with_capacity(b);
        for (i, (tok, row)) in tokens.into_iter().zip(&logits).enumerate() {
            let scores = scores.as_ref().map(|(s, n)| (s[i].as_slice(), n[i].as_slice()));
            let mut out = self.advance(i, tok.map(|t| (t, row.as_slice())), scores, prefill)?;
            if let (Some(top), Some(rows)) = (prompt_top, every.as_ref()) {
                let own = &rows[i][self.pads[i]..];
                self.seqs[i].record_prompt_logprobs(&self.prompts[i], own, 0, top, &mut out);
            }
            outputs.push(out);
        }
        self.step += 1;
        if self.done() {
            if let Some(log) = self.audit.as_mut() {
                log.sync()?;
            }
        }
        Ok(Some(outputs))
    }

    /// The next token of every unfinished sequence (`None` for finished ones). Each sequence has
    /// its own seeded sampler, so the result does not depend on the split: a batch of sampled
    /// sequences is shared with a second thread (a full softmax and a partial sort of the
    /// vocabulary per sequence per step).
    fn sample_all(&mut self, logits: &[Vec<f32>]) -> Vec<Option<u32>> {
        let mut tokens: Vec<Option<u32>> = vec![None; self.seqs.len()];
        let sampled = self.params.sampling.temperature > 0.0;
        let mut work: Vec<(&mut Sampler, &[f32], &mut Option<u32>)> = self
            .seqs
            .iter_mut()
            .zip(logits)
            .zip(tokens.iter_mut())
            .filter(|((s, _), _)| s.finished.is_none())
            .map(|((s, row), tok)| (&mut s.sampler, row.as_slice(), tok))
            .collect();
        fn run(part: &mut [(&mut Sampler, &[f32], &mut Option<u32>)]) {
            for (sampler, row, tok) in part.iter_mut() {
                **tok = Some(sampler.sample(row));
            }
        }
        let n = work.len();
        if sampled && n >= 4 && candle_core::utils::get_num_threads() > 1 {
            let (a, b) = work.split_at_mut(n / 2);
            std::thread::scope(|scope| {
                scope.spawn(|| run(a));
                run(b);
            });
        } else {
            run(&mut work);
        }
        drop(work);
        tokens
    }

    /// Records scores and events for sequence `i`, then appends its next token `tok` (chosen from
    /// the logits beside it).
    fn advance(
        &mut self,
        i: usize,
        tok: Option<(u32, &[f32])>,
        scores: Option<ScoreRows<'_>>,
        prefill: bool,
    ) -> Result<StepOutput> {
        let seq_was_finished = self.seqs[i].finished.is_some();
        let mut out = empty_output();
        if seq_was_finished && self.seqs[i].last_scored {
            return Ok(out);
        }
        if let Some((sc, norms)) = scores {
            let first = if prefill { self.pads[i] } else { 0 };
            let base = if prefill { 0 } else { self.seqs[i].prompt_len + self.seqs[i].generated.len() - 1 };
            let site = EventSite { sequence: i, step: self.step };
            self.seqs[i].record_scores(
                &mut self.plan,
                &self.thresholds,
                site,
                &sc[first..],
                &norms[first..],
                base,
                true,
                &mut out,
            )?;
        }
        if seq_was_finished {
            self.seqs[i].last_scored = true;
        } else {
            let (tok, logits) =
                tok.ok_or_else(|| Error::Compute("no token was sampled for an unfinished sequence".into()))?;
            self.seqs[i].choose_token(&self.model, &self.params, tok, logits, &mut out)?;
        }
        for e in &out.events {
            if let Some(log) = self.audit.as_mut() {
                log.write(e, &self.model, None)?;
            }
        }
        self.seqs[i].events.extend(out.events.iter().cloned());
        Ok(out)
    }

    /// Runs until every sequence is finished.
    pub fn run(&mut self) -> Result<()> {
        while self.step()?.is_some() {}
        Ok(())
    }

    /// Results of every sequence so far (unfinished ones have no finish reason).
    pub fn results(&self) -> Vec<SequenceResult> {
        self.seqs.iter().map(SeqState::result).collect()
    }
}
