"""The ``personacore evaluate`` command: steering evaluated over layers × coefficients.

Runs :func:`personacore.evaluate` with a progress bar, prints one line per ``(layer, coef)`` and
writes the :class:`~personacore.Evaluation` as JSON (``--out``).
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, List

from ..errors import InvalidInputError

__all__ = ["register", "COMMANDS", "parse_number_list"]


def parse_number_list(text: str, what: str, kind: type) -> List[Any]:
    """``"10,12"`` → ``[10, 12]`` (``kind`` int or float); a clear error for anything else."""
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise InvalidInputError(f"{what} is empty: expected a comma-separated list, e.g. 10,12")
    out = []
    for p in parts:
        try:
            out.append(kind(p))
        except ValueError:
            noun = "integers" if kind is int else "numbers"
            raise InvalidInputError(
                f"{what} {text!r}: {p!r} is not a number (expected comma-separated {noun})"
            ) from None
    return out


def register(sub: Any, add_model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """Adds ``evaluate`` to the ``personacore`` sub-parsers."""
    p = sub.add_parser(
        "evaluate",
        help="steer with a vector over layers x coefficients and score the replies",
        description="For every layer and coefficient, answer the trait's held-out questions with "
        "the vector added at that layer (coefficient 0 = unsteered), then score each reply: "
        "trait and coherence scores from a judge (--judge-url/--judge-model), the A/B log-prob "
        "gap without one, and always the reply's mean projection on the vector at its "
        "recommended layer. Prints a table and writes all rows and replies to --out (JSON).",
    )
    add_model_args(p)
    p.add_argument("--vector", required=True, metavar="PATH", help="persona vector file")
    p.add_argument(
        "--vector-layer",
        type=int,
        default=None,
        metavar="N",
        help="the vector's layer, where projections are measured (default: the one stored in "
        "the file; needed for persona_vectors .pt files, which store none)",
    )
    p.add_argument(
        "--trait", required=True, help="built-in trait name or persona_vectors-format JSON path"
    )
    p.add_argument(
        "--layers",
        default=None,
        help="comma-separated layers to steer at, e.g. 10,12 (default: the vector's layer)",
    )
    p.add_argument(
        "--coefs",
        required=True,
        help="comma-separated coefficients, e.g. 0,4,8 (negative first: --coefs=-4,0,4)",
    )
    p.add_argument("--questions", type=int, default=None, help="use the first N questions")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per reply (default 64)")
    p.add_argument("--batch-size", type=int, default=16, help="replies generated together")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampled replies")
    p.add_argument(
        "--ab-items", type=int, default=None, help="A/B items used without a judge (default all)"
    )
    p.add_argument(
        "--judge-url",
        default=None,
        metavar="URL",
        help="OpenAI-compatible endpoint of the judge, e.g. http://127.0.0.1:8000/v1 "
        "(key: $OPENAI_API_KEY); with neither --judge-url nor --judge-model, no judge",
    )
    p.add_argument(
        "--judge-model",
        default=None,
        metavar="M",
        help="judge model name (default gpt-4.1-mini when --judge-url is given)",
    )
    p.add_argument("--out", required=True, metavar="JSON", help="where to write the evaluation")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ..extract.sweep import evaluate
    from ..judges import OpenAIJudge
    from ..vectors import PersonaVector
    from .persona_cmds import _load_model

    layers = None if args.layers is None else parse_number_list(args.layers, "--layers", int)
    coefs = parse_number_list(args.coefs, "--coefs", float)
    judge = None
    if args.judge_url is not None or args.judge_model is not None:
        judge = OpenAIJudge(model=args.judge_model or "gpt-4.1-mini", base_url=args.judge_url)
    vector = PersonaVector.load(args.vector, layer=args.vector_layer)
    model = _load_model(args)
    result = evaluate(
        model,
        vector,
        args.trait,
        layers=layers,
        coefs=coefs,
        judge=judge,
        questions=args.questions,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        temperature=args.temperature,
        ab_items=args.ab_items,
        progress=not args.quiet,
    )
    md = result.metadata
    print(
        f"trait {md['trait']}, vector {md['vector']} (projection at layer {md['vector_layer']}), "
        f"{md['settings']['questions']} questions, judge: {md['judge'] or 'none'}"
    )
    print(result.table())
    print(f"wrote {result.save(args.out)}")
    return 0


COMMANDS = {"evaluate": _cmd_evaluate}
