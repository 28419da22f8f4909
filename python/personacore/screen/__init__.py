"""Screening training data for persona vectors (docs/conventions.md, Screening output): :func:`screen`, :class:`ScreenResult`.

``screen(model, vectors, samples, method="delta")`` scores each (prompt, response) sample by the
projection difference of the paper (§6.1): how far the response moves the model's activations along
each vector compared with the model's own greedy reply. :mod:`.samples` reads and checks samples
(iterables, ``.jsonl``, ``.parquet``), :mod:`.output` writes results (resumable chunks, filtered
datasets); the ``personacore screen`` command joins them.

``personacore.screen`` as an attribute of ``personacore`` is the function (``pc.screen``,
the public API), so import this package's names with ``from personacore.screen import ...``.
"""

from __future__ import annotations

from .core import (
    METHODS,
    ON_ERROR,
    ScreenResult,
    iter_screen,
    keep_below_mask,
    ranking,
    resolve_vectors,
    screen,
    top_fraction_mask,
)
from .output import CheckpointWriter, filtered_path, read_scores, write_filtered, write_rows
from .samples import BadSample, Sample, SampleError, count_records, iter_samples
from .shift import FinetuneShift, finetune_shift

__all__ = [
    "METHODS",
    "ON_ERROR",
    "screen",
    "iter_screen",
    "ScreenResult",
    "resolve_vectors",
    "ranking",
    "keep_below_mask",
    "top_fraction_mask",
    "Sample",
    "BadSample",
    "SampleError",
    "iter_samples",
    "count_records",
    "CheckpointWriter",
    "write_rows",
    "read_scores",
    "write_filtered",
    "filtered_path",
    "finetune_shift",
    "FinetuneShift",
]
