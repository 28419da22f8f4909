//! Receipts: every threshold crossing and every steering switch, as events and JSONL audit lines.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A monitor score rose above its threshold.
    Alert,
    /// A monitor score fell back to or below its threshold.
    Clear,
    /// A conditional steering switched on.
    SteerOn,
    /// A conditional steering switched off.
    SteerOff,
}

impl EventKind {
    /// Lowercase name used in dicts and logs.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Alert => "alert",
            EventKind::Clear => "clear",
            EventKind::SteerOn => "steer_on",
            EventKind::SteerOff => "steer_off",
        }
    }
}

/// One event, with everything that caused it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Kind.
    pub kind: EventKind,
    /// Batch index of the sequence.
    pub sequence: usize,
    /// Token position (prompt positions first, then generated).
    pub position: usize,
    /// Forward pass index (0 = prefill).
    pub step: usize,
    /// Monitor vector name.
    pub vector: String,
    /// Layer of the score.
    pub layer: usize,
    /// The score that caused it.
    pub score: f32,
    /// Threshold crossed, if any.
    pub threshold: Option<f32>,
    /// Steering coefficient, for steer events (for a proportional steer_on, the one in effect).
    pub coef: Option<f32>,
    /// Steering name, for steer events.
    pub steer: Option<String>,
}

impl Event {
    /// The event as a JSON object (also the audit-log line).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "kind": self.kind.name(), "sequence": self.sequence, "position": self.position,
            "step": self.step, "vector": self.vector, "layer": self.layer, "score": self.score,
            "threshold": self.threshold, "coef": self.coef, "steer": self.steer,
        })
    }
}

/// An append-only JSONL file; each line is flushed and synced as it is written, so the log
/// survives a crash mid-generation.
pub struct AuditLog {
    file: std::fs::File,
    path: PathBuf,
}

impl AuditLog {
    /// Opens (creating if needed) `path` for appending.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        Ok(Self { file, path: path.to_path_buf() })
    }

    /// Appends one event with a timestamp, the model it came from and, when given, the id of the
    /// request it belongs to (`request_id`, as the serving engine names it).
    pub fn write(&mut self, event: &Event, model: &str, request_id: Option<&str>) -> Result<()> {
        let mut v = event.to_json();
        if let Some(id) = request_id {
            v["request_id"] = serde_json::json!(id);
        }
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        v["time"] = serde_json::json!(now);
        v["model"] = serde_json::json!(model);
        let line = format!("{v}\n");
        self.file.write_all(line.as_bytes()).map_err(|e| Error::io(&self.path, e))?;
        self.file.sync_data().map_err(|e| Error::io(&self.path, e))
    }
}
