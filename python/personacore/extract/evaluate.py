"""How well a vector separates and steers: held-out projection statistics (:func:`separation`) and
the judge-free A/B behaviour check (:func:`ab_logit_gap`)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..errors import InvalidInputError
from ..vectors import PersonaVector

__all__ = ["separation", "sample_stats", "heldout_record", "ab_logit_gap"]


def _auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    return float(roc_auc_score(y, np.r_[pos, neg]))


def separation(
    acts: np.ndarray, labels: np.ndarray, directions: np.ndarray
) -> Dict[str, List[float]]:
    """Per-layer statistics of the projections ``a·v/‖v‖`` of ``acts`` ``[n, L+1, H]`` on ``directions``:
    AUROC and Cohen's d of positive vs negative, and their means and standard deviations."""
    norms = np.linalg.norm(directions, axis=1)
    unit = directions / np.where(norms > 0, norms, 1.0)[:, None]
    proj = np.einsum("nlh,lh->nl", acts.astype(np.float64), unit.astype(np.float64))
    pos, neg = proj[labels == 1], proj[labels == 0]
    stats: Dict[str, List[float]] = {
        k: [] for k in ("auroc", "cohens_d", "pos_mean", "pos_std", "neg_mean", "neg_std")
    }
    for layer in range(proj.shape[1]):
        p, q = pos[:, layer], neg[:, layer]
        pooled_sd = np.sqrt((p.var(ddof=1) + q.var(ddof=1)) / 2) if min(len(p), len(q)) > 1 else 0.0
        stats["auroc"].append(_auroc(p, q) if norms[layer] > 0 else 0.5)
        stats["cohens_d"].append(float((p.mean() - q.mean()) / pooled_sd) if pooled_sd > 0 else 0.0)
        stats["pos_mean"].append(float(p.mean()))
        stats["pos_std"].append(float(p.std(ddof=1)) if len(p) > 1 else 0.0)
        stats["neg_mean"].append(float(q.mean()))
        stats["neg_std"].append(float(q.std(ddof=1)) if len(q) > 1 else 0.0)
    return stats


def sample_stats(values: np.ndarray, labels: np.ndarray) -> Dict[str, List[float]]:
    """Per-layer AUROC, Cohen's d and per-class mean / standard deviation of ``values``
    ``[n, L+1]`` (one number per rollout and layer, e.g. each reply's highest token score)."""
    values = np.asarray(values, dtype=np.float64)
    stats: Dict[str, List[float]] = {
        k: [] for k in ("auroc", "cohens_d", "pos_mean", "pos_std", "neg_mean", "neg_std")
    }
    for layer in range(values.shape[1]):
        p, q = values[labels == 1, layer], values[labels == 0, layer]
        pooled_sd = np.sqrt((p.var(ddof=1) + q.var(ddof=1)) / 2) if min(len(p), len(q)) > 1 else 0.0
        spread = np.ptp(values[:, layer]) > 0
        stats["auroc"].append(_auroc(p, q) if spread else 0.5)
        stats["cohens_d"].append(float((p.mean() - q.mean()) / pooled_sd) if pooled_sd > 0 else 0.0)
        stats["pos_mean"].append(float(p.mean()))
        stats["pos_std"].append(float(p.std(ddof=1)) if len(p) > 1 else 0.0)
        stats["neg_mean"].append(float(q.mean()))
        stats["neg_std"].append(float(q.std(ddof=1)) if len(q) > 1 else 0.0)
    return stats


def heldout_record(
    acts: Dict[str, np.ndarray],
    token_max: np.ndarray,
    labels: np.ndarray,
    directions: np.ndarray,
    layer: int,
    warn_layer: int,
    pooling: str,
) -> Dict[str, Any]:
    """The held-out rollouts' own numbers, kept with a vector to calibrate monitors.

    ``acts`` maps a pooling to ``[n, L+1, H]`` and ``token_max`` ``[n, L+1]`` holds each reply's
    highest token score. The record holds the labels (1 = trait) and, at the vector's ``layer``,
    each reply's mean projection (``reply``, pooling ``pooling``) and highest token score
    (``reply_max``); and the last prompt token's projection (``prompt_last``, what the
    early-warning score reads) at ``layer`` and at ``warn_layer`` (where it separates best),
    keyed by the layer as a string. Projections are on ``directions[i] / ‖directions[i]‖``.
    """

    def proj(a: np.ndarray, i: int) -> List[float]:
        row = directions[i].astype(np.float64)
        unit = row / max(float(np.linalg.norm(row)), 1e-30)
        return [float(x) for x in a[:, i].astype(np.float64) @ unit]

    return {
        "layer": int(layer),
        "labels": [int(x) for x in labels],
        "reply": proj(acts[pooling], layer),
        "reply_max": [float(x) for x in token_max[:, layer]],
        "prompt_last": {str(i): proj(acts["prompt_last"], i) for i in sorted({layer, warn_layer})},
        "reply_pooling": pooling,
    }


def ab_logit_gap(
    model: Any,
    vector: PersonaVector,
    items: Sequence[Dict[str, str]],
    coefs: Sequence[float] = (-2.0, 0.0, 2.0),
    layer: Optional[int] = None,
) -> Dict[float, float]:
    """Judge-free behaviour check: for each coefficient, the mean over A/B items of
    mean-per-token logp(trait answer) − mean-per-token logp(neutral answer), with ``coef × v`` added at
    ``layer`` (default: the vector's recommended layer) at every position."""
    from ..steering import Steer

    layer = vector.layer if layer is None else layer
    if layer is None:
        raise InvalidInputError("the vector has no recommended layer: pass layer=")

    def mean_logp(prompt: List[int], answer: List[int], steer) -> float:
        logits = model.logits(prompt + answer, steer=steer).astype(np.float64)
        logits = logits[len(prompt) - 1 : -1]
        logz = np.logaddexp.reduce(logits, axis=1)
        return float(np.mean(logits[np.arange(len(answer)), answer] - logz))

    def encode(text: str) -> List[int]:
        return model.tokenizer.encode(text, add_special_tokens=False)

    out: Dict[float, float] = {}
    for coef in coefs:
        steer = [Steer(vector, float(coef), layers=[layer])] if coef != 0 else None
        gaps = []
        for it in items:
            prompt = model.encode_chat([{"role": "user", "content": it["question"]}])
            gaps.append(
                mean_logp(prompt, encode(it["trait_answer"]), steer)
                - mean_logp(prompt, encode(it["neutral_answer"]), steer)
            )
        out[float(coef)] = float(np.mean(gaps))
    return out
