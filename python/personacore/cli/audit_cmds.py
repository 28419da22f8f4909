"""The ``personacore audit`` commands: ``audit verify LOG --vector NAME=PATH ... [--model M]``.

Checks every event of an audit log against vector files (and a model) with
:func:`personacore.steering.audit.verify_audit_log`, prints a summary and exits 1 when a hash
does not match (so a script can gate on it), 0 when every checked hash matches.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

from .serve_cmds import parse_vector_args

__all__ = ["register", "COMMANDS"]


def register(sub: Any, add_model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """Adds ``audit`` (with its ``verify`` subcommand) to the ``personacore`` sub-parsers."""
    p = sub.add_parser(
        "audit",
        help="check an audit log's receipts against vector and model files",
        description="Receipts written with audit_log=... name each vector and the model by content "
        "hash; 'audit verify' recomputes the hashes from files and reports every mismatch.",
    )
    actions = p.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    v = actions.add_parser(
        "verify",
        help="check every event's vector_sha256 (and model_sha256) against files",
        description="Exit status: 0 when every checked hash matches, 1 on a mismatch or an error.",
    )
    v.add_argument("log", metavar="LOG", help="the audit log (JSONL)")
    v.add_argument(
        "--vector",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a vector file to check events of NAME against (repeatable; a bare PATH is named "
        "by its file stem)",
    )
    v.add_argument(
        "--model",
        metavar="PATH",
        help="a model directory or .gguf file to check every event's model_sha256 against",
    )


def _cmd_audit(args: argparse.Namespace) -> int:
    from ..steering.audit import verify_audit_log

    report = verify_audit_log(args.log, parse_vector_args(args.vector), model=args.model)
    print(report.summary())
    return 0 if report.ok else 1


COMMANDS = {"audit": _cmd_audit}
