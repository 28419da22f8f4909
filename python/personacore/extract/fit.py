"""Fitting one direction per layer from pooled positive/negative activations."""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

from ..errors import InvalidInputError

__all__ = ["METHODS", "fit_directions"]

METHODS = ("mean_diff", "logreg", "pca")


def fit_directions(
    method: str,
    acts: np.ndarray,
    labels: np.ndarray,
    pairs: Dict[Tuple[int, str, int], Dict[int, int]],
):
    """Directions ``[L+1, H]`` (and extra per-layer info) from pooled rows and labels."""
    pos, neg = acts[labels == 1], acts[labels == 0]
    mean_diff = (pos.mean(0) - neg.mean(0)).astype(np.float32)
    if method == "mean_diff":
        return mean_diff, {}
    if method == "logreg":
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import cross_val_score
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        folds = int(min(5, len(pos), len(neg)))
        dirs, accs = np.zeros_like(mean_diff), []
        for layer in range(acts.shape[1]):
            x = acts[:, layer].astype(np.float64)
            clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
            accs.append(
                float(cross_val_score(clf, x, labels, cv=folds).mean())
                if folds >= 2
                else float("nan")
            )
            clf.fit(x, labels)
            scaler, lr = clf[0], clf[1]
            w = lr.coef_[0] / np.where(
                scaler.scale_ > 0, scaler.scale_, 1.0
            )  # back to activation space
            nw = np.linalg.norm(w)
            # same length as the mean difference, so coefficients mean the same across methods
            dirs[layer] = (w / nw * np.linalg.norm(mean_diff[layer])) if nw > 0 else 0.0
        return dirs, {"cv_accuracy": accs}
    if method == "pca":
        idx = [(d[1], d[0]) for d in pairs.values() if 0 in d and 1 in d]
        if len(idx) < 2:
            raise InvalidInputError("method 'pca' needs at least 2 matched positive/negative pairs")
        p_i, n_i = map(list, zip(*idx))
        diffs = acts[p_i] - acts[n_i]  # [pairs, L+1, H]
        dirs = np.zeros_like(mean_diff)
        explained = []
        for layer in range(acts.shape[1]):
            _, s, vt = np.linalg.svd(diffs[:, layer].astype(np.float64), full_matrices=False)
            pc = vt[0]
            if pc @ mean_diff[layer] < 0:  # sign fixed by the labels
                pc = -pc
            dirs[layer] = pc * abs(pc @ mean_diff[layer])
            explained.append(float(s[0] ** 2 / max((s**2).sum(), 1e-30)))
        return dirs, {"explained_variance": explained}
    raise InvalidInputError(f"unknown method {method!r} (expected one of {', '.join(METHODS)})")
