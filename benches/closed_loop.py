"""Closed-loop steering without chatter (issue 20): each mode of a monitor-conditioned steer.

On the trait's evaluation questions under its positive system prompts (the model is told to be
impolite), a `Monitor` watches the vector at one layer and a steer pushes back when the score is
above the threshold. For each mode the table gives the switches (steer_on + steer_off events) per
100 generated tokens, the mean and max reply score (attention sinks left out), the share of reply
tokens above the threshold, and the mean negative log-likelihood of the reply under the unsteered
model (a judge-free coherence check: steering that derails the text raises it).

    python benches/closed_loop.py --vector .cache/impolite.safetensors

Extract the vector first (a couple of minutes on 2 cores; do not commit it):

    pc.extract(pc.load_model(), pc.Trait.load("impolite"), max_questions=8, n_per_question=1,
               max_new_tokens=32).save(".cache/impolite.safetensors")
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional

import numpy as np

import personacore as pc


def _nll(model: Any, gen: Any) -> float:
    """Mean negative log-likelihood per reply token under the unsteered model."""
    if not gen.token_ids:
        return float("nan")
    logits = model.logits(gen.ids).astype(np.float64)[gen.prompt_len - 1 : -1]
    logz = np.logaddexp.reduce(logits, axis=1)
    return float(-np.mean(logits[np.arange(len(gen.token_ids)), gen.token_ids] - logz))


def _row(model: Any, gens: List[Any], name: str, threshold: float) -> Dict[str, Any]:
    """The table row of one mode: switches per 100 tokens, reply scores, NLL."""
    n_tokens = sum(len(g.token_ids) for g in gens)
    switches = sum(e.kind in ("steer_on", "steer_off") for g in gens for e in g.events)
    reply = np.concatenate([g.reply_scores()[name][:, 0] for g in gens])
    return {
        "switches/100 tok": 100.0 * switches / max(n_tokens, 1),
        "mean score": float(reply.mean()),
        "max score": float(reply.max()),
        "above τ": float((reply > threshold).mean()),
        "NLL": float(np.mean([_nll(model, g) for g in gens])),
    }


def main(argv: Optional[List[str]] = None) -> None:
    """Run every mode and print the markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vector", default=".cache/impolite.safetensors")
    ap.add_argument("--trait", default="impolite")
    ap.add_argument("--layer", type=int, default=12, help="monitored and steered layer")
    ap.add_argument("--threshold", type=float, default=2.0)
    ap.add_argument("--hysteresis", type=float, default=1.0)
    ap.add_argument("--coef", type=float, default=-3.0)
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args(argv)

    model = pc.load_model()
    vec = pc.PersonaVector.load(args.vector)
    trait = pc.Trait.load(args.trait)
    questions = list(trait.eval_questions)[: args.questions]
    pos = [p for p, _ in trait.instructions]
    prompts = [
        [{"role": "system", "content": pos[i % len(pos)]}, {"role": "user", "content": q}]
        for i, q in enumerate(questions)
    ]
    name, tau, layer = args.trait, args.threshold, args.layer
    monitor = pc.Monitor({name: vec}, layers=[layer], thresholds={name: tau})

    def when(**kw: Any) -> pc.When:
        return pc.When(name, above=tau, hysteresis=args.hysteresis, **kw)

    def steer(**kw: Any) -> pc.Steer:
        return pc.Steer(vec, args.coef, layers=[layer], when=when(**kw))

    modes: Dict[str, Any] = {
        "no steering": None,
        "switch (hysteresis only)": steer(),
        "min_on=4": steer(min_on=4),
        "min_on=8": steer(min_on=8),
        "min_on=16": steer(min_on=16),
        "min_on=8, min_off=8": steer(min_on=8, min_off=8),
        "proportional gain=0.1": steer(mode="proportional", gain=0.1),
        "proportional gain=0.3": steer(mode="proportional", gain=0.3),
        "proportional gain=1": steer(mode="proportional", gain=1.0),
        "min_on=8 + proportional gain=0.3": steer(min_on=8, mode="proportional", gain=0.3),
        f"Cap(max={tau:g}), always on": pc.Cap(vec, max=tau, layers=[layer]),
        f"steer {args.coef:g}, always on": pc.Steer(vec, args.coef, layers=[layer]),
    }
    print(
        f"default model, vector {args.vector} at layer {layer}, τ={tau:g}, "
        f"hysteresis {args.hysteresis:g}, coef {args.coef:g}, {len(prompts)} questions × "
        f"{args.tokens} greedy tokens\n"
    )
    cols = ["switches/100 tok", "mean score", "max score", "above τ", "NLL"]
    print("| mode | " + " | ".join(cols) + " |")
    print("| --- |" + " ---: |" * len(cols))
    for label, s in modes.items():
        gens = model.generate(
            prompts, max_new_tokens=args.tokens, temperature=0.0, steer=s, monitor=monitor
        )
        row = _row(model, gens, name, tau)
        cells = [f"{row[c]:.2f}" if c != "switches/100 tok" else f"{row[c]:.1f}" for c in cols]
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
