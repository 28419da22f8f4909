//! Continuous batching: requests join and leave between decode steps. Each request owns a KV
//! cache sized to what it can use (prompt + `max_new_tokens`), reserved against a token budget
//! (requests wait in a queue while it is full), its own hook plan (steering, conditional
//! steering, monitor bank, thresholds), sampler, stop strings and audit log. One step runs one
//! batched decode forward over every request that has finished its prompt (each at its own
//! position, its own cache gathered and masked), then one prefill chunk of at most
//! `prefill_chunk` prompt tokens of the oldest request still reading its prompt, so a long prompt
//! never stalls the replies in progress.

use std::collections::VecDeque;
use std::sync::Arc;

use candle_core::{Device, Tensor};

use super::events::{AuditLog, EventKind};
use super::sampling::Sampler;
use super::sequence::{empty_output, EventSite, SeqState};
use super::session::{FinishReason, GenerateParams, SequenceResult, StepOutput};
use crate::bail_input;
use crate::error::{Error, Result};
use crate::hooks::{HookPlan, HookPoint, Hooks};
use crate::models::{ForwardInput, KvCache, LayerStores, LogitsMode};
use crate::nn::{AttentionMask, KvStore, LayerKvCache};
use crate::pipeline::Model;
use crate::requests::PreparedGeneration;

/// What a request does when one of its monitor scores crosses its threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertPolicy {
    /// Record the event only.
    Flag,
    /// Switch the request's conditional steerings on for the rest of the reply.
    Steer,
    /// End the reply (finish reason `content_filter`).
    Stop,
}

impl AlertPolicy {
    /// `flag`, `steer` or `stop`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "flag" => Ok(Self::Flag),
            "steer" => Ok(Self::Steer),
            "stop" => Ok(Self::Stop),
            other => Err(Error::input(format!("on_alert must be 'flag', 'steer' or 'stop', got '{other}'"))),
        }
    }
}

/// Limits of a [`Scheduler`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Requests decoding together at most.
    pub max_batch: usize,
    /// KV-cache positions reserved by running requests at most (each reserves prompt +
    /// `max_new_tokens`, capped by the context window).
    pub max_tokens_in_flight: usize,
    /// Prompt tokens prefilled per step at most.
    pub prefill_chunk: usize,
}

impl SchedulerConfig {
    /// Checks the limits as given; `max_tokens_in_flight` defaults to `max_batch` times the
    /// context window (at most 4096 positions each).
    pub fn new(model: &Model, max_batch: i64, max_tokens_in_flight: Option<i64>, prefill_chunk: i64) -> Result<Self> {
        let positive = |v: i64, what: &str| -> Result<usize> {
            match usize::try_from(v) {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(Error::input(format!("{what} must be an int >= 1, got {v}"))),
            }
        };
        let max_batch = positive(max_batch, "max_batch")?;
        let per_request = model.config().max_position_embeddings.min(4096);
        let max_tokens_in_flight = match max_tokens_in_flight {
            Some(v) => positive(v, "max_tokens_in_flight")?,
            None => max_batch.saturating_mul(per_request),
        };
        Ok(Self { max_batch, max_tokens_in_flight, prefill_chunk: positive(prefill_chunk, "prefill_chunk")? })
    }
}

/// Counters of a [`Scheduler`], for monitoring.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    /// Requests waiting for a slot.
    pub queued: usize,
    /// Requests holding a slot.
    pub running: usize,
    /// Sequences in the last decode forward.
    pub batch_size: usize,
    /// Tokens generated so far.
    pub tokens_generated: u64,
    /// Monitor alerts raised so far.
    pub alerts: u64,
    /// Conditional steerings switched on or off so far.
    pub steer_switches: u64,
    /// Steps run so far.
    pub steps: u64,
    /// KV-cache positions reserved now.
    pub tokens_in_flight: usize,
    /// The budget of KV-cache positions.
    pub max_tokens_in_flight: usize,
}

/// What one step (or a cancellation) produced for one request.
#[derive(Debug)]
pub struct RequestUpdate {
    /// The request's id (as [`Scheduler::add`] returned it).
    pub id: u64,
    /// One new token with its scores and events (`Ok(None)` when there is none to report), or
    /// the error that ended the request.
    pub step: Result<Option<StepOutput>>,
    /// The whole result, once the request has ended.
    pub result: Option<SequenceResult>,
}

/// One request and everything it owns.
struct Request {
    id: u64,
    request_id: String,
    prompt: Vec<u32>,
    params: GenerateParams,
    plan: HookPlan,
    thresholds: Vec<Option<f32>>,
    policy: AlertPolicy,
    audit: Option<AuditLog>,
    /// KV-cache positions it reserves.
    need: usize,
    /// Its cache, allocated when it starts running.
    cache: Option<KvCache>,
    /// Prompt tokens forwarded so far.
    prefilled: usize,
    seq: SeqState,
    /// Forward passes it has been part of.
    passes: usize,
    /// Output gathered since the last token was reported (prompt chunks, the final scoring pass).
    pending: StepOutput,
    /// Whether `pending` is complete: a new token, or the end of the request.
    ready: bool,
}

impl Request {
    fn decoding(&self) -> bool {
        self.prefilled == self.prompt.len() && !self.done()
    }

    fn done(&self) -> bool {
        self.seq.finished.is_some() && self.seq.last_scored
    }
}

/// Every request's own hook plan, each acting on its row of the batch.
struct RowHooks<'a> {
    plans: Vec<&'a mut HookPlan>,
}

impl Hooks for RowHooks<'_> {
    fn at(&mut self, point: HookPoint, x: &Tensor) -> Result<Option<Tensor>> {
        match self.plans.as_mut_slice() {
            [plan] => plan.at(point, x),
            plans => HookPlan::at_rows(plans, point, x),
        }
    }

    fn reads(&self, point: HookPoint) -> bool {
        self.plans.iter().any(|p| p.reads(point))
    }
}

/// One layer of the caches of a decode batch: each row appends to its own cache; the keys and
/// values come back one view per sequence (read in place by the decode kernel), or padded with
/// zeros to the longest and gathered (the mask hides the padding) for the other paths.
struct GatherLayer<'a> {
    rows: Vec<&'a mut LayerKvCache>,
}

impl KvStore for GatherLayer<'_> {
    fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        if let [cache] = self.rows.as_mut_slice() {
            return cache.append(k, v);
        }
        let parts = self.append_each(k, v)?;
        let s = parts.iter().map(|(k, _)| k.dim(2)).collect::<candle_core::Result<Vec<_>>>()?.into_iter().max();
        let s = s.unwrap_or(0);
        let pad = |t: &Tensor| -> Result<Tensor> {
            let (_, h, n, d) = t.dims4()?;
            if n == s {
                return Ok(t.clone());
            }
            Ok(Tensor::cat(&[t, &Tensor::zeros((1, h, s - n, d), t.dtype(), t.device())?], 2)?)
        };
        let ks = parts.iter().map(|(k, _)| pad(k)).collect::<Result<Vec<_>>>()?;
        let vs = parts.iter().map(|(_, v)| pad(v)).collect::<Result<Vec<_>>>()?;
        Ok((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?))
    }

    fn separate(&self) -> bool {
        self.rows.len() > 1
    }

    fn append_each(&mut self, k: &Tensor, v: &Tensor) -> Result<Vec<(Tensor, Tensor)>> {
        let mut parts = Vec::with_capacity(self.rows.len());
        for (r, cache) in self.rows.iter_mut().enumerate() {
            parts.push(cache.append(&k.narrow(0, r, 1)?, &v.narrow(0, r, 1)?)?);
        }
        Ok(parts)
    }
}

/// The caches of every layer of a decode batch.
struct Gathered<'a> {
    layers: Vec<GatherLayer<'a>>,
}

impl<'a> Gathered<'a> {
    fn new(caches: Vec<&'a mut KvCache>, num_layers: usize) -> Self {
        let mut layers: Vec<GatherLayer<'a>> =
            (0..num_layers).map(|_| GatherLayer { rows: Vec::with_capacity(caches.len()) }).collect();
        for cache in caches {
            for (layer, c) in layers.iter_mut().zip(cache.layers.iter_mut()) {
                layer.rows.push(c);
            }
        }
        Self { layers }
    }
}

impl LayerStores for Gathered<'_> {
    fn layer(&mut self, i: usize) -> &mut dyn KvStore {
        &mut self.layers[i]
    }
}

/// Requests queued and running over one model, stepped by the caller.
pub struct Scheduler {
    model: Arc<Model>,
    config: SchedulerConfig,
    queue: VecDeque<Request>,
    running: Vec<Request>,
    next_id: u64,
    stats: SchedulerStats,
}

impl Scheduler {
    /// An empty scheduler for `model`.
    pub fn new(model: Arc<Model>, config: SchedulerConfig) -> Self {
        let stats = SchedulerStats { max_tokens_in_flight: config.max_tokens_in_flight, ..Default::default() };
        Self { model, config, queue: VecDeque::new(), running: Vec::new(), next_id: 0, stats }
    }

    /// The limits.
    pub fn config(&self) -> SchedulerConfig {
        self.config
    }

    /// Counters so far.
    pub fn stats(&self) -> SchedulerStats {
        let tokens_in_flight = self.running.iter().map(|r| r.need).sum();
        SchedulerStats { queued: self.queue.len(), running: self.running.len(), tokens_in_flight, ..self.stats }
    }

    /// Whether any request is queued or running.
    pub fn has_work(&self) -> bool {
        !self.queue.is_empty() || !self.running.is_empty()
    }

    /// KV-cache positions a request of this prompt length and `max_new_tokens` reserves.
    pub fn positions_needed(&self, prompt_len: usize, max_new_tokens: usize) -> usize {
        (prompt_len + max_new_tokens).min(self.model.config().max_position_embeddings) + 1
    }

    /// Queues a checked single-prompt generation (see [`crate::requests::GenerateRequest::prepare`])
    /// under `policy`, its events logged with `request_id`; returns its id.
    pub fn add(&mut self, prepared: PreparedGeneration, policy: AlertPolicy, request_id: String) -> Result<u64> {
        if !Arc::ptr_eq(&prepared.model, &self.model) {
            bail_input!("this generation was prepared for another model than the scheduler's");
        }
        let [prompt] = <[Vec<u32>; 1]>::try_from(prepared.prompts)
            .map_err(|p| Error::input(format!("a scheduled request has exactly one prompt, got {}", p.len())))?;
        let need = self.positions_needed(prompt.len(), prepared.params.max_new_tokens);
        if need > self.config.max_tokens_in_flight {
            bail_input!(
                "request '{request_id}' needs {need} KV-cache positions (prompt + max_new_tokens), more than the \
                 engine's max_tokens_in_flight ({})",
                self.config.max_tokens_in_flight
            );
        }
        let (mut bank, thresholds) = match prepared.monitor {
            Some(m) if !m.bank.is_empty() => (Some(m.bank), m.thresholds),
            _ => (None, Vec::new()),
        };
        if let Some(bank) = bank.as_mut() {
            // Requests monitoring the same vectors hold one copy, projected together in a step.
            for other in self.running.iter().chain(&self.queue).filter_map(|r| r.plan.monitor()) {
                bank.share_vectors(other);
            }
        }
        let columns = bank.as_ref().map_or_else(Vec::new, |b| b.columns.clone());
        let t = &self.model.transformer;
        let plan = HookPlan::new(self.model.config().num_layers, 1, prepared.steerings, bank, t.dtype(), t.device())?;
        let audit = prepared.audit.as_ref().map(AuditLog::open).transpose()?;
        let sampler = Sampler::new(prepared.params.sampling.clone(), prepared.params.seed);
        let id = self.next_id;
        self.next_id += 1;
        self.queue.push_back(Request {
            id,
            request_id,
            seq: SeqState::new(prompt.len(), &columns, sampler),
            prompt,
            params: prepared.params,
            plan,
            thresholds,
            policy,
            audit,
            need,
            cache: None,
            prefilled: 0,
            passes: 0,
            pending: empty_output(),
            ready: false,
        });
        Ok(id)
    }

    /// Ends request `id` now (finish reason `cancelled`) and frees its slot; `None` if it is not
    /// queued or running (it has already ended).
    pub fn cancel(&mut self, id: u64) -> Option<RequestUpdate> {
        let mut req = if let Some(k) = self.queue.iter().position(|r| r.id == id) {
            self.queue.remove(k)?
        } else {
            let k = self.running.iter().position(|r| r.id == id)?;
            self.running.remove(k)
        };
        let mut out = std::mem::replace(&mut req.pending, empty_output());
        req.seq.finish_now(FinishReason::Cancelled, &mut out);
        Some(RequestUpdate { id, step: Ok(Some(out)), result: Some(req.seq.result()) })
    }

    /// Moves queued requests (oldest first) into the running set while a slot and the budget
    /// allow, allocating each one's cache.
    fn admit(&mut self) -> Vec<RequestUpdate> {
        let mut failed = Vec::new();
        while let Some(next) = self.queue.front() {
            let reserved: usize = self.running.iter().map(|r| r.need).sum();
            if self.running.len() >= self.config.max_batch || reserved + next.need > self.config.max_tokens_in_flight {
                break;
            }
            let Some(mut req) = self.queue.pop_front() else { break };
            match self.model.transformer.new_cache(1, req.need) {
                Ok(cache) => {
                    req.cache = Some(cache);
                    self.running.push(req);
                }
                Err(e) => failed.push(RequestUpdate { id: req.id, step: Err(e), result: None }),
            }
        }
        failed
    }

    /// One step: admits what fits, runs one decode forward over the requests past their prompt
    /// and one prefill chunk; returns an update for every request that has something to report.
    pub fn step(&mut self) -> Vec<RequestUpdate> {
        let mut updates = self.admit();
        let decoding: Vec<usize> = (0..self.running.len()).filter(|&k| self.running[k].decoding()).collect();
        self.stats.batch_size = decoding.len();
        if !decoding.is_empty() {
            let failed = match self.decode(&decoding) {
                Ok(failed) => failed,
                Err(e) => {
                    let msg = e.to_string();
                    let err = |_| Error::Compute(format!("the batched decode step failed: {msg}"));
                    decoding.iter().map(|&k| (k, err(k))).collect()
                }
            };
            for (k, e) in failed {
                updates.push(RequestUpdate { id: self.running[k].id, step: Err(e), result: None });
            }
        }
        if let Some(k) = self.running.iter().position(|r| r.prefilled < r.prompt.len()) {
            if let Err(e) = self.prefill_chunk(k) {
                let req = self.running.remove(k);
                updates.push(RequestUpdate { id: req.id, step: Err(e), result: None });
            }
        }
        self.stats.steps += 1;
        let mut k = 0;
        while k < self.running.len() {
            if updates.iter().any(|u| u.id == self.running[k].id && u.step.is_err()) {
                self.running.remove(k);
                continue;
            }
            let req = &mut self.running[k];
            if std::mem::take(&mut req.ready) {
                let out = std::mem::replace(&mut req.pending, empty_output());
                let result = req.done().then(|| req.seq.result());
                updates.push(RequestUpdate { id: req.id, step: Ok(Some(out)), result });
            }
            if self.running[k].done() {
                self.running.remove(k);
            } else {
                k += 1;
            }
        }
        updates
    }

    /// The batched decode forward of `running[ks]`: one token each, at its own position. An error
    /// of the forward pass fails them all; the requests whose own bookkeeping failed (an audit
    /// log that cannot be written, say) come back with their error.
    fn decode(&mut self, ks: &[usize]) -> Result<Vec<(usize, Error)>> {
        let model = Arc::clone(&self.model);
        let t = &model.transformer;
        let dev = t.device().clone();
        let b = ks.len();
        let mut ids = Vec::with_capacity(b);
        let mut positions = Vec::with_capacity(b);
        let mut lens = Vec::with_capacity(b);
        // A finished request is here for its last token's scores only: no logits for its row.
        let samples = |req: &Request| req.seq.finished.is_none();
        let sampling: Vec<usize> = (0..b).filter(|&r| samples(&self.running[ks[r]])).collect();
        let n_sampling = sampling.len();
        for &k in ks {
            let seq = &self.running[k].seq;
            let pos = seq.prompt_len + seq.generated.len() - 1;
            ids.push(seq.generated.last().copied().unwrap_or(0));
            positions.push(pos as u32);
            lens.push(pos + 1);
        }
        let mask =
            if b == 1 { t.causal_mask(1, lens[0] - 1)? } else { Some(AttentionMask::Dense(self.decode_mask(&lens)?)) };
        let input = ForwardInput {
            ids: Tensor::from_vec(ids, (b, 1), &dev)?,
            positions: Tensor::from_vec(positions, (b, 1), &dev)?,
            mask,
        };
        let mut plans = Vec::with_capacity(b);
        let mut caches = Vec::with_capacity(b);
        for (k, req) in self.running.iter_mut().enumerate() {
            if ks.contains(&k) {
                req.plan.prefill = false;
                plans.push(&mut req.plan);
                caches.push(req.cache.as_mut().ok_or_else(|| Error::Compute("a running request has no cache".into()))?);
            }
        }
        let mut hooks = RowHooks { plans };
        let mut gathered = Gathered::new(caches, model.config().num_layers);
        let logits = match t.forward(&input, &mut hooks, Some(&mut gathered), LogitsMode::LastOf(sampling))? {
            Some(l) => l.squeeze(1)?.to_device(&Device::Cpu)?.to_vec2::<f32>()?,
            None if n_sampling == 0 => Vec::new(),
            None => return Err(Error::Compute("forward returned no logits".into())),
        };
        if logits.len() != n_sampling {
            return Err(Error::Compute(format!("{} rows of logits for {n_sampling} sampling rows", logits.len())));
        }
        let mut rows = logits.iter();
        let mut failed = Vec::new();
        for &k in ks {
            // in batch order, as `sampling` was made (a request's own pass has not run yet)
            let row: &[f32] = if samples(&self.running[k]) { rows.next().map_or(&[], Vec::as_slice) } else { &[] };
            let req = &mut self.running[k];
            let base = req.seq.prompt_len + req.seq.generated.len() - 1;
            match Self::finish_pass(&model, req, row, base, false) {
                Ok(counts) => self.stats.absorb(counts),
                Err(e) => failed.push((k, e)),
            }
        }
        Ok(failed)
    }

    /// The additive mask `[b, 1, 1, s]` of a decode batch whose sequences hold `lens` positions
    /// (the new one included): each sees its own positions, within the sliding window if any.
    fn decode_mask(&self, lens: &[usize]) -> Result<Tensor> {
        let window = self.model.config().sliding_window;
        let s = lens.iter().copied().max().unwrap_or(0);
        let mut m = vec![f32::NEG_INFINITY; lens.len() * s];
        for (r, &len) in lens.iter().enumerate() {
            let q = len - 1;
            for j in 0..len {
                if window.is_none_or(|w| q - j < w) {
                    m[r * s + j] = 0.0;
                }
            }
        }
        let t = &self.model.transformer;
        Ok(Tensor::from_vec(m, (lens.len(), 1, 1, s), t.device())?.to_dtype(t.dtype())?)
    }

    /// Forwards the next chunk of `running[k]`'s prompt; the last chunk picks its first token.
    fn prefill_chunk(&mut self, k: usize) -> Result<()> {
        let model = Arc::clone(&self.model);
        let t = &model.transformer;
        let req = &mut self.running[k];
        let start = req.prefilled;
        let n = (req.prompt.len() - start).min(self.config.prefill_chunk);
        let dev = t.device().clone();
        let input = ForwardInput {
            ids: Tensor::from_vec(req.prompt[start..start + n].to_vec(), (1, n), &dev)?,
            positions: Tensor::from_vec((start..start + n).map(|p| p as u32).collect(), (1, n), &dev)?,
            mask: t.causal_mask(n, start)?,
        };
        req.plan.prefill = true;
        req.plan.ends_prompt = start + n == req.prompt.len();
        let cache = req.cache.as_mut().ok_or_else(|| Error::Compute("a running request has no cache".into()))?;
        let mode = if req.params.prompt_logprobs.is_some() { LogitsMode::All } else { LogitsMode::Last };
        // [positions, vocab]: every position's row with prompt_logprobs, else the last one's
        let logits = t
            .forward(&input, &mut req.plan, Some(cache), mode)?
            .ok_or_else(|| Error::Compute("forward returned no logits".into()))?
            .squeeze(0)?
            .to_device(&Device::Cpu)?
            .to_vec2::<f32>()?;
        if let Some(top) = req.params.prompt_logprobs {
            req.seq.record_prompt_logprobs(&req.prompt, &logits, start, top, &mut req.pending);
        }
        req.prefilled += n;
        let last = req.prefilled == req.prompt.len();
        let row = logits.last().ok_or_else(|| Error::Compute("forward returned no logits row".into()))?;
        let counts = Self::finish_pass(&model, req, row, start, !last)?;
        self.stats.absorb(counts);
        Ok(())
    }

    /// After a forward of `req`: its scores and events (positions from `base`), the alert policy,
    /// the audit log, then (unless `partial`, a prompt chunk before the last) its next token
    /// (`logits` is empty for a finished request: its pass only scored its last token).
    fn finish_pass(model: &Model, req: &mut Request, logits: &[f32], base: usize, partial: bool) -> Result<PassCounts> {
        let mut out = empty_output();
        let site = EventSite { sequence: 0, step: req.passes };
        req.passes += 1;
        if let Some((rows, norms)) = req.plan.take_score_rows()? {
            req.seq.record_scores(&mut req.plan, &req.thresholds, site, &rows, &norms, base, !partial, &mut out)?;
        }
        let mut counts = PassCounts::default();
        let alerted = out.events.iter().any(|e| e.kind == EventKind::Alert);
        if alerted && req.policy == AlertPolicy::Steer {
            Self::latch_steerings(req, site, base, &mut out)?;
        }
        if req.seq.finished.is_some() {
            req.seq.last_scored = true;
        } else if alerted && req.policy == AlertPolicy::Stop {
            req.seq.finish_now(FinishReason::ContentFilter, &mut out);
        } else if !partial {
            let tok = req.seq.sampler.sample(logits);
            req.seq.choose_token(model, &req.params, tok, logits, &mut out)?;
            counts.tokens = 1;
        }
        for e in &out.events {
            match e.kind {
                EventKind::Alert => counts.alerts += 1,
                EventKind::SteerOn | EventKind::SteerOff => counts.steer_switches += 1,
                EventKind::Clear => {}
            }
            if let Some(log) = req.audit.as_mut() {
                log.write(e, model, Some(&req.request_id))?;
            }
        }
        req.seq.events.extend(out.events.iter().cloned());
        let chose = out.token.is_some();
        merge(&mut req.pending, out);
        req.ready = if req.seq.finished.is_some() { req.seq.last_scored } else { chose };
        Ok(counts)
    }

    /// `on_alert="steer"`: every conditional steering still off switches on for good.
    fn latch_steerings(req: &mut Request, site: EventSite, position: usize, out: &mut StepOutput) -> Result<()> {
        for si in 0..req.plan.steerings().len() {
            let st = &req.plan.steerings()[si];
            if st.condition.is_none() || req.plan.is_active(si, 0) {
                continue;
            }
            let trigger = out.events.iter().find(|e| e.kind == EventKind::Alert).cloned();
            let coef = st.interventions.first().and_then(|iv| match iv.kind {
                crate::hooks::InterventionKind::Add { coef } => Some(coef),
                _ => None,
            });
            let name = st.name.clone();
            req.plan.latch_on(si)?;
            if let Some(alert) = trigger {
                out.events.push(super::events::Event {
                    kind: EventKind::SteerOn,
                    sequence: site.sequence,
                    position: position.max(alert.position),
                    step: site.step,
                    coef,
                    steer: Some(name),
                    ..alert
                });
            }
        }
        Ok(())
    }
}

/// Counts of one forward pass of one request.
#[derive(Default)]
struct PassCounts {
    tokens: u64,
    alerts: u64,
    steer_switches: u64,
}

impl SchedulerStats {
    fn absorb(&mut self, c: PassCounts) {
        self.tokens_generated += c.tokens;
        self.alerts += c.alerts;
        self.steer_switches += c.steer_switches;
    }
}

/// Folds `new` (a later pass of the same request) into `acc`.
fn merge(acc: &mut StepOutput, new: StepOutput) {
    if new.token.is_some() {
        acc.token = new.token;
    }
    acc.text.push_str(&new.text);
    if new.finish_reason.is_some() {
        acc.finish_reason = new.finish_reason;
    }
    acc.scores.extend(new.scores);
    acc.n_positions += new.n_positions;
    acc.sinks.extend(new.sinks);
    acc.events.extend(new.events);
    acc.logprobs.extend(new.logprobs);
    acc.prompt_logprobs.extend(new.prompt_logprobs);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alert_policies_parse_by_name() {
        assert_eq!(AlertPolicy::parse("flag").unwrap(), AlertPolicy::Flag);
        assert_eq!(AlertPolicy::parse("steer").unwrap(), AlertPolicy::Steer);
        assert_eq!(AlertPolicy::parse("stop").unwrap(), AlertPolicy::Stop);
        assert!(AlertPolicy::parse("panic").unwrap_err().to_string().contains("'panic'"));
    }

    #[test]
    fn merge_keeps_the_latest_token_and_appends_the_rest() {
        let mut acc = empty_output();
        acc.scores = vec![1.0];
        acc.n_positions = 1;
        let mut next = empty_output();
        next.token = Some(7);
        next.text = "hi".into();
        next.scores = vec![2.0, 3.0];
        next.n_positions = 2;
        next.finish_reason = Some(FinishReason::Length);
        merge(&mut acc, next);
        assert_eq!((acc.token, acc.text.as_str(), acc.n_positions), (Some(7), "hi", 3));
        assert_eq!(acc.scores, vec![1.0, 2.0, 3.0]);
        assert_eq!(acc.finish_reason, Some(FinishReason::Length));
    }
}
