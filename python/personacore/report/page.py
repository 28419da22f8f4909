""":func:`report`: one self-contained HTML file of a persona vector, generations and a sweep.

The file opens offline: plotly's JavaScript is inlined once in the page (no network fetch), the
styles are inline, and nothing else is referenced. Each figure sits in a
``<div class="figure" data-figure="NAME">`` (NAME: ``separation``, ``projections``,
``generation-K`` for the K-th generation (from 1)'s score plot, ``evaluation``); the colored tokens of the
K-th generation (from 1) are in ``<div data-tokens="generation-K">``.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..engine import Generation
from ..errors import InvalidInputError, PersonacoreIOError
from ..vectors import PersonaVector
from .figures import (
    evaluation_figure,
    plotly_modules,
    projection_figure,
    score_figure,
    separation_figure,
)
from .inputs import alert_threshold, evaluation_rows, labelled_generations, separation_stats
from .tokens import score_column, token_pieces, tokens_html

__all__ = ["report"]

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto;
       max-width: 1280px; padding: 0 16px; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 4px; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 32px; }
h3 { font-size: 1.05em; margin: 8px 0; }
table.meta { border-collapse: collapse; font-size: 0.9em; }
table.meta td { padding: 2px 12px 2px 0; vertical-align: top; }
table.meta td:first-child { color: #666; }
.note { color: #555; font-size: 0.9em; }
.figure { width: 100%; height: 380px; }
.generations { display: grid; gap: 20px; }
.generation { border: 1px solid #ddd; border-radius: 6px; padding: 12px; min-width: 0; }
.tokens { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 0.9em;
          line-height: 1.9; margin: 8px 0; }
.tok { border-radius: 3px; padding: 1px 0; }
.tok.sink { outline: 1px dashed #888; }
.event { font-family: system-ui, sans-serif; font-size: 0.75em; font-weight: 600; color: #fff;
         border-radius: 3px; padding: 1px 4px; margin: 0 3px; white-space: nowrap; }
.event.alert { background: #c62828; } .event.clear { background: #2e7d32; }
.event.steer_on { background: #1565c0; } .event.steer_off { background: #5c6bc0; }
.prompt-events, .scale { font-size: 0.85em; color: #444; margin: 4px 0; }
"""


def _figure_html(fig: Any, name: str) -> str:
    body = fig.to_html(
        full_html=False,
        include_plotlyjs=False,
        div_id=f"figure-{name}",
        default_width="100%",
        default_height="380px",
        config={"displaylogo": False, "responsive": True},
    )
    return f'<div class="figure" data-figure="{html.escape(name)}">{body}</div>'


def _meta_table(vector: PersonaVector) -> str:
    md = vector.metadata
    rows: List[Tuple[str, Any]] = [
        ("name", vector.name),
        ("trait", md.get("trait")),
        ("model", md.get("model")),
        ("method", md.get("method")),
        ("pooling", md.get("pooling")),
        ("layer", vector.layer),
        ("layers x hidden", f"{vector.num_layers + 1} x {vector.hidden_size}"),
        ("counts", md.get("counts")),
    ]
    cells = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
        for k, v in rows
        if v is not None and v != ""
    )
    return f'<table class="meta">{cells}</table>'


def _vector_sections(vector: PersonaVector, threshold: Optional[float]) -> List[str]:
    stats = separation_stats(vector)
    out = [f"<h2>Persona vector</h2>{_meta_table(vector)}"]
    if stats is None:
        out.append(
            '<p class="note">This vector stores no held-out statistics (metadata "stats").</p>'
        )
        return out
    out.append("<h2>Separation by layer</h2>")
    out.append(
        '<p class="note">How well the projection on each layer\'s direction separates held-out '
        "rollouts with the trait from those without (AUROC; Cohen's d = difference of the means "
        "over the pooled standard deviation).</p>"
    )
    out.append(_figure_html(separation_figure(stats, vector.layer), "separation"))
    layer = vector.layer
    if layer is not None and layer < len(stats["pos_mean"]):
        out.append(f"<h2>Projections at layer {layer}</h2>")
        rule = (
            "given explicitly"
            if threshold is not None and threshold != alert_threshold(vector)
            else "the midpoint of the two held-out means"
        )
        if threshold is not None:
            out.append(f'<p class="note">Alert threshold {threshold:.4g}: {rule}.</p>')
        fig = projection_figure(stats, layer, vector.metadata, threshold)
        out.append(_figure_html(fig, "projections"))
    return out


def _generation_card(
    k: int,
    label: str,
    gen: Generation,
    vector: Optional[PersonaVector],
    threshold: Optional[float],
    tokenizer: Any,
) -> str:
    name = vector.name if vector is not None else None
    column = score_column(gen, name, vector.layer if vector is not None else None)
    scale: Tuple[Optional[float], Optional[float]] = (None, None)
    if vector is not None and column is not None and vector.name in (None, column[0]):
        stats = separation_stats(vector)
        if stats is not None and column[2] < len(stats["neg_mean"]):
            scale = (stats["neg_mean"][column[2]], stats["pos_mean"][column[2]])
    line = threshold
    for e in gen.events:
        if e.kind in ("alert", "clear") and e.threshold is not None:
            line = e.threshold  # the threshold the monitor really used
            break
    pieces = token_pieces(gen, tokenizer)
    facts = [f"{len(gen.token_ids)} tokens", f"finish: {gen.finish_reason}"]
    if column is not None and gen.prompt_len > 0:
        facts.append(f"early warning {float(gen.early_warning[column[0]][column[1]]):.3f}")
    facts.append(f"{sum(e.kind == 'alert' for e in gen.events)} alerts")
    facts.append(f"{sum(e.kind == 'steer_on' for e in gen.events)} steer-on events")
    parts = [
        f'<div class="generation"><h3>{html.escape(label)}</h3>',
        f'<div class="note">{html.escape(" · ".join(facts))}</div>',
    ]
    if pieces is None:
        parts.append(
            '<div class="note">No tokenizer given: tokens are shown by id (pass tokenizer= or '
            "--model to show their text).</div>"
        )
    parts.append(
        f'<div data-tokens="generation-{k}">{tokens_html(gen, pieces, column, scale)}</div>'
    )
    if gen.scores:
        fig = score_figure(gen, pieces or [], line, label)
        parts.append(_figure_html(fig, f"generation-{k}"))
    else:
        parts.append('<div class="note">Not monitored: no scores.</div>')
    parts.append("</div>")
    return "".join(parts)


def report(
    path: Any,
    vector: Optional[PersonaVector] = None,
    generations: Any = (),
    evaluation: Any = None,
    title: Optional[str] = None,
    threshold: Optional[float] = None,
    tokenizer: Any = None,
) -> Path:
    """Write one self-contained HTML report to ``path`` and return its path.

    Sections, each left out when its input is missing: the vector (its metadata; per-layer AUROC
    and Cohen's d of the held-out rollouts with the chosen layer marked; the positive and negative
    projections at that layer with the alert threshold), each generation (its reply's tokens
    colored by score with alert and steer events marked, and its score over tokens; side by side),
    and the evaluation sweep (trait score and coherence against the coefficient, one line per
    layer; the A/B gap and mean projection when no judge scored it).

    ``generations``: :class:`~personacore.Generation` objects, ``(label, generation)`` pairs or a
    ``{label: generation}`` dict. ``evaluation``: row dicts or an object with ``.rows``.
    ``threshold`` (default: the midpoint of the vector's held-out means at its layer) is the line
    drawn on the projections and on generations whose events carry none. ``tokenizer`` (a
    :class:`~personacore.Tokenizer` or :class:`~personacore.Model`) decodes the tokens; without it
    they show as ids. Needs plotly (``pip install "personacore[report]"``); the file loads plotly's
    JavaScript from itself and opens offline.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidInputError(f"report path must be a path, got {type(path).__name__}")
    if vector is not None and not isinstance(vector, PersonaVector):
        raise InvalidInputError(f"vector must be a PersonaVector, got {type(vector).__name__}")
    if title is not None and not isinstance(title, str):
        raise InvalidInputError(f"title must be a str, got {type(title).__name__}")
    _, _, offline = plotly_modules()
    gens = labelled_generations(generations)
    rows = evaluation_rows(evaluation)
    line = alert_threshold(vector, threshold)
    if title is None:
        name = vector.name if vector is not None and vector.name else None
        title = f"personacore report: {name}" if name else "personacore report"

    body: List[str] = [f"<h1>{html.escape(title)}</h1>"]
    if vector is not None:
        body.extend(_vector_sections(vector, line))
    if gens:
        body.append("<h2>Generations</h2>")
        # a fixed column count: each plot is drawn while the page is parsed, before the cards
        # after it exist, so an auto-fitting grid would first give it the whole row
        columns = min(len(gens), 2)
        body.append(
            f'<div class="generations" style="grid-template-columns: '
            f'repeat({columns}, minmax(0, 1fr))">'
        )
        body.extend(
            _generation_card(k, label, gen, vector, line, tokenizer)
            for k, (label, gen) in enumerate(gens, 1)
        )
        body.append("</div>")
    if rows:
        body.append("<h2>Evaluation sweep</h2>")
        counts: Dict[int, int] = {}
        for r in rows:
            counts[r["layer"]] = counts.get(r["layer"], 0) + 1
        body.append(
            f'<p class="note">{len(rows)} (layer, coefficient) cells over layers '
            f"{', '.join(str(k) for k in sorted(counts))}.</p>"
        )
        body.append(_figure_html(evaluation_figure(rows), "evaluation"))
    script = f"<script>{offline.get_plotlyjs()}</script>" if "data-figure" in "".join(body) else ""
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style>{script}</head>"
        f"<body>{''.join(body)}</body></html>\n"
    )
    out = Path(os.fspath(path)).expanduser()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page, encoding="utf-8")
    except OSError as e:
        raise PersonacoreIOError(f"cannot write the report {os.fspath(out)!r}: {e}") from e
    return out
