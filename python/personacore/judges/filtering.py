"""persona_vectors' filter on paired rollouts (positive ≥ 50, negative < 50, both coherent ≥ 50)."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import numpy as np

from ..errors import InvalidInputError

__all__ = ["FilterReport", "filter_pairs"]


@dataclasses.dataclass
class FilterReport:
    """How many pairs :func:`filter_pairs` kept, and why the others went."""

    total: int
    kept: int
    unscored: int
    pos_below_threshold: int
    neg_at_or_above_threshold: int
    incoherent: int

    def __str__(self) -> str:
        share = f" ({100.0 * self.kept / self.total:.0f}%)" if self.total else ""
        return (
            f"{self.kept}/{self.total} pairs kept{share}; dropped: {self.unscored} unscored, "
            f"{self.pos_below_threshold} positive below the trait threshold, "
            f"{self.neg_at_or_above_threshold} negative at or above it, {self.incoherent} incoherent"
        )


def _scores(x: Sequence[Optional[float]], what: str) -> np.ndarray:
    try:
        return np.array([np.nan if v is None else float(v) for v in x], dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{what} must be a list of numbers or None") from None


def filter_pairs(
    pos_scores: Sequence[Optional[float]],
    neg_scores: Sequence[Optional[float]],
    pos_coherence: Sequence[Optional[float]],
    neg_coherence: Sequence[Optional[float]],
    trait_threshold: float = 50,
    coherence_threshold: float = 50,
) -> Tuple[np.ndarray, FilterReport]:
    """persona_vectors' filter on paired rollouts: keep pair ``i`` when ``pos_scores[i] >= trait_threshold``,
    ``neg_scores[i] < trait_threshold`` and both coherence scores ``>= coherence_threshold``.

    Scores may be ``None`` (or NaN): such a pair is dropped. Returns ``(mask, report)``: a boolean
    array and a :class:`FilterReport` (``str(report)`` is a one-line summary).
    """
    arrays = [
        _scores(x, n)
        for x, n in (
            (pos_scores, "pos_scores"),
            (neg_scores, "neg_scores"),
            (pos_coherence, "pos_coherence"),
            (neg_coherence, "neg_coherence"),
        )
    ]
    if len({a.size for a in arrays}) != 1:
        raise InvalidInputError(
            f"filter_pairs needs four lists of the same length, got {[a.size for a in arrays]}"
        )
    pos, neg, pc, nc = arrays
    unscored = np.isnan(pos) | np.isnan(neg) | np.isnan(pc) | np.isnan(nc)
    with np.errstate(invalid="ignore"):
        pos_ok = pos >= trait_threshold
        neg_ok = neg < trait_threshold
        coh_ok = (pc >= coherence_threshold) & (nc >= coherence_threshold)
    mask = ~unscored & pos_ok & neg_ok & coh_ok
    scored = ~unscored
    report = FilterReport(
        total=int(pos.size),
        kept=int(mask.sum()),
        unscored=int(unscored.sum()),
        pos_below_threshold=int((scored & ~pos_ok).sum()),
        neg_at_or_above_threshold=int((scored & ~neg_ok).sum()),
        incoherent=int((scored & ~coh_ok).sum()),
    )
    return mask, report
