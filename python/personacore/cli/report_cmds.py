"""The ``personacore report`` command: write one self-contained HTML report (:func:`personacore.report`).

Inputs are files: the vector (``.safetensors``, ``.pt``, ``.gguf``), generations as JSONL (one
:meth:`Generation.to_dict <personacore.Generation.to_dict>` per line, an optional ``"label"``) and an
evaluation sweep as JSON (``{"rows": [...]}`` or a list of rows). Token texts are decoded with
``--model`` or, without it, with the model the vector's metadata names (``model_path`` or
``model``) when that path exists.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable, Optional

__all__ = ["register", "COMMANDS"]


def register(sub: Any, add_model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """Adds ``report`` to the ``personacore`` sub-parsers."""
    p = sub.add_parser(
        "report",
        help="write an HTML report of a vector, generations and an evaluation sweep",
        description="Write one self-contained HTML file (opens offline): the vector's per-layer "
        "separation (AUROC, Cohen's d) with its layer marked and its held-out projections with the "
        "alert threshold; each generation's tokens colored by score with alert and steer events "
        "and a score-over-tokens plot; the evaluation sweep (trait score and coherence against "
        'the coefficient, one line per layer). Needs pip install "personacore[report]".',
    )
    p.add_argument("--vector", metavar="PATH", help="persona vector file")
    p.add_argument(
        "--generations",
        metavar="JSONL",
        help="generations, one Generation.to_dict() per line (an optional 'label' key names it)",
    )
    p.add_argument(
        "--evaluation", metavar="JSON", help='evaluation rows: {"rows": [...]} or a list of rows'
    )
    p.add_argument("--out", required=True, metavar="HTML", help="report file to write")
    p.add_argument("--title", default=None, help="page title (default: from the vector's name)")
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="alert threshold to draw (default: midpoint of the vector's held-out means)",
    )
    p.add_argument(
        "--model",
        metavar="PATH",
        default=None,
        help="model whose tokenizer decodes the generations' tokens (default: the model the "
        "vector's metadata names, when that path exists; otherwise tokens show as ids)",
    )


def _tokenizer_model(args: argparse.Namespace, vector: Any) -> Optional[Any]:
    from ..engine import load_model

    path = args.model
    if path is None and vector is not None:
        for key in ("model_path", "model"):  # where the vector was extracted
            named = vector.metadata.get(key)
            if isinstance(named, str) and named and os.path.exists(named):
                path = named
                break
    return load_model(path) if path is not None else None


def _cmd_report(args: argparse.Namespace) -> int:
    from ..report import load_evaluation, load_generations, report
    from ..vectors import PersonaVector

    vector = PersonaVector.load(args.vector) if args.vector else None
    gens = load_generations(args.generations) if args.generations else []
    rows = load_evaluation(args.evaluation) if args.evaluation else []
    model = _tokenizer_model(args, vector) if gens else None
    out = report(
        args.out,
        vector=vector,
        generations=gens,
        evaluation=rows,
        title=args.title,
        threshold=args.threshold,
        tokenizer=model,
    )
    parts = [
        "vector" if vector is not None else None,
        f"{len(gens)} generations" if gens else None,
        f"{len(rows)} evaluation rows" if rows else None,
    ]
    print(f"wrote {out} ({', '.join(p for p in parts if p) or 'title only'})")
    return 0


COMMANDS = {"report": _cmd_report}
