"""Judges that score replies 0-100 for a trait or for coherence, and the pair filter built on them.

- :mod:`.base`: the :class:`Judge` interface, :class:`NoJudge`, persona_vectors' scoring rule
  (:func:`aggregate_0_100`), :func:`render_prompt`, :data:`COHERENCE_PROMPT`;
- :mod:`.openai_judge`: :class:`OpenAIJudge`, any OpenAI-compatible endpoint through the ``openai``
  SDK (``pip install 'personacore[judge]'``);
- :mod:`.local`: :class:`LocalJudge`, the same scoring with a personacore model;
- :mod:`.filtering`: :func:`filter_pairs` and its :class:`FilterReport`.
"""

from .base import (
    COHERENCE_PROMPT,
    Judge,
    JudgeError,
    NoJudge,
    aggregate_0_100,
    judge_enabled,
    render_prompt,
)
from .filtering import FilterReport, filter_pairs
from .local import LocalJudge
from .openai_judge import OpenAIJudge

__all__ = [
    "COHERENCE_PROMPT",
    "FilterReport",
    "Judge",
    "JudgeError",
    "LocalJudge",
    "NoJudge",
    "OpenAIJudge",
    "aggregate_0_100",
    "filter_pairs",
    "judge_enabled",
    "render_prompt",
]
