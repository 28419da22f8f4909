"""Contrastive rollouts: generate with the positive and the negative system prompts of a trait,
optionally filter them with a judge, and pool their activations chunk by chunk."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm.auto import tqdm

from ..judges import COHERENCE_PROMPT, judge_enabled

__all__ = ["Rollout", "rollouts", "collect"]


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
    #: With a monitor: the highest score of the reply's tokens (attention sinks left out) at each
    #: monitored layer, what a monitor's alert on that reply would be decided by.
    token_max: Optional[np.ndarray] = None


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
    monitor: Any = None,
):
    """Generate positive and negative rollouts, yielding them batch by batch (lists of :class:`Rollout`).

    Every instruction pair × question × sample gives one positive and one negative rollout; with
    ``round_robin`` question ``j`` uses only instruction pair ``j mod n`` (for cheap held-out sets).
    With ``monitor`` (a ``pc.Monitor`` of one vector), each rollout records ``token_max``.
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
    bar = tqdm(total=len(jobs), desc=desc, unit="rollout", disable=not progress)
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
                monitor=monitor,
            )
            eos = set(model.tokenizer.eos_token_ids)
            out = []
            for (label, i, q, s), g in zip(chunk, gens):
                resp = list(g.token_ids)
                while resp and resp[-1] in eos:
                    resp.pop()
                r = Rollout(label, i, q, s, g.text, list(g.prompt_ids), resp)
                if monitor is not None:
                    (reply,) = g.reply_scores().values()
                    r.token_max = reply.max(axis=0) if len(reply) else None
                out.append(r)
            bar.update(len(chunk))
            yield out
    finally:
        bar.close()


def _judge(judge: Any, trait: Any, batch: List[Rollout]) -> None:
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


def _pooled(
    model: Any, batch: List[Rollout], poolings: Sequence[str], batch_size: int
) -> Dict[str, np.ndarray]:
    """Pooled activations ``{pooling: [len(batch), L+1, H]}`` of rollouts with a non-empty response."""
    return model.pool(
        [r.prompt_ids for r in batch],
        [r.response_ids for r in batch],
        poolings=tuple(poolings),
        batch_size=batch_size,
    )


def collect(
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
    extra_poolings=(),
    monitor=None,
):
    """Rollouts → (judge filter) → pooled rows. Memory holds only the pooled rows and small metadata.

    Returns ``(acts, kept, n_total)``; with ``extra_poolings`` (poolings besides ``pooling``),
    ``acts`` is a dict ``{pooling: rows}`` holding ``pooling`` and each of them.
    """
    poolings = [pooling] + [p for p in extra_poolings if p != pooling]
    rows: Dict[str, List[np.ndarray]] = {p: [] for p in poolings}
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
        monitor=monitor,
    ):
        n_total += len(batch)
        if judge_enabled(judge):
            _judge(judge, trait, batch)
            batch = [r for r in batch if _keep(r, trait_threshold, coherence_threshold)]
        batch = [
            r for r in batch if r.response_ids and (monitor is None or r.token_max is not None)
        ]
        if not batch:
            continue
        for p, arr in _pooled(model, batch, poolings, batch_size).items():
            rows[p].append(arr)
        for r in batch:
            r.prompt_ids, r.response_ids = [], []  # drop what is no longer needed
        kept.extend(batch)
    empty = np.zeros((0, model.num_layers + 1, model.hidden_size), np.float32)
    by_pooling = {p: np.concatenate(r) if r else empty for p, r in rows.items()}
    if extra_poolings:
        return by_pooling, kept, n_total
    return by_pooling[pooling], kept, n_total
