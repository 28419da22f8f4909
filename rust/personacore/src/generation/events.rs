//! Receipts: every threshold crossing and every steering switch, as events and JSONL audit lines.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

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

/// When the audit log is `fsync`ed (each line is written with one `write` as the event happens,
/// so it survives the process being killed; `fsync` makes it survive a power loss too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuditFsync {
    /// Once when the generation (or serving request) ends, and when it fails.
    #[default]
    Request,
    /// After every line.
    Event,
    /// Never (the OS writes the page cache back in its own time).
    Never,
}

impl AuditFsync {
    /// Parses `"request"`, `"event"` or `"never"`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "request" => Ok(Self::Request),
            "event" => Ok(Self::Event),
            "never" => Ok(Self::Never),
            _ => Err(Error::input(format!("audit_fsync '{name}' is not one of 'request', 'event', 'never'"))),
        }
    }
}

/// Where and how to write receipts, with the hashes every line carries.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditSpec {
    /// The JSONL file (absolute).
    pub path: PathBuf,
    /// When to `fsync`.
    pub fsync: AuditFsync,
    /// `vector_sha256` of each monitored vector, by name.
    pub vectors: Vec<(String, String)>,
    /// `vector_sha256` of each steering's vector, by steering name.
    pub steers: Vec<(String, String)>,
}

/// An append-only JSONL file (opened `O_APPEND`: each line goes out in one `write`, so concurrent
/// writers never interleave inside a line). Each line names the vector and the steering by name
/// and `vector_sha256`, and the model by path and `model_sha256`; see docs/conventions.md.
pub struct AuditLog {
    file: std::fs::File,
    spec: AuditSpec,
    /// Lines written since the last `fsync`.
    unsynced: bool,
    /// A regular file (`fsync` means nothing for `/dev/null` or a pipe, where it fails).
    regular: bool,
}

/// The hash recorded for `name`, if any.
fn lookup<'a>(pairs: &'a [(String, String)], name: Option<&str>) -> Option<&'a str> {
    let name = name?;
    pairs.iter().find(|(n, _)| n == name).map(|(_, h)| h.as_str())
}

impl AuditLog {
    /// Opens (creating if needed) `spec.path` for appending. A file that does not end in a newline
    /// (a line torn by a power loss) gets one first, so the torn line stays one damaged line that
    /// readers skip instead of being glued to the next event.
    pub fn open(spec: &AuditSpec) -> Result<Self> {
        let path = &spec.path;
        let open = |read: bool| std::fs::OpenOptions::new().create(true).read(read).append(true).open(path);
        // A file we may append to but not read (mode 0200) is used as is, without the repair.
        let (mut file, readable) = match open(true) {
            Ok(f) => (f, true),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                (open(false).map_err(|e| Error::io(path, e))?, false)
            }
            Err(e) => return Err(Error::io(path, e)),
        };
        let io = |e| Error::io(path, e);
        let len = file.metadata().map_err(io)?.len();
        let mut unsynced = false;
        let regular = file.metadata().map_err(io)?.is_file();
        if readable && regular && len > 0 {
            // Under the lock every writer holds while it appends a line (see `write`), so the
            // last byte read is never that of a line another process is writing right now.
            file.lock().map_err(io)?;
            let len = file.metadata().map_err(io)?.len();
            let mut last = [0u8; 1];
            file.seek(SeekFrom::Start(len - 1)).map_err(io)?;
            file.read_exact(&mut last).map_err(io)?;
            let repaired = if last[0] != b'\n' { file.write_all(b"\n") } else { Ok(()) };
            file.unlock().map_err(io)?;
            repaired.map_err(io)?;
            unsynced = last[0] != b'\n';
        }
        Ok(Self { file, spec: spec.clone(), unsynced, regular })
    }

    /// Appends one event with a timestamp, the model it came from (path and `model_sha256`), the
    /// hashes of its vector and steering and, when given, the id of the request it belongs to
    /// (`request_id`, as the serving engine names it). The line is one `write` of the whole
    /// line; with [`AuditFsync::Event`] it is also synced.
    pub fn write(&mut self, event: &Event, model: &crate::pipeline::Model, request_id: Option<&str>) -> Result<()> {
        let mut v = event.to_json();
        v["vector_sha256"] = serde_json::json!(lookup(&self.spec.vectors, Some(&event.vector)));
        v["steer_sha256"] = serde_json::json!(lookup(&self.spec.steers, event.steer.as_deref()));
        if let Some(id) = request_id {
            v["request_id"] = serde_json::json!(id);
        }
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        v["time"] = serde_json::json!(now);
        v["model"] = serde_json::json!(model.source.display().to_string());
        v["model_sha256"] = serde_json::json!(model.sha256);
        let line = format!("{v}\n");
        let io = |e| Error::io(&self.spec.path, e);
        // One write of the whole line, under an exclusive lock on regular files, so that a
        // process opening the log meanwhile never takes a half-written line for a torn one.
        if self.regular {
            self.file.lock().map_err(io)?;
        }
        let written = self.file.write_all(line.as_bytes());
        if self.regular {
            self.file.unlock().map_err(io)?;
        }
        written.map_err(io)?;
        self.unsynced = true;
        if self.spec.fsync == AuditFsync::Event {
            self.sync()?;
        }
        Ok(())
    }

    /// `fsync`s the lines written so far (unless the policy is [`AuditFsync::Never`]).
    pub fn sync(&mut self) -> Result<()> {
        if self.unsynced && self.regular && self.spec.fsync != AuditFsync::Never {
            self.file.sync_data().map_err(|e| Error::io(&self.spec.path, e))?;
        }
        self.unsynced = false;
        Ok(())
    }
}

impl Drop for AuditLog {
    /// The end of a generation or request (finished, cancelled or failed): the per-request sync.
    fn drop(&mut self) {
        if let Err(e) = self.sync() {
            eprintln!("personacore: could not fsync the audit log: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsync_policies_parse_and_name_the_bad_one() {
        assert_eq!(AuditFsync::parse("request").unwrap(), AuditFsync::Request);
        assert_eq!(AuditFsync::parse("event").unwrap(), AuditFsync::Event);
        assert_eq!(AuditFsync::parse("never").unwrap(), AuditFsync::Never);
        assert_eq!(AuditFsync::default(), AuditFsync::Request);
        let msg = AuditFsync::parse("Event").unwrap_err().to_string();
        assert!(msg.contains("'Event'") && msg.contains("'request', 'event', 'never'"), "{msg}");
    }

    #[test]
    fn opening_a_torn_log_starts_a_new_line() {
        let dir = std::env::temp_dir().join(format!("personacore-audit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("torn.jsonl");
        std::fs::write(&path, b"{\"kind\": \"alert\"}\n{\"kind\": \"al").unwrap();
        let spec = AuditSpec { path: path.clone(), fsync: AuditFsync::Never, vectors: vec![], steers: vec![] };
        drop(AuditLog::open(&spec).unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), b"{\"kind\": \"alert\"}\n{\"kind\": \"al\n");
        drop(AuditLog::open(&spec).unwrap()); // a whole last line is left alone
        assert!(std::fs::read(&path).unwrap().ends_with(b"al\n"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
