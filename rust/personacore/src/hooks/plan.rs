//! The hook plan of a (batched) forward pass: steering interventions per layer and sequence,
//! then monitor projections. Layers with nothing planned cost one lookup.

use candle_core::{DType, Device, Tensor};

use super::interventions::Intervention;
use super::monitor::{MonitorBank, Projection};
use super::{HookPoint, Hooks};
use crate::error::{Error, Result};

/// How a switched-on conditional steering acts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LoopMode {
    /// Full strength while on.
    Switch,
    /// Strength `min(1, gain · excess)`, the excess being how far the score is past the threshold
    /// (0 while it is not past it, e.g. inside the hysteresis band or a `min_on` hold).
    Proportional {
        /// Strength per unit of excess (> 0).
        gain: f32,
    },
}

/// When a steering is active: while a monitor column's score is above (or below) a threshold.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    /// Monitor column whose score decides.
    pub column: usize,
    /// Switch on when the score rises above this.
    pub above: Option<f32>,
    /// Switch on when the score falls below this.
    pub below: Option<f32>,
    /// Switch off only once the score is back by this margin.
    pub hysteresis: f32,
    /// Once switched on, stay on for at least this many tokens.
    pub min_on: usize,
    /// Once switched off, stay off for at least this many tokens.
    pub min_off: usize,
    /// Full strength or proportional to the excess.
    pub mode: LoopMode,
}

/// Where a conditional steering stands for one sequence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoopState {
    /// Switched on.
    pub on: bool,
    /// Decisions (scored tokens) since the last switch.
    pub held: usize,
}

impl Default for LoopState {
    /// Off, and free to switch on at the first decision.
    fn default() -> Self {
        Self { on: false, held: usize::MAX }
    }
}

impl Condition {
    /// Exactly one finite threshold, a finite, non-negative hysteresis and a positive, finite gain.
    pub fn validate(&self, steer: &str) -> Result<()> {
        let finite = |x: Option<f32>| x.is_none_or(f32::is_finite);
        if self.above.is_some() == self.below.is_some() || !finite(self.above) || !finite(self.below) {
            return Err(Error::input(format!(
                "steering '{steer}': a condition needs exactly one finite 'above' or 'below'"
            )));
        }
        if !(self.hysteresis.is_finite() && self.hysteresis >= 0.0) {
            return Err(Error::input(format!(
                "steering '{steer}': hysteresis must be finite and >= 0, got {}",
                self.hysteresis
            )));
        }
        if let LoopMode::Proportional { gain } = self.mode {
            if !(gain.is_finite() && gain > 0.0) {
                return Err(Error::input(format!("steering '{steer}': gain must be finite and > 0, got {gain}")));
            }
        }
        Ok(())
    }

    /// The new on/off state given the current state and a score (thresholds and hysteresis only).
    pub fn next_state(&self, on: bool, score: f32) -> bool {
        let h = self.hysteresis;
        match (self.above, self.below) {
            (Some(a), _) if on => score > a - h,
            (Some(a), _) => score > a,
            (None, Some(b)) if on => score < b + h,
            (None, Some(b)) => score < b,
            (None, None) => true,
        }
    }

    /// One decision (one scored token): updates `state`, honouring `min_on`/`min_off`; returns
    /// whether it switched.
    pub fn step(&self, state: &mut LoopState, score: f32) -> bool {
        state.held = state.held.saturating_add(1);
        let hold = if state.on { self.min_on } else { self.min_off };
        if state.held < hold || self.next_state(state.on, score) == state.on {
            return false;
        }
        state.on = !state.on;
        state.held = 0;
        true
    }

    /// The steering's strength in `0..=1` in state `on` at `score`.
    pub fn strength(&self, on: bool, score: f32) -> f32 {
        match (on, self.mode) {
            (false, _) => 0.0,
            (true, LoopMode::Switch) => 1.0,
            (true, LoopMode::Proportional { gain }) => {
                let excess = match (self.above, self.below) {
                    (Some(a), _) => score - a,
                    (None, Some(b)) => b - score,
                    (None, None) => 0.0,
                };
                (gain * excess).clamp(0.0, 1.0)
            }
        }
    }
}

/// A named steering: interventions at one or more layers, for some sequences, maybe conditional.
#[derive(Debug, Clone)]
pub struct Steering {
    /// Name used in events.
    pub name: String,
    /// One intervention per layer.
    pub interventions: Vec<Intervention>,
    /// Which batch members carry it.
    pub sequences: Vec<bool>,
    /// Optional condition; without one it is always on for its sequences.
    pub condition: Option<Condition>,
}

/// Per position of one sequence: the monitor's scores and the residual norms, each in column
/// order (see [`HookPlan::take_score_rows`]).
pub type HostScores = (Vec<Vec<f32>>, Vec<Vec<f32>>);

/// Interventions and monitoring for one batch, called by the layer loop.
pub struct HookPlan {
    num_layers: usize,
    steerings: Vec<Steering>,
    /// `[steering][sequence]` its strength now (0 = off, 1 = full).
    strength: Vec<Vec<f32>>,
    /// `[steering][sequence]` the state of its condition (unused without one).
    loops: Vec<Vec<LoopState>>,
    /// `[steering]` sequence weights `[batch, 1, 1]`, `None` when on for the whole batch.
    weights: Vec<Option<Tensor>>,
    /// Per capture row: (steering, intervention) pairs acting there.
    by_row: Vec<Vec<(usize, usize)>>,
    monitor: Option<MonitorBank>,
    /// Whether the current forward pass is a pass over the prompt.
    pub prefill: bool,
    /// Whether the current prompt pass holds the prompt's last token (false for the chunks
    /// before the last when a prompt is read in chunks).
    pub ends_prompt: bool,
    /// Per monitored row of the current pass: its projections and their columns.
    scores: Vec<(Projection, Vec<usize>)>,
    /// A decode step's scores and residual norms in column order, written in place by
    /// [`Self::at_rows`] (kept from step to step, so a step allocates nothing per hook point);
    /// `row_filled` once the current pass has written to them.
    row: (Vec<f32>, Vec<f32>),
    row_filled: bool,
    dtype: DType,
    device: Device,
}

impl HookPlan {
    /// A plan for `batch` sequences.
    pub fn new(
        num_layers: usize,
        batch: usize,
        steerings: Vec<Steering>,
        monitor: Option<MonitorBank>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let mut by_row = vec![Vec::new(); num_layers + 1];
        for (si, s) in steerings.iter().enumerate() {
            if s.sequences.len() != batch {
                return Err(Error::input(format!(
                    "steering '{}' names {} sequences for a batch of {batch}",
                    s.name,
                    s.sequences.len()
                )));
            }
            for (ii, iv) in s.interventions.iter().enumerate() {
                if iv.layer == 0 || iv.layer >= num_layers {
                    return Err(Error::input(format!(
                        "steering '{}': layer {} is not steerable (valid: 1..={})",
                        s.name,
                        iv.layer,
                        num_layers - 1
                    )));
                }
                by_row[iv.layer].push((si, ii));
            }
            let mut seen = Vec::new();
            for iv in &s.interventions {
                if seen.contains(&iv.layer) {
                    return Err(Error::input(format!("steering '{}' lists layer {} twice", s.name, iv.layer)));
                }
                seen.push(iv.layer);
            }
            if let Some(c) = &s.condition {
                c.validate(&s.name)?;
                let n = monitor.as_ref().map_or(0, |m| m.columns.len());
                if c.column >= n {
                    return Err(Error::input(format!(
                        "steering '{}' is conditioned on a monitor column that does not exist",
                        s.name
                    )));
                }
            }
        }
        let strength = steerings
            .iter()
            .map(|s| s.sequences.iter().map(|&on| if on && s.condition.is_none() { 1.0 } else { 0.0 }).collect())
            .collect();
        let loops = vec![vec![LoopState::default(); batch]; steerings.len()];
        let mut plan = Self {
            num_layers,
            weights: vec![None; steerings.len()],
            steerings,
            strength,
            loops,
            by_row,
            monitor,
            prefill: true,
            ends_prompt: true,
            scores: Vec::new(),
            row: (Vec::new(), Vec::new()),
            row_filled: false,
            dtype,
            device: device.clone(),
        };
        for i in 0..plan.steerings.len() {
            plan.refresh_weights(i)?;
        }
        Ok(plan)
    }

    fn refresh_weights(&mut self, i: usize) -> Result<()> {
        let w = &self.strength[i];
        self.weights[i] = if w.iter().all(|&a| a == 1.0) {
            None
        } else {
            let w = w.clone();
            let b = w.len();
            Some(Tensor::from_vec(w, (b, 1, 1), &self.device)?.to_dtype(self.dtype)?)
        };
        Ok(())
    }

    /// The steerings.
    pub fn steerings(&self) -> &[Steering] {
        &self.steerings
    }

    /// Whether steering `i` is switched on for sequence `seq` (its strength may still be 0 in
    /// proportional mode).
    pub fn is_active(&self, i: usize, seq: usize) -> bool {
        match self.steerings[i].condition {
            Some(_) => self.loops[i][seq].on,
            None => self.strength[i][seq] > 0.0,
        }
    }

    /// The strength (0..=1) of steering `i` for sequence `seq`.
    pub fn strength(&self, i: usize, seq: usize) -> f32 {
        self.strength[i][seq]
    }

    /// Feeds the score of sequence `seq`'s newest token to the condition of steering `i` (which
    /// must have one): switches it (returns `Some(on)`) and sets its strength for the next pass.
    pub fn decide(&mut self, i: usize, seq: usize, score: f32) -> Result<Option<bool>> {
        let Some(cond) = &self.steerings[i].condition else {
            return Err(Error::Compute(format!("steering '{}' has no condition", self.steerings[i].name)));
        };
        let state = &mut self.loops[i][seq];
        let switched = cond.step(state, score);
        let w = cond.strength(state.on, score);
        let on = state.on;
        if self.strength[i][seq] != w {
            self.strength[i][seq] = w;
            self.refresh_weights(i)?;
        }
        Ok(switched.then_some(on))
    }

    /// Switches steering `i` on for good (the serving engine's `on_alert="steer"` policy): its
    /// condition stops deciding, for every sequence it applies to.
    pub fn latch_on(&mut self, i: usize) -> Result<()> {
        self.steerings[i].condition = None;
        self.strength[i] = self.steerings[i].sequences.iter().map(|&on| if on { 1.0 } else { 0.0 }).collect();
        self.refresh_weights(i)
    }

    /// The monitor bank, if any.
    pub fn monitor(&self) -> Option<&MonitorBank> {
        self.monitor.as_ref()
    }

    /// Scores and residual norms of the last forward pass, each `[batch, seq, columns]` f32 in
    /// column order (the norm of a column is the one at its layer); `None` if no monitor.
    pub fn take_scores(&mut self) -> Result<Option<(Tensor, Tensor)>> {
        if let Some((scores, norms)) = self.take_row()? {
            let width = scores.len();
            let as_tensor = |v: Vec<f32>| Tensor::from_vec(v, (1, 1, width), &self.device);
            return Ok(Some((as_tensor(scores)?, as_tensor(norms)?)));
        }
        let Some(bank) = &self.monitor else { return Ok(None) };
        let parts = std::mem::take(&mut self.scores);
        if parts.is_empty() {
            return Ok(None);
        }
        let mut order = Vec::with_capacity(bank.columns.len());
        let (mut scores, mut norms) = (Vec::with_capacity(parts.len()), Vec::with_capacity(parts.len()));
        for (p, cols) in parts {
            let (s, n) = p.into_tensors(&self.device)?;
            order.extend(cols);
            scores.push(s);
            norms.push(n);
        }
        let mut inverse = vec![0u32; order.len()];
        for (pos, &col) in order.iter().enumerate() {
            inverse[col] = pos as u32;
        }
        let idx = Tensor::from_vec(inverse, order.len(), scores[0].device())?;
        let pick = |parts: Vec<Tensor>| -> Result<Tensor> { Ok(Tensor::cat(&parts, 2)?.index_select(&idx, 2)?) };
        Ok(Some((pick(scores)?, pick(norms)?)))
    }

    /// [`Self::take_scores`] of a one-sequence pass as host rows: per position, the scores and
    /// the norms in column order. Rows projected on the host (a decode step's) are put in place
    /// with plain loops, without a tensor op per monitored layer; others go through
    /// [`Self::take_scores`].
    pub fn take_score_rows(&mut self) -> Result<Option<HostScores>> {
        if let Some((scores, norms)) = self.take_row()? {
            return Ok(Some((vec![scores], vec![norms])));
        }
        let Some(bank) = &self.monitor else { return Ok(None) };
        let one_host = |(p, _): &(Projection, Vec<usize>)| matches!(p, Projection::Host { dims: (1, _, _), .. });
        if self.scores.is_empty() || !self.scores.iter().all(one_host) {
            return self
                .take_scores()?
                .map(|(s, n)| -> Result<_> {
                    let rows = s.to_device(&Device::Cpu)?.to_vec3::<f32>()?.swap_remove(0);
                    let norms = n.to_device(&Device::Cpu)?.to_vec3::<f32>()?.swap_remove(0);
                    Ok((rows, norms))
                })
                .transpose();
        }
        let width = bank.columns.len();
        let mut rows: Vec<Vec<f32>> = Vec::new();
        let mut norms: Vec<Vec<f32>> = Vec::new();
        for (p, cols) in std::mem::take(&mut self.scores) {
            let Projection::Host { scores, norms: n, dims: (_, t, k) } = p else {
                return Err(Error::Compute("a monitored row was not projected on the host".into()));
            };
            if rows.is_empty() {
                rows = vec![vec![0f32; width]; t];
                norms = vec![vec![0f32; width]; t];
            }
            if rows.len() != t || cols.len() != k {
                return Err(Error::Compute("monitored rows of one pass disagree in length".into()));
            }
            for pos in 0..t {
                for (j, &c) in cols.iter().enumerate() {
                    rows[pos][c] = scores[pos * k + j];
                    norms[pos][c] = n[pos * k + j];
                }
            }
        }
        Ok(Some((rows, norms)))
    }
}

impl HookPlan {
    /// The steerings at capture row `row` applied to `x`: `None` when none acts there.
    fn steer(&self, row: usize, x: &Tensor) -> Result<Option<Tensor>> {
        let mut cur: Option<Tensor> = None;
        for &(si, ii) in &self.by_row[row] {
            if self.strength[si].iter().all(|&a| a == 0.0) {
                continue;
            }
            let iv = &self.steerings[si].interventions[ii];
            if let Some(y) =
                iv.apply(cur.as_ref().unwrap_or(x), self.weights[si].as_ref(), self.prefill, self.ends_prompt)?
            {
                cur = Some(y);
            }
        }
        Ok(cur)
    }

    /// Records the monitor's projections of `x` at capture row `row`.
    fn monitor_at(&mut self, row: usize, x: &Tensor) -> Result<()> {
        if let Some(bank) = &self.monitor {
            if let Some((p, cols)) = bank.project(row, x)? {
                self.scores.push((p, cols.to_vec()));
            }
        }
        Ok(())
    }

    /// One hook point of a decode batch whose row `r` (`x` is `[batch, 1, hidden]`) belongs to
    /// `plans[r]`, a one-sequence plan each: every plan's steerings on its own row, then every
    /// monitor on the result. On the CPU in f32 the batch comes to the host once, and the rows of
    /// neighbouring plans that share their vectors ([`MonitorBank::share_vectors`]) are projected
    /// in one pass; each row's scores are the ones its plan alone would record.
    pub fn at_rows(plans: &mut [&mut HookPlan], point: HookPoint, x: &Tensor) -> Result<Option<Tensor>> {
        let Some(row) = plans.first().and_then(|p| point.row(p.num_layers)) else { return Ok(None) };
        let mut rows: Option<Vec<Tensor>> = None;
        for (r, plan) in plans.iter().enumerate() {
            if plan.by_row[row].is_empty() {
                continue;
            }
            if let Some(y) = plan.steer(row, &x.narrow(0, r, 1)?)? {
                let rows = match rows.as_mut() {
                    Some(rows) => rows,
                    None => rows.insert((0..x.dim(0)?).map(|i| x.narrow(0, i, 1)).collect::<candle_core::Result<_>>()?),
                };
                rows[r] = y;
            }
        }
        let out = rows.map(|rows| Tensor::cat(&rows, 0)).transpose()?;
        let y = out.as_ref().unwrap_or(x);
        if !plans.iter().any(|p| p.monitor.as_ref().is_some_and(|m| m.monitors(row))) {
            return Ok(out);
        }
        let (b, t, h) = y.dims3()?;
        if !(y.device().is_cpu() && y.dtype() == DType::F32 && t == 1 && b == plans.len()) {
            for (r, plan) in plans.iter_mut().enumerate() {
                plan.monitor_at(row, &y.narrow(0, r, 1)?)?;
            }
            return Ok(out);
        }
        {
            // the batch's rows read in place (no copy when they are already contiguous)
            let y = y.contiguous()?;
            let (storage, layout) = y.storage_and_layout();
            let data: &[f32] = match (&*storage, layout.contiguous_offsets()) {
                (candle_core::Storage::Cpu(cpu), Some((start, end))) => &cpu.as_slice::<f32>()?[start..end],
                _ => return Err(Error::Compute("a decode batch's rows are not contiguous f32 on the host".into())),
            };
            let mut r0 = 0;
            while r0 < b {
                let Some(bank) = plans[r0].monitor.as_ref().filter(|m| m.monitors(row)) else {
                    r0 += 1;
                    continue;
                };
                let mut r1 = r0 + 1;
                while r1 < b && plans[r1].monitor.as_ref().is_some_and(|m| m.shares_row(bank, row)) {
                    r1 += 1;
                }
                let Some((scores, norms, cols)) = bank.project_host(row, &data[r0 * h..r1 * h], h) else { break };
                let k = cols.len();
                for (i, plan) in plans[r0..r1].iter_mut().enumerate() {
                    plan.write_row(&cols, &scores[i * k..][..k], &norms[i * k..][..k])?;
                }
                r0 = r1;
            }
        }
        Ok(out)
    }

    /// Puts one decode row's `scores` and `norms` at columns `cols` of this pass's row.
    fn write_row(&mut self, cols: &[usize], scores: &[f32], norms: &[f32]) -> Result<()> {
        if !self.row_filled {
            let width = self.monitor.as_ref().map_or(0, |m| m.columns.len());
            for v in [&mut self.row.0, &mut self.row.1] {
                v.clear();
                v.resize(width, 0.0);
            }
            self.row_filled = true;
        }
        for ((&c, &s), &n) in cols.iter().zip(scores).zip(norms) {
            match (self.row.0.get_mut(c), self.row.1.get_mut(c)) {
                (Some(slot), Some(norm)) => (*slot, *norm) = (s, n),
                _ => return Err(Error::Compute(format!("monitor column {c} is outside this plan's bank"))),
            }
        }
        Ok(())
    }

    /// This pass's decode row (scores, norms), if [`Self::at_rows`] wrote one.
    fn take_row(&mut self) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
        if !std::mem::take(&mut self.row_filled) {
            return Ok(None);
        }
        if !self.scores.is_empty() {
            return Err(Error::Compute("a pass recorded its scores both in place and as projections".into()));
        }
        Ok(Some(self.row.clone()))
    }
}

impl Hooks for HookPlan {
    fn at(&mut self, point: HookPoint, x: &Tensor) -> Result<Option<Tensor>> {
        let Some(row) = point.row(self.num_layers) else { return Ok(None) };
        let cur = self.steer(row, x)?;
        self.monitor_at(row, cur.as_ref().unwrap_or(x))?;
        Ok(cur)
    }

    fn reads(&self, point: HookPoint) -> bool {
        let Some(row) = point.row(self.num_layers) else { return false };
        !self.by_row[row].is_empty() || self.monitor.as_ref().is_some_and(|bank| bank.monitors(row))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn switch() -> Condition {
        Condition {
            column: 0,
            above: Some(2.0),
            below: None,
            hysteresis: 0.0,
            min_on: 0,
            min_off: 0,
            mode: LoopMode::Switch,
        }
    }

    /// The switch decisions of `c` over `scores`, from the start state.
    fn switches(c: &Condition, scores: &[f32]) -> Vec<usize> {
        let mut st = LoopState::default();
        scores.iter().enumerate().filter(|(_, &s)| c.step(&mut st, s)).map(|(i, _)| i).collect()
    }

    /// A decode batch's rows written in place (shared vectors projected together, one plan with
    /// other vectors between them) give each plan the scores it records alone, step after step.
    #[test]
    fn rows_written_in_place_equal_each_plan_alone() -> Result<()> {
        let (layers, hidden) = (2, 8);
        let dir = |s: usize| (0..hidden).map(|i| ((i * 7 + s * 3) % 11) as f32 - 5.0).collect::<Vec<f32>>();
        let bank = |s: usize| {
            let entries =
                vec![("a".to_string(), 1, dir(s)), ("b".to_string(), 2, dir(s + 1)), ("a".to_string(), 2, dir(s))];
            MonitorBank::new(entries, layers, hidden, DType::F32, &Device::Cpu)
        };
        let plan = |b: MonitorBank| HookPlan::new(layers, 1, Vec::new(), Some(b), DType::F32, &Device::Cpu);
        let (first, mut same, other) = (bank(0)?, bank(0)?, bank(4)?);
        same.share_vectors(&first);
        let mut batch = [plan(first.clone())?, plan(other.clone())?, plan(same.clone())?];
        let mut alone = [plan(first)?, plan(other)?, plan(same)?];
        for step in 0..2 {
            let x: Vec<f32> = (0..3 * hidden).map(|i| ((i + 5 * step) as f32 * 0.37).sin()).collect();
            let x = Tensor::from_vec(x, (3, 1, hidden), &Device::Cpu)?;
            for point in [HookPoint::ResidPost(0), HookPoint::ResidPost(1)] {
                let mut refs: Vec<&mut HookPlan> = batch.iter_mut().collect();
                assert!(HookPlan::at_rows(&mut refs, point, &x)?.is_none());
                for (r, p) in alone.iter_mut().enumerate() {
                    p.at(point, &x.narrow(0, r, 1)?)?;
                }
            }
            for (b, a) in batch.iter_mut().zip(alone.iter_mut()) {
                let (got, want) = (b.take_score_rows()?, a.take_score_rows()?);
                assert!(got.is_some() && got == want, "step {step}: {got:?} vs {want:?}");
            }
        }
        Ok(())
    }

    #[test]
    fn min_on_and_min_off_hold_the_state() {
        let chatter: Vec<f32> = (0..40).map(|i| if i % 2 == 0 { 3.0 } else { 0.0 }).collect();
        assert_eq!(switches(&switch(), &chatter).len(), 40);
        let held = switches(&Condition { min_on: 8, ..switch() }, &chatter);
        assert_eq!(&held[..4], &[0, 9, 10, 19]);
        let both = switches(&Condition { min_on: 8, min_off: 8, ..switch() }, &chatter);
        assert_eq!(both, vec![0, 9, 18, 27, 36]);
    }

    #[test]
    fn proportional_strength_grows_with_the_excess() {
        let p = Condition { mode: LoopMode::Proportional { gain: 0.5 }, ..switch() };
        let s: Vec<f32> = [1.0, 2.0, 2.5, 3.0, 4.0, 9.0].iter().map(|&x| p.strength(true, x)).collect();
        assert_eq!(s, vec![0.0, 0.0, 0.25, 0.5, 1.0, 1.0]);
        assert_eq!(p.strength(false, 9.0), 0.0);
        let below = Condition { above: None, below: Some(-1.0), ..p };
        assert_eq!(below.strength(true, -2.0), 0.5);
        assert!(Condition { mode: LoopMode::Proportional { gain: 0.0 }, ..switch() }.validate("s").is_err());
    }

    #[test]
    fn hysteresis_keeps_state_until_margin_is_crossed() {
        let c = Condition { column: 0, above: Some(2.0), below: None, hysteresis: 0.5, ..switch() };
        assert!(!c.next_state(false, 1.9));
        assert!(c.next_state(false, 2.1));
        assert!(c.next_state(true, 1.6));
        assert!(!c.next_state(true, 1.4));
        let d = Condition { column: 0, above: None, below: Some(-1.0), hysteresis: 0.0, ..switch() };
        assert!(d.next_state(false, -1.5));
        assert!(!d.next_state(true, -0.5));
    }
}
