"""Calibrated alerts: thresholds and early-warning probabilities from a vector's held-out rollouts.

``pc.extract`` keeps, with every vector, numbers from its held-out rollouts (the trait's
evaluation questions under its positive and negative system prompts, projected on the fitted
directions):

- ``metadata["stats"]``: per layer, the reply mean projections' per-class mean and standard
  deviation, AUROC and Cohen's d;
- ``metadata["token_max_stats"]``: the same for each reply's highest token score (attention
  sinks left out), the number a monitor's alert on that reply is decided by;
- ``metadata["heldout"]``: each rollout's label, reply mean and highest token score at the
  recommended layer, and its last-prompt-token projection there and at the layer where that
  projection separates the classes best;
- ``metadata["early_warning"]``: the logistic fit below.

From them:

- :func:`auto_threshold` gives the alert threshold ``thresholds="auto"`` uses (``pc.Monitor`` and
  ``personacore serve`` both call it). Rules: ``"token_fpr"`` (the default, :data:`DEFAULT_RULE`):
  fit a normal to the negative replies' highest token scores and put the threshold where
  :data:`FALSE_ALARM` = 5% of them lie above, ``neg_mean + 1.645 · neg_std`` of
  ``token_max_stats``: about 5% of trait-free replies raise an alert; ``"neg_fpr"``: the same on
  the reply means (``stats``), i.e. 5% of trait-free replies have a mean above it, though a
  monitor alerts on single tokens, which cross it far more often; ``"midpoint"``:
  ``(pos_mean + neg_mean) / 2`` of the reply means, the server's first rule. Which one alerts
  best was measured (``python scripts/early_warning.py --thresholds``, numbers in the README).
- :func:`fit_early_warning` fits ``P(trait | s) = 1 / (1 + exp(-(a·s + b)))`` to the
  last-prompt-token projections ``s`` of the held-out rollouts (label 1 = positive system
  prompt); :meth:`Calibration.probability` applies it to a generation's early-warning score.

Every score is the projection ``a·v/‖v‖`` at one layer (docs/conventions.md, "Projection"), so a
threshold holds at its own layer only.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from ..errors import InvalidInputError

__all__ = [
    "Calibration",
    "CalibrationMissingError",
    "DEFAULT_RULE",
    "FALSE_ALARM",
    "RULES",
    "alert_layer",
    "auto_threshold",
    "calibration",
    "fit_early_warning",
    "rates",
]

#: The false-alarm rate the ``"*_fpr"`` rules aim at.
FALSE_ALARM = 0.05
#: One-sided normal quantile for :data:`FALSE_ALARM` (``scipy.stats.norm.ppf(0.95)``).
_Z = 1.6448536269514722
#: The threshold rules :func:`auto_threshold` knows.
RULES = ("token_fpr", "neg_fpr", "midpoint")
#: The rule ``thresholds="auto"`` uses (module docstring).
DEFAULT_RULE = "token_fpr"
_STAT_KEYS = ("auroc", "cohens_d", "pos_mean", "pos_std", "neg_mean", "neg_std")


class CalibrationMissingError(InvalidInputError):
    """A vector without the held-out statistics a calibrated threshold or probability needs."""


def _name(vec: Any) -> str:
    return repr(getattr(vec, "name", None) or "vector")


def _stats_at(vec: Any, key: str = "stats", layer: Optional[int] = None) -> Dict[str, float]:
    """The held-out statistics ``metadata[key]`` at ``layer`` (default: the vector's recommended
    layer), or a clear error."""
    meta = vec.metadata if isinstance(getattr(vec, "metadata", None), dict) else {}
    stats = meta.get(key)
    layer = vec.layer if layer is None else layer
    if layer is None or not isinstance(stats, Mapping):
        raise CalibrationMissingError(
            f"{_name(vec)} has no held-out statistics (metadata[{key!r}]) or no recommended "
            "layer: calibrated thresholds need a vector made by pc.extract; pass a number instead"
        )
    try:
        out = {k: float(stats[k][layer]) for k in _STAT_KEYS[2:]}
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise CalibrationMissingError(
            f"{_name(vec)}: metadata[{key!r}] lacks {e} at layer {layer}"
        ) from None
    if not all(math.isfinite(x) for x in out.values()):
        raise CalibrationMissingError(f"{_name(vec)}: non-finite statistics at layer {layer}")
    for k in _STAT_KEYS[:2]:  # separation measures: shown by Calibration, not needed by a rule
        try:
            out[k] = float(stats[k][layer])
        except (KeyError, IndexError, TypeError, ValueError):
            out[k] = float("nan")
    return {k: out[k] for k in _STAT_KEYS}


def _effective_rule(vec: Any, rule: str) -> str:
    """``rule``, or ``"neg_fpr"`` for ``"token_fpr"`` on a vector saved before personacore kept
    the replies' highest token scores (the fallback :attr:`Calibration.rule` shows)."""
    if rule not in RULES:
        raise InvalidInputError(
            f"unknown threshold rule {rule!r} (expected one of {', '.join(RULES)})"
        )
    meta = vec.metadata if isinstance(getattr(vec, "metadata", None), dict) else {}
    if rule == "token_fpr" and not isinstance(meta.get("token_max_stats"), Mapping):
        return "neg_fpr"
    return rule


def threshold_for(stats: Mapping[str, float], rule: str) -> float:
    """The threshold of a rule from per-class statistics at one layer: ``neg_mean + 1.645 ·
    neg_std`` (``"token_fpr"`` on the replies' highest token scores, ``"neg_fpr"`` on their mean
    projections) or ``(pos_mean + neg_mean) / 2`` (``"midpoint"``)."""
    if rule in ("token_fpr", "neg_fpr"):
        return float(stats["neg_mean"] + _Z * stats["neg_std"])
    if rule == "midpoint":
        return float((stats["pos_mean"] + stats["neg_mean"]) / 2.0)
    raise InvalidInputError(f"unknown threshold rule {rule!r} (expected one of {', '.join(RULES)})")


def auto_threshold(vec: Any, rule: str = DEFAULT_RULE, layer: Optional[int] = None) -> float:
    """The alert threshold for ``vec`` at ``layer`` (default: its recommended layer), by ``rule``
    (module docstring).

    ``"token_fpr"`` on a vector without token statistics (saved by an older personacore) falls
    back to ``"neg_fpr"``. Raises :class:`CalibrationMissingError` when the vector has no held-out
    statistics at all.
    """
    rule = _effective_rule(vec, rule)
    key = "token_max_stats" if rule == "token_fpr" else "stats"
    return threshold_for(_stats_at(vec, key, layer), rule)


def alert_layer(vec: Any) -> int:
    """The steerable layer where single-token alerts separate best: the highest held-out AUROC
    of the replies' highest token scores (``token_max_stats``; ties by Cohen's d). Falls back to
    the recommended layer for a vector without token statistics."""
    stats = vec.metadata.get("token_max_stats") if isinstance(vec.metadata, dict) else None
    if not isinstance(stats, Mapping):
        if vec.layer is None:
            raise CalibrationMissingError(f"{_name(vec)} has no recommended layer")
        return int(vec.layer)
    steerable = range(1, len(stats["auroc"]) - 1)
    return max(steerable, key=lambda i: (round(stats["auroc"][i], 6), stats["cohens_d"][i]))


def _heldout(vec: Any) -> Optional[Dict[str, Any]]:
    """The stored held-out numbers at the vector's layer as arrays, or None (older vectors)."""
    rec = vec.metadata.get("heldout") if isinstance(vec.metadata, dict) else None
    if not isinstance(rec, Mapping) or rec.get("layer") != vec.layer:
        return None
    try:
        out = {
            "labels": np.asarray(rec["labels"], dtype=np.int64),
            "reply": np.asarray(rec["reply"], dtype=np.float64),
        }
        if "reply_max" in rec:
            out["reply_max"] = np.asarray(rec["reply_max"], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        return None
    if any(len(v) != len(out["labels"]) for v in out.values()) or not len(out["labels"]):
        return None
    return out


def fit_early_warning(heldout: Mapping[str, Any], l2: float = 1.0) -> Dict[str, Any]:
    """A logistic fit of P(trait) on the last-prompt-token projections of held-out rollouts.

    ``heldout`` holds ``labels`` (1 = trait) and ``prompt_last`` (projections). The fit runs on the
    standardized score with an L2 penalty ``l2`` (so perfectly separated classes still give a
    finite slope) by Newton's method, then is mapped back to the raw score:
    ``P = 1 / (1 + exp(-(coef · s + intercept)))``. Returns ``{"layer", "coef", "intercept",
    "n_pos", "n_neg"}``.
    """
    y = np.asarray(heldout["labels"], dtype=np.float64)
    s = np.asarray(heldout["prompt_last"], dtype=np.float64)
    if len(y) != len(s) or y.min(initial=1) > 0 or y.max(initial=0) < 1:
        raise CalibrationMissingError(
            "an early-warning fit needs held-out rollouts of both classes "
            f"(got {int((y == 1).sum())} positive, {int((y == 0).sum())} negative)"
        )
    mu, sd = float(s.mean()), float(s.std()) or 1.0
    x = np.c_[(s - mu) / sd, np.ones_like(s)]
    w = np.zeros(2)
    penalty = np.diag([l2, 0.0])
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        grad = x.T @ (p - y) + penalty @ w
        hess = (x * (p * (1 - p))[:, None]).T @ x + penalty + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if float(np.abs(step).max()) < 1e-10:
            break
    coef = w[0] / sd
    return {
        "layer": heldout.get("layer"),
        "coef": float(coef),
        "intercept": float(w[1] - coef * mu),
        "n_pos": int((y == 1).sum()),
        "n_neg": int((y == 0).sum()),
    }


@dataclasses.dataclass(frozen=True)
class Calibration:
    """What a vector's alerts are calibrated on, at its recommended ``layer``.

    ``threshold`` (by ``rule``; ``"neg_fpr"`` when ``"token_fpr"`` was asked of a vector without
    token statistics). Its ``false_alarm_rate`` and ``detection_rate``: the share of negative and
    of positive held-out replies a monitor would alert on (a reply token above the threshold),
    counted on the stored held-out replies (``rates_from="held-out rollouts"``); for a vector
    that does not store them, the share whose reply mean is above it under normal fits of the
    statistics (``rates_from="normal fit of reply means"``). ``reply_mean_false_alarm_rate`` /
    ``reply_mean_detection_rate``: the same for the reply's mean score. The per-class statistics
    of the reply means at ``layer`` (``auroc`` ... ``neg_std``), and ``early_warning``, the logistic
    fit of P(trait) on the last prompt token's score at ``early_warning["layer"]`` (None for a
    vector saved before personacore kept it). ``alert_layer``: where single-token alerts
    separate best (:func:`alert_layer`); monitor there for alerts.
    """

    name: Optional[str]
    layer: int
    rule: str
    threshold: float
    false_alarm_rate: float
    detection_rate: float
    reply_mean_false_alarm_rate: float
    reply_mean_detection_rate: float
    rates_from: str
    n_pos: Optional[int]
    n_neg: Optional[int]
    auroc: float
    cohens_d: float
    pos_mean: float
    pos_std: float
    neg_mean: float
    neg_std: float
    early_warning: Optional[Dict[str, Any]]
    alert_layer: Optional[int] = None

    @property
    def early_warning_layer(self) -> Optional[int]:
        """The layer whose last-prompt-token score the early-warning probability reads."""
        return None if self.early_warning is None else int(self.early_warning["layer"])

    def probability(self, score: Any) -> Any:
        """P(trait) for an early-warning score: the last prompt token's projection at
        :attr:`early_warning_layer` (a number gives a float, an array an array).

        Raises :class:`CalibrationMissingError` for a vector extracted before personacore kept
        the held-out prompt projections.
        """
        if self.early_warning is None:
            raise CalibrationMissingError(
                f"{self.name!r} has no early-warning calibration (it was saved before personacore "
                "kept held-out prompt projections); extract it again with pc.extract"
            )
        z = self.early_warning["coef"] * np.asarray(score, dtype=np.float64)
        p = 1.0 / (1.0 + np.exp(-(z + self.early_warning["intercept"])))
        return float(p) if np.ndim(p) == 0 else p

    def to_dict(self) -> Dict[str, Any]:
        """The numbers as a plain dict (for JSON)."""
        return dataclasses.asdict(self)


def _normal_sf(x: float, mean: float, std: float) -> float:
    if std <= 0:
        return float(x < mean)
    return 0.5 * math.erfc((x - mean) / (std * math.sqrt(2.0)))


def calibration(vec: Any, rule: str = DEFAULT_RULE, layer: Optional[int] = None) -> Calibration:
    """The :class:`Calibration` of ``vec`` at ``layer`` (default: its recommended layer; see
    :attr:`PersonaVector.calibration`). The stored per-rollout numbers exist at the recommended
    layer only; at another layer the rates come from normal fits of the statistics."""
    rule = _effective_rule(vec, rule)
    at = int(vec.layer if layer is None else layer)
    st = _stats_at(vec, "stats", at)
    tau = auto_threshold(vec, rule, at)
    held = _heldout(vec) if at == vec.layer else None
    early = vec.metadata.get("early_warning")
    if held is not None:
        labels = held["labels"]
        mean_fa, mean_det = rates(held["reply"][labels == 1], held["reply"][labels == 0], tau)
        if "reply_max" in held:
            fa, det = rates(held["reply_max"][labels == 1], held["reply_max"][labels == 0], tau)
            how = "held-out rollouts"
        else:
            fa, det, how = mean_fa, mean_det, "held-out rollouts (reply means)"
        n_pos, n_neg = int((labels == 1).sum()), int((labels == 0).sum())
    else:
        mean_fa = _normal_sf(tau, st["neg_mean"], st["neg_std"])
        mean_det = _normal_sf(tau, st["pos_mean"], st["pos_std"])
        fa, det, how, n_pos, n_neg = mean_fa, mean_det, "normal fit of reply means", None, None
        if isinstance(vec.metadata.get("token_max_stats"), Mapping):
            tok = _stats_at(vec, "token_max_stats", at)
            fa = _normal_sf(tau, tok["neg_mean"], tok["neg_std"])
            det = _normal_sf(tau, tok["pos_mean"], tok["pos_std"])
            how = "normal fits of the statistics"
    return Calibration(
        name=vec.name,
        layer=at,
        rule=rule,
        threshold=tau,
        false_alarm_rate=fa,
        detection_rate=det,
        reply_mean_false_alarm_rate=mean_fa,
        reply_mean_detection_rate=mean_det,
        rates_from=how,
        n_pos=n_pos,
        n_neg=n_neg,
        early_warning=dict(early) if isinstance(early, Mapping) else None,
        alert_layer=alert_layer(vec),
        **st,
    )


def rates(scores_pos: Sequence[float], scores_neg: Sequence[float], tau: float) -> List[float]:
    """(false-alarm rate, detection rate) of threshold ``tau``: the share of ``scores_neg`` and of
    ``scores_pos`` above it."""
    neg, pos = np.asarray(scores_neg, float), np.asarray(scores_pos, float)
    return [float((neg > tau).mean()), float((pos > tau).mean())]
