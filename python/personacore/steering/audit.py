"""Receipts: read an audit log and check it against the vector and model files it names.

The engine appends one JSON line per event (``model.generate(..., audit_log=PATH)``, the serving
engine, ``personacore serve --audit-log``). Every line names its vector and steering by name and
``vector_sha256`` and the model by ``model_sha256``; both hashes are defined in
docs/conventions.md (Audit log) and recomputed here with hashlib alone, independently of the
engine's Rust code, so that :func:`verify_audit_log` (``personacore audit verify``) can tell
whether the files at hand are the ones a log was written with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Union

import numpy as np

from ..errors import InvalidInputError, PersonacoreIOError
from ..vectors import PersonaVector, load_vector

__all__ = [
    "AUDIT_FSYNC",
    "AuditLogWarning",
    "AuditReport",
    "model_sha256",
    "read_audit_log",
    "vector_sha256",
    "verify_audit_log",
]

#: The ``audit_fsync`` policies: ``"request"`` (default: once when a generation or serving request
#: ends), ``"event"`` (after every line) and ``"never"``.
AUDIT_FSYNC = ("request", "event", "never")

_WHOLE_FILE_LIMIT = 8 << 20
_SAMPLES = 64
_BLOCK = 64 << 10


class AuditLogWarning(UserWarning):
    """A line of an audit log that could not be read (torn by a crash, or damaged) was skipped."""


def vector_sha256(vector: Any) -> str:
    """The ``vector_sha256`` of a :class:`~personacore.PersonaVector` or array: sha256 of
    ``"f32le <dims separated by spaces>\\n"`` followed by the values as little-endian float32,
    row-major (see docs/conventions.md, Audit log)."""
    if isinstance(vector, PersonaVector):
        arr = vector.directions
    else:
        arr = np.asarray(vector)
    if arr.dtype.kind not in "fiu":
        raise InvalidInputError(f"vector_sha256 needs a numeric array, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype="<f4")
    h = hashlib.sha256(("f32le " + " ".join(str(d) for d in arr.shape) + "\n").encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def _model_files(path: Path) -> List[Path]:
    if not path.is_dir():
        return [path]
    files = [
        p
        for p in path.iterdir()
        if p.is_file() and (p.name == "config.json" or p.name.endswith(".safetensors"))
    ]
    return sorted(files, key=lambda p: p.name)


def model_sha256(path: Union[str, os.PathLike]) -> str:
    """The ``model_sha256`` of a model directory or ``.gguf`` file (see docs/conventions.md, Audit
    log): over ``config.json`` and the ``*.safetensors`` files (or the one ``.gguf``), by file name,
    each as ``"<name>\\n<size>\\n"`` then its bytes, or 64 evenly spaced 64 KiB blocks of a file
    larger than 8 MiB. ``Model.sha256`` is the engine's value for a loaded model."""
    root = Path(os.path.expanduser(os.fspath(path)))
    if not root.exists():
        raise InvalidInputError(
            f"model '{root}' does not exist (give a model directory or a .gguf file)"
        )
    h = hashlib.sha256()
    for f in _model_files(root):
        size = f.stat().st_size
        h.update(f"{f.name}\n{size}\n".encode())
        with open(f, "rb") as fh:
            if size <= _WHOLE_FILE_LIMIT:
                h.update(fh.read())
                continue
            for k in range(_SAMPLES):
                fh.seek(k * (size - _BLOCK) // (_SAMPLES - 1))
                h.update(fh.read(_BLOCK))
    return h.hexdigest()


def read_audit_log(path: Union[str, os.PathLike]) -> List[Dict[str, Any]]:
    """The events of an audit log, as dicts in file order.

    A line that is not a JSON object is skipped with an :class:`AuditLogWarning`: the last line
    when it has no newline (the writer was killed mid-write: nothing after it was lost), or a
    damaged line elsewhere (its line number is in the warning). A missing file raises
    :class:`~personacore.PersonacoreIOError`.
    """
    p = Path(os.path.expanduser(os.fspath(path)))
    try:
        data = p.read_bytes()
    except OSError as e:
        raise PersonacoreIOError(f"cannot read audit log '{p}': {e.strerror or e}") from e
    lines = data.split(b"\n")
    events: List[Dict[str, Any]] = []
    for number, raw in enumerate(lines, start=1):
        last = number == len(lines)
        if not raw.strip():
            continue
        try:
            event = json.loads(raw)
            if not isinstance(event, dict):
                raise ValueError("not a JSON object")
        except (ValueError, RecursionError):
            what = "torn last line (written when the writer died)" if last else "damaged line"
            warnings.warn(
                f"audit log '{p}': skipped {what} {number}: {raw[:80]!r}",
                AuditLogWarning,
                stacklevel=2,
            )
            continue
        events.append(event)
    return events


@dataclasses.dataclass
class AuditReport:
    """What :func:`verify_audit_log` found: counts, and one line per mismatch."""

    events: int = 0
    skipped_lines: int = 0
    vectors_checked: Dict[str, int] = dataclasses.field(default_factory=dict)
    model_checked: int = 0
    unchecked_vectors: Dict[str, int] = dataclasses.field(default_factory=dict)
    mismatches: List[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no event disagrees with the given files."""
        return not self.mismatches

    def summary(self) -> str:
        """A few lines for people."""
        out = [f"events: {self.events} (lines skipped: {self.skipped_lines})"]
        for name, n in sorted(self.vectors_checked.items()):
            out.append(f"vector {name}: {n} hashes checked")
        for name, n in sorted(self.unchecked_vectors.items()):
            out.append(f"vector {name}: {n} events not checked (no --vector {name}=PATH given)")
        if self.model_checked:
            out.append(f"model: {self.model_checked} hashes checked")
        out.extend(f"MISMATCH {m}" for m in self.mismatches[:20])
        if len(self.mismatches) > 20:
            out.append(f"... and {len(self.mismatches) - 20} more mismatches")
        out.append("OK" if self.ok else f"FAILED: {len(self.mismatches)} mismatches")
        return "\n".join(out)


def _hash_of(vector: Any, name: str) -> str:
    if isinstance(vector, (str, os.PathLike)):
        return vector_sha256(load_vector(vector))
    if isinstance(vector, (PersonaVector, np.ndarray)):
        return vector_sha256(vector)
    raise InvalidInputError(
        f"vector {name!r}: expected a path, a PersonaVector or an array, got {type(vector).__name__}"
    )


def verify_audit_log(
    path: Union[str, os.PathLike],
    vectors: Mapping[str, Any],
    model: Union[str, os.PathLike, None] = None,
) -> AuditReport:
    """Check every event of the audit log at ``path`` against the given files.

    ``vectors`` maps a name (as the log names the monitored vector or the steering) to a vector
    file, a :class:`~personacore.PersonaVector` or an array; each event's ``vector_sha256`` (and
    ``steer_sha256``) for that name must equal the hash of it. ``model`` (a model directory or
    ``.gguf`` file), when given, must match every event's ``model_sha256``. Events of names not
    given are counted as unchecked. Torn or damaged lines are skipped with a warning and counted.
    """
    expected = {name: _hash_of(v, name) for name, v in vectors.items()}
    model_hash = model_sha256(model) if model is not None else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AuditLogWarning)
        events = read_audit_log(path)
    report = AuditReport(events=len(events))
    report.skipped_lines = sum(1 for w in caught if issubclass(w.category, AuditLogWarning))
    for w in caught:
        warnings.warn(w.message, w.category, stacklevel=2)
    for i, e in enumerate(events):
        where = f"event {i} ({e.get('kind')}, request {e.get('request_id')}, position {e.get('position')})"
        for name_key, hash_key in (("vector", "vector_sha256"), ("steer", "steer_sha256")):
            name = e.get(name_key)
            if name is None:
                continue
            if name not in expected:
                report.unchecked_vectors[name] = report.unchecked_vectors.get(name, 0) + 1
                continue
            got = e.get(hash_key)
            if got != expected[name]:
                report.mismatches.append(
                    f"{where}: {name_key} {name!r} has {hash_key} {got}, the file gives {expected[name]}"
                )
            else:
                report.vectors_checked[name] = report.vectors_checked.get(name, 0) + 1
        if model_hash is not None:
            if e.get("model_sha256") != model_hash:
                report.mismatches.append(
                    f"{where}: model_sha256 {e.get('model_sha256')}, the model gives {model_hash}"
                )
            else:
                report.model_checked += 1
    return report
