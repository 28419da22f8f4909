"""What every judge shares: the :class:`Judge` interface, persona_vectors' 0–100 scoring rule, prompts.

A judge reads a prompt template with ``{question}`` and ``{answer}`` (a trait's ``eval_prompt`` or
:data:`COHERENCE_PROMPT`), asks a language model for one token, and turns the top-20 next-token
probabilities into a score exactly as persona_vectors' ``OpenAiJudge._aggregate_0_100_score`` does:
the probability-weighted mean of the tokens that are integers 0–100, normalised by their total
probability, or ``None`` when that total is below 0.25 (see :func:`aggregate_0_100`). In addition, when
the prompt offers a REFUSAL answer and the most likely token is ``REF``/``REFUSAL``, the score is
``None`` (``refusal_check=False`` turns this off and gives persona_vectors' rule alone).

:class:`NoJudge` scores everything ``None``. With no judge (``judge=None`` or a ``NoJudge``; see
:func:`judge_enabled`) extraction skips filtering instead of dropping every rollout.
"""

from __future__ import annotations

import abc
import re
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from tqdm.auto import tqdm

from ..errors import InvalidInputError, PersonacoreError

__all__ = [
    "Judge",
    "NoJudge",
    "JudgeError",
    "COHERENCE_PROMPT",
    "TOP_K",
    "MIN_MASS",
    "aggregate_0_100",
    "render_prompt",
    "judge_enabled",
]

#: How many top tokens a judge reads (persona_vectors: ``top_logprobs=20``).
TOP_K = 20
#: Minimum total probability on integer tokens 0–100 for a score (persona_vectors: 0.25).
MIN_MASS = 0.25

#: Our coherence judge prompt (``{question}``, ``{answer}``): 0–100, independent of any trait.
COHERENCE_PROMPT = """You are rating the COHERENCE of an AI assistant's answer, and nothing else.

Question:
[QUESTION START]
{question}
[QUESTION END]

Answer:
[ANSWER START]
{answer}
[ANSWER END]

Judge only whether the answer is coherent: fluent, grammatical, on topic for the question, and
understandable. Ignore whether it is polite, kind, correct, helpful, safe or in line with any values
or personality: a rude, odd or false answer can still be perfectly coherent.

Use this scale:
0 = gibberish, broken or repeating text, or unrelated to the question
50 = understandable but rambling, confused or partly off topic
100 = clear, fluent and fully responsive to the question

Respond with a number between 0 and 100. Don't say anything else, just the number."""

_PLACEHOLDER = re.compile(r"\{(question|answer)\}")


class JudgeError(PersonacoreError, RuntimeError):
    """A judge that cannot score: HTTP errors after the last retry, a rejected key (401), a bad request,
    an endpoint without logprobs, the ``openai`` package missing for :class:`OpenAIJudge`."""


def render_prompt(template: str, question: str, answer: str) -> str:
    """``template`` with ``{question}`` and ``{answer}`` filled in (other braces are left alone, and
    text inside the question or answer is never substituted again)."""
    if not isinstance(template, str):
        raise InvalidInputError(
            f"a judge prompt template must be a str, got {type(template).__name__}"
        )
    values = {"question": str(question), "answer": str(answer)}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def is_refusal_token(token: str) -> bool:
    """True for a REFUSAL-like token (``REF``, ``REFUS``, ``REFUSAL``, any case, stripped)."""
    t = token.strip().upper()
    return len(t) >= 3 and ("REFUSAL".startswith(t) or t.startswith("REFUS"))


def aggregate_0_100(
    top: Union[Iterable[Tuple[str, float]], Dict[str, float]], *, refusal_check: bool = False
) -> Optional[float]:
    """The 0–100 score of a next-token distribution ``top``: ``(token, probability)`` pairs or a dict.

    persona_vectors' rule: the tokens whose stripped text is an integer 0..100 are averaged, weighted
    by probability and divided by their total probability; ``None`` if that total is < 0.25 (or
    ``top`` is empty). Tokens with the same stripped text add up. With ``refusal_check``, ``None`` also
    when the most probable token is REFUSAL-like (``REF``, ``REFUS``, ``REFUSAL``...).
    """
    items = list(top.items()) if isinstance(top, dict) else [(str(t), float(p)) for t, p in top]
    if not items:
        return None
    if refusal_check and is_refusal_token(max(items, key=lambda tp: tp[1])[0]):
        return None
    total = weighted = 0.0
    for token, p in items:
        s = token.strip()
        if not (s.isascii() and s.isdigit()):
            continue
        value = int(s)
        if 0 <= value <= 100:
            weighted += value * p
            total += p
    if total < MIN_MASS:
        return None
    return weighted / total


def judge_enabled(judge: Any) -> bool:
    """False for ``None`` and :class:`NoJudge` (callers then skip filtering), True for a real judge."""
    return judge is not None and not isinstance(judge, NoJudge)


class Judge(abc.ABC):
    """A scorer of (question, answer) pairs under a prompt template, 0–100 or ``None``.

    Subclasses implement :meth:`score_prompt`; :meth:`score` and :meth:`score_many` render templates
    and (for many) score each distinct prompt once.
    """

    refusal_check: bool = True

    @abc.abstractmethod
    def score_prompt(self, prompt: str) -> Optional[float]:
        """Score an already rendered judge prompt."""

    def score(self, question: str, answer: str, prompt_template: str) -> Optional[float]:
        """Score one answer to ``question`` with ``prompt_template`` (``{question}``/``{answer}``)."""
        return self.score_prompt(render_prompt(prompt_template, question, answer))

    def score_many(
        self, items: Sequence[Tuple[str, str]], prompt_template: str, progress: bool = False
    ) -> List[Optional[float]]:
        """Scores of ``items`` (``(question, answer)`` pairs), in order; identical prompts are scored once."""
        prompts = [render_prompt(prompt_template, q, a) for q, a in items]
        unique = list(dict.fromkeys(prompts))
        scores = dict(zip(unique, self._score_prompts(unique, progress)))
        return [scores[p] for p in prompts]

    def _score_prompts(self, prompts: List[str], progress: bool) -> List[Optional[float]]:
        bar = tqdm(prompts, desc=type(self).__name__, unit="item", disable=not progress)
        return [self.score_prompt(p) for p in bar]


class NoJudge(Judge):
    """A judge that scores nothing: every score is ``None``. Extraction treats it like ``judge=None``
    and skips filtering (see :func:`judge_enabled`)."""

    def score_prompt(self, prompt: str) -> Optional[float]:
        """Always ``None``."""
        return None

    def __repr__(self) -> str:
        return "NoJudge()"
