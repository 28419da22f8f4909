"""HTML reports: ``pc.report(path, vector=..., generations=[...], evaluation=...)``.

One self-contained file (plotly's JavaScript inlined, no network fetch) with the vector's per-layer
separation and held-out projections, each generation's tokens colored by score with its events
and a score-over-tokens plot, and an evaluation sweep. Needs the ``report`` extra
(``pip install "personacore[report]"``); importing personacore does not.
"""

from __future__ import annotations

from .figures import ReportDependencyError
from .inputs import alert_threshold, evaluation_rows, load_evaluation, load_generations
from .page import report

__all__ = [
    "ReportDependencyError",
    "alert_threshold",
    "evaluation_rows",
    "load_evaluation",
    "load_generations",
    "report",
]
