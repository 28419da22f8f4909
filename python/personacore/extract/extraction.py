"""From a trait to a persona vector: the paper's pipeline, run by the engine.

``extract(model, trait)`` runs contrastive rollouts (positive vs negative system prompts over the
trait's questions), optionally filters them with a judge, pools the response activations at every
layer through :meth:`Model.pool` chunk by chunk (only the pooled rows are kept), fits a direction per
layer (``mean_diff``, ``logreg`` or ``pca``), then recommends the layer that best separates held-out
rollouts of the trait's evaluation questions (AUROC, then Cohen's d), keeping per-layer projection
statistics to calibrate monitors.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import InvalidInputError
from ..judges import judge_enabled
from ..vectors import PersonaVector

__all__ = ["extract", "Rollout", "rollouts", "separation", "ab_logit_gap", "METHODS"]

METHODS = ("mean_diff", "logreg", "pca")
POOLINGS = ("response_avg", "prompt_avg", "prompt_last")


@dataclasses.dataclass
class Rollout:
    """One generated response: ``label`` 1 for the trait (positive system prompt), 0 for its absence."""

    label: int
    instruction: int
    question: str
    sample: int
    text: str
    prompt_ids: List[int]
    response_ids: List[int]
    trait_score: Optional[float] = None
    coherence: Optional[float] = None


def _progress(total: int, desc: str, enabled: bool):
    """A tqdm progress bar when tqdm is installed and ``enabled``, else a silent stand-in."""
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, unit="rollout")
        except ImportError:
            pass

    class _Silent:
        def update(self, n: int) -> None:
            """Ignore progress."""

        def close(self) -> None:
            """Nothing to close."""

    return _Silent()


def rollouts(
    model: Any,
    trait: Any,
    questions: Sequence[str],
    n_per_question: int = 1,
    *,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    instructions: Optional[Sequence[int]] = None,
    round_robin: bool = False,
    progress: bool = False,
    desc: str = "rollouts",
):
    """Generate positive and negative rollouts, yielding them batch by batch (lists of :class:`Rollout`).

    Every instruction pair × question × sample gives one positive and one negative rollout; with
    ``round_robin`` question ``j`` uses only instruction pair ``j mod n`` (for cheap held-out sets).
    """
    n_instr = len(trait.instructions)
    instr = list(range(n_instr)) if instructions is None else list(instructions)
    jobs: List[Tuple[int, int, str, int]] = []
    for j, q in enumerate(questions):
        pairs = [instr[j % len(instr)]] if round_robin else instr
        for i in pairs:
            for s in range(n_per_question):
                jobs.append((1, i, q, s))
                jobs.append((0, i, q, s))
    bar = _progress(len(jobs), desc, progress)
    try:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            chats = []
            for label, i, q, _ in chunk:
                pos, neg = trait.system_prompts(i)
                chats.append(
                    [
                        {"role": "system", "content": pos if label else neg},
                        {"role": "user", "content": q},
                    ]
                )
            gens = model.generate(
                chats,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed + start,
            )
            eos = set(model.tokenizer.eos_token_ids)
            out = []
            for (label, i, q, s), g in zip(chunk, gens):
                resp = list(g.token_ids)
                while resp and resp[-1] in eos:
                    resp.pop()
                out.append(Rollout(label, i, q, s, g.text, list(g.prompt_ids), resp))
            bar.update(len(chunk))
            yield out
    finally:
        bar.close()


def _judge(judge: Any, trait: Any, batch: List[Rollout]) -> None:
    from ..judges import COHERENCE_PROMPT

    items = [(r.question, r.text) for r in batch]
    for r, t, c in zip(
        batch, judge.score_many(items, trait.eval_prompt), judge.score_many(items, COHERENCE_PROMPT)
    ):
        r.trait_score, r.coherence = t, c


def _keep(r: Rollout, trait_threshold: float, coherence_threshold: float) -> bool:
    """persona_vectors' filter: positive rollouts must show the trait, negative ones must not, both coherent."""
    if r.trait_score is None or r.coherence is None or r.coherence < coherence_threshold:
        return False
    return r.trait_score >= trait_threshold if r.label else r.trait_score < trait_threshold


def _pooled(model: Any, batch: List[Rollout], pooling: str, batch_size: int) -> np.ndarray:
    """Pooled activations ``[len(batch), L+1, H]`` of rollouts with a non-empty response."""
    out = model.pool(
        [r.prompt_ids for r in batch],
        [r.response_ids for r in batch],
        poolings=(pooling,),
        batch_size=batch_size,
    )
    return out[pooling]


def _collect(
    model,
    trait,
    questions,
    *,
    n_per_question,
    max_new_tokens,
    temperature,
    top_p,
    seed,
    batch_size,
    instructions,
    round_robin,
    pooling,
    judge,
    trait_threshold,
    coherence_threshold,
    progress,
    desc,
):
    """Rollouts → (judge filter) → pooled rows. Memory holds only the pooled rows and small metadata."""
    rows: List[np.ndarray] = []
    kept: List[Rollout] = []
    n_total = 0
    for batch in rollouts(
        model,
        trait,
        questions,
        n_per_question,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        batch_size=batch_size,
        instructions=instructions,
        round_robin=round_robin,
        progress=progress,
        desc=desc,
    ):
        n_total += len(batch)
        if judge_enabled(judge):
            _judge(judge, trait, batch)
            batch = [r for r in batch if _keep(r, trait_threshold, coherence_threshold)]
        batch = [r for r in batch if r.response_ids]
        if not batch:
            continue
        rows.append(_pooled(model, batch, pooling, batch_size))
        for r in batch:
            r.prompt_ids, r.response_ids = [], []  # drop what is no longer needed
        kept.extend(batch)
    acts = (
        np.concatenate(rows)
        if rows
        else np.zeros((0, model.num_layers + 1, model.hidden_size), np.float32)
    )
    return acts, kept, n_total


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


def _fit(
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


def extract(
    model: Any,
    trait: Any,
    n_per_question: int = 1,
    max_new_tokens: int = 48,
    max_questions: Optional[int] = None,
    judge: Any = None,
    method: str = "mean_diff",
    seed: int = 0,
    *,
    pooling: str = "response_avg",
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_instructions: Optional[int] = None,
    max_eval_questions: Optional[int] = None,
    batch_size: int = 16,
    trait_threshold: float = 50.0,
    coherence_threshold: float = 50.0,
    progress: bool = True,
) -> PersonaVector:
    """Extract a persona vector for ``trait`` (a :class:`~personacore.Trait` or a name) from ``model``.

    Returns a :class:`PersonaVector` whose ``layer`` is the steerable layer (1..L-1) that best separates
    held-out positive/negative rollouts of the trait's evaluation questions, with per-layer statistics in
    ``metadata["stats"]`` (AUROC, Cohen's d, mean/std of positive and negative projections).
    """
    from .traits import Trait

    if isinstance(trait, str):
        trait = Trait.load(trait)
    if method not in METHODS:
        raise InvalidInputError(f"unknown method {method!r} (expected one of {', '.join(METHODS)})")
    if pooling not in POOLINGS:
        raise InvalidInputError(
            f"unknown pooling {pooling!r} (expected one of {', '.join(POOLINGS)})"
        )
    for name, v in (
        ("n_per_question", n_per_question),
        ("max_new_tokens", max_new_tokens),
        ("batch_size", batch_size),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InvalidInputError(f"{name} must be a positive int, got {v!r}")
    questions = list(trait.questions)[:max_questions]
    eval_questions = list(trait.eval_questions)[:max_eval_questions]
    if not eval_questions:
        raise InvalidInputError(
            f"trait {trait.name!r} has no evaluation questions to choose a layer with"
        )
    instructions = list(range(len(trait.instructions)))[:max_instructions]
    common = dict(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        batch_size=batch_size,
        instructions=instructions,
        pooling=pooling,
        judge=judge,
        trait_threshold=trait_threshold,
        coherence_threshold=coherence_threshold,
        progress=progress,
    )
    acts, kept, n_total = _collect(
        model,
        trait,
        questions,
        n_per_question=n_per_question,
        seed=seed,
        round_robin=False,
        desc=f"extract {trait.name}",
        **common,
    )
    labels = np.array([r.label for r in kept], dtype=np.int64)
    if (labels == 1).sum() < 1 or (labels == 0).sum() < 1:
        raise InvalidInputError(
            f"after filtering, {int((labels == 1).sum())} positive and {int((labels == 0).sum())} negative "
            f"rollouts remain out of {n_total}: need at least one of each (lower the thresholds or add samples)"
        )
    pairs: Dict[Tuple[int, str, int], Dict[int, int]] = {}
    for k, r in enumerate(kept):
        pairs.setdefault((r.instruction, r.question, r.sample), {})[r.label] = k
    directions, fit_info = _fit(method, acts, labels, pairs)
    del acts
    ev_acts, ev_kept, _ = _collect(
        model,
        trait,
        eval_questions,
        n_per_question=1,
        seed=seed + 1_000_003,
        round_robin=True,
        desc=f"held-out {trait.name}",
        **dict(common, judge=None),
    )
    ev_labels = np.array([r.label for r in ev_kept], dtype=np.int64)
    stats = separation(ev_acts, ev_labels, directions)
    steerable = range(1, model.num_layers)
    layer = max(steerable, key=lambda l: (round(stats["auroc"][l], 6), stats["cohens_d"][l]))
    metadata = {
        "model": getattr(model, "path", None) or "",
        "trait": trait.name,
        "method": method,
        "pooling": pooling,
        "layer": layer,
        "counts": {
            "rollouts": n_total,
            "kept_pos": int((labels == 1).sum()),
            "kept_neg": int((labels == 0).sum()),
            "eval_pos": int((ev_labels == 1).sum()),
            "eval_neg": int((ev_labels == 0).sum()),
        },
        "judge": type(judge).__name__ if judge_enabled(judge) else None,
        "settings": {
            "n_per_question": n_per_question,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
            "questions": len(questions),
            "eval_questions": len(eval_questions),
            "instructions": len(instructions),
        },
        "stats": stats,
        **fit_info,
    }
    return PersonaVector(directions, layer=layer, name=trait.name, metadata=metadata)


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

    out: Dict[float, float] = {}
    for coef in coefs:
        steer = [Steer(vector, float(coef), layers=[layer])] if coef != 0 else None
        gaps = []
        for it in items:
            prompt = model.encode_chat([{"role": "user", "content": it["question"]}])
            enc = lambda s: model.tokenizer.encode(s, add_special_tokens=False)
            gaps.append(
                mean_logp(prompt, enc(it["trait_answer"]), steer)
                - mean_logp(prompt, enc(it["neutral_answer"]), steer)
            )
        out[float(coef)] = float(np.mean(gaps))
    return out
