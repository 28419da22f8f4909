"""Steering evaluation over a layer × coefficient sweep: :func:`evaluate` and :class:`Evaluation`.

For every ``(layer, coef)`` the model answers the trait's held-out questions (one user message each,
no system prompt) with ``Steer(vector, coef, layers=[layer], positions="all")`` (``coef = 0`` is
the unsteered baseline), as persona_vectors evaluates steering. Each reply is then measured:

- with a judge: the trait score (the trait's ``eval_prompt``) and the coherence score
  (:data:`~personacore.judges.COHERENCE_PROMPT`), both 0–100 by persona_vectors' scoring rule;
- always: the reply's projection, the mean over its tokens of ``a·v̂`` at the vector's recommended
  layer (``response_avg`` pooling of the unsteered model reading prompt + reply, ``v̂ = v/‖v‖``,
  docs/conventions.md "Projection"), i.e. how much of the trait the reply carries;
- without a judge, when the trait has A/B items: the A/B log-prob gap under the same steering
  (:func:`~personacore.extract.evaluate.ab_logit_gap`), a judge-free behaviour check.

::

    ev = pc.evaluate(model, vec, "impolite", layers=[10, 12], coefs=[0, 4, 8])
    ev.rows[0]          # {"layer": 10, "coef": 0.0, "trait_score": None, ..., "samples": [...]}
    ev.to_pandas()      # one row per (layer, coef), without the samples
    ev.save("eval.json"); pc.Evaluation.load("eval.json")
"""

from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
from tqdm.auto import tqdm

from ..errors import InvalidInputError, PersonacoreIOError
from ..judges import COHERENCE_PROMPT, judge_enabled
from ..steering import Steer
from ..vectors import PersonaVector
from .evaluate import ab_logit_gap
from .traits import Trait, questions_and_held_out

__all__ = ["Evaluation", "evaluate", "ROW_KEYS", "SAMPLE_KEYS"]

#: The keys of every row of :attr:`Evaluation.rows`, in order.
ROW_KEYS = ("layer", "coef", "trait_score", "coherence", "ab_gap", "projection", "n", "samples")
#: The keys of every sample of a row's ``"samples"``.
SAMPLE_KEYS = ("question", "answer", "trait_score", "coherence", "projection")

_FORMAT = "personacore.evaluation"
_VERSION = 1


class Evaluation:
    """The result of :func:`evaluate`: one plain-dict row per ``(layer, coef)``, in sweep order.

    A row has exactly the keys of :data:`ROW_KEYS`: ``layer`` (int), ``coef`` (float),
    ``trait_score`` and ``coherence`` (mean judge scores 0–100 over the replies that got one;
    ``None`` without a judge), ``ab_gap`` (the A/B log-prob gap, computed without a judge;
    ``None`` with a judge or when the trait has no A/B items), ``projection`` (mean over replies
    of each reply's mean projection on ``v̂`` at the vector's recommended layer; ``None`` only if
    no reply has a token), ``n`` (replies) and ``samples`` (one dict per reply with
    :data:`SAMPLE_KEYS`; a sample's scores are ``None`` where the judge gave none). ``metadata``
    records the model, vector, trait and settings. Iterating yields the rows; ``len`` is their
    number.
    """

    def __init__(self, rows: Sequence[Dict[str, Any]], metadata: Optional[Dict[str, Any]] = None):
        """Wrap rows (checked to have :data:`ROW_KEYS`) and optional metadata."""
        checked = []
        for i, row in enumerate(rows):
            if not isinstance(row, dict) or set(row) != set(ROW_KEYS):
                got = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise InvalidInputError(
                    f"evaluation row {i} must be a dict with keys {list(ROW_KEYS)}, got {got}"
                )
            checked.append({k: row[k] for k in ROW_KEYS})
        self.rows: List[Dict[str, Any]] = checked
        self.metadata: Dict[str, Any] = dict(metadata or {})

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        return iter(self.rows)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return self.rows[i]

    def __repr__(self) -> str:
        md = self.metadata
        return (
            f"Evaluation(trait={md.get('trait')!r}, vector={md.get('vector')!r}, "
            f"rows={len(self.rows)}, judge={md.get('judge')!r})"
        )

    def summary(self) -> List[Dict[str, Any]]:
        """The rows without their ``samples`` (plain dicts)."""
        return [{k: v for k, v in r.items() if k != "samples"} for r in self.rows]

    def to_pandas(self) -> Any:
        """A ``pandas.DataFrame`` of :meth:`summary`, one row per ``(layer, coef)`` (pandas needed)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError(
                "Evaluation.to_pandas needs pandas (pip install pandas); "
                "Evaluation.rows holds the same data as plain dicts"
            ) from None
        return pd.DataFrame(self.summary(), columns=[k for k in ROW_KEYS if k != "samples"])

    def table(self) -> str:
        """The rows as a fixed-width text table (what ``personacore evaluate`` prints)."""

        def num(x: Any, fmt: str) -> str:
            return "-" if x is None else format(x, fmt)

        lines = [
            f"{'layer':>5} {'coef':>8} {'trait':>6} {'coher':>6} {'ab_gap':>8} {'proj':>9} {'n':>4}"
        ]
        for r in self.rows:
            lines.append(
                f"{r['layer']:>5} {r['coef']:>8g} {num(r['trait_score'], '6.1f'):>6} "
                f"{num(r['coherence'], '6.1f'):>6} {num(r['ab_gap'], '+8.3f'):>8} "
                f"{num(r['projection'], '+9.3f'):>9} {r['n']:>4}"
            )
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        """``{"format", "version", "metadata", "rows"}``: what :meth:`save` writes."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "metadata": self.metadata,
            "rows": self.rows,
        }

    def save(self, path: Union[str, "os.PathLike[str]"]) -> Path:
        """Write the evaluation as UTF-8 JSON (read it back with :meth:`load`); returns the path."""
        p = Path(path).expanduser()
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(
                json.dumps(self.to_dict(), indent=1, ensure_ascii=False, allow_nan=False) + "\n",
                encoding="utf-8",
            )
        except OSError as e:
            raise PersonacoreIOError(f"cannot write the evaluation to {p}: {e}") from e
        return p

    @classmethod
    def load(cls, path: Union[str, "os.PathLike[str]"]) -> "Evaluation":
        """Read a file written by :meth:`save`."""
        p = Path(path).expanduser()
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except OSError as e:
            raise PersonacoreIOError(f"cannot read the evaluation file {p}: {e}") from e
        except ValueError as e:
            raise InvalidInputError(f"evaluation file {p} is not JSON: {e}") from None
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise InvalidInputError(
                f'{p} is not a personacore evaluation file (no "format": "{_FORMAT}")'
            )
        if data.get("version") != _VERSION:
            raise InvalidInputError(
                f"evaluation file {p} has version {data.get('version')!r}; this personacore "
                f"reads version {_VERSION}"
            )
        return cls(data.get("rows") or [], data.get("metadata") or {})


# ---- argument checks ---------------------------------------------------------------------------
def _layers(layers: Any, vector: PersonaVector, num_layers: int) -> List[int]:
    if layers is None:
        if vector.layer is None:
            raise InvalidInputError("the vector has no recommended layer: pass layers=[...]")
        layers = [vector.layer]
    if isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
        layers = [layers]
    if isinstance(layers, (str, bytes)) or not isinstance(layers, (Sequence, np.ndarray)):
        raise InvalidInputError(f"layers must be a list of ints, got {layers!r}")
    out = []
    for x in list(layers):
        if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral):
            raise InvalidInputError(f"layers must be ints, got {x!r}")
        if not 1 <= int(x) <= num_layers - 1:
            raise InvalidInputError(
                f"layer {int(x)} is not steerable: the model's steerable layers are "
                f"1..{num_layers - 1} (docs/conventions.md, Layers)"
            )
        out.append(int(x))
    if not out:
        raise InvalidInputError("layers is empty: give at least one layer to steer at")
    return list(dict.fromkeys(out))


def _coefs(coefs: Any) -> List[float]:
    if isinstance(coefs, numbers.Real) and not isinstance(coefs, bool):
        coefs = [coefs]
    if isinstance(coefs, (str, bytes)) or not isinstance(coefs, (Sequence, np.ndarray)):
        raise InvalidInputError(f"coefs must be a list of numbers, got {coefs!r}")
    out = []
    for c in list(coefs):
        if isinstance(c, (bool, np.bool_)) or not isinstance(c, numbers.Real):
            raise InvalidInputError(f"coefs must be numbers, got {c!r}")
        if not math.isfinite(float(c)):
            raise InvalidInputError(f"coefs must be finite numbers, got {c!r}")
        out.append(float(c))
    if not out:
        raise InvalidInputError("coefs is empty: give at least one coefficient (0 = unsteered)")
    return list(dict.fromkeys(out))


def _positive_int(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise InvalidInputError(f"{name} must be a positive int, got {v!r}")
    return int(v)


def _vector(vector: Any, model: Any) -> Tuple[PersonaVector, np.ndarray]:
    """The vector (loaded if a path) and ``v̂`` at its layer, checked against the model."""
    if isinstance(vector, (str, os.PathLike)):
        vector = PersonaVector.load(vector)
    if not isinstance(vector, PersonaVector):
        raise InvalidInputError(
            f"vector must be a PersonaVector or a vector file path, got {type(vector).__name__}"
        )
    if vector.hidden_size != model.hidden_size or vector.num_layers != model.num_layers:
        raise InvalidInputError(
            f"vector {vector.name!r} is for another model: shape {vector.shape} (hidden "
            f"{vector.hidden_size}, {vector.num_layers} layers), the model has hidden "
            f"{model.hidden_size} and {model.num_layers} layers"
        )
    if vector.layer is None:
        raise InvalidInputError(
            f"vector {vector.name!r} has no recommended layer to measure projections at: "
            "set vector.layer (or load it with layer=)"
        )
    row = np.asarray(vector[vector.layer], dtype=np.float64)
    norm = float(np.linalg.norm(row))
    if norm == 0.0:
        raise InvalidInputError(
            f"vector {vector.name!r} is zero at its recommended layer {vector.layer}"
        )
    return vector, row / norm


def _questions(trait: Trait, questions: Any) -> List[str]:
    if isinstance(questions, (list, tuple)) and questions:
        if all(isinstance(q, str) and q.strip() for q in questions):
            return list(questions)
    elif questions is None:
        return questions_and_held_out(trait, "to evaluate on")[1]
    elif isinstance(questions, numbers.Integral) and not isinstance(questions, bool):
        count = _positive_int(questions, "questions")
        return questions_and_held_out(trait, "to evaluate on")[1][:count]
    raise InvalidInputError(
        f"questions must be None (all held-out questions), a positive int (the first N) or a "
        f"list of non-empty strings, got {questions!r}"
    )


# ---- the sweep ---------------------------------------------------------------------------------
def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    got = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(got)) if got else None


def _replies(
    model: Any,
    chats: List[List[Dict[str, str]]],
    steer: Any,
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int,
    bar: Any,
) -> List[Any]:
    gens: List[Any] = []
    for start in range(0, len(chats), batch_size):
        out = model.generate(
            chats[start : start + batch_size],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed + start,
            steer=steer,
        )
        gens.extend(out)
        bar.update(len(out))
    return gens


def _projections(
    model: Any, gens: List[Any], layer: int, unit: np.ndarray, batch_size: int
) -> List[Optional[float]]:
    """Each reply's mean projection on ``unit`` at ``layer`` (``None`` for an empty reply)."""
    eos = set(model.tokenizer.eos_token_ids)
    replies = []
    for g in gens:
        ids = list(g.token_ids)
        while ids and ids[-1] in eos:
            ids.pop()
        replies.append(ids)
    keep = [i for i, r in enumerate(replies) if r]
    out: List[Optional[float]] = [None] * len(gens)
    if keep:
        pooled = model.pool(
            [gens[i].prompt_ids for i in keep],
            [replies[i] for i in keep],
            poolings=("response_avg",),
            batch_size=batch_size,
        )["response_avg"][:, layer, :]
        for i, p in zip(keep, pooled.astype(np.float64) @ unit):
            out[i] = float(p)
    return out


def evaluate(
    model: Any,
    vector: Any,
    trait: Any,
    layers: Optional[Sequence[int]] = None,
    coefs: Sequence[float] = (),
    judge: Any = None,
    questions: Union[None, int, Sequence[str]] = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    seed: int = 0,
    *,
    temperature: float = 0.0,
    ab_items: Optional[int] = None,
    progress: bool = True,
) -> Evaluation:
    """Steer ``model`` with ``vector`` at every ``layer`` × ``coef`` and measure the replies.

    ``vector`` is a :class:`~personacore.PersonaVector` (or a vector file path) for this model,
    with a recommended layer (where projections are measured); ``trait`` a
    :class:`~personacore.Trait`, a built-in name or a trait file path. ``layers`` are steerable
    layers (default: the vector's recommended layer); ``coefs`` the coefficients (``0`` = the
    unsteered baseline, generated once and shared by every layer). ``questions``: ``None`` for all
    of the trait's held-out questions, ``N`` for the first ``N``, or a list of questions; a trait
    without held-out questions uses :meth:`Trait.held_out_split` (with a warning). ``judge`` (a
    :class:`~personacore.Judge`) adds trait and coherence scores; without one, the A/B gap is
    computed on the trait's A/B items (the first ``ab_items`` of them when given). Replies are
    greedy by default (``temperature=0``); with sampling every ``(layer, coef)`` uses the same
    seeds. Returns an :class:`Evaluation`; see the module docstring for what each number means.
    """
    if not isinstance(trait, Trait):
        trait = Trait.load(trait)
    vector, unit = _vector(vector, model)
    layer_list = _layers(layers, vector, model.num_layers)
    coef_list = _coefs(coefs)
    qs = _questions(trait, questions)
    max_new_tokens = _positive_int(max_new_tokens, "max_new_tokens")
    batch_size = _positive_int(batch_size, "batch_size")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise InvalidInputError(f"seed must be an int, got {seed!r}")
    use_judge = judge_enabled(judge)
    ab = [] if use_judge else list(trait.ab_items)
    if ab_items is not None:
        ab = ab[: _positive_int(ab_items, "ab_items")]
    chats = [[{"role": "user", "content": q}] for q in qs]
    gen_kw = dict(
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        seed=int(seed),
        batch_size=batch_size,
    )
    n_runs = len(layer_list) * sum(1 for c in coef_list if c != 0) + (0.0 in coef_list)
    rows: List[Dict[str, Any]] = []
    baseline: Optional[Dict[str, Any]] = None  # the coef-0 row's measurements, shared by layers
    with tqdm(
        total=n_runs * len(qs), desc=f"evaluate {trait.name}", unit="reply", disable=not progress
    ) as bar:
        for layer in layer_list:
            for coef in coef_list:
                bar.set_postfix(layer=layer, coef=f"{coef:g}")
                if coef == 0 and baseline is not None:
                    samples = [dict(x) for x in baseline["samples"]]
                    rows.append(dict(baseline, layer=layer, samples=samples))
                    continue
                steer = None if coef == 0 else [Steer(vector, coef, [layer], positions="all")]
                gens = _replies(model, chats, steer, bar=bar, **gen_kw)
                proj = _projections(model, gens, vector.layer, unit, batch_size)
                items = [(q, g.text) for q, g in zip(qs, gens)]
                scores: List[Optional[float]] = [None] * len(items)
                coherence: List[Optional[float]] = [None] * len(items)
                if use_judge:
                    scores = judge.score_many(items, trait.eval_prompt)
                    coherence = judge.score_many(items, COHERENCE_PROMPT)
                ab_gap = None
                if ab:
                    gap = ab_logit_gap(model, vector, ab, coefs=[coef], layer=layer)
                    ab_gap = float(gap[coef])
                row = {
                    "layer": layer,
                    "coef": coef,
                    "trait_score": _mean(scores) if use_judge else None,
                    "coherence": _mean(coherence) if use_judge else None,
                    "ab_gap": ab_gap,
                    "projection": _mean(proj),
                    "n": len(gens),
                    "samples": [
                        dict(zip(SAMPLE_KEYS, (q, a, s, c, p)))
                        for (q, a), s, c, p in zip(items, scores, coherence, proj)
                    ],
                }
                if coef == 0:
                    baseline = row
                rows.append(row)
    metadata = {
        "model": getattr(model, "path", None) or "",
        "vector": vector.name,
        "vector_layer": vector.layer,
        "trait": trait.name,
        "judge": repr(judge) if use_judge else None,
        "settings": {
            "layers": layer_list,
            "coefs": coef_list,
            "questions": len(qs),
            "max_new_tokens": max_new_tokens,
            "temperature": float(temperature),
            "seed": int(seed),
            "positions": "all",
            "ab_items": len(ab),
        },
    }
    return Evaluation(rows, metadata)
