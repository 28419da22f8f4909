"""How a :class:`~personacore.PersonaVector` shows itself in a notebook: :func:`vector_html`.

A table (name, model, trait, method, recommended layer, shape) and a per-layer curve: the held-out
AUROC of each layer when the vector carries extraction statistics (``metadata["stats"]["auroc"]``),
else the norm of each layer's direction, with the recommended layer marked. The curve is drawn by
matplotlib when it is installed (as inline SVG); otherwise by a small hand-written SVG line, so the
core package needs no plotting library. Plotly is not used here: its figures need its JavaScript
(several MB inline, or a CDN), which a static notebook view cannot rely on.
"""

from __future__ import annotations

import html
import io
import math
from typing import Any, List, Optional, Tuple

__all__ = ["vector_html", "layer_curve"]

_W, _H, _PAD = 320, 90, 18


def layer_curve(vec: Any) -> Tuple[str, List[float]]:
    """``(label, values)``: the held-out AUROC per layer from the metadata, else direction norms."""
    stats = vec.metadata.get("stats") if isinstance(vec.metadata, dict) else None
    auroc = stats.get("auroc") if isinstance(stats, dict) else None
    if isinstance(auroc, (list, tuple)) and len(auroc) == vec.shape[0]:
        try:
            return "held-out AUROC per layer", [float(a) for a in auroc]
        except (TypeError, ValueError):
            pass
    return "direction norm per layer", [float(n) for n in vec.norms()]


def _svg_sparkline(values: List[float], marked: Optional[int], label: str) -> str:
    finite = [v for v in values if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    span = hi - lo or 1.0
    n = len(values)

    def xy(i: int, v: float) -> Tuple[float, float]:
        x = _PAD + (_W - 2 * _PAD) * (i / max(1, n - 1))
        y = _H - _PAD - (_H - 2 * _PAD) * ((v - lo) / span)
        return round(x, 1), round(y, 1)

    points = " ".join(
        f"{x},{y}" for x, y in (xy(i, v) for i, v in enumerate(values) if math.isfinite(v))
    )
    parts = [
        f'<svg class="pc-curve" xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" '
        f'viewBox="0 0 {_W} {_H}" role="img"><title>{html.escape(label)}</title>',
        f'<polyline fill="none" stroke="#2563eb" stroke-width="1.5" points="{points}"/>',
        f'<text x="2" y="{_PAD - 6}" font-size="9" fill="#6b7280">{hi:.3g}</text>',
        f'<text x="2" y="{_H - 4}" font-size="9" fill="#6b7280">{lo:.3g}</text>',
        f'<text x="{_W - _PAD}" y="{_H - 4}" font-size="9" fill="#6b7280" '
        f'text-anchor="end">layer {n - 1}</text>',
    ]
    if marked is not None and 0 <= marked < n and math.isfinite(values[marked]):
        x, y = xy(marked, values[marked])
        parts.append(f'<circle cx="{x}" cy="{y}" r="3.5" fill="#dc2626"/>')
        parts.append(
            f'<text x="{x}" y="{_PAD - 6}" font-size="9" fill="#dc2626" '
            f'text-anchor="middle">layer {marked}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _matplotlib_curve(values: List[float], marked: Optional[int], label: str) -> Optional[str]:
    """The curve drawn by matplotlib as inline SVG, or None when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure  # no pyplot: the notebook's backend is left alone
    except ImportError:
        return None
    fig = Figure(figsize=(_W / 96, _H / 96 * 1.4), dpi=96)
    ax = fig.add_subplot()
    ax.plot(range(len(values)), values, color="#2563eb", linewidth=1.5)
    if marked is not None and 0 <= marked < len(values):
        ax.plot([marked], [values[marked]], "o", color="#dc2626", markersize=4)
        ax.axvline(marked, color="#dc2626", linewidth=0.6, alpha=0.5)
    ax.set_xlabel("layer", fontsize=7)
    ax.tick_params(labelsize=7)
    fig.tight_layout(pad=0.3)
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    svg = buf.getvalue()
    return svg[svg.index("<svg") :]  # without the XML declaration and doctype


def vector_html(vec: Any) -> str:
    """The HTML of a :class:`~personacore.PersonaVector` (see the module docstring)."""
    md = vec.metadata if isinstance(vec.metadata, dict) else {}
    label, values = layer_curve(vec)
    rows = [
        ("name", vec.name),
        ("model", md.get("model") or None),
        ("trait", md.get("trait")),
        ("method", md.get("method")),
        ("recommended layer", vec.layer),
        ("shape", f"{vec.shape[0]} layers (0..{vec.shape[0] - 1}) x {vec.shape[1]}"),
    ]
    if vec.layer is not None:
        rows.append(
            (label.replace(" per layer", f" at layer {vec.layer}"), f"{values[vec.layer]:.4g}")
        )
    table = "".join(
        f'<tr><th style="text-align:left;padding-right:8px">{html.escape(k)}</th>'
        f"<td>{html.escape(str(v))}</td></tr>"
        for k, v in rows
        if v is not None
    )
    curve = _matplotlib_curve(values, vec.layer, label) or _svg_sparkline(values, vec.layer, label)
    return (
        '<div class="pc-vector" style="font-family:sans-serif;font-size:13px">'
        f"<table>{table}</table>"
        f'<div class="pc-curve-box"><div style="color:#6b7280">{html.escape(label)}</div>'
        f"{curve}</div></div>"
    )
