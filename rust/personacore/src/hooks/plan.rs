//! The hook plan of a (batched) forward pass: steering interventions per layer and sequence,
//! then monitor projections. Layers with nothing planned cost one lookup.

use candle_core::{DType, Device, Tensor};

use super::interventions::Intervention;
use super::monitor::MonitorBank;
use super::{HookPoint, Hooks};
use crate::error::{Error, Result};

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
}

impl Condition {
    /// Exactly one finite threshold and a finite, non-negative hysteresis.
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
        Ok(())
    }

    /// The new on/off state given the current state and a score.
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

/// Interventions and monitoring for one batch, called by the layer loop.
pub struct HookPlan {
    num_layers: usize,
    steerings: Vec<Steering>,
    /// `[steering][sequence]` whether it is on now.
    active: Vec<Vec<bool>>,
    /// `[steering]` sequence weights `[batch, 1, 1]`, `None` when on for the whole batch.
    weights: Vec<Option<Tensor>>,
    /// Per capture row: (steering, intervention) pairs acting there.
    by_row: Vec<Vec<(usize, usize)>>,
    monitor: Option<MonitorBank>,
    /// Whether the current forward pass is the prompt pass.
    pub prefill: bool,
    scores: Vec<(Tensor, Vec<usize>)>,
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
        let active =
            steerings.iter().map(|s| s.sequences.iter().map(|&on| on && s.condition.is_none()).collect()).collect();
        let mut plan = Self {
            num_layers,
            weights: vec![None; steerings.len()],
            steerings,
            active,
            by_row,
            monitor,
            prefill: true,
            scores: Vec::new(),
            dtype,
            device: device.clone(),
        };
        for i in 0..plan.steerings.len() {
            plan.refresh_weights(i)?;
        }
        Ok(plan)
    }

    fn refresh_weights(&mut self, i: usize) -> Result<()> {
        let act = &self.active[i];
        self.weights[i] = if act.iter().all(|&a| a) {
            None
        } else {
            let w: Vec<f32> = act.iter().map(|&a| if a { 1.0 } else { 0.0 }).collect();
            let b = w.len();
            Some(Tensor::from_vec(w, (b, 1, 1), &self.device)?.to_dtype(self.dtype)?)
        };
        Ok(())
    }

    /// The steerings.
    pub fn steerings(&self) -> &[Steering] {
        &self.steerings
    }

    /// Whether steering `i` is on for sequence `seq`.
    pub fn is_active(&self, i: usize, seq: usize) -> bool {
        self.active[i][seq]
    }

    /// Switches steering `i` on or off for sequence `seq`.
    pub fn set_active(&mut self, i: usize, seq: usize, on: bool) -> Result<()> {
        if self.active[i][seq] != on {
            self.active[i][seq] = on;
            self.refresh_weights(i)?;
        }
        Ok(())
    }

    /// Switches steering `i` on for good (the serving engine's `on_alert="steer"` policy): its
    /// condition stops deciding, for every sequence it applies to.
    pub fn latch_on(&mut self, i: usize) -> Result<()> {
        self.steerings[i].condition = None;
        self.active[i] = self.steerings[i].sequences.clone();
        self.refresh_weights(i)
    }

    /// The monitor bank, if any.
    pub fn monitor(&self) -> Option<&MonitorBank> {
        self.monitor.as_ref()
    }

    /// Scores of the last forward pass, `[batch, seq, columns]` f32 in column order; `None` if no monitor.
    pub fn take_scores(&mut self) -> Result<Option<Tensor>> {
        let Some(bank) = &self.monitor else { return Ok(None) };
        let parts = std::mem::take(&mut self.scores);
        if parts.is_empty() {
            return Ok(None);
        }
        let mut order = Vec::with_capacity(bank.columns.len());
        let tensors: Vec<Tensor> = parts
            .into_iter()
            .map(|(t, cols)| {
                order.extend(cols);
                t
            })
            .collect();
        let cat = Tensor::cat(&tensors, 2)?;
        let mut inverse = vec![0u32; order.len()];
        for (pos, &col) in order.iter().enumerate() {
            inverse[col] = pos as u32;
        }
        let idx = Tensor::from_vec(inverse, order.len(), cat.device())?;
        Ok(Some(cat.index_select(&idx, 2)?))
    }
}

impl Hooks for HookPlan {
    fn at(&mut self, point: HookPoint, x: &Tensor) -> Result<Option<Tensor>> {
        let Some(row) = point.row(self.num_layers) else { return Ok(None) };
        let mut cur: Option<Tensor> = None;
        for &(si, ii) in &self.by_row[row] {
            if self.active[si].iter().all(|&a| !a) {
                continue;
            }
            let iv = &self.steerings[si].interventions[ii];
            if let Some(y) = iv.apply(cur.as_ref().unwrap_or(x), self.weights[si].as_ref(), self.prefill)? {
                cur = Some(y);
            }
        }
        if let Some(bank) = &self.monitor {
            if let Some((s, cols)) = bank.project(row, cur.as_ref().unwrap_or(x))? {
                self.scores.push((s, cols.to_vec()));
            }
        }
        Ok(cur)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hysteresis_keeps_state_until_margin_is_crossed() {
        let c = Condition { column: 0, above: Some(2.0), below: None, hysteresis: 0.5 };
        assert!(!c.next_state(false, 1.9));
        assert!(c.next_state(false, 2.1));
        assert!(c.next_state(true, 1.6));
        assert!(!c.next_state(true, 1.4));
        let d = Condition { column: 0, above: None, below: Some(-1.0), hysteresis: 0.0 };
        assert!(d.next_state(false, -1.5));
        assert!(!d.next_state(true, -0.5));
    }
}
