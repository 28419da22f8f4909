"""Screening training data by projection difference (paper §6.1, App. I): :func:`screen`.

For a sample (prompt x, response y), the model's own greedy reply y' to x and a vector v at its
layer l, with v̂ = v/‖v‖ and means over response tokens (docs/conventions.md, "Poolings"):

    response_proj    = mean(a_l(x, y)) · v̂
    baseline_proj    = mean(a_l(x, y')) · v̂        (method "delta" only)
    prompt_last_proj = a_l(x)[last prompt token] · v̂
    score            = response − baseline ("delta", the paper's ΔP), response − prompt_last
                       ("prompt_last") or response alone ("response")

Samples are processed in batches of ``batch_size``: the batch's y' are generated in one call
(greedy, ``max_new_tokens``) under a monitor that scores every generated token at each vector's
layer, so the baseline projection is the mean of those scores (no second pass over x + y'); then
the samples (x, y) go through one :meth:`Model.pool` call, which pools inside the forward pass
(only ``[n, L+1, H]`` rows leave the engine, never the full hidden states); every vector is
projected from the same pooled rows at its own layer. Batches are cut in
input order from the well-formed samples only, so a run resumed at a batch boundary computes the
same batches as one that never stopped.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Union

import numpy as np

from ..errors import ChatTemplateError, InvalidInputError
from ..vectors import PersonaVector
from .samples import BadSample, Sample, SampleError, iter_samples

__all__ = ["METHODS", "ON_ERROR", "ScreenResult", "screen", "iter_screen", "resolve_vectors"]

#: Screening methods (docs/conventions.md, Screening output).
METHODS = ("delta", "prompt_last", "response")
#: What to do with a malformed sample: report and skip it, or raise :class:`SampleError`.
ON_ERROR = ("skip", "fail")
_POOLINGS = ("response_avg", "prompt_last")
_FIELDS = ("scores", "response_proj", "baseline_proj", "prompt_last_proj")


class _Unit:
    """One vector of the bank: its name, layer and unit direction (float64) at that layer."""

    __slots__ = ("name", "layer", "unit", "vector")

    def __init__(self, name: str, layer: int, unit: np.ndarray, vector: PersonaVector):
        self.name, self.layer, self.unit, self.vector = name, layer, unit, vector


def _named(vectors: Any) -> Dict[str, Any]:
    if isinstance(vectors, (PersonaVector, str, os.PathLike)):
        vectors = [vectors]
    if isinstance(vectors, Mapping):
        out = {str(k): v for k, v in vectors.items()}
    elif isinstance(vectors, Iterable):
        out = {}
        for v in vectors:
            if isinstance(v, (str, os.PathLike)):
                v = PersonaVector.load(v)
            if not isinstance(v, PersonaVector):
                raise InvalidInputError(
                    f"vectors must be PersonaVectors or vector file paths, got {type(v).__name__}"
                )
            name = v.name or "vector"
            if name in out:
                raise InvalidInputError(
                    f"two vectors are named {name!r}: pass a dict {{name: vector}} to name them"
                )
            out[name] = v
    else:
        raise InvalidInputError(
            "vectors must be a PersonaVector, a {name: PersonaVector} dict or a list of them, "
            f"got {type(vectors).__name__}"
        )
    if not out:
        raise InvalidInputError("vectors is empty: screening needs at least one vector")
    return out


def resolve_vectors(model: Any, vectors: Any, layer: Any = None) -> List[_Unit]:
    """The vector bank: ``(name, layer, v̂)`` per vector, checked against ``model``.

    ``vectors`` is a :class:`PersonaVector`, a file path, a ``{name: vector or path}`` dict or a list;
    ``layer`` overrides each vector's recommended layer (an int for all, or ``{name: int}``).
    """
    bank = []
    shape = (model.num_layers + 1, model.hidden_size)
    for name, v in _named(vectors).items():
        if isinstance(v, (str, os.PathLike)):
            v = PersonaVector.load(v)
        if not isinstance(v, PersonaVector):
            raise InvalidInputError(f"vector {name!r} is a {type(v).__name__}, not a PersonaVector")
        if v.shape != shape:
            raise InvalidInputError(
                f"vector {name!r} has shape {v.shape}, the model needs {shape} (num_layers + 1, hidden)"
            )
        at = layer.get(name, v.layer) if isinstance(layer, Mapping) else layer
        at = v.layer if at is None else at
        if at is None:
            raise InvalidInputError(f"vector {name!r} has no recommended layer: pass layer=")
        if isinstance(at, bool) or not isinstance(at, (int, np.integer)) or not 0 <= at < shape[0]:
            raise InvalidInputError(f"layer {at!r} of vector {name!r} is not in 0..{shape[0] - 1}")
        row = v.directions[int(at)].astype(np.float64)
        norm = float(np.linalg.norm(row))
        if norm == 0.0:
            raise InvalidInputError(f"vector {name!r} is zero at layer {at}")
        bank.append(_Unit(name, int(at), row / norm, v))
    return bank


def _check_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidInputError(f"{what} must be an int >= 1, got {value!r}")
    return int(value)


def check_options(method: str, max_new_tokens: Any, batch_size: Any, on_error: str) -> None:
    """Raise :class:`InvalidInputError` for an unknown method or on_error, or a bad count."""
    if method not in METHODS:
        raise InvalidInputError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    if on_error not in ON_ERROR:
        raise InvalidInputError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
    _check_int(max_new_tokens, "max_new_tokens")
    _check_int(batch_size, "batch_size")


def _finite_or_none(x: float) -> Optional[float]:
    return None if math.isnan(x) else x


class ScreenResult:
    """Scores of screened samples, in input order (one entry per well-formed sample).

    Per vector name, float32 arrays of length ``len(self)``: ``response_proj``, ``prompt_last_proj``,
    ``baseline_proj`` (``"delta"`` only) and ``scores``. ``baselines`` are the model's greedy replies
    y' (``"delta"`` only, else None), generated with ``max_new_tokens``. ``indices`` are the samples'
    positions in the input, ``ids`` their ``"id"`` (None where absent), ``layers`` each vector's
    layer, ``errors`` the malformed samples that were skipped (:class:`BadSample`). A y' that is
    empty (the model ends its turn at once) has no mean: its baseline and delta score are NaN, which
    filters never drop and rankings put last.
    """

    def __init__(
        self,
        method: str,
        layers: Mapping[str, int],
        indices: Any,
        ids: Sequence[Any],
        response_proj: Mapping[str, np.ndarray],
        prompt_last_proj: Mapping[str, np.ndarray],
        scores: Mapping[str, np.ndarray],
        baseline_proj: Optional[Mapping[str, np.ndarray]] = None,
        baselines: Optional[Sequence[str]] = None,
        max_new_tokens: Optional[int] = None,
        errors: Sequence[BadSample] = (),
        next_index: Optional[int] = None,
    ):
        """Build a result from its columns (use :func:`screen` instead)."""
        self.method = method
        self.layers = dict(layers)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.ids = list(ids)
        self.response_proj = {k: np.asarray(v, np.float32) for k, v in response_proj.items()}
        self.prompt_last_proj = {k: np.asarray(v, np.float32) for k, v in prompt_last_proj.items()}
        self.scores = {k: np.asarray(v, np.float32) for k, v in scores.items()}
        self.baseline_proj = {
            k: np.asarray(v, np.float32) for k, v in (baseline_proj or {}).items()
        }
        self.baselines = list(baselines) if baselines is not None else None
        self.max_new_tokens = max_new_tokens
        self.errors = list(errors)
        #: The input position after the last record this result consumed (resuming starts there).
        self.next_index = next_index

    # ---- shape --------------------------------------------------------------------------------
    @property
    def names(self) -> List[str]:
        """The vector names, in the order they were given."""
        return list(self.layers)

    def __len__(self) -> int:
        """Number of screened samples."""
        return len(self.indices)

    def __repr__(self) -> str:
        return (
            f"ScreenResult(method={self.method!r}, samples={len(self)}, vectors={self.layers}, "
            f"errors={len(self.errors)})"
        )

    # ---- selection ----------------------------------------------------------------------------
    def select(self, which: Any) -> "ScreenResult":
        """A new result with the samples picked by ``which`` (positions or a boolean mask)."""
        pos = np.arange(len(self))[np.asarray(which)] if len(self) else np.zeros(0, np.int64)

        def cols(d):
            return {k: v[pos] for k, v in d.items()}

        return ScreenResult(
            self.method,
            self.layers,
            self.indices[pos],
            [self.ids[i] for i in pos],
            cols(self.response_proj),
            cols(self.prompt_last_proj),
            cols(self.scores),
            cols(self.baseline_proj),
            [self.baselines[i] for i in pos] if self.baselines is not None else None,
            self.max_new_tokens,
            self.errors,
            self.next_index,
        )

    def _name(self, vector: Optional[str]) -> str:
        if vector is None:
            if len(self.layers) != 1:
                raise InvalidInputError(f"several vectors were screened: name one of {self.names}")
            return self.names[0]
        if vector not in self.layers:
            raise InvalidInputError(f"no vector named {vector!r}; screened: {self.names}")
        return vector

    def _names(self, vector: Optional[str]) -> List[str]:
        return self.names if vector is None else [self._name(vector)]

    def top(self, k: int, vector: Optional[str] = None) -> "ScreenResult":
        """The ``k`` highest-scoring samples on ``vector``, highest first (ties in input order)."""
        k = _check_int(k, "k") if k != 0 else 0
        return self.select(ranking(self.scores[self._name(vector)])[:k])

    def keep_below(self, threshold: float, vector: Optional[str] = None) -> "ScreenResult":
        """The samples whose score is below ``threshold`` on ``vector`` (None: on every vector)."""
        return self.select(keep_below_mask(self.scores, threshold, self._names(vector)))

    def drop_top(self, fraction: float, vector: Optional[str] = None) -> "ScreenResult":
        """The samples left after dropping the top ``fraction`` (0..1) of scores on ``vector``
        (None: on any vector); ``round(fraction * n)`` samples per vector are dropped."""
        return self.select(~top_fraction_mask(self.scores, fraction, self._names(vector)))

    # ---- export -------------------------------------------------------------------------------
    def rows(self) -> Iterator[Dict[str, Any]]:
        """One dict per sample in the output row format of docs/conventions.md (Screening output) (NaN becomes None)."""
        fields = [f for f in _FIELDS if getattr(self, f)]
        for i in range(len(self)):
            row: Dict[str, Any] = {"index": int(self.indices[i])}
            if self.ids[i] is not None:
                row["id"] = self.ids[i]
            for f in fields:
                row[f] = {k: _finite_or_none(float(v[i])) for k, v in getattr(self, f).items()}
            if self.baselines is not None:
                row["baseline"] = self.baselines[i]
            yield row

    def to_jsonl(self, path: Union[str, os.PathLike]) -> None:
        """Write :meth:`rows` to a JSON Lines file."""
        from .output import write_rows

        write_rows(path, self.rows(), self.names, self.method, "jsonl")

    def to_parquet(self, path: Union[str, os.PathLike]) -> None:
        """Write :meth:`rows` to a Parquet file (needs pyarrow; ``id`` is stored as a string)."""
        from .output import write_rows

        write_rows(path, self.rows(), self.names, self.method, "parquet")

    def to_pandas(self) -> Any:
        """A pandas DataFrame: ``index``, ``id``, ``baseline`` and one ``field.name`` column per
        vector and field (e.g. ``scores.impolite``). Needs pandas."""
        try:
            import pandas as pd
        except ImportError:
            raise InvalidInputError("to_pandas needs pandas: pip install pandas") from None
        data: Dict[str, Any] = {"index": self.indices, "id": self.ids}
        for f in _FIELDS:
            for k, v in getattr(self, f).items():
                data[f"{f}.{k}"] = v
        if self.baselines is not None:
            data["baseline"] = self.baselines
        return pd.DataFrame(data)

    @classmethod
    def concat(cls, parts: Sequence["ScreenResult"]) -> "ScreenResult":
        """One result from consecutive results of the same screening (e.g. batches)."""
        if not parts:
            raise InvalidInputError("concat needs at least one ScreenResult")
        first = parts[0]
        if any(p.method != first.method or p.layers != first.layers for p in parts):
            raise InvalidInputError(
                "concat needs results of one screening (the same method and vectors)"
            )

        def cols(field):
            return {k: np.concatenate([getattr(p, field)[k] for p in parts]) for k in first.layers}

        return cls(
            first.method,
            first.layers,
            np.concatenate([p.indices for p in parts]),
            [i for p in parts for i in p.ids],
            cols("response_proj"),
            cols("prompt_last_proj"),
            cols("scores"),
            cols("baseline_proj") if first.baseline_proj else None,
            [b for p in parts for b in p.baselines or ()] if first.baselines is not None else None,
            first.max_new_tokens,
            [e for p in parts for e in p.errors],
            parts[-1].next_index,
        )


def ranking(scores: np.ndarray) -> np.ndarray:
    """Positions of ``scores`` from highest to lowest, ties in input order, NaN last."""
    key = np.where(np.isnan(scores), -np.inf, scores.astype(np.float64))
    order = np.argsort(-key, kind="stable")
    return np.concatenate([order[~np.isnan(scores[order])], order[np.isnan(scores[order])]])


def keep_below_mask(scores: Mapping[str, np.ndarray], threshold: float, names: Sequence[str]):
    """Boolean mask of the samples whose score is below ``threshold`` on every one of ``names``
    (a NaN score, from an empty baseline, does not drop a sample)."""
    x = float(threshold)
    n = len(scores[names[0]])
    keep = np.ones(n, dtype=bool)
    for name in names:
        s = scores[name]
        keep &= np.isnan(s) | (s < x)
    return keep


def top_fraction_mask(scores: Mapping[str, np.ndarray], fraction: float, names: Sequence[str]):
    """Boolean mask of the samples among the top ``round(fraction * n)`` scores on any of ``names``."""
    frac = float(fraction)
    if not 0.0 <= frac <= 1.0:
        raise InvalidInputError(f"fraction must be in [0, 1], got {fraction!r}")
    n = len(scores[names[0]])
    drop = np.zeros(n, dtype=bool)
    k = int(round(frac * n))
    for name in names:
        order = ranking(scores[name])
        top = order[:k]
        drop[top[~np.isnan(scores[name][top])]] = True
    return drop


class _Tokenised:
    """A well-formed sample with its prompt and response token ids."""

    __slots__ = ("sample", "prompt_ids", "response_ids")

    def __init__(self, sample: Sample, prompt_ids: List[int], response_ids: List[int]):
        self.sample, self.prompt_ids, self.response_ids = sample, prompt_ids, response_ids


def _tokenise(model: Any, s: Sample) -> Union[_Tokenised, BadSample]:
    """Token ids of a sample, or why it cannot be screened (empty response, too long, template)."""
    try:
        if isinstance(s.prompt, str):
            messages = [{"role": "user", "content": s.prompt}]
        else:
            messages = s.prompt
        if model.has_chat_template:
            p_ids = model.encode_chat(messages, add_generation_prompt=True)
        elif isinstance(s.prompt, str):
            p_ids = model.tokenizer.encode(s.prompt, False)
        else:
            return BadSample(s.index, "the model has no chat template to render messages", s.line)
    except (ChatTemplateError, InvalidInputError) as e:
        return BadSample(s.index, f"cannot render the prompt: {e}", s.line)
    r_ids = model.tokenizer.encode(s.response, False)
    ctx = model.max_position_embeddings
    if not r_ids:
        return BadSample(s.index, "empty response (no tokens)", s.line)
    if len(p_ids) >= ctx:
        return BadSample(
            s.index, f"the prompt has {len(p_ids)} tokens, longer than the context ({ctx})", s.line
        )
    if len(p_ids) + len(r_ids) > ctx:
        return BadSample(
            s.index,
            f"prompt + response have {len(p_ids) + len(r_ids)} tokens, longer than the context ({ctx})",
            s.line,
        )
    return _Tokenised(s, p_ids, r_ids)


def _pooled_rows(bank: List[_Unit]) -> List[int]:
    """The capture rows the bank's vectors sit at, ascending: the only rows pooled (the forward
    pass stops after the deepest)."""
    return sorted({u.layer for u in bank})


def _project(pooled: np.ndarray, bank: List[_Unit]) -> Dict[str, np.ndarray]:
    """``a_l · v̂`` per vector from ``pooled`` ``[n, rows, hidden]`` (the rows of
    :func:`_pooled_rows`), float32 (computed in float64)."""
    at = {row: i for i, row in enumerate(_pooled_rows(bank))}
    return {
        u.name: (pooled[:, at[u.layer], :].astype(np.float64) @ u.unit).astype(np.float32)
        for u in bank
    }


def _monitor(bank: List[_Unit]) -> Any:
    """A :class:`~personacore.Monitor` scoring each vector of the bank at its own layer only."""
    from ..steering.monitor import Monitor

    return Monitor({u.name: u.vector for u in bank}, layers={u.name: [u.layer] for u in bank})


def _score_batch(
    model: Any,
    bank: List[_Unit],
    batch: List[_Tokenised],
    method: str,
    max_new_tokens: int,
    errors: List[BadSample],
    next_index: int,
) -> ScreenResult:
    n = len(batch)
    prompts = [t.prompt_ids for t in batch]
    responses = [t.response_ids for t in batch]
    baselines = None
    base_ids: List[List[int]] = []
    # y' depends on the prompt only: each distinct prompt of the batch is generated once
    first: Dict[tuple, int] = {}
    slot = [first.setdefault(tuple(p), len(first)) for p in prompts]
    unique = [list(p) for p in first]
    # baseline projection per distinct prompt, NaN for an empty y'
    per_prompt = {u.name: np.full(len(unique), np.nan, np.float64) for u in bank}
    unscored: List[int] = []  # y' whose generated rows did not all come back scored
    if method == "delta" and n:
        eos = set(model.tokenizer.eos_token_ids)
        # The monitor scores every generated token (the last one too) with a_l · v̂ in the same
        # forward passes that generate y', so mean(a_l(x, y')) · v̂ is the mean of those rows: no
        # second forward pass over x + y'. Every row of y' counts, attention sinks included (a
        # generated token can be a norm-outlier sink), as in the pooled mean it replaces.
        monitor = _monitor(bank)
        gens = model.generate(
            unique, max_new_tokens=max_new_tokens, temperature=0.0, monitor=monitor
        )
        for j, g in enumerate(gens):
            ids = list(g.token_ids)
            if ids and ids[-1] in eos:
                ids.pop()  # y' without its EOS: leave the EOS row out of the mean too
            base_ids.append(ids)
            if not ids:
                continue
            rows = {
                u.name: g.scores[u.name][g.prompt_len : g.prompt_len + len(ids), 0] for u in bank
            }
            if any(r.shape[0] != len(ids) for r in rows.values()):
                unscored.append(j)  # e.g. cut at the context window: pool it below instead
                continue
            for k, r in rows.items():
                per_prompt[k][j] = r.astype(np.float64).mean()
        texts = [model.tokenizer.decode(ids) for ids in base_ids]
        baselines = [texts[j] for j in slot]
    if n:
        seq_p = prompts + [unique[j] for j in unscored]
        seq_r = responses + [base_ids[j] for j in unscored]
        pooled = model.pool(
            seq_p, seq_r, poolings=_POOLINGS, batch_size=len(seq_p), layers=_pooled_rows(bank)
        )
    else:
        empty = np.zeros((0, len(_pooled_rows(bank)), model.hidden_size), np.float32)
        pooled = {p: empty for p in _POOLINGS}
    resp = _project(pooled["response_avg"][:n], bank)
    last = _project(pooled["prompt_last"][:n], bank)
    base = None
    if method == "response":
        scores = resp
    elif method == "prompt_last":
        scores = {k: resp[k] - last[k] for k in resp}
    else:
        got = _project(pooled["response_avg"][n:], bank)
        base = {}
        for k in resp:
            per_prompt[k][unscored] = got[k]
            base[k] = per_prompt[k].astype(np.float32)[slot]
        scores = {k: resp[k] - base[k] for k in resp}
    return ScreenResult(
        method,
        {u.name: u.layer for u in bank},
        [t.sample.index for t in batch],
        [t.sample.id for t in batch],
        resp,
        last,
        scores,
        base,
        baselines if method == "delta" else None,
        max_new_tokens if method == "delta" else None,
        errors,
        next_index,
    )


def iter_screen(
    model: Any,
    vectors: Any,
    samples: Any,
    method: str = "delta",
    max_new_tokens: int = 256,
    batch_size: int = 16,
    *,
    layer: Any = None,
    on_error: str = "fail",
    start: int = 0,
) -> Iterator[ScreenResult]:
    """:func:`screen`, one :class:`ScreenResult` per batch of ``batch_size`` well-formed samples.

    Streams ``samples`` from record ``start`` on. Each result carries the malformed samples met
    since the previous one (``errors``) and ``next_index``, the input position after the last
    record it consumed; a final result may hold errors only. Memory holds one batch.
    """
    check_options(method, max_new_tokens, batch_size, on_error)
    bank = resolve_vectors(model, vectors, layer)
    batch: List[_Tokenised] = []
    errors: List[BadSample] = []
    next_index = start
    for sample in iter_samples(samples, start):
        next_index = max(next_index, sample.index + 1)
        item = _tokenise(model, sample) if isinstance(sample, Sample) else sample
        if isinstance(item, BadSample):
            if on_error == "fail":
                raise SampleError(item)
            errors.append(item)
            continue
        batch.append(item)
        if len(batch) == batch_size:
            yield _score_batch(model, bank, batch, method, max_new_tokens, errors, next_index)
            batch, errors = [], []
    if batch or errors:
        yield _score_batch(model, bank, batch, method, max_new_tokens, errors, next_index)


def screen(
    model: Any,
    vectors: Any,
    samples: Any,
    method: str = "delta",
    max_new_tokens: int = 256,
    batch_size: int = 16,
    *,
    layer: Any = None,
    on_error: str = "fail",
    progress: bool = False,
) -> ScreenResult:
    """Score training samples by how much they would push ``model`` along persona vectors.

    ``vectors``: a :class:`PersonaVector`, a ``{name: PersonaVector}`` dict (or paths), each projected
    at its ``.layer`` (``layer=`` overrides: an int, or ``{name: int}``). ``samples``: an iterable of
    ``{"messages": [..., assistant turn]}`` or ``{"prompt": str | messages, "response": str}``
    records, or a ``.jsonl``/``.parquet`` path. ``method``: ``"delta"`` (response − the model's own
    greedy reply, the paper's ΔP), ``"prompt_last"`` (response − last prompt token) or
    ``"response"``. Malformed samples (no assistant turn, empty response, longer than the context,
    bad JSON) raise :class:`~personacore.screen.SampleError` with ``on_error="fail"``; with
    ``"skip"`` they are left out, listed in ``result.errors`` and announced with a warning.
    The whole result is kept in memory; the ``personacore screen`` command streams to a file.
    """
    parts = []
    bar = _bar(samples, progress)
    try:
        for part in iter_screen(
            model,
            vectors,
            samples,
            method,
            max_new_tokens,
            batch_size,
            layer=layer,
            on_error=on_error,
        ):
            parts.append(part)
            bar.update(len(part) + len(part.errors))
    finally:
        bar.close()
    if not parts:
        raise InvalidInputError("samples is empty: nothing to screen")
    res = ScreenResult.concat(parts)
    if res.errors:
        shown = "; ".join(f"{e.where}: {e.reason}" for e in res.errors[:3])
        more = f" (and {len(res.errors) - 3} more)" if len(res.errors) > 3 else ""
        warnings.warn(
            f"screen skipped {len(res.errors)} malformed sample(s): {shown}{more}", stacklevel=2
        )
    return res


def _bar(samples: Any, enabled: bool):
    """A tqdm bar over the samples (its total when ``samples`` has a length), disabled unless asked."""
    from tqdm.auto import tqdm

    total = len(samples) if hasattr(samples, "__len__") and not isinstance(samples, str) else None
    return tqdm(total=total, desc="screen", unit="sample", disable=not enabled)
