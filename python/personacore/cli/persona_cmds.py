"""The persona subcommands of the ``personacore`` command: ``traits``, ``extract``, ``score``, ``chat``.

Kept apart from :mod:`personacore.cli` (model utilities); :func:`register` adds them to its parser.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np

from ..errors import InvalidInputError

__all__ = ["register", "COMMANDS", "parse_steer"]

_STEER = re.compile(r"^(?P<name>[^:@]+):(?P<coef>[-+0-9.eE]+)(?:@(?P<layer>\d+))?$")


def parse_steer(spec: str) -> Dict[str, Any]:
    """Parses ``NAME:COEF@LAYER`` (``@LAYER`` optional: the vector's recommended layer)."""
    m = _STEER.match(spec.strip())
    if not m:
        raise InvalidInputError(
            f"--steer {spec!r}: expected NAME:COEF or NAME:COEF@LAYER, e.g. evil:-2.0@12"
        )
    return {
        "name": m["name"],
        "coef": float(m["coef"]),
        "layer": int(m["layer"]) if m["layer"] else None,
    }


def register(sub: Any, add_model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """Adds the persona subcommands to the ``personacore`` sub-parsers."""
    tr = sub.add_parser(
        "traits",
        help="list the built-in traits, or show one",
        description="List the built-in traits (no argument) or print one trait's definition.",
    )
    tr.add_argument("name", nargs="?", help="a built-in trait name or a trait JSON path to show")
    tr.add_argument("--json", action="store_true", help="print the full trait as JSON")

    ex = sub.add_parser(
        "extract",
        help="extract a persona vector for a trait",
        description="Run contrastive rollouts for a trait, fit a direction per layer, choose "
        "the layer that best separates held-out rollouts, and save the vector.",
    )
    add_model_args(ex)
    ex.add_argument(
        "--trait", required=True, help="built-in trait name or persona_vectors-format JSON path"
    )
    ex.add_argument(
        "--out", required=True, metavar="DIR", help="directory for the vector files and report"
    )
    ex.add_argument(
        "--method",
        default="mean_diff",
        choices=["mean_diff", "logreg", "pca"],
        help="how a direction is fitted per layer (default: mean_diff, as the paper)",
    )
    ex.add_argument(
        "--n-per-question", type=int, default=1, help="rollouts per instruction pair and question"
    )
    ex.add_argument(
        "--max-new-tokens", type=int, default=48, help="tokens per rollout (default: 48)"
    )
    ex.add_argument(
        "--max-questions", type=int, default=None, help="use only the first N extraction questions"
    )
    ex.add_argument(
        "--max-instructions", type=int, default=None, help="use only the first N instruction pairs"
    )
    ex.add_argument(
        "--max-eval-questions",
        type=int,
        default=None,
        help="use only the first N held-out questions",
    )
    ex.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sampling temperature of rollouts (default 0 = greedy: it separates best on small "
        "models; use > 0 with --n-per-question > 1)",
    )
    ex.add_argument(
        "--batch-size", type=int, default=16, help="sequences generated and pooled together"
    )
    ex.add_argument(
        "--judge",
        default="none",
        choices=["none", "local", "openai"],
        help="filter rollouts with a judge: none, local (this model), openai (OPENAI_BASE_URL/KEY)",
    )
    ex.add_argument("--judge-model", default="gpt-4.1-mini", help="model name for --judge openai")
    ex.add_argument("--seed", type=int, default=0, help="seed of the sampled rollouts")
    ex.add_argument(
        "--formats",
        default="safetensors,gguf",
        help="comma-separated files to write: safetensors (ours), pt (persona_vectors), gguf (llama.cpp)",
    )
    ex.add_argument("--quiet", action="store_true", help="no progress bars")

    sc = sub.add_parser(
        "score",
        help="per-trait scores for a JSONL of conversations",
        description="For every conversation (a JSON line with 'messages' ending in an assistant "
        "reply, or 'prompt' and 'response'), print the projection of the reply's "
        "mean activation (response_avg) and of the last prompt token (prompt_last) "
        "on each vector at its layer. Output rows carry the input's 'id' (when it has one) "
        "and its line number.",
    )
    add_model_args(sc)
    sc.add_argument(
        "--vector",
        action="append",
        required=True,
        metavar="PATH",
        help="a persona vector file (.safetensors/.pt/.gguf); repeat for several",
    )
    sc.add_argument(
        "--input", required=True, metavar="JSONL", help="conversations, one JSON object per line"
    )
    sc.add_argument("--output", metavar="JSONL", help="write the scores here instead of stdout")
    sc.add_argument(
        "--layer", type=int, default=None, help="score at this layer instead of each vector's own"
    )

    ch = sub.add_parser(
        "chat",
        help="interactive chat with live trait scores and optional steering",
        description="Chat with the model; every reply streams with each token's monitored trait "
        "scores at the vector's layer (colored text on a terminal, token[score] otherwise) "
        "and a line for every alert the moment a --threshold is crossed. Type /quit to leave.",
    )
    add_model_args(ch)
    ch.add_argument(
        "--vector",
        action="append",
        default=[],
        metavar="PATH",
        help="a persona vector to monitor (and to steer with, by its name); repeat for several",
    )
    ch.add_argument(
        "--steer",
        action="append",
        default=[],
        metavar="NAME:COEF@LAYER",
        help="add COEF x vector NAME at LAYER (default: its recommended layer) while generating",
    )
    ch.add_argument("--system", default=None, help="system message")
    ch.add_argument("--max-new-tokens", type=int, default=128, help="tokens per reply")
    ch.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)"
    )
    ch.add_argument(
        "--threshold", type=float, default=None, help="alert when a trait score rises above this"
    )
    ch.add_argument(
        "--no-color",
        action="store_true",
        help="plain token[score] marks even on a terminal (also: the NO_COLOR variable)",
    )
    ch.add_argument(
        "--audit-log",
        default=None,
        metavar="JSONL",
        help="append every alert and steering event here",
    )
    ch.add_argument(
        "--audit-fsync",
        default="request",
        choices=["request", "event", "never"],
        help="when the audit log is fsynced: at the end of each reply (default), after every "
        "event, or never",
    )


def _load_model(args):
    from ..engine import load_model

    return load_model(
        args.model,
        device=args.device,
        dtype=args.dtype,
        quantized=args.quantized,
        precision=getattr(args, "precision", "highest"),
    )


def _load_vectors(paths: List[str]):
    from ..vectors import PersonaVector

    vecs = {}
    for p in paths:
        v = PersonaVector.load(p)
        vecs[v.name or Path(p).stem] = v
    return vecs


def _cmd_traits(args) -> int:
    from ..extract import Trait, traits

    if not args.name:
        for name in traits():
            t = Trait.load(name)
            print(f"{name:<14} {t.description or ''}"[:120])
        return 0
    t = Trait.load(args.name)
    if args.json:
        print(json.dumps(t.to_dict(), indent=2, ensure_ascii=False))
        return 0
    print(f"{t.name}: {t.description or ''}\n")
    print(
        f"{len(t.instructions)} instruction pairs, {len(t.questions)} extraction questions, "
        f"{len(t.eval_questions)} held-out questions, {len(t.ab_items)} A/B items"
    )
    pos, neg = t.system_prompts(0)
    print(f"\nfirst pair:\n  + {pos}\n  - {neg}\n\nfirst question: {t.questions[0]}")
    return 0


def _extract_formats(spec: str) -> List[str]:
    """The formats of ``--formats``, or an error for an unknown one or a .pt without torch."""
    from ..vectors.io import SUPPORTED_FORMATS, VectorFormatError

    formats = [f.strip().lower().lstrip(".") for f in spec.split(",") if f.strip()]
    unknown = [f for f in formats if "." + f not in SUPPORTED_FORMATS]
    if unknown or not formats:
        raise InvalidInputError(
            f"--formats {spec!r}: expected a comma-separated list of "
            f"{', '.join(x.lstrip('.') for x in SUPPORTED_FORMATS)}"
        )
    if "pt" in formats and importlib.util.find_spec("torch") is None:
        raise VectorFormatError(
            "--formats pt: writing .pt vectors needs torch (pip install torch, or "
            "pip install 'personacore[torch]')"
        )
    return formats


def _cmd_extract(args) -> int:
    from ..extract import extract
    from ..judges import LocalJudge, OpenAIJudge

    formats = _extract_formats(args.formats)  # checked before minutes of rollouts, not after
    model = _load_model(args)
    judge = {
        "none": lambda: None,
        "local": lambda: LocalJudge(model),
        "openai": lambda: OpenAIJudge(model=args.judge_model),
    }[args.judge]()
    vec = extract(
        model,
        args.trait,
        n_per_question=args.n_per_question,
        max_new_tokens=args.max_new_tokens,
        max_questions=args.max_questions,
        judge=judge,
        method=args.method,
        seed=args.seed,
        temperature=args.temperature,
        max_instructions=args.max_instructions,
        max_eval_questions=args.max_eval_questions,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        path = out / f"{vec.name}.{fmt}"
        vec.save(path)
        written.append(str(path))
    stats = vec.metadata["stats"]
    report = {
        "trait": vec.name,
        "layer": vec.layer,
        "auroc": stats["auroc"][vec.layer],
        "cohens_d": stats["cohens_d"][vec.layer],
        "counts": vec.metadata["counts"],
        "files": written,
    }
    (out / f"{vec.name}.report.json").write_text(json.dumps(dict(report, stats=stats), indent=2))
    print(json.dumps(report, indent=2))
    return 0


def _conversation(model, obj: Dict[str, Any], lineno: int):
    """(prompt ids, response ids) of one JSONL conversation."""
    if "messages" in obj:
        msgs = obj["messages"]
        if not msgs or msgs[-1].get("role") != "assistant":
            raise InvalidInputError(f"line {lineno}: 'messages' must end with an assistant reply")
        return model.encode_chat(msgs[:-1]), model.tokenizer.encode(msgs[-1]["content"])
    if "prompt" in obj and "response" in obj:
        p = obj["prompt"]
        prompt = model.encode_chat([{"role": "user", "content": p}] if isinstance(p, str) else p)
        return prompt, model.tokenizer.encode(obj["response"])
    raise InvalidInputError(f"line {lineno}: expected 'messages' or 'prompt' and 'response'")


def _cmd_score(args) -> int:
    model = _load_model(args)
    vecs = _load_vectors(args.vector)
    out = open(args.output, "w") if args.output else sys.stdout
    try:
        with open(args.input) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InvalidInputError(
                        f"{args.input} line {lineno} is not JSON: {e}"
                    ) from None
                prompt, response = _conversation(model, obj, lineno)
                pooled = model.pool([prompt], [response], poolings=("response_avg", "prompt_last"))
                row: Dict[str, Any] = {"id": obj["id"]} if "id" in obj else {}
                row["line"] = lineno
                for name, v in vecs.items():
                    layer = args.layer if args.layer is not None else v.layer
                    d = v.directions[layer] / np.linalg.norm(v.directions[layer])
                    row[name] = {
                        "layer": layer,
                        "response_avg": float(pooled["response_avg"][0, layer] @ d),
                        "prompt_last": float(pooled["prompt_last"][0, layer] @ d),
                    }
                out.write(json.dumps(row) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


def _cmd_chat(args) -> int:
    from ..steering import Monitor, Steer
    from .chat_view import ChatView, use_color

    model = _load_model(args)
    vecs = _load_vectors(args.vector)
    steers = []
    for spec in args.steer:
        s = parse_steer(spec)
        if s["name"] not in vecs:
            raise InvalidInputError(
                f"--steer {spec!r}: no --vector named {s['name']!r} (have: {sorted(vecs)})"
            )
        v = vecs[s["name"]]
        steers.append(
            Steer(v, s["coef"], layers=[s["layer"] if s["layer"] is not None else v.layer])
        )
    monitor = Monitor(vecs, thresholds=args.threshold) if vecs else None
    layers = {name: v.layer for name, v in vecs.items()}
    view = ChatView(sys.stdout, vecs, layers, use_color(sys.stdout, args.no_color))
    history = [{"role": "system", "content": args.system}] if args.system else []
    print(
        "personacore chat: type a message, /quit to leave."
        + (f" steering: {', '.join(args.steer)}" if steers else "")
    )
    if vecs:
        print(view.header())
    while True:
        try:
            user = input("\nyou> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if user.strip() in ("/quit", "/exit"):
            return 0
        history.append({"role": "user", "content": user})
        print("bot> ", end="", flush=True)
        prompt = model.encode_chat(history)
        stream = model.stream(
            prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            steer=steers or None,
            monitor=monitor,
            audit_log=args.audit_log,
            audit_fsync=args.audit_fsync,
        )
        view.reply(stream, len(prompt))
        gen = stream.generation()
        history.append({"role": "assistant", "content": gen.text})
        if gen.scores:
            parts = []
            for name, reply in gen.reply_scores().items():
                if len(reply):
                    parts.append(
                        f"{name}@{gen.score_layers[name][0]}: mean {reply[:, 0].mean():+.2f} "
                        f"max {reply[:, 0].max():+.2f} (prompt end {gen.early_warning[name][0]:+.2f})"
                    )
            view.line("  scores: " + "; ".join(parts))
        else:
            view.end_line()


COMMANDS = {"traits": _cmd_traits, "extract": _cmd_extract, "score": _cmd_score, "chat": _cmd_chat}
