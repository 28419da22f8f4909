"""The ``personacore screen`` command: score a dataset file by persona-vector projection difference.

Streams the input (``.jsonl`` or ``.parquet``) batch by batch through
:func:`personacore.screen.iter_screen` into a resumable output (:class:`~personacore.screen.CheckpointWriter`),
with a progress bar (samples/s, ETA), and optionally writes a filtered copy of the input next to it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Dict

import numpy as np

from ..errors import InvalidInputError

__all__ = ["register", "COMMANDS", "parse_drop_top"]

_PERCENT = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(%?)\s*$")


def parse_drop_top(text: str) -> float:
    """``"5%"`` → 0.05, ``"0.05"`` → 0.05; the fraction must be in [0, 1]."""
    m = _PERCENT.match(text)
    if not m:
        raise InvalidInputError(f"--drop-top {text!r}: expected a percentage like 5% or a fraction")
    value = float(m[1]) / (100.0 if m[2] else 1.0)
    if not 0.0 <= value <= 1.0:
        raise InvalidInputError(f"--drop-top {text!r} is not between 0% and 100%")
    return value


def register(sub: Any, add_model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """Adds ``screen`` to the ``personacore`` sub-parsers."""
    p = sub.add_parser(
        "screen",
        help="score a training dataset by projection on persona vectors (resumable)",
        description="Score every (prompt, response) sample of INPUT on persona vectors, in input "
        "order, into OUT (one row per sample: index, id, scores, projections, the model's own "
        "reply). 'delta' (the paper's projection difference) = mean response projection minus "
        "that of the model's own greedy reply; 'prompt_last' subtracts the last prompt token's "
        "projection instead; 'response' is the response projection alone. Killed runs continue "
        "with --resume.",
    )
    add_model_args(p)
    p.add_argument(
        "--vector",
        action="append",
        required=True,
        metavar="[NAME=]PATH",
        help="persona vector file (.safetensors, .pt, .gguf); repeat for several. NAME defaults "
        "to the vector's name, else the file name",
    )
    p.add_argument("--input", required=True, help="samples: .jsonl or .parquet")
    p.add_argument("--out", required=True, help="scored output: .jsonl or .parquet")
    p.add_argument("--method", default="delta", choices=["delta", "prompt_last", "response"])
    p.add_argument(
        "--layer", type=int, default=None, help="layer for every vector (default: each one's own)"
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=256,
        help="length limit of the model's own replies (delta; default 256)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="samples per batch (default 16)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run of OUT")
    p.add_argument(
        "--on-error",
        default="skip",
        choices=["skip", "fail"],
        help="malformed samples: report and skip them (default), or stop at the first",
    )
    flt = p.add_mutually_exclusive_group()
    flt.add_argument(
        "--keep-below",
        type=float,
        default=None,
        metavar="X",
        help="also write the samples scoring below X on every vector, next to OUT",
    )
    flt.add_argument(
        "--drop-top",
        default=None,
        metavar="P%",
        help="also write the samples left after dropping the top P%% on any vector, next to OUT",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _vectors(specs: Any) -> Dict[str, Any]:
    from ..vectors import PersonaVector

    out: Dict[str, Any] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or os.path.exists(spec):
            name, path = None, spec
        vec = PersonaVector.load(path)
        name = name or vec.name or Path(path).stem
        if name in out:
            raise InvalidInputError(f"two vectors are named {name!r}: use --vector NAME=PATH")
        out[name] = vec
    return out


def _settings(args: argparse.Namespace, model: Any, vectors: Dict[str, Any]) -> Dict[str, Any]:
    """What a resumed run must share with the run it continues."""
    src = Path(args.input).resolve()
    st = src.stat()
    return {
        "method": args.method,
        "max_new_tokens": args.max_new_tokens if args.method == "delta" else None,
        "batch_size": args.batch_size,
        "vectors": {
            n: {
                "layer": args.layer if args.layer is not None else v.layer,
                "sha256": hashlib.sha256(np.ascontiguousarray(v.directions).tobytes()).hexdigest(),
            }
            for n, v in vectors.items()
        },
        "model": {
            "path": str(model.path),
            "dtype": model.dtype,
            "precision": model.precision,
            "quantized": model.quantized,
            "device": model.device,
        },
        "input": {"path": str(src), "size": st.st_size, "mtime_ns": st.st_mtime_ns},
    }


def _filter(args: argparse.Namespace, names: Any) -> None:
    from ..screen import (
        filtered_path,
        keep_below_mask,
        read_scores,
        top_fraction_mask,
        write_filtered,
    )

    indices, scores = read_scores(args.out, names)
    if args.keep_below is not None:
        keep_rows = keep_below_mask(scores, args.keep_below, names)
        rule = f"score < {args.keep_below:g} on every vector"
    else:
        frac = parse_drop_top(args.drop_top)
        keep_rows = ~top_fraction_mask(scores, frac, names)
        rule = f"not in the top {100 * frac:g}% on any vector"
    keep = np.zeros(int(indices.max()) + 1 if len(indices) else 0, dtype=bool)
    keep[indices[keep_rows]] = True
    dest = filtered_path(args.out, args.input)
    kept = write_filtered(args.input, dest, keep)
    print(
        f"filtered: {dest} ({kept} of {len(indices)} screened samples kept: {rule}; "
        f"skipped malformed samples are not copied)",
        file=sys.stderr,
    )


def _cmd_screen(args: argparse.Namespace) -> int:
    from ..screen import CheckpointWriter, count_records, iter_screen, resolve_vectors
    from ..screen.core import check_options
    from ..screen.samples import source_kind
    from .main import _load

    check_options(args.method, args.max_new_tokens, args.batch_size, args.on_error)
    for path in (args.input, args.out):
        source_kind(path)  # a .jsonl or .parquet suffix, checked before the model loads
    if args.drop_top is not None:
        parse_drop_top(args.drop_top)
    if not Path(args.input).is_file():
        raise InvalidInputError(f"--input {args.input!r} does not exist")
    if Path(args.input).resolve() == Path(args.out).resolve():
        raise InvalidInputError("--out must differ from --input")
    vectors = _vectors(args.vector)
    model = _load(args)
    bank = resolve_vectors(model, vectors, args.layer)  # checks shapes and layers before any work
    names = [u.name for u in bank]
    writer = CheckpointWriter(
        args.out, names, args.method, _settings(args, model, vectors), resume=args.resume
    )
    if writer.complete:
        print(f"{args.out} is already complete: nothing to resume", file=sys.stderr)
    else:
        _run(args, model, vectors, writer, count_records(args.input), iter_screen)
    if args.keep_below is not None or args.drop_top is not None:
        _filter(args, names)
    return 0


def _run(args, model, vectors, writer, total, iter_screen) -> None:
    from tqdm.auto import tqdm

    start, skipped = writer.start, 0
    layers = ", ".join(
        f"{n}@{v.layer if args.layer is None else args.layer}" for n, v in vectors.items()
    )
    print(
        f"screening {args.input} ({total} records{f', resuming at {start}' if start else ''}) "
        f"on {layers}, method {args.method}",
        file=sys.stderr,
    )
    bar = tqdm(
        total=total,
        initial=start,
        unit="sample",
        desc="screen",
        disable=args.quiet,
        file=sys.stderr,
    )
    try:
        for part in iter_screen(
            model,
            vectors,
            args.input,
            args.method,
            args.max_new_tokens,
            args.batch_size,
            layer=args.layer,
            on_error=args.on_error,
            start=start,
        ):
            writer.write(part)
            for bad in part.errors:
                tqdm.write(f"skipped {bad.where}: {bad.reason}", file=sys.stderr)
            skipped += len(part.errors)
            bar.update(part.next_index - bar.n)
    finally:
        bar.close()
        writer.close()
    writer.finish()
    print(
        f"wrote {args.out}: {writer.rows} samples scored, {skipped} malformed skipped"
        f"{' in this run' if start else ''}",
        file=sys.stderr,
    )


COMMANDS = {"screen": _cmd_screen}
