//! One sequence of a generation, shared by the batched [`super::Session`] and the continuous-
//! batching [`super::Scheduler`]: its tokens and text, the stop conditions, its scores, threshold
//! alerts and conditional-steering switches.

use super::events::{Event, EventKind};
use super::sampling::{token_logprobs, Sampler, TokenLogprobs};
use super::session::{FinishReason, GenerateParams, SequenceResult, StepOutput};
use crate::error::Result;
use crate::hooks::{HookPlan, InterventionKind, MonitorColumn, SinkDetector};
use crate::pipeline::Model;

/// The state of one sequence.
pub(crate) struct SeqState {
    pub prompt_len: usize,
    pub generated: Vec<u32>,
    pub finished: Option<FinishReason>,
    /// Whether its last token has been forwarded (so every token has a score).
    pub last_scored: bool,
    text: String,
    emitted: usize,
    scores: Vec<f32>,
    /// Per scored position: whether it is an attention sink.
    sinks: Vec<bool>,
    sink_detector: SinkDetector,
    pub events: Vec<Event>,
    /// Per monitor column: currently above its threshold.
    alerting: Vec<bool>,
    pub sampler: Sampler,
    /// Per generated token, its log-probabilities (when asked for).
    logprobs: Vec<TokenLogprobs>,
    /// Per prompt token after the first, its log-probabilities (when asked for).
    prompt_logprobs: Vec<TokenLogprobs>,
}

/// Where a sequence sits when it records events: its index in the plan's batch and the step.
#[derive(Clone, Copy)]
pub(crate) struct EventSite {
    /// Index of the sequence in its hook plan's batch (and in events).
    pub sequence: usize,
    /// Forward pass index (0 = the first prompt pass).
    pub step: usize,
}

/// Name and layer of monitor column `c` of `plan`, looked up only when an event needs them.
fn column_name(plan: &HookPlan, c: usize) -> (String, usize) {
    plan.monitor().and_then(|m| m.columns.get(c)).map_or((String::new(), 0), |col| (col.name.clone(), col.layer))
}

/// An empty step output.
pub(crate) fn empty_output() -> StepOutput {
    StepOutput {
        token: None,
        text: String::new(),
        finish_reason: None,
        scores: Vec::new(),
        n_positions: 0,
        sinks: Vec::new(),
        events: Vec::new(),
        logprobs: Vec::new(),
        prompt_logprobs: Vec::new(),
    }
}

impl SeqState {
    /// A sequence with a `prompt_len`-token prompt, the monitor's `columns` and its own sampler.
    pub fn new(prompt_len: usize, columns: &[MonitorColumn], sampler: Sampler) -> Self {
        let n_cols = columns.len();
        Self {
            prompt_len,
            generated: Vec::new(),
            finished: None,
            last_scored: n_cols == 0,
            text: String::new(),
            emitted: 0,
            scores: Vec::new(),
            sinks: Vec::new(),
            sink_detector: SinkDetector::new(columns),
            events: Vec::new(),
            alerting: vec![false; n_cols],
            sampler,
            logprobs: Vec::new(),
            prompt_logprobs: Vec::new(),
        }
    }

    /// Records the log-probabilities of the prompt tokens after positions `base ..` (one logits
    /// row per position, `prompt` the whole prompt): row `r` predicts prompt token `base + r + 1`;
    /// the row of the last prompt position predicts a generated token and is skipped.
    pub fn record_prompt_logprobs(
        &mut self,
        prompt: &[u32],
        rows: &[Vec<f32>],
        base: usize,
        top: usize,
        out: &mut StepOutput,
    ) {
        for (r, row) in rows.iter().enumerate() {
            let Some(&next) = prompt.get(base + r + 1) else { break };
            let lp = token_logprobs(row, next, top);
            self.prompt_logprobs.push(lp.clone());
            out.prompt_logprobs.push(lp);
        }
    }

    /// Records score `rows` of positions `base ..` (threshold alerts at each, conditional steerings
    /// decided at the last when `decide`: not in the chunks of a prompt before its last, so a
    /// chunked prompt switches steering where a whole one would) into `out`. `norms` are the
    /// positions' residual norms at the monitored columns: attention sinks among them
    /// ([`SinkDetector`]) raise no alert and switch nothing unless the monitor includes sinks.
    #[allow(clippy::too_many_arguments)]
    pub fn record_scores(
        &mut self,
        plan: &mut HookPlan,
        thresholds: &[Option<f32>],
        site: EventSite,
        rows: &[Vec<f32>],
        norms: &[Vec<f32>],
        base: usize,
        decide: bool,
        out: &mut StepOutput,
    ) -> Result<()> {
        let first = out.scores.len();
        let first_sink = out.sinks.len();
        let include_sinks = plan.monitor().is_some_and(|m| m.include_sinks);
        for (k, (row, norm)) in rows.iter().zip(norms).enumerate() {
            let sink = self.sink_detector.push(norm);
            out.scores.extend_from_slice(row);
            out.sinks.push(sink);
            out.n_positions += 1;
            if include_sinks || !sink {
                self.check_thresholds(plan, thresholds, site, base + k, row, &mut out.events);
            }
        }
        if let (true, Some(last), Some(&sink)) = (decide, rows.last(), out.sinks.last()) {
            if include_sinks || !sink {
                check_conditions(plan, site, base + rows.len() - 1, last, &mut out.events)?;
            }
        }
        self.scores.extend_from_slice(&out.scores[first..]);
        self.sinks.extend_from_slice(&out.sinks[first_sink..]);
        Ok(())
    }

    /// Appends token `tok` (chosen from `logits`), decides whether the sequence stops, and puts the
    /// new text (and the token's log-probabilities, when asked for) in `out`.
    pub fn choose_token(
        &mut self,
        model: &Model,
        params: &GenerateParams,
        tok: u32,
        logits: &[f32],
        out: &mut StepOutput,
    ) -> Result<()> {
        let ctx = model.config().max_position_embeddings;
        let eos = model.tokenizer.eos_token_ids();
        self.generated.push(tok);
        out.token = Some(tok);
        if let Some(top) = params.logprobs {
            let lp = token_logprobs(logits, tok, top);
            self.logprobs.push(lp.clone());
            out.logprobs.push(lp);
        }
        let full = model.tokenizer.decode(&self.generated, true)?;
        let mut reason = None;
        let mut text = full;
        if let Some(cut) = params.stop.iter().filter_map(|st| text.find(st.as_str())).min() {
            text.truncate(cut);
            reason = Some(FinishReason::Stop);
        } else if !params.ignore_eos && eos.contains(&tok) {
            reason = Some(FinishReason::Eos);
        } else if self.generated.len() >= params.max_new_tokens || self.prompt_len + self.generated.len() >= ctx {
            reason = Some(FinishReason::Length);
        }
        // Emit only complete characters, and hold back a tail that could start a stop string.
        let safe_end = if reason.is_some() {
            text.len()
        } else {
            let mut end = text.trim_end_matches('\u{FFFD}').len();
            for st in &params.stop {
                for k in (1..st.len()).rev() {
                    if st.is_char_boundary(k) && text[..end].ends_with(&st[..k]) {
                        end = end.min(text.len() - k);
                        break;
                    }
                }
            }
            end
        };
        if let Some(piece) = text.get(self.emitted..safe_end) {
            out.text = piece.to_string();
            self.emitted = safe_end;
        }
        self.text = text;
        if let Some(r) = reason {
            self.finished = Some(r);
            out.finish_reason = Some(r);
        }
        Ok(())
    }

    /// Ends the sequence now for `reason` (cancelled, stopped by policy): the rest of the text it
    /// held back is emitted into `out`, and its last token counts as scored.
    pub fn finish_now(&mut self, reason: FinishReason, out: &mut StepOutput) {
        if let Some(piece) = self.text.get(self.emitted..) {
            out.text.push_str(piece);
            self.emitted = self.text.len();
        }
        self.finished = Some(reason);
        self.last_scored = true;
        out.finish_reason = Some(reason);
    }

    fn check_thresholds(
        &mut self,
        plan: &HookPlan,
        thresholds: &[Option<f32>],
        site: EventSite,
        position: usize,
        row: &[f32],
        events: &mut Vec<Event>,
    ) {
        for (c, &score) in row.iter().enumerate() {
            let Some(thr) = thresholds.get(c).copied().flatten() else { continue };
            let was = self.alerting[c];
            let now = score > thr;
            if was != now {
                self.alerting[c] = now;
                let (vector, layer) = column_name(plan, c);
                events.push(Event {
                    kind: if now { EventKind::Alert } else { EventKind::Clear },
                    sequence: site.sequence,
                    position,
                    step: site.step,
                    vector,
                    layer,
                    score,
                    threshold: Some(thr),
                    coef: None,
                    steer: None,
                });
            }
        }
    }

    /// The result so far.
    pub fn result(&self) -> SequenceResult {
        SequenceResult {
            token_ids: self.generated.clone(),
            text: self.text.clone(),
            finish_reason: self.finished,
            prompt_len: self.prompt_len,
            scores: self.scores.clone(),
            sinks: self.sinks.clone(),
            events: self.events.clone(),
            logprobs: self.logprobs.clone(),
            prompt_logprobs: self.prompt_logprobs.clone(),
        }
    }
}

/// Switches conditional steerings of sequence `site.sequence` on or off from the monitor `row`
/// of `position`; `steer_on`/`steer_off` events go to `events`.
pub(crate) fn check_conditions(
    plan: &mut HookPlan,
    site: EventSite,
    position: usize,
    row: &[f32],
    events: &mut Vec<Event>,
) -> Result<()> {
    let i = site.sequence;
    for si in 0..plan.steerings().len() {
        let st = &plan.steerings()[si];
        let Some(column) = st.condition.as_ref().map(|c| c.column) else { continue };
        if !st.sequences[i] {
            continue;
        }
        let score = row[column];
        let Some(now) = plan.decide(si, i, score)? else { continue };
        let st = &plan.steerings()[si];
        let threshold = st.condition.as_ref().and_then(|c| c.above.or(c.below));
        // steer_on reports the coefficient in effect (scaled by the strength in proportional
        // mode), steer_off the steering's own.
        let scale = if now { plan.strength(si, i) } else { 1.0 };
        let coef = st.interventions.first().and_then(|iv| match iv.kind {
            InterventionKind::Add { coef } => Some(coef * scale),
            _ => None,
        });
        let steer = Some(st.name.clone());
        let (vector, layer) = column_name(plan, column);
        events.push(Event {
            kind: if now { EventKind::SteerOn } else { EventKind::SteerOff },
            sequence: i,
            position,
            step: site.step,
            vector,
            layer,
            score,
            threshold,
            coef,
            steer,
        });
    }
    Ok(())
}
