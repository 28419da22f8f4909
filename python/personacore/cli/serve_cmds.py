"""The ``personacore serve`` command: the OpenAI-compatible HTTP server (:mod:`personacore.serve`).

Loads the model and the named vectors, builds the app with its limits and runs it with uvicorn.
It binds 127.0.0.1 unless ``--host`` says otherwise; the API key may come from ``--api-key`` or the
``PERSONACORE_API_KEY`` environment variable (which keeps it out of the process list).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

from ..errors import InvalidInputError

__all__ = ["register", "COMMANDS", "parse_vector_args"]


def parse_vector_args(items: List[str]) -> Dict[str, str]:
    """``["NAME=PATH", "PATH", ...]`` -> ``{name: path}`` (a bare PATH is named by its file stem)."""
    out: Dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).stem, item
        if not name or not path:
            raise InvalidInputError(f"--vector {item!r}: expected NAME=PATH")
        if name in out:
            raise InvalidInputError(f"--vector: the name {name!r} is given twice")
        out[name] = path
    return out


_LIMITS: List[Tuple[str, int, str]] = [
    ("--max-batch", 16, "sequences decoded together by the engine"),
    ("--max-queued", 64, "requests waiting beyond --max-batch before new ones get 429"),
    ("--max-streams", 64, "concurrent streamed replies before new ones get 429"),
    ("--max-body-bytes", 1 << 20, "largest request body (larger: 413)"),
    ("--max-tokens-limit", 2048, "largest max_tokens a request may ask for (larger: 400)"),
    ("--default-max-tokens", 256, "max_tokens of a request that gives none"),
]

_TIMEOUTS: List[Tuple[str, float, str]] = [
    ("--body-timeout", 30.0, "seconds a client has to send its whole request body (later: 408)"),
    (
        "--send-timeout",
        30.0,
        "seconds a write of the reply may wait for a client that does not read (then the request "
        "is cancelled and the connection closed)",
    ),
]


def register(sub: Any, add_model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """Adds ``serve`` to the ``personacore`` sub-parsers."""
    p = sub.add_parser(
        "serve",
        help="run the OpenAI-compatible HTTP server with per-request steering and live scores",
        description="Serve MODEL at /v1/chat/completions, /v1/completions, /v1/models, "
        "/v1/vectors, /health and /metrics. Requests steer and monitor the loaded vectors by name "
        "(extra body keys steer, monitor, on_alert); replies carry a persona object with the "
        "scores and events.",
    )
    add_model_args(p)
    p.add_argument(
        "--vector",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a persona vector (.safetensors, .pt, .gguf) requests refer to as NAME; repeat for "
        "several (a bare PATH is named by its file stem)",
    )
    p.add_argument(
        "--steer",
        action="append",
        default=None,
        metavar="JSON",
        help='a steer body (as a request\'s steer list holds: \'{"vector": "impolite", '
        '"coef": -4, "layers": [20]}\') applied to every request that sends no steer of its '
        "own; repeat for several. Lets clients that send no extra body keys (an evaluation "
        "harness) use the steered model",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("PERSONACORE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $PERSONACORE_API_KEY)",
    )
    p.add_argument("--model-name", default=None, help="model id in /v1/models (default: file stem)")
    p.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=None,
        help="longest prompt (longer: 400; default: the model's context)",
    )
    for flag, default, what in _LIMITS:
        p.add_argument(flag, type=int, default=default, help=f"{what} (default: {default})")
    for flag, seconds, what in _TIMEOUTS:
        p.add_argument(flag, type=float, default=seconds, help=f"{what} (default: {seconds:g})")
    p.add_argument("--log-level", default="info", help="uvicorn log level (default: info)")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..serve import ServeOptions, create_app
    except ImportError as e:
        print(
            f"personacore serve: {e.name} is missing: pip install 'personacore[serve]'",
            file=sys.stderr,
        )
        return 2
    from ..engine import load_model

    vectors = parse_vector_args(args.vector)
    default_steer = None
    if args.steer is not None:
        default_steer = []
        for text in args.steer:
            try:
                default_steer.append(json.loads(text))
            except ValueError as e:
                raise InvalidInputError(f"--steer {text!r} is not JSON: {e}") from None
    if not _is_loopback(args.host) and not args.api_key:
        print(
            f"personacore serve: warning: listening on {args.host} without --api-key",
            file=sys.stderr,
        )
    model = load_model(
        args.model,
        device=args.device,
        dtype=args.dtype,
        quantized=args.quantized,
        precision=args.precision,
    )
    opts = ServeOptions(
        api_key=args.api_key,
        model_name=args.model_name,
        max_prompt_tokens=args.max_prompt_tokens,
        default_steer=default_steer,
        **{
            flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_"))
            for flag in [f for f, _, _ in _LIMITS] + [f for f, _, _ in _TIMEOUTS]
        },
    )
    app = create_app(model, vectors, options=opts)
    names = ", ".join(vectors) or "none"
    steered = f", steering requests that send no steer: {args.steer}" if args.steer else ""
    print(
        f"personacore serve: {app.state.server.name} with vectors {names} on "
        f"http://{args.host}:{args.port}/v1{steered}",
        file=sys.stderr,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


COMMANDS = {"serve": _cmd_serve}
