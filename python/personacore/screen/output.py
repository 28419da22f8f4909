"""Writing screening results: resumable chunked output, plain export, filtered datasets.

Output rows follow docs/conventions.md, Screening output (``index``, ``id``, ``scores``, ``response_proj``,
``baseline_proj``, ``prompt_last_proj``, ``baseline``). In Parquet each per-vector field is a
struct column with one float32 field per vector name, and ``id`` is a string column.

:class:`CheckpointWriter` makes a long run safe to kill. Next to the output ``OUT`` it keeps a
folder ``OUT.partial/`` with ``state.json``: the run's settings, the input position to continue
from, and how much output is committed. A batch is committed in this order: its rows are written
and fsynced (JSONL: appended to ``OUT``; Parquet: a complete part file ``part-NNNNNN.parquet``
renamed into place), then the new state is written to a temporary file, fsynced and renamed over
``state.json``. A kill at any moment therefore leaves a state that describes a prefix of whole
batches; resuming truncates ``OUT`` to the committed length (a torn last line, or a batch written
but not yet recorded, is dropped), deletes uncommitted parts, and continues from the recorded
input position, where an uninterrupted run would have started its next batch too. When the run
ends, Parquet parts are merged into ``OUT``, then ``state.json`` is removed (from that moment the
run is finished) and the rest of ``OUT.partial/`` after it; a kill while the folder is removed
leaves a folder without a state, which the next ``--resume`` clears.
"""

from __future__ import annotations

import json
import os
import shutil
from array import array
from pathlib import Path
from typing import Any, BinaryIO, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import InvalidInputError, PersonacoreIOError
from .samples import jsonl_lines, pyarrow_parquet, source_kind

__all__ = [
    "CheckpointWriter",
    "write_rows",
    "read_scores",
    "write_filtered",
    "filtered_path",
    "row_fields",
]

_STATE_VERSION = 1


def row_fields(method: str) -> List[str]:
    """The per-vector fields of an output row for ``method``, in row order."""
    base = ["baseline_proj"] if method == "delta" else []
    return ["scores", "response_proj", *base, "prompt_last_proj"]


def _schema(names: Sequence[str], method: str):
    import pyarrow as pa

    per_vector = pa.struct([(n, pa.float32()) for n in names])
    fields = [("index", pa.int64()), ("id", pa.string())]
    fields += [(f, per_vector) for f in row_fields(method)]
    if method == "delta":
        fields.append(("baseline", pa.string()))
    return pa.schema(fields)


def _id_text(rid: Any) -> Optional[str]:
    if rid is None or isinstance(rid, str):
        return rid
    return str(rid) if isinstance(rid, int) else json.dumps(rid, sort_keys=True)


def _table(rows: List[Mapping[str, Any]], schema: Any):
    import pyarrow as pa

    cols: Dict[str, list] = {f.name: [] for f in schema}
    for row in rows:
        for name in cols:
            value = row.get(name)
            cols[name].append(_id_text(value) if name == "id" else value)
    return pa.Table.from_pydict(cols, schema=schema)


def _jsonl_bytes(rows: Iterable[Mapping[str, Any]]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in rows)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not every platform opens folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a fsynced temporary file renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_rows(
    path: Union[str, os.PathLike],
    rows: Iterable[Mapping[str, Any]],
    names: Sequence[str],
    method: str,
    kind: Optional[str] = None,
) -> None:
    """Write output rows to a ``.jsonl`` or ``.parquet`` file (``kind`` overrides the suffix)."""
    kind = kind or source_kind(path)
    try:
        if kind == "parquet":
            pq = pyarrow_parquet()
            pq.write_table(_table(list(rows), _schema(names, method)), os.fspath(path))
        else:
            with open(path, "wb") as f:
                f.write(_jsonl_bytes(rows))
    except OSError as e:
        raise PersonacoreIOError(f"cannot write {os.fspath(path)!r}: {e}") from e


class CheckpointWriter:
    """Appends screening results to ``out`` (``.jsonl`` or ``.parquet``) batch by batch, durably.

    ``settings`` (a JSON-able dict: method, vectors, model, input...) is stored with the state; a
    resume with different settings is refused. After construction, :attr:`start` is the input
    position to screen from, and :attr:`complete` is True when ``resume`` found a finished output
    (nothing left to do). Call :meth:`write` per batch and :meth:`finish` at the end.
    """

    def __init__(
        self,
        out: Union[str, os.PathLike],
        names: Sequence[str],
        method: str,
        settings: Mapping[str, Any],
        resume: bool = False,
    ):
        """Open ``out``: fresh (refusing to clobber an interrupted run) or resumed."""
        self.out = Path(out)
        self.kind = source_kind(self.out)
        if self.kind == "parquet":
            pyarrow_parquet()
        self.names, self.method = list(names), method
        self.partial = self.out.with_name(self.out.name + ".partial")
        self._state_path = self.partial / "state.json"
        self.settings = json.loads(json.dumps(settings))
        self.complete = False
        self.state: Dict[str, Any] = {}
        self._file: Optional[BinaryIO] = None
        try:
            if self._state_path.exists():
                if not resume:
                    raise InvalidInputError(
                        f"an interrupted run left {self.partial}: pass --resume to continue it, "
                        f"or delete that folder to start over"
                    )
                self._resume()
            elif resume and self.out.exists():
                self.complete = True
                self.state = {"next_index": None, "rows": None}
                if self.partial.exists():  # the finished run was killed removing its folder
                    shutil.rmtree(self.partial)
            else:
                self._fresh()
        except OSError as e:
            raise PersonacoreIOError(f"cannot write {self.out}: {e}") from e

    # ---- state --------------------------------------------------------------------------------
    @property
    def start(self) -> Optional[int]:
        """The input position to continue from (None when the output is already complete)."""
        return self.state["next_index"]

    @property
    def rows(self) -> Optional[int]:
        """Rows committed so far."""
        return self.state["rows"]

    def _commit(self) -> None:
        _atomic_write(self._state_path, json.dumps(self.state, indent=1).encode())

    def _fresh(self) -> None:
        self.partial.mkdir(parents=True, exist_ok=True)
        for stale in self.partial.glob("part-*.parquet*"):
            stale.unlink()
        self.state = {
            "version": _STATE_VERSION,
            "settings": self.settings,
            "next_index": 0,
            "rows": 0,
            "bytes": 0,
            "parts": 0,
            "last_index": None,
        }
        # The state first: a kill before it leaves no state and no output (a fresh start), a kill
        # after it but before the output exists is resumed from row 0 (see _resume_jsonl). Creating
        # the output first would leave an empty OUT that --resume took for a finished run.
        self._commit()
        if self.kind == "jsonl":
            self._file = f = open(self.out, "wb")
            os.fsync(f.fileno())

    def _resume(self) -> None:
        state = json.loads(self._state_path.read_text())
        if state.get("version") != _STATE_VERSION:
            raise InvalidInputError(f"{self._state_path}: unknown state version, cannot resume")
        old = state["settings"]
        if old != self.settings:
            diff = sorted(
                k for k in set(old) | set(self.settings) if old.get(k) != self.settings.get(k)
            )
            raise InvalidInputError(
                f"cannot resume {self.out}: the run was started with other settings ({', '.join(diff)} "
                f"differ: was {[old.get(k) for k in diff]}, now {[self.settings.get(k) for k in diff]})"
            )
        self.state = state
        if self.kind == "jsonl":
            self._resume_jsonl()
        else:
            for part in self.partial.glob("part-*.parquet*"):
                if part.suffix != ".parquet" or int(part.stem.split("-")[1]) >= state["parts"]:
                    part.unlink()  # written after the last commit (or a torn temporary)

    def _resume_jsonl(self) -> None:
        committed = self.state["bytes"]
        if committed == 0 and not self.out.exists():
            self.out.touch()  # killed between the first commit and creating the output
        size = self.out.stat().st_size if self.out.exists() else -1
        if size < committed:
            raise InvalidInputError(
                f"cannot resume {self.out}: it has {max(size, 0)} bytes, fewer than the "
                f"{committed} recorded in {self._state_path}; delete both to start over"
            )
        self._file = f = open(self.out, "r+b")
        f.truncate(committed)  # drops a torn line or an unrecorded batch
        f.seek(committed)
        os.fsync(f.fileno())
        if committed:
            f.seek(max(0, committed - (4 << 20)))  # a row is far shorter
            tail = f.read().rsplit(b"\n", 2)[-2]
            f.seek(committed)
            if json.loads(tail).get("index") != self.state["last_index"]:
                raise InvalidInputError(
                    f"cannot resume {self.out}: its last committed row is not sample "
                    f"{self.state['last_index']} as {self._state_path} records"
                )

    # ---- writing ------------------------------------------------------------------------------
    def write(self, result: Any) -> None:
        """Commit one batch (a :class:`~personacore.screen.ScreenResult` with ``next_index``)."""
        rows = list(result.rows())
        try:
            if rows and self.kind == "jsonl":
                data = _jsonl_bytes(rows)
                f = self._jsonl_file()
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
                self.state["bytes"] += len(data)
            elif rows:
                part = self.partial / f"part-{self.state['parts']:06d}.parquet"
                tmp = part.with_name(part.name + ".tmp")
                with open(tmp, "wb") as f:
                    pyarrow_parquet().write_table(_table(rows, _schema(self.names, self.method)), f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, part)
                _fsync_dir(self.partial)
                self.state["parts"] += 1
            if rows:
                self.state["rows"] += len(rows)
                self.state["last_index"] = rows[-1]["index"]
            self.state["next_index"] = int(result.next_index)
            self._commit()
        except OSError as e:
            raise PersonacoreIOError(f"cannot write {self.out}: {e}") from e

    def finish(self) -> None:
        """Close the output (Parquet: merge the parts into it) and remove ``OUT.partial/``."""
        if self.complete:
            return
        try:
            if self.kind == "jsonl":
                self._jsonl_file().close()
            else:
                self._merge_parts()
            # The state first, alone: without it the run is finished. Removed with the rest of the
            # folder, a kill could take the parts a resumed run would merge and leave the state.
            self._state_path.unlink()
            _fsync_dir(self.partial)
            shutil.rmtree(self.partial)
            _fsync_dir(self.out.parent)
        except OSError as e:
            raise PersonacoreIOError(f"cannot write {self.out}: {e}") from e
        self.complete = True

    def _jsonl_file(self) -> BinaryIO:
        """The open JSONL output (opened by the constructor unless the output was complete)."""
        if self._file is None:
            raise InvalidInputError(f"{self.out} is already complete: nothing to write")
        return self._file

    def close(self) -> None:
        """Close the output file without finishing (the run can be resumed)."""
        if self._file is not None and not self._file.closed:
            self._file.close()

    def _merge_parts(self) -> None:
        pq = pyarrow_parquet()
        schema = _schema(self.names, self.method)
        tmp = self.out.with_name(self.out.name + ".tmp")
        with pq.ParquetWriter(os.fspath(tmp), schema) as w:
            for k in range(self.state["parts"]):
                w.write_table(pq.read_table(self.partial / f"part-{k:06d}.parquet", schema=schema))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.out)


def _scored_rows(path: Path) -> Iterable[Mapping[str, Any]]:
    if source_kind(path) == "parquet":
        pf = pyarrow_parquet().ParquetFile(os.fspath(path))
        for batch in pf.iter_batches(columns=["index", "scores"]):
            yield from batch.to_pylist()
    else:
        for _, _, raw in jsonl_lines(path):
            yield json.loads(raw)


def read_scores(
    path: Union[str, os.PathLike], names: Sequence[str]
) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """``(indices, {name: scores})`` of a scored output file, read row by row (8 bytes a value)."""
    idx = array("q")
    cols = {n: array("d") for n in names}
    for row in _scored_rows(Path(path)):
        idx.append(int(row["index"]))
        for n in names:
            v = row["scores"].get(n)
            cols[n].append(float("nan") if v is None else float(v))
    return np.frombuffer(idx, np.int64), {
        n: np.frombuffer(c, np.float64).astype(np.float32) for n, c in cols.items()
    }


def filtered_path(out: Union[str, os.PathLike], source: Union[str, os.PathLike]) -> Path:
    """Where the filtered dataset goes: next to ``out``, ``<out stem>.filtered<input suffix>``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.filtered{Path(source).suffix}")


def write_filtered(
    source: Union[str, os.PathLike], dest: Union[str, os.PathLike], keep: np.ndarray
) -> int:
    """Copy the records of ``source`` whose index ``i`` has ``keep[i]`` to ``dest`` (same format,
    records unchanged, streamed); returns how many were written."""
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    kept = 0
    try:
        if source_kind(source) == "parquet":
            import pyarrow as pa

            pq = pyarrow_parquet()
            pf = pq.ParquetFile(os.fspath(source))
            start = 0
            with pq.ParquetWriter(os.fspath(tmp), pf.schema_arrow) as w:
                for batch in pf.iter_batches(batch_size=1024):
                    stop = start + batch.num_rows
                    mask = np.zeros(batch.num_rows, dtype=bool)
                    hi = min(stop, len(keep))
                    if hi > start:
                        mask[: hi - start] = keep[start:hi]
                    w.write_batch(batch.filter(pa.array(mask)))
                    kept += int(mask.sum())
                    start = stop
        else:
            with open(tmp, "wb") as f:
                for index, _, raw in jsonl_lines(source):
                    if index < len(keep) and keep[index]:
                        f.write(raw + b"\n")
                        kept += 1
        os.replace(tmp, dest)
    except OSError as e:
        raise PersonacoreIOError(f"cannot write {dest}: {e}") from e
    return kept
