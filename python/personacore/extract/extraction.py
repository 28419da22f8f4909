"""From a trait to a persona vector: the paper's pipeline, run by the engine.

``extract(model, trait)`` runs contrastive rollouts (positive vs negative system prompts over the
trait's questions), optionally filters them with a judge, pools the response activations at every
layer through :meth:`Model.pool` chunk by chunk (only the pooled rows are kept), fits a direction per
layer (``mean_diff``, ``logreg`` or ``pca``), then recommends the layer that best separates held-out
rollouts of the trait's evaluation questions (AUROC, then Cohen's d), keeping per-layer projection
statistics to calibrate monitors.

The steps live in their own modules: :mod:`.rollouts` (generation, judge filter, pooling),
:mod:`.fit` (one direction per layer) and :mod:`.evaluate` (held-out separation, A/B check).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np

from ..engine.defaults import model_identity
from ..errors import InvalidInputError
from ..judges import judge_enabled
from ..steering import Monitor
from ..vectors import PersonaVector
from ..vectors.calibration import fit_early_warning
from .evaluate import heldout_record, sample_stats, separation
from .fit import METHODS, fit_directions
from .rollouts import collect
from .traits import HELD_OUT_FRACTION, Trait, questions_and_held_out

__all__ = ["extract", "POOLINGS"]

POOLINGS = ("response_avg", "prompt_avg", "prompt_last")


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

    The held-out questions are the trait's ``eval_questions``; a trait without any holds out a fixed
    share of its own questions instead (:meth:`Trait.held_out_split`, with a warning), and
    ``metadata["settings"]["eval_split"]`` records that share (``None`` when the trait had its own).
    """
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
    all_questions, all_eval = questions_and_held_out(trait, "to choose the layer with")
    questions = all_questions[:max_questions]
    eval_questions = all_eval[:max_eval_questions]
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
    acts, kept, n_total = collect(
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
    directions, fit_info = fit_directions(method, acts, labels, pairs)
    del acts
    # Held-out rollouts, monitored on the fitted directions at every layer with a non-zero row:
    # each reply's highest token score is what a monitor's alert on it would see.
    scored = [i for i in range(model.num_layers + 1) if np.linalg.norm(directions[i]) > 0]
    ev_acts, ev_kept, _ = collect(
        model,
        trait,
        eval_questions,
        n_per_question=1,
        seed=seed + 1_000_003,
        round_robin=True,
        desc=f"held-out {trait.name}",
        extra_poolings=("prompt_last",),
        monitor=Monitor({trait.name: directions}, layers=scored),
        **dict(common, judge=None),
    )
    ev_labels = np.array([r.label for r in ev_kept], dtype=np.int64)
    token_max = np.zeros((len(ev_kept), model.num_layers + 1))
    for k, r in enumerate(ev_kept):
        token_max[k, scored] = r.token_max
    stats = separation(ev_acts[pooling], ev_labels, directions)
    prompt_stats = separation(ev_acts["prompt_last"], ev_labels, directions)
    steerable = range(1, model.num_layers)

    def best(st: Dict[str, Any]) -> int:
        return max(steerable, key=lambda i: (round(st["auroc"][i], 6), st["cohens_d"][i]))

    layer, warn_layer = best(stats), best(prompt_stats)
    heldout = heldout_record(ev_acts, token_max, ev_labels, directions, layer, warn_layer, pooling)
    metadata = {
        **model_identity(model),
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
            "eval_split": None if trait.eval_questions else HELD_OUT_FRACTION,
            "instructions": len(instructions),
        },
        "stats": stats,
        "token_max_stats": sample_stats(token_max, ev_labels),
        "prompt_last_stats": prompt_stats,
        "heldout": heldout,
        "early_warning": fit_early_warning(
            {
                "layer": warn_layer,
                "labels": heldout["labels"],
                "prompt_last": heldout["prompt_last"][str(warn_layer)],
            }
        ),
        **fit_info,
    }
    return PersonaVector(directions, layer=layer, name=trait.name, metadata=metadata)
