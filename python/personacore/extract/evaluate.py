"""How well a vector separates and steers: held-out projection statistics (:func:`separation`) and
the judge-free A/B behaviour check (:func:`ab_logit_gap`)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..errors import InvalidInputError
from ..vectors import PersonaVector

__all__ = ["separation", "ab_logit_gap"]


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
