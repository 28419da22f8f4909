"""Reading training samples for screening: :class:`Sample`, :class:`BadSample`, :func:`iter_samples`.

A sample is a prompt and the response a dataset would train on. Accepted shapes (docs/conventions.md, Screening output):

* ``{"messages": [..., {"role": "assistant", "content": y}]}`` (or the bare list of messages): the
  last message must be the assistant's turn; it is the response, everything before it the prompt;
* ``{"prompt": str | messages, "response": str}``: a str prompt is one user message.

Either dict may carry an ``"id"``, reported with the sample's scores. Samples come from an iterable
of such records or from a path: ``.jsonl`` (one JSON record per line; blank lines are not records)
or ``.parquet`` (read in record batches with pyarrow). Records are numbered from 0 in input order,
malformed ones included, so a sample's ``index`` is its position in the input; a JSONL record also
knows its 1-based line number. Everything is streamed: nothing holds more than one record batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, List, Optional, Tuple, Union

from ..errors import InvalidInputError, PersonacoreIOError

__all__ = [
    "Sample",
    "BadSample",
    "SampleError",
    "iter_samples",
    "iter_records",
    "jsonl_lines",
    "source_kind",
    "count_records",
]

#: File suffixes read as JSON Lines and as Parquet.
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
_PARQUET_BATCH = 1024


class SampleError(InvalidInputError):
    """A malformed sample met with ``on_error="fail"``: ``.bad`` is the :class:`BadSample`."""

    def __init__(self, bad: "BadSample"):
        """Wrap ``bad``; the message names its position and what is wrong."""
        super().__init__(f"{bad.where}: {bad.reason}")
        self.bad = bad


@dataclasses.dataclass(frozen=True)
class Sample:
    """One well-formed sample: ``prompt`` (a str or a list of messages) and ``response`` (a str).

    ``index`` is the record's 0-based position in the input, ``line`` its 1-based line in a JSONL
    file (None otherwise), ``id`` the record's ``"id"`` (None when it has none).
    """

    index: int
    prompt: Union[str, List[dict]]
    response: str
    id: Any = None
    line: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class BadSample:
    """A record that cannot be screened: where it is (``index``, ``line``) and ``reason``."""

    index: int
    reason: str
    line: Optional[int] = None

    @property
    def where(self) -> str:
        """``"line 12 (sample 11)"`` for a JSONL record, ``"sample 11"`` otherwise."""
        return f"line {self.line} (sample {self.index})" if self.line else f"sample {self.index}"

    def to_dict(self) -> dict:
        """The report as a plain dict (``index``, ``line``, ``reason``)."""
        return dataclasses.asdict(self)


def source_kind(path: Union[str, os.PathLike]) -> str:
    """``"jsonl"`` or ``"parquet"`` from a path's suffix; :class:`InvalidInputError` otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    raise InvalidInputError(
        f"{os.fspath(path)!r}: unknown sample file type {suffix!r}; "
        f"use {', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)}"
    )


def _open(path: Union[str, os.PathLike], mode: str = "rb"):
    try:
        return open(path, mode)
    except OSError as e:
        raise PersonacoreIOError(f"cannot read samples from {os.fspath(path)!r}: {e}") from e


def pyarrow_parquet():
    """``pyarrow.parquet``, or an :class:`InvalidInputError` saying how to install it."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InvalidInputError(
            "Parquet needs pyarrow: pip install 'personacore[screen]' (or pip install pyarrow)"
        ) from None
    return pq


def jsonl_lines(path: Union[str, os.PathLike], start: int = 0) -> Iterator[Tuple[int, int, bytes]]:
    """``(index, line, raw)`` for each record line of a JSONL file from record ``start`` on.

    Blank lines are not records. ``raw`` is the line's bytes without its end-of-line.
    """
    index = 0
    with _open(path) as f:
        for line_no, raw in enumerate(f, 1):
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue
            if index >= start:
                yield index, line_no, raw
            index += 1


@contextlib.contextmanager
def _parquet_errors(path: Union[str, os.PathLike]) -> Iterator[None]:
    """pyarrow's errors on a corrupt or unreadable Parquet file as personacore's typed errors."""
    try:
        yield
    except OSError as e:  # pyarrow's IO errors (missing file, truncated pages, thrift headers)
        raise PersonacoreIOError(f"cannot read Parquet samples {os.fspath(path)!r}: {e}") from e
    except (ValueError, TypeError, LookupError, ArithmeticError, NotImplementedError) as e:
        # ArrowInvalid (a ValueError), undecodable strings, ... from corrupt bytes
        raise InvalidInputError(
            f"{os.fspath(path)!r} is not a readable Parquet file: {type(e).__name__}: {e}"
        ) from None
    except Exception as e:
        import pyarrow

        if not isinstance(e, pyarrow.ArrowException):  # ArrowCapacityError, ArrowMemoryError...
            raise
        raise InvalidInputError(
            f"{os.fspath(path)!r} is not a readable Parquet file: {type(e).__name__}: {e}"
        ) from None


def _parquet_rows(path: Union[str, os.PathLike], start: int) -> Iterator[Tuple[int, Any]]:
    pq = pyarrow_parquet()
    index = 0
    with _parquet_errors(path):
        for batch in pq.ParquetFile(os.fspath(path)).iter_batches(batch_size=_PARQUET_BATCH):
            if index + batch.num_rows <= start:
                index += batch.num_rows
                continue
            for row in batch.to_pylist():
                if index >= start:
                    yield index, row
                index += 1


def count_records(path: Union[str, os.PathLike]) -> int:
    """Number of records in a ``.jsonl`` or ``.parquet`` file (for progress bars)."""
    if source_kind(path) == "parquet":
        with _parquet_errors(path):
            return int(pyarrow_parquet().ParquetFile(os.fspath(path)).metadata.num_rows)
    return sum(1 for _ in jsonl_lines(path))


def iter_records(source: Any, start: int = 0) -> Iterator[Tuple[int, Optional[int], Any]]:
    """``(index, line, record)`` for every record of ``source`` from record ``start`` on.

    ``source`` is a path (``.jsonl``/``.parquet``) or an iterable of records. A JSONL line that is
    not valid JSON yields a :class:`BadSample` as its record.
    """
    if isinstance(source, (str, os.PathLike)):
        kind = source_kind(source)
        if not Path(source).is_file():
            raise PersonacoreIOError(f"sample file not found: {os.fspath(source)!r}")
        if kind == "parquet":
            for index, row in _parquet_rows(source, start):
                yield index, None, row
            return
        for index, line, raw in jsonl_lines(source, start):
            try:
                yield index, line, json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                yield index, line, BadSample(index, f"bad JSON: {e}", line)
            except RecursionError:  # "[[[[..." a few thousand deep
                yield index, line, BadSample(index, "bad JSON: nested too deeply", line)
        return
    if isinstance(source, (bytes, Mapping)) or not isinstance(source, Iterable):
        raise InvalidInputError(
            "samples must be an iterable of records ({'messages': [...]} or {'prompt', "
            f"'response'}}) or a .jsonl/.parquet path, got {type(source).__name__}"
        )
    for index, record in enumerate(source):
        if index >= start:
            yield index, None, record


def _messages(value: Any, what: str) -> List[dict]:
    """``value`` as a list of ``{"role": str, "content": str}`` dicts, or a ValueError saying why."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise ValueError(f"{what} must be a list of messages, got {type(value).__name__}")
    out = []
    for k, m in enumerate(value):
        if not isinstance(m, Mapping):
            raise ValueError(f"{what}[{k}] must be a dict, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise ValueError(f"{what}[{k}] needs a string 'role' and a string 'content'")
        out.append({"role": role, "content": content})
    return out


def _split_chat(messages: List[dict]) -> Tuple[List[dict], str]:
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant turn: the last message must be the assistant's response")
    if messages[-1]["role"] != "assistant":
        raise ValueError(
            f"the last message is a {messages[-1]['role']!r} turn: a sample must end with the "
            "assistant's response"
        )
    if len(messages) < 2:
        raise ValueError("no prompt: the assistant's response is the only message")
    return messages[:-1], messages[-1]["content"]


def _normalise(record: Any) -> Tuple[Union[str, List[dict]], str, Any]:
    """``(prompt, response, id)`` of a record, or a ValueError saying what is wrong with it."""
    rid = None
    prompt: Union[str, List[dict]]
    if isinstance(record, Mapping):
        rid = record.get("id")
        if record.get("messages") is not None:
            prompt, response = _split_chat(_messages(record["messages"], "messages"))
        elif "prompt" in record or "response" in record:
            given_prompt, given_response = record.get("prompt"), record.get("response")
            if not isinstance(given_response, str):
                raise ValueError(f"'response' must be a str, got {type(given_response).__name__}")
            response = given_response
            if isinstance(given_prompt, str):
                if not given_prompt.strip():
                    raise ValueError("empty prompt")
                prompt = given_prompt
            else:
                prompt = _messages(given_prompt, "prompt")
                if not prompt:
                    raise ValueError("empty prompt: no messages")
        else:
            raise ValueError("a record needs 'messages' or 'prompt' and 'response'")
    else:
        prompt, response = _split_chat(_messages(record, "messages"))
    if not response.strip():
        raise ValueError("empty response")
    return prompt, response, rid


def iter_samples(source: Any, start: int = 0) -> Iterator[Union[Sample, BadSample]]:
    """Each record of ``source`` (from record ``start`` on) as a :class:`Sample` or :class:`BadSample`.

    ``source`` is a path (``.jsonl``/``.parquet``) or an iterable of records or :class:`Sample` s.
    Only the record's shape is checked here; tokens (empty response, context length) are checked
    by :func:`personacore.screen.screen`, which has the model.
    """
    for index, line, record in iter_records(source, start):
        if isinstance(record, (Sample, BadSample)):
            yield record
            continue
        try:
            prompt, response, rid = _normalise(record)
        except ValueError as e:
            yield BadSample(index, str(e), line)
            continue
        yield Sample(index, prompt, response, rid, line)
