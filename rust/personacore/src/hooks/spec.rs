//! Steering and monitoring as a caller describes them (a vector, layer choices, a condition), and
//! their resolution against a model into the hook plan's [`Steering`]s and [`MonitorBank`].
//!
//! Every value is checked here, once. What can be checked without a model is in the `check`
//! methods, so the Python objects (`pc.Steer`, `pc.When`, `pc.Monitor`) fail when they are built;
//! `resolve` runs `check` again and then the checks that need the model (layer ranges, widths,
//! zero rows, monitor names). Layer numbering follows docs/conventions.md ("Layers").

use super::interventions::{Intervention, InterventionKind, Positions};
use super::monitor::MonitorBank;
use super::plan::{Condition, LoopMode, Steering};
use crate::bail_input;
use crate::error::{Error, Result};
use crate::pipeline::Model;

/// A vector as given: row-major f32 data and its shape, `[hidden]` (the same direction at every
/// layer) or `[num_layers + 1, hidden]` (one row per layer).
#[derive(Debug, Clone, PartialEq)]
pub struct VectorArg {
    /// Row-major values.
    pub data: Vec<f32>,
    /// The array's shape.
    pub shape: Vec<usize>,
}

/// A shape as Python prints a tuple: `(4,)`, `(2, 3, 4)`.
fn shape_text(shape: &[usize]) -> String {
    match shape {
        [n] => format!("({n},)"),
        _ => format!("({})", shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    }
}

/// `[a, b]` as Python prints a list of ints.
fn list_text(xs: &[i64]) -> String {
    format!("[{}]", xs.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", "))
}

impl VectorArg {
    /// One or two dimensions, not empty, every value finite.
    pub fn check(&self, what: &str) -> Result<()> {
        if !matches!(self.shape.len(), 1 | 2) {
            bail_input!(
                "{what} must be [hidden] or [num_layers + 1, hidden], got an array of shape {}",
                shape_text(&self.shape)
            );
        }
        if self.data.is_empty() {
            bail_input!("{what} is empty");
        }
        if let Some(i) = self.data.iter().position(|x| !x.is_finite()) {
            let width = self.shape[self.shape.len() - 1];
            let at = if self.shape.len() == 1 { format!("[{i}]") } else { format!("[{}, {}]", i / width, i % width) };
            bail_input!("{what} contains NaN or inf (first at index {at})");
        }
        Ok(())
    }

    /// The direction at each of `layers` (checked against the model's width `hidden` and row
    /// count `num_layers + 1`).
    fn rows(&self, layers: &[usize], num_layers: usize, hidden: usize, what: &str) -> Result<Vec<Vec<f32>>> {
        let rows = num_layers + 1;
        let width = self.shape[self.shape.len() - 1];
        if width != hidden {
            bail_input!("{what} has width {width}, but the model's hidden size is {hidden}");
        }
        if self.shape.len() == 1 {
            return Ok(vec![self.data.clone(); layers.len()]);
        }
        if self.shape[0] != rows {
            bail_input!(
                "{what} has {} rows, but the model needs num_layers + 1 = {rows} (one direction per layer, \
                 docs/conventions.md)",
                self.shape[0]
            );
        }
        Ok(layers.iter().map(|&l| self.data[l * hidden..(l + 1) * hidden].to_vec()).collect())
    }
}

/// A non-empty list of distinct layers.
fn check_layer_list(layers: &[i64], what: &str) -> Result<()> {
    if layers.is_empty() {
        bail_input!("{what} is empty: give at least one layer");
    }
    if layers.iter().enumerate().any(|(i, l)| layers[..i].contains(l)) {
        bail_input!("{what} lists a layer twice: {}", list_text(layers));
    }
    Ok(())
}

/// `x` unless it is NaN or infinite.
fn finite(x: f64, what: &str) -> Result<f32> {
    if !x.is_finite() {
        bail_input!("{what} must be finite, got {}", py_float(x));
    }
    Ok(x as f32)
}

/// A float as Python prints it (`inf`, `nan`, `1.0`).
fn py_float(x: f64) -> String {
    if x.is_nan() {
        "nan".into()
    } else if x.is_infinite() {
        if x > 0.0 { "inf" } else { "-inf" }.into()
    } else if x.fract() == 0.0 && x.abs() < 1e16 {
        format!("{x:.1}")
    } else {
        x.to_string()
    }
}

/// What an intervention does: `"add"` (`pc.Steer`), `"ablate"` (`pc.Ablate`) or `"cap"` (`pc.Cap`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterventionOp {
    /// Add `coef · v`.
    Add,
    /// Remove the component along `v`.
    Ablate,
    /// Clamp the projection on `v`.
    Cap,
}

impl InterventionOp {
    /// Parses `add`, `ablate`, `cap`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "add" => Ok(Self::Add),
            "ablate" => Ok(Self::Ablate),
            "cap" => Ok(Self::Cap),
            _ => Err(Error::input(format!("unknown intervention kind '{name}' (expected 'add', 'ablate' or 'cap')"))),
        }
    }

    /// The Python class that builds it, used to name it in messages.
    pub fn class_name(&self) -> &'static str {
        match self {
            Self::Add => "Steer",
            Self::Ablate => "Ablate",
            Self::Cap => "Cap",
        }
    }
}

/// The condition of a conditional steering (`pc.When`): on while monitor `monitor` scores above
/// (or below) a threshold, read at `layer` (default: the first layer the monitor watches for it).
#[derive(Debug, Clone, PartialEq)]
pub struct WhenSpec {
    /// Name of the monitored vector.
    pub monitor: String,
    /// Switch on above this.
    pub above: Option<f64>,
    /// Switch on below this.
    pub below: Option<f64>,
    /// Switch off only once the score is back by this margin.
    pub hysteresis: f64,
    /// The monitored layer that decides.
    pub layer: Option<i64>,
    /// Once switched on, stay on for at least this many tokens (>= 0).
    pub min_on: i64,
    /// Once switched off, stay off for at least this many tokens (>= 0).
    pub min_off: i64,
    /// `"switch"` (full strength while on) or `"proportional"` (strength `min(1, gain · excess)`).
    pub mode: String,
    /// Strength per unit of excess in proportional mode (default [`DEFAULT_GAIN`]).
    pub gain: Option<f64>,
}

/// The gain of `When(..., mode="proportional")` when none is given: full strength 3.3 score units
/// past the threshold. Of the gains measured (0.1, 0.3, 1; benches/closed_loop.py, benches/README.md
/// "Closed loop"), 0.3 kept the reply's likelihood closest to the unsteered one.
pub const DEFAULT_GAIN: f64 = 0.3;

impl WhenSpec {
    /// A name, exactly one finite threshold, a finite hysteresis >= 0.
    pub fn check(&self) -> Result<()> {
        if self.monitor.is_empty() {
            bail_input!("When needs the name of a monitored vector, got ''");
        }
        if self.above.is_some() == self.below.is_some() {
            bail_input!("When needs exactly one of above= or below=");
        }
        if let Some(a) = self.above {
            finite(a, "When above")?;
        }
        if let Some(b) = self.below {
            finite(b, "When below")?;
        }
        let h = finite(self.hysteresis, "When hysteresis")?;
        if h < 0.0 {
            bail_input!("When hysteresis must be >= 0, got {}", py_float(self.hysteresis));
        }
        for (what, n) in [("min_on", self.min_on), ("min_off", self.min_off)] {
            if n < 0 {
                bail_input!("When {what} must be an int >= 0 (tokens), got {n}");
            }
        }
        match (self.mode.as_str(), self.gain) {
            ("switch", None) => {}
            ("switch", Some(_)) => bail_input!("When gain= needs mode='proportional'"),
            ("proportional", g) => {
                let g = finite(g.unwrap_or(DEFAULT_GAIN), "When gain")?;
                if g <= 0.0 {
                    bail_input!("When gain must be > 0, got {}", py_float(g.into()));
                }
            }
            (m, _) => bail_input!("unknown When mode '{m}' (expected 'switch' or 'proportional')"),
        }
        Ok(())
    }

    /// The loop mode (after [`WhenSpec::check`]).
    fn loop_mode(&self) -> LoopMode {
        match self.mode.as_str() {
            "proportional" => LoopMode::Proportional { gain: self.gain.unwrap_or(DEFAULT_GAIN) as f32 },
            _ => LoopMode::Switch,
        }
    }

    /// The engine condition for steering `steer`, reading the monitor columns `monitor`.
    fn resolve(&self, steer: &str, monitor: Option<&ResolvedMonitor>) -> Result<Condition> {
        let Some(monitor) = monitor else {
            bail_input!(
                "steer '{steer}' is conditional (when='{}'), which needs a monitor: pass \
                 monitor=pc.Monitor({{'{}': ...}}) to model.generate()",
                self.monitor,
                self.monitor
            );
        };
        let Some((_, layers)) = monitor.layers.iter().find(|(n, _)| *n == self.monitor) else {
            let names: Vec<String> = monitor.layers.iter().map(|(n, _)| format!("'{n}'")).collect();
            bail_input!(
                "when= names monitor '{}', which is not monitored (monitored: {})",
                self.monitor,
                if names.is_empty() { "none".to_string() } else { names.join(", ") }
            );
        };
        let layer = self.layer.unwrap_or(layers[0] as i64);
        if !layers.iter().any(|&l| l as i64 == layer) {
            let watched: Vec<i64> = layers.iter().map(|&l| l as i64).collect();
            bail_input!(
                "when= reads '{}' at layer {layer}, but the monitor watches it only at {}",
                self.monitor,
                list_text(&watched)
            );
        }
        let column =
            monitor.bank.columns.iter().position(|c| c.name == self.monitor && c.layer as i64 == layer).ok_or_else(
                || Error::Compute(format!("monitor column '{}' at layer {layer} is missing", self.monitor)),
            )?;
        Ok(Condition {
            column,
            above: self.above.map(|a| a as f32),
            below: self.below.map(|b| b as f32),
            hysteresis: self.hysteresis as f32,
            min_on: self.min_on as usize,
            min_off: self.min_off as usize,
            mode: self.loop_mode(),
        })
    }
}

/// An intervention's layers and the direction at each, checked against a model's dimensions.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedRows {
    /// What it does.
    pub op: InterventionOp,
    /// The steered layers (`1 .. num_layers - 1`), in the order given.
    pub layers: Vec<usize>,
    /// The direction at each layer (`hidden` values each).
    pub rows: Vec<Vec<f32>>,
}

/// One intervention as the caller describes it (`pc.Steer`, `pc.Ablate`, `pc.Cap`).
#[derive(Debug, Clone, PartialEq)]
pub struct InterventionSpec {
    /// `"add"`, `"ablate"` or `"cap"`.
    pub kind: String,
    /// Label of its events.
    pub name: String,
    /// Scale of the added vector (`add` only).
    pub coef: Option<f64>,
    /// Lower bound of the projection (`cap` only).
    pub min: Option<f64>,
    /// Upper bound of the projection (`cap` only).
    pub max: Option<f64>,
    /// The direction(s).
    pub vector: VectorArg,
    /// The vector's recommended layer, used when `layers` is `None`.
    pub recommended: Option<i64>,
    /// The layers to act at (steerable: `1 .. num_layers - 1`).
    pub layers: Option<Vec<i64>>,
    /// `"all"`, `"prompt"` or `"response"` (docs/conventions.md, "Positions").
    pub positions: String,
    /// Optional condition.
    pub when: Option<WhenSpec>,
}

impl InterventionSpec {
    /// Every check that needs no model; returns the parsed kind.
    pub fn check(&self) -> Result<InterventionOp> {
        let op = InterventionOp::parse(&self.kind)?;
        let cls = op.class_name();
        if self.name.is_empty() {
            bail_input!("name must be a non-empty str or None, got ''");
        }
        if !matches!(self.positions.as_str(), "all" | "prompt" | "response") {
            bail_input!("unknown positions '{}'; valid modes: 'all', 'prompt', 'response'", self.positions);
        }
        match op {
            InterventionOp::Add => {
                let coef = self.coef.ok_or_else(|| Error::input("Steer needs a coefficient"))?;
                finite(coef, "Steer coef")?;
            }
            InterventionOp::Ablate => {}
            InterventionOp::Cap => {
                let lo = self.min.map(|m| finite(m, "Cap min")).transpose()?;
                let hi = self.max.map(|m| finite(m, "Cap max")).transpose()?;
                match (lo, hi) {
                    (None, None) => bail_input!("Cap needs min=, max= or both"),
                    (Some(a), Some(b)) if a > b => {
                        bail_input!("Cap min ({}) is greater than max ({})", py_float(a.into()), py_float(b.into()))
                    }
                    _ => {}
                }
            }
        }
        if let Some(layers) = &self.layers {
            check_layer_list(layers, &format!("{cls} layers"))?;
        }
        self.vector.check(&format!("{cls} vector"))?;
        if let Some(w) = &self.when {
            w.check()?;
        }
        Ok(op)
    }

    /// The layers it acts at and the direction at each, for a model of `num_layers` decoder blocks
    /// and width `hidden`: every check of [`InterventionSpec::resolve`] except the condition's and
    /// the batch's (layer range, width, row count, non-zero direction for ablate and cap). Also what
    /// `personacore.integrations.torch` checks a transformers model's hooks with.
    pub fn resolve_rows(&self, num_layers: usize, hidden: usize) -> Result<ResolvedRows> {
        let op = self.check()?;
        let cls = op.class_name();
        let layers = match (&self.layers, self.recommended) {
            (Some(ls), _) => ls.clone(),
            (None, Some(r)) => vec![r],
            (None, None) => bail_input!(
                "{cls} needs layers=[...]: the vector has no recommended layer (only a PersonaVector with .layer \
                 set provides one)"
            ),
        };
        let n = num_layers;
        let layers = layers
            .iter()
            .map(|&l| {
                usize::try_from(l).ok().filter(|&l| (1..n).contains(&l)).ok_or_else(|| {
                    Error::input(format!(
                        "{cls} layer {l} is not steerable: valid layers are 1..{} (the output of decoder block i; \
                         docs/conventions.md)",
                        n.saturating_sub(1)
                    ))
                })
            })
            .collect::<Result<Vec<usize>>>()?;
        let rows = self.vector.rows(&layers, num_layers, hidden, &format!("{cls} vector"))?;
        if op != InterventionOp::Add {
            if let Some(i) = rows.iter().position(|r| r.iter().all(|&x| x == 0.0)) {
                bail_input!("{cls} needs a non-zero direction, but the vector is zero at layer {}", layers[i]);
            }
        }
        Ok(ResolvedRows { op, layers, rows })
    }

    /// The engine steering for `model`, applied to `sequences` of a batch of `batch`; a condition
    /// reads the columns of `monitor`.
    pub fn resolve(
        &self,
        model: &Model,
        sequences: &[usize],
        batch: usize,
        monitor: Option<&ResolvedMonitor>,
    ) -> Result<Steering> {
        let c = model.config();
        let ResolvedRows { op, layers, rows } = self.resolve_rows(c.num_layers, c.hidden_size)?;
        let kind = match op {
            InterventionOp::Add => InterventionKind::Add { coef: self.coef.unwrap_or(1.0) as f32 },
            InterventionOp::Ablate => InterventionKind::Ablate,
            InterventionOp::Cap => {
                InterventionKind::Cap { min: self.min.map(|m| m as f32), max: self.max.map(|m| m as f32) }
            }
        };
        let positions = Positions::parse(&self.positions)?;
        let t = &model.transformer;
        let interventions = layers
            .iter()
            .zip(&rows)
            .map(|(&l, v)| Intervention::new(l, kind, v, positions, t.dtype(), t.device()))
            .collect::<Result<Vec<_>>>()?;
        let mut mask = vec![false; batch];
        for &s in sequences {
            *mask.get_mut(s).ok_or_else(|| {
                Error::input(format!("steer '{}': sequence {s} is not in the batch of {batch}", self.name))
            })? = true;
        }
        let condition = self.when.as_ref().map(|w| w.resolve(&self.name, monitor)).transpose()?;
        Ok(Steering { name: self.name.clone(), interventions, sequences: mask, condition })
    }
}

/// Which layers a monitored vector is scored at.
#[derive(Debug, Clone, PartialEq)]
pub enum LayerChoice {
    /// The vector's recommended layer.
    Recommended,
    /// A name: only `"all"` (every row `0 ..= num_layers`) is one.
    Named(String),
    /// These rows, in this order.
    Layers(Vec<i64>),
}

impl LayerChoice {
    fn check(&self, what: &str) -> Result<()> {
        match self {
            LayerChoice::Recommended => Ok(()),
            LayerChoice::Named(n) if n == "all" => Ok(()),
            LayerChoice::Named(n) => bail_input!("{what} must be None, 'all', an int or a list of ints, got '{n}'"),
            LayerChoice::Layers(ls) => check_layer_list(ls, what),
        }
    }
}

/// One named vector of a monitor.
#[derive(Debug, Clone, PartialEq)]
pub struct MonitorVector {
    /// Its name (labels scores and events).
    pub name: String,
    /// The direction(s).
    pub vector: VectorArg,
    /// Its recommended layer, if any.
    pub recommended: Option<i64>,
}

/// A monitor bank as the caller describes it (`pc.Monitor`).
#[derive(Debug, Clone, PartialEq)]
pub struct MonitorSpec {
    /// The vectors, in score order.
    pub vectors: Vec<MonitorVector>,
    /// Layers of every vector not named in `layers_by_name`.
    pub layers: LayerChoice,
    /// Layers per vector name.
    pub layers_by_name: Vec<(String, LayerChoice)>,
    /// Alert thresholds per vector name.
    pub thresholds: Vec<(String, f64)>,
    /// Let attention-sink positions raise alerts and switch conditions
    /// ([`super::monitor::SinkDetector`]; they are skipped by default).
    pub include_sinks: bool,
}

/// A monitor resolved against a model: the bank, a threshold per column, and the layers of each
/// name in score order.
#[derive(Debug, Clone)]
pub struct ResolvedMonitor {
    /// The vectors to project on.
    pub bank: MonitorBank,
    /// Per column: its alert threshold.
    pub thresholds: Vec<Option<f32>>,
    /// Per name: the layers it is scored at.
    pub layers: Vec<(String, Vec<usize>)>,
}

impl MonitorSpec {
    /// Every check that needs no model.
    pub fn check(&self) -> Result<()> {
        if self.vectors.is_empty() {
            bail_input!("Monitor needs a non-empty dict {{name: vector}} (PersonaVector or array)");
        }
        let names: Vec<&str> = self.vectors.iter().map(|v| v.name.as_str()).collect();
        let unknown = |keys: Vec<&String>| -> Vec<String> {
            keys.into_iter().filter(|k| !names.contains(&k.as_str())).map(|k| format!("'{k}'")).collect()
        };
        for v in &self.vectors {
            if v.name.is_empty() {
                bail_input!("Monitor vector names must be non-empty strs, got ''");
            }
            v.vector.check(&format!("Monitor vector '{}'", v.name))?;
        }
        let bad = unknown(self.layers_by_name.iter().map(|(n, _)| n).collect());
        if !bad.is_empty() {
            bail_input!("Monitor layers names unknown vectors: [{}]", bad.join(", "));
        }
        let bad = unknown(self.thresholds.iter().map(|(n, _)| n).collect());
        if !bad.is_empty() {
            let known: Vec<String> = names.iter().map(|n| format!("'{n}'")).collect();
            bail_input!(
                "Monitor thresholds name unknown vectors [{}]; monitored: [{}]",
                bad.join(", "),
                known.join(", ")
            );
        }
        for v in &self.vectors {
            self.choice(&v.name).check(&format!("Monitor layers for '{}'", v.name))?;
        }
        for (name, t) in &self.thresholds {
            finite(*t, &format!("Monitor threshold for '{name}'"))?;
        }
        Ok(())
    }

    fn choice(&self, name: &str) -> &LayerChoice {
        self.layers_by_name.iter().find(|(n, _)| n == name).map_or(&self.layers, |(_, c)| c)
    }

    /// The layers each vector is scored at on `model`, in score order.
    pub fn layers_for(&self, model: &Model) -> Result<Vec<(String, Vec<usize>)>> {
        self.check()?;
        let n = model.config().num_layers;
        self.vectors
            .iter()
            .map(|v| {
                let layers: Vec<i64> = match self.choice(&v.name) {
                    LayerChoice::Named(_) => (0..=n as i64).collect(),
                    LayerChoice::Layers(ls) => ls.clone(),
                    LayerChoice::Recommended => match v.recommended {
                        Some(r) => vec![r],
                        None => bail_input!(
                            "Monitor vector '{}' has no recommended layer: pass layers=[...] or 'all' (only a \
                             PersonaVector with .layer set provides one)",
                            v.name
                        ),
                    },
                };
                let layers = layers
                    .iter()
                    .map(|&l| {
                        usize::try_from(l).ok().filter(|&l| l <= n).ok_or_else(|| {
                            Error::input(format!("Monitor layer {l} for '{}' is outside 0..{n}", v.name))
                        })
                    })
                    .collect::<Result<Vec<usize>>>()?;
                Ok((v.name.clone(), layers))
            })
            .collect()
    }

    /// The bank, thresholds and layers for `model`.
    pub fn resolve(&self, model: &Model) -> Result<ResolvedMonitor> {
        let layers = self.layers_for(model)?;
        let (mut entries, mut thresholds) = (Vec::new(), Vec::new());
        for (v, (name, ls)) in self.vectors.iter().zip(&layers) {
            let (n, hidden) = (model.config().num_layers, model.config().hidden_size);
            let rows = v.vector.rows(ls, n, hidden, &format!("Monitor vector '{name}'"))?;
            let threshold = self.thresholds.iter().find(|(n, _)| n == name).map(|(_, t)| *t as f32);
            for (&l, row) in ls.iter().zip(rows) {
                if row.iter().all(|&x| x == 0.0) {
                    bail_input!(
                        "Monitor vector '{name}' is zero at layer {l}: a projection a·v/‖v‖ needs a non-zero v"
                    );
                }
                entries.push((name.clone(), l, row));
                thresholds.push(threshold);
            }
        }
        let (c, t) = (model.config(), &model.transformer);
        let mut bank = MonitorBank::new(entries, c.num_layers, c.hidden_size, t.dtype(), t.device())?;
        bank.include_sinks = self.include_sinks;
        Ok(ResolvedMonitor { bank, thresholds, layers })
    }
}

/// Monitor scores regrouped by name: the `[n, columns]` row-major table of a session becomes one
/// `[n, layers of the name]` table per name, in the monitor's order.
#[derive(Debug, Clone)]
pub struct ScoreGroups {
    /// Per name: the layers (= columns of its table), in score order.
    pub layers: Vec<(String, Vec<usize>)>,
    /// Per name: its columns in the session's table.
    columns: Vec<Vec<usize>>,
    width: usize,
}

impl ScoreGroups {
    /// Groups the session columns `(name, layer)`.
    pub fn new(columns: &[(String, usize)]) -> Self {
        let mut layers: Vec<(String, Vec<usize>)> = Vec::new();
        let mut idx: Vec<Vec<usize>> = Vec::new();
        for (c, (name, layer)) in columns.iter().enumerate() {
            match layers.iter().position(|(n, _)| n == name) {
                Some(g) => {
                    layers[g].1.push(*layer);
                    idx[g].push(c);
                }
                None => {
                    layers.push((name.clone(), vec![*layer]));
                    idx.push(vec![c]);
                }
            }
        }
        Self { layers, columns: idx, width: columns.len() }
    }

    /// Splits a row-major `[n, columns]` table into `(name, [n, k], row-major data)` per name.
    pub fn split(&self, table: &[f32]) -> Vec<(&str, [usize; 2], Vec<f32>)> {
        let n = table.len().checked_div(self.width).unwrap_or(0);
        self.layers
            .iter()
            .zip(&self.columns)
            .map(|((name, _), cols)| {
                let data = (0..n).flat_map(|r| cols.iter().map(move |&c| table[r * self.width + c])).collect();
                (name.as_str(), [n, cols.len()], data)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector(data: Vec<f32>, shape: Vec<usize>) -> VectorArg {
        VectorArg { data, shape }
    }

    fn steer() -> InterventionSpec {
        InterventionSpec {
            kind: "add".into(),
            name: "x".into(),
            coef: Some(1.0),
            min: None,
            max: None,
            vector: vector(vec![1.0; 4], vec![4]),
            recommended: None,
            layers: Some(vec![1]),
            positions: "all".into(),
            when: None,
        }
    }

    fn message(r: Result<impl std::fmt::Debug>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn model_free_intervention_checks() {
        assert!(steer().check().is_ok());
        let bad = [
            (InterventionSpec { layers: Some(vec![]), ..steer() }, "empty"),
            (InterventionSpec { layers: Some(vec![3, 3]), ..steer() }, "twice: [3, 3]"),
            (InterventionSpec { positions: "last".into(), ..steer() }, "positions 'last'"),
            (InterventionSpec { coef: Some(f64::NAN), ..steer() }, "Steer coef must be finite, got nan"),
            (InterventionSpec { kind: "cap".into(), ..steer() }, "min=, max="),
            (InterventionSpec { kind: "cap".into(), min: Some(2.0), max: Some(1.0), ..steer() }, "greater"),
            (InterventionSpec { vector: vector(vec![1.0; 24], vec![2, 3, 4]), ..steer() }, "shape (2, 3, 4)"),
            (InterventionSpec { vector: vector(vec![f32::INFINITY], vec![1]), ..steer() }, "NaN or inf"),
        ];
        for (spec, want) in bad {
            let msg = message(spec.check());
            assert!(msg.contains(want), "{msg:?} lacks {want:?}");
        }
    }

    #[test]
    fn rows_resolve_against_dimensions() {
        let per_layer: Vec<f32> = (0..12).map(|x| x as f32).collect();
        let spec = InterventionSpec { vector: vector(per_layer, vec![3, 4]), layers: Some(vec![1]), ..steer() };
        let r = spec.resolve_rows(2, 4).unwrap();
        assert_eq!((r.op, r.layers, r.rows), (InterventionOp::Add, vec![1], vec![vec![4.0, 5.0, 6.0, 7.0]]));
        let flat = steer().resolve_rows(3, 4).unwrap();
        assert_eq!(flat.rows, vec![vec![1.0; 4]]);
        let ablate_zero = InterventionSpec { kind: "ablate".into(), vector: vector(vec![0.0; 4], vec![4]), ..steer() };
        let bad = [
            (steer().resolve_rows(3, 5), "width 4, but the model's hidden size is 5"),
            (spec.resolve_rows(3, 4), "has 3 rows, but the model needs num_layers + 1 = 4"),
            (InterventionSpec { layers: Some(vec![3]), ..steer() }.resolve_rows(3, 4), "layer 3 is not steerable"),
            (InterventionSpec { layers: None, ..steer() }.resolve_rows(3, 4), "needs layers=[...]"),
            (ablate_zero.resolve_rows(3, 4), "Ablate needs a non-zero direction"),
        ];
        for (r, want) in bad {
            let msg = message(r);
            assert!(msg.contains(want), "{msg:?} lacks {want:?}");
        }
    }

    #[test]
    fn when_rules() {
        let w = WhenSpec {
            monitor: "evil".into(),
            above: Some(1.0),
            below: None,
            hysteresis: 0.0,
            layer: None,
            min_on: 8,
            min_off: 0,
            mode: "switch".into(),
            gain: None,
        };
        assert!(w.check().is_ok());
        assert!(WhenSpec { mode: "proportional".into(), ..w.clone() }.check().is_ok());
        assert!(message(WhenSpec { min_on: -1, ..w.clone() }.check()).contains("min_on must be an int >= 0"));
        assert!(message(WhenSpec { min_off: -2, ..w.clone() }.check()).contains("min_off"));
        assert!(message(WhenSpec { mode: "pid".into(), ..w.clone() }.check()).contains("unknown When mode 'pid'"));
        assert!(message(WhenSpec { gain: Some(1.0), ..w.clone() }.check()).contains("mode='proportional'"));
        let p = WhenSpec { mode: "proportional".into(), ..w.clone() };
        assert!(message(WhenSpec { gain: Some(0.0), ..p.clone() }.check()).contains("gain must be > 0"));
        assert!(message(WhenSpec { gain: Some(f64::NAN), ..p }.check()).contains("finite"));
        assert!(message(WhenSpec { above: None, ..w.clone() }.check()).contains("exactly one"));
        assert!(message(WhenSpec { below: Some(0.0), ..w.clone() }.check()).contains("exactly one"));
        assert!(message(WhenSpec { hysteresis: -1.0, ..w.clone() }.check()).contains("hysteresis"));
        assert!(message(WhenSpec { monitor: String::new(), ..w }.check()).contains("name"));
    }

    #[test]
    fn monitor_checks() {
        let one = MonitorVector { name: "a".into(), vector: vector(vec![1.0; 4], vec![4]), recommended: None };
        let spec = MonitorSpec {
            vectors: vec![one.clone()],
            layers: LayerChoice::Layers(vec![1]),
            layers_by_name: vec![],
            thresholds: vec![],
            include_sinks: false,
        };
        assert!(spec.check().is_ok());
        let bad = [
            (MonitorSpec { vectors: vec![], ..spec.clone() }, "non-empty"),
            (MonitorSpec { layers: LayerChoice::Named("some".into()), ..spec.clone() }, "'all'"),
            (MonitorSpec { layers: LayerChoice::Layers(vec![1, 1]), ..spec.clone() }, "twice"),
            (MonitorSpec { layers_by_name: vec![("b".into(), LayerChoice::Recommended)], ..spec.clone() }, "unknown"),
            (MonitorSpec { thresholds: vec![("b".into(), 1.0)], ..spec.clone() }, "unknown"),
            (MonitorSpec { thresholds: vec![("a".into(), f64::INFINITY)], ..spec.clone() }, "finite"),
        ];
        for (s, want) in bad {
            let msg = message(s.check());
            assert!(msg.contains(want), "{msg:?} lacks {want:?}");
        }
    }

    #[test]
    fn scores_regroup_by_name() {
        let cols = [("a".to_string(), 3), ("b".to_string(), 1), ("a".to_string(), 5)];
        let g = ScoreGroups::new(&cols);
        assert_eq!(g.layers, vec![("a".to_string(), vec![3, 5]), ("b".to_string(), vec![1])]);
        let split = g.split(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(split, vec![("a", [2, 2], vec![1.0, 3.0, 4.0, 6.0]), ("b", [2, 1], vec![2.0, 5.0])]);
        assert_eq!(g.split(&[])[0].1, [0, 2]);
    }
}
