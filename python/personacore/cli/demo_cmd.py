"""``personacore demo``: the persona workflow in under a minute on the default model.

A conversation whose system prompt pushes the model into a trait (the first positive instruction
of the built-in trait, ``impolite`` by default) is answered twice, with the trait's built-in
vector monitored where its held-out rollouts say each job is done best
(:mod:`personacore.vectors.calibration`):

* alerts at the vector's alert layer, with the threshold ``thresholds="auto"`` gives there
  (single reply tokens above it: about 5% of trait-free held-out replies raise one);
* the early-warning score, the last prompt token's projection at the layer where held-out
  prompts separate best, with its calibrated probability, printed before the first token;
* the closed loop at the vector's own layer: ``pc.Cap(vec, max=...)`` at the threshold its reply
  means give there (95% of trait-free replies have a mean below it).

Run 1 is unsteered, run 2 the same request with the cap. Each reply is printed with each token's
score (colored on a terminal, ``token[score]`` otherwise) and an alert line when a score crosses
the threshold; then a table of both runs (early warning, mean and max reply score, alerts), the
audit-log lines the engine wrote for each run, and where they are. ``--json`` prints all of it as
one JSON object instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from ..report import ReportDependencyError
from ..report import report as write_report

__all__ = ["register", "run_demo", "COMMANDS"]

_QUESTION = "Can you explain how to make a cup of tea?"


def register(sub: Any) -> None:
    """Add the ``demo`` subcommand to the ``personacore`` parser."""
    from ..extract.traits import traits

    demo = sub.add_parser(
        "demo",
        help="watch a persona vector catch a trait, alert, and get capped by steering",
        description="On the default model: a system prompt pushes the model into a trait; the "
        "reply is printed with each token's score on the trait's built-in vector, the "
        "early-warning score before the first token and an alert when the calibrated threshold "
        "is crossed; then the same request again with closed-loop steering (pc.Cap at the "
        "threshold), a table of both runs and the audit-log lines.",
    )
    demo.add_argument(
        "--trait",
        default="impolite",
        choices=traits(),
        help="built-in trait whose vector is used (default: impolite)",
    )
    demo.add_argument(
        "--question", default=_QUESTION, help=f"user message (default: {_QUESTION!r})"
    )
    demo.add_argument("--max-new-tokens", type=int, default=48, help="reply length (default: 48)")
    demo.add_argument("--no-color", action="store_true", help="plain token[score] output")
    demo.add_argument(
        "--json", action="store_true", help="print both runs as one JSON object (no streaming)"
    )
    demo.add_argument(
        "--out-dir",
        help="where the audit logs go (default: a new temporary folder, printed at the end)",
    )


def _summary(gen: Any, name: str, threshold: float) -> Dict[str, Any]:
    """A run's numbers: reply scores (attention sinks left out), early warning, alerts."""
    reply = gen.reply_scores()[name][:, 0]
    return {
        "tokens": len(gen.token_ids),
        "mean": float(reply.mean()) if len(reply) else None,
        "max": float(reply.max()) if len(reply) else None,
        "early_warning": float(gen.early_warning[name][0]),
        "alerts": sum(e.kind == "alert" for e in gen.events),
        "reply_alerts": sum(e.kind == "alert" and e.position >= gen.prompt_len for e in gen.events),
        "tokens_above_threshold": int((reply > threshold).sum()),
    }


def _tokens(model: Any, gen: Any, name: str) -> List[Dict[str, Any]]:
    scores = gen.scores[name][gen.prompt_len :, 0]
    return [
        {"text": model.tokenizer.decode([t]), "score": float(s)}
        for t, s in zip(gen.token_ids, scores)
    ]


def _audit_lines(path: Path) -> List[str]:
    return path.read_text().splitlines() if path.exists() else []


def run_demo(args: argparse.Namespace, out: Any = None) -> Dict[str, Any]:
    """Run both generations (streamed to ``out`` unless ``--json``) and return their record."""
    from .. import __version__
    from ..engine import load_model
    from ..extract.traits import Trait
    from ..steering import Cap, Monitor
    from ..vectors import PersonaVector
    from ..vectors.calibration import alert_layer, auto_threshold, calibration
    from .chat_view import ChatView, use_color

    out = out or sys.stdout
    t0 = time.perf_counter()
    model = load_model()
    vec = PersonaVector.load(args.trait, model=model)
    trait = Trait.load(args.trait)
    name = args.trait
    # Three layers, each calibrated on the vector's held-out rollouts: alerts where single tokens
    # separate best (the alert layer, threshold by the default rule); the early-warning
    # probability where the last prompt token separates best; the closed loop at the vector's
    # own layer, capped at the threshold its reply means give (neg_fpr: 95% of trait-free replies
    # have a mean below it).
    layer = alert_layer(vec)
    cal = calibration(vec, layer=layer)
    tau = cal.threshold
    warn_layer = cal.early_warning_layer
    steer_layer = int(vec.layer if vec.layer is not None else layer)
    cap_max = auto_threshold(vec, "neg_fpr", steer_layer)
    early = f"{name}@{warn_layer}"
    monitor = Monitor(
        {name: vec, early: vec},
        layers={name: [layer], early: [warn_layer]},
        thresholds={name: "auto"},
    )
    pos, _ = trait.system_prompts(0)
    messages = [{"role": "system", "content": pos}, {"role": "user", "content": args.question}]
    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="personacore-demo-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    show = not args.json
    color = show and use_color(out, args.no_color)

    def say(text: str = "") -> None:
        if show:
            out.write(text + "\n")
            out.flush()

    def warn_line(scores: Dict[str, float]) -> str:
        return (
            f"  early warning (last prompt token, before the first reply token): {early} "
            f"{scores[early]:+.2f}, P({name}) = {cal.probability(scores[early]):.2f}"
        )

    say(f"personacore {__version__} demo: the built-in {name!r} vector on {model.path}")
    say(
        f"alerts: {name}@{layer} above {tau:+.2f} (rule {cal.rule}; held-out replies alerted on: "
        f"{cal.false_alarm_rate:.0%} without the trait, {cal.detection_rate:.0%} with it)"
    )
    say(f"early warning: {name}@{warn_layer} at the last prompt token, as a calibrated probability")
    say(f"system: {pos}")
    say(f"user:   {args.question}")
    runs: Dict[str, Dict[str, Any]] = {}
    gens: Dict[str, Any] = {}
    cap = Cap(vec, layers=[steer_layer], max=cap_max)
    for label, steer in (("unsteered", None), ("steered", cap)):
        audit = out_dir / f"{label}.audit.jsonl"
        audit.unlink(missing_ok=True)
        prompt = model.encode_chat(messages)
        stream = model.stream(
            prompt,
            max_new_tokens=args.max_new_tokens,
            steer=steer,
            monitor=monitor,
            audit_log=audit,
        )
        if show:
            how = (
                ""
                if steer is None
                else f" with pc.Cap({name}, layers=[{steer_layer}], max={cap_max:+.2f}): the closed loop"
            )
            say(f"\n== {label}{how} ==")
            view = ChatView(out, {name: vec}, {name: layer}, color, early_warning=warn_line)
            if label == "unsteered":
                say(view.header())
            say("assistant:")
            view.reply(stream, len(prompt), line_started=True)
            view.end_line()
            gen = stream.generation()
        else:
            for _ in stream:
                pass
            gen = stream.generation()
        gens[label] = gen
        summary = _summary(gen, name, tau)
        summary["early_warning_layer"] = warn_layer
        summary["early_warning_at_warning_layer"] = float(gen.early_warning[early][0])
        summary["early_warning_probability"] = monitor.early_warning_probability(gen)[early]
        runs[label] = {
            "steer": None if steer is None else repr(steer),
            "text": gen.text,
            "tokens": _tokens(model, gen, name),
            "events": [e.to_dict() for e in gen.events],
            "summary": summary,
            "audit_log": str(audit),
            "audit_lines": _audit_lines(audit),
        }
    report_path: Optional[Path] = out_dir / "demo.html"
    try:
        write_report(
            report_path,
            vector=vec,
            generations=gens,
            threshold=calibration(vec).threshold,  # the projections figure is at vec.layer
            tokenizer=model,
            title=f"personacore demo: {name}",
        )
    except ReportDependencyError:
        report_path = None  # plotting is the optional extra personacore[report]
    elapsed = time.perf_counter() - t0
    record = {
        "trait": name,
        "model": model.path,
        "layer": layer,
        "threshold": tau,
        "early_warning_layer": warn_layer,
        "steer_layer": steer_layer,
        "cap_max": cap_max,
        "calibration": cal.to_dict(),
        "messages": messages,
        "runs": runs,
        "report": None if report_path is None else str(report_path),
        "seconds": elapsed,
    }
    if show:
        _print_table(say, runs)
        for label, run in runs.items():
            lines = run["audit_lines"]
            say(f"\naudit log, {label} ({run['audit_log']}, {len(lines)} lines):")
            for line in lines[:6]:
                say(f"  {line}")
            if len(lines) > 6:
                say(f"  ... {len(lines) - 6} more")
        if report_path is None:
            say('\nreport: not written (plots need the extra: pip install "personacore[report]")')
        else:
            say(f"\nreport of both runs: {report_path}")
        say(f"\n{elapsed:.1f} s")
    return record


def _print_table(say: Any, runs: Dict[str, Dict[str, Any]]) -> None:
    rows = [
        ("early warning", "early_warning_at_warning_layer", "{:+.2f}"),
        ("P(trait) before reply", "early_warning_probability", "{:.2f}"),
        ("reply mean score", "mean", "{:+.2f}"),
        ("reply max score", "max", "{:+.2f}"),
        ("reply tokens above thr.", "tokens_above_threshold", "{}"),
        ("alerts (prompt + reply)", "alerts", "{}"),
        ("tokens", "tokens", "{}"),
    ]
    say(f"\n{'':<26}{'unsteered':>12}{'steered':>12}")
    for label, key, fmt in rows:
        cells = []
        for run in ("unsteered", "steered"):
            v = runs[run]["summary"][key]
            cells.append("-" if v is None else fmt.format(v))
        say(f"{label:<26}{cells[0]:>12}{cells[1]:>12}")


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise SystemExit("personacore demo: --max-new-tokens must be >= 1")
    record = run_demo(args)
    if args.json:
        json.dump(record, sys.stdout, default=_jsonable)
        sys.stdout.write("\n")
    return 0


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    raise TypeError(f"{type(x).__name__} is not JSON serializable")


COMMANDS = {"demo": _cmd_demo}
