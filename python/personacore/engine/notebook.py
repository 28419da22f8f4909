"""How a :class:`~personacore.Generation` shows itself in a notebook: :func:`generation_html`.

The reply's tokens are colored by their score on the first monitored vector at its first monitored
layer, on a diverging scale centred on that vector's alert threshold (red above, blue below; without
a threshold, centred on the reply's mean score), the color strength proportional to the distance
from the centre over the largest distance in the reply. Each token's exact score is in its tooltip.
Alert, clear and steering events are marked before the token they happened at; events on the prompt
are listed above the reply. All text is HTML-escaped; the markup is plain inline-styled HTML.
"""

from __future__ import annotations

import html
import math
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["generation_html", "score_color"]

_HIGH = (220, 38, 38)  # red: above the centre of the scale
_LOW = (37, 99, 235)  # blue: below it
_EVENT_LABELS = {
    "alert": "\u26a0 alert",
    "clear": "\u2713 clear",
    "steer_on": "\u21e9 steer on",
    "steer_off": "\u21e7 steer off",
}
_EVENT_COLORS = {
    "alert": "#b91c1c",
    "clear": "#15803d",
    "steer_on": "#7c3aed",
    "steer_off": "#6b7280",
}


def score_color(score: float, center: float, scale: float) -> str:
    """The background color of a token: white at ``center``, full red at ``center + scale`` and
    above, full blue at ``center - scale`` and below, mixed linearly in between (``rgb(r,g,b)``)."""
    if not math.isfinite(score):
        return "rgb(255,255,255)"
    t = max(-1.0, min(1.0, (score - center) / scale)) if scale > 0 else 0.0
    target = _HIGH if t >= 0 else _LOW
    a = 0.85 * abs(t)
    r, g, b = (round(255 + a * (c - 255)) for c in target)
    return f"rgb({r},{g},{b})"


def _event_badge(ev: Any) -> str:
    color = _EVENT_COLORS.get(ev.kind, "#374151")
    label = _EVENT_LABELS.get(ev.kind, ev.kind)
    return (
        f'<span class="pc-event pc-event-{html.escape(ev.kind)}" '
        f'title="{html.escape(ev.describe())}" style="color:{color};font-weight:bold;'
        f"font-size:0.8em;border:1px solid {color};border-radius:3px;padding:0 2px;"
        f'margin:0 2px">{html.escape(label)}</span>'
    )


def _colored_column(gen: Any) -> Optional[Tuple[str, int, List[Optional[float]]]]:
    """(name, layer, score of each generated token or None) of the first monitored column."""
    if not gen.scores:
        return None
    name = next(iter(gen.scores))
    rows = gen.scores[name]
    layer = gen.score_layers.get(name, [None])[0]
    scores: List[Optional[float]] = []
    for k in range(len(gen.token_ids)):
        row = gen.prompt_len + k
        ok = row < rows.shape[0] and rows.shape[1] > 0 and math.isfinite(float(rows[row, 0]))
        scores.append(float(rows[row, 0]) if ok else None)
    return name, layer, scores


def _threshold(gen: Any, name: str) -> Optional[float]:
    if name in gen.thresholds:
        return float(gen.thresholds[name])
    for ev in gen.events:  # a Generation built without thresholds: the line an event crossed
        if ev.vector == name and ev.threshold is not None:
            return float(ev.threshold)
    return None


def _swatch(color: str, text: str) -> str:
    return (
        f'<span style="background:{color};padding:0 4px;border:1px solid #ddd">'
        f"{html.escape(text)}</span>"
    )


def generation_html(gen: Any) -> str:
    """The HTML of a :class:`~personacore.Generation` (see the module docstring)."""
    texts = list(gen.token_texts)
    if len(texts) != len(gen.token_ids):  # built without a tokenizer: show the ids
        texts = [f"[{t}]" for t in gen.token_ids]
    column = _colored_column(gen)
    by_position: Dict[int, List[Any]] = {}
    for ev in gen.events:
        by_position.setdefault(int(ev.position), []).append(ev)

    head: List[str] = []
    center = scale = 0.0
    if column is None:
        head.append("no monitor scores: tokens shown without colors")
    else:
        name, layer, scores = column
        known = [s for s in scores if s is not None]
        threshold = _threshold(gen, name)
        center = threshold if threshold is not None else (sum(known) / len(known) if known else 0.0)
        scale = max((abs(s - center) for s in known), default=0.0)
        what = f"threshold {center:+.3f}" if threshold is not None else f"reply mean {center:+.3f}"
        head.append(
            f"colored by <b>{html.escape(str(name))}</b> at layer {html.escape(str(layer))}: "
            + _swatch(score_color(center - scale, center, scale), f"{center - scale:+.2f}")
            + " "
            + _swatch(score_color(center, center, scale), what)
            + " "
            + _swatch(score_color(center + scale, center, scale), f"{center + scale:+.2f}")
        )
        if gen.prompt_len > 0 and gen.prompt_len - 1 < gen.scores[name].shape[0]:
            early = float(gen.scores[name][gen.prompt_len - 1, 0])
            head.append(f"early warning (last prompt token): {early:+.3f}")
    head.append(f"{len(gen.token_ids)} tokens, finish reason {html.escape(str(gen.finish_reason))}")
    before = [ev for p, evs in by_position.items() if p < gen.prompt_len for ev in evs]
    if before:
        head.append("on the prompt: " + " ".join(_event_badge(ev) for ev in before))

    body: List[str] = []
    for k, text in enumerate(texts):
        for ev in by_position.get(gen.prompt_len + k, []):
            body.append(_event_badge(ev))
        score = column[2][k] if column is not None else None
        if score is None:
            style, title = "", f"token {k}"
        else:
            style = f' style="background:{score_color(score, center, scale)}"'
            title = f"token {k}: score {score:+.3f}"
        body.append(
            f'<span class="pc-tok" title="{html.escape(title)}"{style}>{html.escape(text)}</span>'
        )
    end = gen.prompt_len + len(texts)
    for ev in (ev for p, evs in sorted(by_position.items()) if p >= end for ev in evs):
        body.append(_event_badge(ev))
    legend = "".join(f"<div>{line}</div>" for line in head)
    return (
        '<div class="pc-generation" style="font-family:sans-serif;font-size:13px">'
        f'<div class="pc-legend" style="color:#374151;margin-bottom:4px">{legend}</div>'
        '<div class="pc-tokens" style="font-family:monospace;white-space:pre-wrap;'
        f'line-height:1.7;border:1px solid #e5e7eb;padding:6px">{"".join(body)}</div></div>'
    )
