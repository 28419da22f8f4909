"""The report's plots, as plotly figures (``personacore[report]`` installs plotly).

Each function takes checked inputs (:mod:`personacore.report.inputs`) and returns a
``plotly.graph_objects.Figure``; :mod:`personacore.report.page` writes them into the HTML file.
Scores and projections are the projections of docs/conventions.md ("Projection").
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..engine import Generation
from ..errors import PersonacoreError
from .inputs import EvalRow, sweep_metrics

__all__ = [
    "ReportDependencyError",
    "evaluation_figure",
    "plotly_modules",
    "projection_figure",
    "score_figure",
    "separation_figure",
]

#: trait (positive rollouts) and no-trait (negative rollouts) colors, used across the report
POS_COLOR = "#d62728"
NEG_COLOR = "#2ca02c"
THRESHOLD_COLOR = "#444444"
_EVENT_SYMBOLS = {
    "alert": ("triangle-up", "#d62728"),
    "clear": ("circle-open", "#2ca02c"),
    "steer_on": ("diamond", "#1f77b4"),
    "steer_off": ("diamond-open", "#1f77b4"),
}
_HEIGHT = 380


class ReportDependencyError(PersonacoreError, ImportError):
    """A report was asked for without its plotting library: ``pip install "personacore[report]"``."""


def _marker_line(fig: Any, x: float, text: str, position: str) -> None:
    """A dashed vertical line at ``x`` with a label (the chosen layer, an alert threshold)."""
    fig.add_vline(
        x=x,
        line_dash="dash",
        line_color=THRESHOLD_COLOR,
        annotation_text=text,
        annotation_position=position,
    )


def plotly_modules() -> Tuple[Any, Any, Any]:
    """``(plotly.graph_objects, plotly.subplots.make_subplots, plotly.offline)``, or a
    :class:`ReportDependencyError` saying how to install them."""
    try:
        import plotly.graph_objects as go
        import plotly.offline as offline
        from plotly.subplots import make_subplots
    except ImportError:
        raise ReportDependencyError(
            'reports need plotly: pip install "personacore[report]" (or pip install plotly)'
        ) from None
    return go, make_subplots, offline


def _layout(fig: Any, title: str, **kwargs: Any) -> Any:
    fig.update_layout(
        title={"text": title, "x": 0.01, "xanchor": "left"},
        height=_HEIGHT,
        margin={"l": 60, "r": 30, "t": 60, "b": 50},
        template="plotly_white",
        legend={"orientation": "h", "y": -0.18},
        **kwargs,
    )
    return fig


def separation_figure(stats: Dict[str, List[float]], layer: Optional[int]) -> Any:
    """AUROC (left axis) and Cohen's d (right axis) of the held-out rollouts at every layer, the
    chosen ``layer`` marked with a dashed line. Row 0 is the token embeddings."""
    go, make_subplots, _ = plotly_modules()
    layers = list(range(len(stats["auroc"])))
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(
        go.Scatter(x=layers, y=stats["auroc"], name="AUROC", mode="lines+markers"),
        secondary_y=False,
    )
    fig.add_trace(
        go.Scatter(x=layers, y=stats["cohens_d"], name="Cohen's d", mode="lines+markers"),
        secondary_y=True,
    )
    if layer is not None:
        _marker_line(fig, layer, f"chosen layer {layer}", "top left")
    fig.update_xaxes(title_text="layer (0 = embeddings)")
    fig.update_yaxes(title_text="AUROC", range=[0, 1.05], secondary_y=False)
    fig.update_yaxes(title_text="Cohen's d", secondary_y=True, showgrid=False)
    return _layout(fig, "Separation of held-out rollouts by layer")


def _heldout_projections(metadata: Dict[str, Any], layer: int) -> Optional[Tuple[Any, Any]]:
    """Raw held-out projections (positive, negative) at ``layer`` when the vector stores them
    (``metadata["heldout"]``: ``layer``, ``labels``, ``reply``), else None."""
    held = metadata.get("heldout")
    if not isinstance(held, dict) or held.get("layer") != layer:
        return None
    try:
        labels = np.asarray(held["labels"], dtype=np.int64)
        values = np.asarray(held["reply"], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        return None
    if labels.shape != values.shape or labels.ndim != 1 or not labels.size:
        return None
    return values[labels == 1], values[labels == 0]


def projection_figure(
    stats: Dict[str, List[float]],
    layer: int,
    metadata: Dict[str, Any],
    threshold: Optional[float],
) -> Any:
    """Positive and negative held-out rollouts' projections at ``layer`` with the alert threshold:
    histograms when the vector stores the raw projections, otherwise the normal densities fitted
    from the stored means and standard deviations (the title says which)."""
    go, _, _ = plotly_modules()
    fig = go.Figure()
    raw = _heldout_projections(metadata, layer)
    if raw is not None:
        pos, neg = raw
        for values, name, color in (
            (pos, "with the trait", POS_COLOR),
            (neg, "without", NEG_COLOR),
        ):
            fig.add_trace(
                go.Histogram(
                    x=values, name=f"{name} (n={values.size})", marker_color=color, opacity=0.6
                )
            )
        fig.update_layout(barmode="overlay")
        what, y_title = "histograms of the held-out projections", "rollouts"
    else:
        classes = [
            ("with the trait", stats["pos_mean"][layer], stats["pos_std"][layer], POS_COLOR),
            ("without", stats["neg_mean"][layer], stats["neg_std"][layer], NEG_COLOR),
        ]
        spread = max([sd for _, _, sd, _ in classes if sd > 0] or [1.0])
        lo = min(m - 4 * max(sd, spread * 0.05) for _, m, sd, _ in classes)
        hi = max(m + 4 * max(sd, spread * 0.05) for _, m, sd, _ in classes)
        if threshold is not None:
            lo, hi = min(lo, threshold), max(hi, threshold)
        xs = np.linspace(lo, hi, 400)
        for name, mean, sd, color in classes:
            sd = sd if sd > 0 else spread * 0.05  # one rollout (or identical ones): a narrow peak
            density = np.exp(-0.5 * ((xs - mean) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=density,
                    name=f"{name}: N({mean:.3g}, {sd:.3g}²)",
                    mode="lines",
                    fill="tozeroy",
                    line_color=color,
                )
            )
        what = "normal densities fitted from the stored means and stds (raw projections not stored)"
        y_title = "density"
    if threshold is not None:
        _marker_line(fig, threshold, f"alert threshold {threshold:.3g}", "top right")
    fig.update_xaxes(title_text=f"projection at layer {layer}")
    fig.update_yaxes(title_text=y_title)
    return _layout(fig, f"Held-out rollouts at layer {layer}: {what}")


def score_figure(
    gen: Generation,
    pieces: Sequence[str],
    threshold: Optional[float],
    label: str,
) -> Any:
    """Score over the reply's tokens for every monitored name and layer; the early-warning score
    (last prompt token) at x = -1, events as markers (those inside the prompt at x = -1), the
    threshold as a dashed line."""
    go, _, _ = plotly_modules()
    fig = go.Figure()
    start = gen.prompt_len
    for name, scores in gen.scores.items():
        reply = scores[start:]
        xs = list(range(-1, reply.shape[0])) if start > 0 else list(range(reply.shape[0]))
        hover = (["(last prompt token)"] if start > 0 else []) + [
            repr(pieces[k]) if k < len(pieces) else "" for k in range(reply.shape[0])
        ]
        for col, layer in enumerate(gen.score_layers.get(name, [])):
            ys = scores[max(start - 1, 0) :, col].astype(np.float64)
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=[float(y) if math.isfinite(y) else None for y in ys],
                    mode="lines+markers",
                    name=f"{name} @ layer {layer}",
                    text=hover,
                    hovertemplate="token %{x}: %{text}<br>score %{y:.3f}<extra>%{fullData.name}</extra>",
                )
            )
    for kind, (symbol, color) in _EVENT_SYMBOLS.items():
        events = [e for e in gen.events if e.kind == kind]
        if not events:
            continue
        fig.add_trace(
            go.Scatter(
                x=[max(e.position - start, -1) for e in events],
                y=[e.score if e.score is not None else threshold for e in events],
                mode="markers",
                name=kind,
                marker={"symbol": symbol, "size": 13, "color": color, "line": {"width": 2}},
                text=[e.describe() for e in events],
                hovertemplate="%{text}<extra></extra>",
            )
        )
    if threshold is not None:
        fig.add_hline(
            y=threshold,
            line_dash="dash",
            line_color=THRESHOLD_COLOR,
            annotation_text=f"threshold {threshold:.3g}",
        )
    fig.update_xaxes(title_text="reply token (-1: last prompt token)")
    fig.update_yaxes(title_text="score (projection)")
    return _layout(fig, f"{label}: score over tokens")


_METRIC_TITLES = {
    "trait_score": "trait score (judge, 0-100)",
    "coherence": "coherence (judge, 0-100)",
    "ab_gap": "A/B log-prob gap",
    "projection": "mean projection of the replies",
}


def evaluation_figure(rows: Sequence[EvalRow]) -> Any:
    """The sweep: two panels (trait score and coherence, or without a judge the A/B gap and the
    mean projection) against the steering coefficient, one line per layer."""
    go, make_subplots, _ = plotly_modules()
    import plotly.colors

    first, second = sweep_metrics(rows)
    fig = make_subplots(
        rows=1, cols=2, subplot_titles=(_METRIC_TITLES[first], _METRIC_TITLES[second])
    )
    palette = plotly.colors.qualitative.Plotly
    for k, layer in enumerate(sorted({r["layer"] for r in rows})):
        mine = sorted((r for r in rows if r["layer"] == layer), key=lambda r: r["coef"])
        color = palette[k % len(palette)]
        for col, metric in ((1, first), (2, second)):
            fig.add_trace(
                go.Scatter(
                    x=[r["coef"] for r in mine],
                    y=[r[metric] for r in mine],
                    mode="lines+markers",
                    name=f"layer {layer}",
                    legendgroup=f"layer {layer}",
                    showlegend=col == 1,
                    line_color=color,
                    connectgaps=False,
                ),
                row=1,
                col=col,
            )
    fig.update_xaxes(title_text="steering coefficient")
    return _layout(fig, "Steering sweep: layer x coefficient")
