"""A generation's reply as HTML: each token on a background colored by its score, events marked.

The color runs from green (a score like the vector's negative held-out rollouts) through yellow to
red (like its positive ones); without held-out statistics the scale is the reply's own range. Each
token's tooltip gives its score; attention-sink positions (which raise no alert) are outlined.
Events (``alert``, ``clear``, ``steer_on``, ``steer_off``) appear as badges in front of the token at
their position; events inside the prompt are listed above the reply.
"""

from __future__ import annotations

import html
import math
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from ..engine import Generation

__all__ = ["ScoreColumn", "color_of", "score_column", "token_pieces", "tokens_html"]

#: (monitored name, column index in ``scores[name]``, layer) that colors a generation's tokens
ScoreColumn = Tuple[str, int, int]

_STOPS = ((0.0, (26, 152, 80)), (0.5, (254, 224, 139)), (1.0, (215, 48, 39)))
_BADGES = {
    "alert": "⚠ alert",
    "clear": "✓ clear",
    "steer_on": "▼ steer on",
    "steer_off": "▲ steer off",
}


def color_of(t: float) -> str:
    """``rgb(...)`` on the green-yellow-red scale for ``t`` in [0, 1] (clipped)."""
    t = min(max(t, 0.0), 1.0)
    for (t0, c0), (t1, c1) in zip(_STOPS, _STOPS[1:]):
        if t <= t1:
            f = (t - t0) / (t1 - t0)
            r, g, b = (round(a + (b_ - a) * f) for a, b_ in zip(c0, c1))
            return f"rgb({r},{g},{b})"
    raise AssertionError("unreachable: t is clipped to [0, 1]")


def token_pieces(gen: Generation, tokenizer: Any) -> Optional[List[str]]:
    """The text of each generated token, or None without a tokenizer.

    ``tokenizer`` is a :class:`~personacore.Tokenizer` or a :class:`~personacore.Model` (its
    tokenizer is used). Each piece is the text the token adds to the decoded reply so far, so that
    multi-byte characters and leading spaces come out as in :attr:`Generation.text`.
    """
    if tokenizer is None:
        return None
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    pieces: List[str] = []
    before = ""
    for k in range(len(gen.token_ids)):
        now = tok.decode(gen.token_ids[: k + 1])
        if now.startswith(before):
            pieces.append(now[len(before) :])
        else:  # the prefix's decoding changed (an incomplete character completed)
            pieces.append(tok.decode([gen.token_ids[k]]))
        before = now
    return pieces


def score_column(
    gen: Generation, name: Optional[str], layer: Optional[int]
) -> Optional[ScoreColumn]:
    """Which score colors the tokens: ``name`` if monitored (else the first name), at ``layer`` if
    monitored (else the first layer); None without scores."""
    if not gen.scores:
        return None
    chosen = name if name in gen.scores else next(iter(gen.scores))
    layers = gen.score_layers.get(chosen, [])
    if not layers:
        return None
    col = layers.index(layer) if layer in layers else 0
    return chosen, col, layers[col]


def _scale(values: np.ndarray, lo: Optional[float], hi: Optional[float]) -> Tuple[float, float]:
    if lo is not None and hi is not None and hi > lo:
        return lo, hi
    finite = values[np.isfinite(values)]
    if not finite.size or finite.max() == finite.min():
        return 0.0, 1.0
    return float(finite.min()), float(finite.max())


def tokens_html(
    gen: Generation,
    pieces: Optional[Sequence[str]],
    column: Optional[ScoreColumn],
    scale: Tuple[Optional[float], Optional[float]] = (None, None),
) -> str:
    """The reply as ``<span>`` tokens colored by ``column``'s scores (see the module docstring).

    ``scale`` = (score drawn green, score drawn red), e.g. the held-out negative and positive means;
    without it the reply's own minimum and maximum. Without ``pieces`` tokens show as ``#id``.
    """
    start = gen.prompt_len
    values = np.full(len(gen.token_ids), np.nan)
    if column is not None:
        name, col, _ = column
        rows = gen.scores[name][start : start + len(gen.token_ids), col].astype(np.float64)
        values[: rows.shape[0]] = rows
    lo, hi = _scale(values, *scale)
    by_position: dict = {}
    prompt_events = []
    for e in gen.events:
        if e.position < start:
            prompt_events.append(e)
        else:
            by_position.setdefault(e.position - start, []).append(e)
    sinks = np.asarray(gen.sinks, dtype=bool)
    out: List[str] = []
    if prompt_events:
        items = ", ".join(_badge(e) for e in prompt_events)
        out.append(f'<div class="prompt-events">in the prompt: {items}</div>')
    out.append('<div class="tokens">')
    for k, token_id in enumerate(gen.token_ids):
        out.extend(_badge(e) for e in by_position.get(k, []))
        text = pieces[k] if pieces is not None and k < len(pieces) else f"#{token_id} "
        score = values[k]
        classes = "tok" + (" sink" if start + k < len(sinks) and sinks[start + k] else "")
        if math.isfinite(score):
            style = f' style="background:{color_of((score - lo) / (hi - lo))}"'
            tip = f"token {k} (id {token_id}): score {score:.3f}"
        else:
            style, tip = "", f"token {k} (id {token_id}): no score"
        out.append(
            f'<span class="{classes}"{style} title="{html.escape(tip)}">{html.escape(text)}</span>'
        )
    out.extend(_badge(e) for e in by_position.get(len(gen.token_ids), []))
    out.append("</div>")
    if column is not None:
        out.append(
            f'<div class="scale">{html.escape(column[0])} @ layer {column[2]}: '
            f'<span class="tok" style="background:{color_of(0.0)}">{lo:.3g}</span> '
            f'<span class="tok" style="background:{color_of(0.5)}">{(lo + hi) / 2:.3g}</span> '
            f'<span class="tok" style="background:{color_of(1.0)}">{hi:.3g}</span></div>'
        )
    return "".join(out)


def _badge(e: Any) -> str:
    tip = f"{e.kind} at position {e.position}"
    if e.score is not None:
        tip += f", score {e.score:.3f}"
    if e.threshold is not None:
        tip += f", threshold {e.threshold:.3f}"
    if e.coef is not None:
        tip += f", coef {e.coef:.3g}"
    return (
        f'<span class="event {html.escape(e.kind)}" title="{html.escape(tip)}">'
        f"{html.escape(_BADGES.get(e.kind, e.kind))}</span>"
    )
