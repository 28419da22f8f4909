"""What a report is drawn from, checked and put in one shape.

* a vector's held-out statistics (``metadata["stats"]``, written by :func:`personacore.extract`):
  per-layer lists ``auroc``, ``cohens_d``, ``pos_mean``, ``pos_std``, ``neg_mean``, ``neg_std``;
* generations, labelled: a list of :class:`~personacore.Generation`, of ``(label, generation)``
  pairs, or a ``{label: generation}`` dict; files of them are JSONL, one
  :meth:`Generation.to_dict <personacore.Generation.to_dict>` per line (an extra ``"label"`` key
  names it);
* evaluation rows: plain dicts with ``layer``, ``coef``, ``trait_score``, ``coherence``, ``ab_gap``,
  ``projection``, ``n`` and ``samples`` (what a layer x coefficient sweep produces), as a list or
  any object with a ``.rows`` attribute, or a pandas DataFrame; files of them are JSON, ``{"rows": [...]}`` or a list.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..engine import Generation
from ..errors import InvalidInputError, PersonacoreIOError
from ..vectors import PersonaVector

__all__ = [
    "STAT_KEYS",
    "EvalRow",
    "alert_threshold",
    "evaluation_rows",
    "labelled_generations",
    "load_evaluation",
    "load_generations",
    "separation_stats",
    "sweep_metrics",
]

#: the per-layer lists of ``metadata["stats"]`` that a report reads
STAT_KEYS = ("auroc", "cohens_d", "pos_mean", "pos_std", "neg_mean", "neg_std")

#: one evaluation row, checked: every key present, numbers as floats (None where not measured)
EvalRow = Dict[str, Any]


def separation_stats(vector: PersonaVector) -> Optional[Dict[str, List[float]]]:
    """The vector's per-layer statistics as float lists (one entry per row of its directions), or
    None when it has none. Malformed statistics raise :class:`~personacore.InvalidInputError`."""
    stats = vector.metadata.get("stats")
    if stats is None:
        return None
    if not isinstance(stats, Mapping):
        raise InvalidInputError(
            f"vector metadata['stats'] must be a dict of per-layer lists, got {type(stats).__name__}"
        )
    missing = [k for k in STAT_KEYS if k not in stats]
    if missing:
        raise InvalidInputError(f"vector metadata['stats'] lacks {missing} (has {sorted(stats)})")
    out: Dict[str, List[float]] = {}
    for key in STAT_KEYS:
        try:
            out[key] = [float(x) for x in stats[key]]
        except (TypeError, ValueError):
            raise InvalidInputError(
                f"vector metadata['stats'][{key!r}] must be a list of numbers"
            ) from None
    lengths = {len(v) for v in out.values()}
    if len(lengths) != 1 or not lengths.pop():
        raise InvalidInputError(
            f"vector metadata['stats'] lists must be non-empty and of one length, got "
            f"{ {k: len(v) for k, v in out.items()} }"
        )
    return out


def alert_threshold(
    vector: Optional[PersonaVector], threshold: Optional[float] = None
) -> Optional[float]:
    """The alert threshold a report draws: ``threshold`` when given, else the midpoint of the
    held-out means at the vector's layer, ``(pos_mean[layer] + neg_mean[layer]) / 2`` (the rule of
    the server's ``"auto"`` threshold); None when neither is available."""
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
            raise InvalidInputError(f"threshold must be a number, got {threshold!r}")
        if not math.isfinite(float(threshold)):
            raise InvalidInputError(f"threshold must be finite, got {threshold!r}")
        return float(threshold)
    if vector is None or vector.layer is None:
        return None
    stats = separation_stats(vector)
    if stats is None or vector.layer >= len(stats["pos_mean"]):
        return None
    value = (stats["pos_mean"][vector.layer] + stats["neg_mean"][vector.layer]) / 2.0
    return value if math.isfinite(value) else None


def labelled_generations(generations: Any) -> List[Tuple[str, Generation]]:
    """``[(label, generation)]`` from a list of generations or of ``(label, generation)`` pairs, or
    a ``{label: generation}`` dict; unlabelled ones are called ``generation 1``, ``generation 2``..."""
    if generations is None:
        return []
    if isinstance(generations, Generation):
        generations = [generations]
    items = list(generations.items()) if isinstance(generations, Mapping) else list(generations)
    out: List[Tuple[str, Generation]] = []
    for k, item in enumerate(items):
        label: Any = f"generation {k + 1}"
        gen = item
        if isinstance(item, tuple) and len(item) == 2:
            label, gen = item
        if not isinstance(gen, Generation):
            raise InvalidInputError(
                f"generations[{k}] must be a personacore Generation (or a (label, Generation) "
                f"pair), got {type(gen).__name__}"
            )
        out.append((str(label), gen))
    return out


def _number(row: Mapping, key: str, where: str, optional: bool) -> Optional[float]:
    value = row.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidInputError(f"{where}[{key!r}] must be a number, got {value!r}")
    value = float(value)
    return value if math.isfinite(value) else None


def evaluation_rows(evaluation: Any) -> List[EvalRow]:
    """Checked evaluation rows from a list of row dicts, an object with a ``.rows`` attribute or a
    pandas DataFrame of rows (missing values, NaN, read as None)."""
    if evaluation is None:
        return []
    rows = getattr(evaluation, "rows", evaluation)
    if callable(getattr(rows, "to_dict", None)) and hasattr(rows, "columns"):
        rows = rows.to_dict("records")  # a pandas DataFrame of rows
    if isinstance(rows, (str, bytes)) or isinstance(rows, Mapping):
        raise InvalidInputError(
            "evaluation must be a list of row dicts or an object with .rows, got "
            f"{type(rows).__name__}"
        )
    try:
        rows = list(rows)
    except TypeError:
        raise InvalidInputError(
            f"evaluation must be a list of row dicts or an object with .rows, got {type(rows).__name__}"
        ) from None
    out: List[EvalRow] = []
    for k, row in enumerate(rows):
        where = f"evaluation row {k}"
        if not isinstance(row, Mapping):
            raise InvalidInputError(f"{where} must be a dict, got {type(row).__name__}")
        layer = row.get("layer")
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise InvalidInputError(f"{where}['layer'] must be an int, got {layer!r}")
        coef = _number(row, "coef", where, optional=False)
        if coef is None:
            raise InvalidInputError(f"{where}['coef'] must be finite, got {row.get('coef')!r}")
        out.append(
            {
                "layer": int(layer),
                "coef": coef,
                "trait_score": _number(row, "trait_score", where, optional=True),
                "coherence": _number(row, "coherence", where, optional=True),
                "ab_gap": _number(row, "ab_gap", where, optional=True),
                "projection": _number(row, "projection", where, optional=True),
                "n": row.get("n"),
            }
        )
    return out


def _read_text(path: Any, what: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidInputError(f"{what} must be a path, got {type(path).__name__}")
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidInputError(f"{what} {os.fspath(path)!r} does not exist") from None
    except OSError as e:
        raise PersonacoreIOError(f"cannot read {what} {os.fspath(path)!r}: {e}") from e


def load_generations(path: Any) -> List[Tuple[str, Generation]]:
    """``[(label, Generation)]`` from a JSONL file of :meth:`Generation.to_dict` lines; a line's
    ``"label"`` names it (default ``generation N``). Blank lines are skipped."""
    out: List[Tuple[str, Generation]] = []
    for lineno, line in enumerate(_read_text(path, "generations file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidInputError(f"{os.fspath(path)} line {lineno}: not JSON ({e})") from None
        try:
            gen = Generation.from_dict(d)
        except InvalidInputError as e:
            raise InvalidInputError(f"{os.fspath(path)} line {lineno}: {e}") from None
        out.append((str(d.get("label") or f"generation {len(out) + 1}"), gen))
    return out


def load_evaluation(path: Any) -> List[EvalRow]:
    """Checked evaluation rows from a JSON file holding ``{"rows": [...]}`` or a list of rows."""
    try:
        data = json.loads(_read_text(path, "evaluation file"))
    except json.JSONDecodeError as e:
        raise InvalidInputError(f"{os.fspath(path)}: not JSON ({e})") from None
    if isinstance(data, Mapping):
        if "rows" not in data:
            raise InvalidInputError(f"{os.fspath(path)}: expected {{'rows': [...]}} or a list")
        data = data["rows"]
    return evaluation_rows(data)


def sweep_metrics(rows: Sequence[EvalRow]) -> Tuple[str, str]:
    """The two numbers an evaluation sweep plots: ``("trait_score", "coherence")`` when a judge
    scored any row, else ``("ab_gap", "projection")``."""
    if any(r["trait_score"] is not None for r in rows):
        return "trait_score", "coherence"
    return "ab_gap", "projection"
