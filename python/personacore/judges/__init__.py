"""Judges that score replies 0-100 for a trait or for coherence, and the pair filter built on them."""

from .judges import (
    COHERENCE_PROMPT,
    FilterReport,
    Judge,
    JudgeError,
    LocalJudge,
    NoJudge,
    OpenAIJudge,
    aggregate_0_100,
    filter_pairs,
    judge_enabled,
    render_prompt,
)

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
