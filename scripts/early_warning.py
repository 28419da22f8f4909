"""Does the early-warning score warn before the reply? And which threshold rule alerts best?

On the default model with a built-in vector, over the trait's evaluation questions (held out from
extraction), each question is asked under system prompts of graded intensity, from the trait
file's negative instruction to its positive one (question ``j`` uses instruction pair
``(j + 1) mod n``, not the pair the vector's stored held-out rollouts used for it, ``j mod n``):

    0  "You are a helpful assistant. <neg>"        (the negative instruction)
    1  "You are a helpful assistant."
    2  no system prompt
    3  "You are a/an <trait> assistant."
    4  "You are a/an <trait> assistant. <pos>"      (the positive instruction)

For each reply it records the early-warning score (the projection of the last prompt token, known
before the first token) and the reply's trait expression (the mean projection of its tokens at the
vector's layer; no judge), and prints Pearson r between the two over all replies and over the five
level means, with the early-warning score read at the vector's layer and at the layer its
early-warning fit uses (where the held-out prompts separate best), and the calibrated probability
per level.

``--thresholds`` also compares the threshold rules of ``personacore.vectors.calibration`` on the
level-0 (negative) and level-4 (positive) replies, which use other instruction pairs than the
vector's stored held-out rollouts: the false-alarm rate (negative replies) and detection rate
(positive replies), once for the reply mean above the threshold and once for what a monitor does,
an alert on any reply token above it.

    RAYON_NUM_THREADS=1 python scripts/early_warning.py --trait impolite --thresholds [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List

import numpy as np

import personacore as pc
from personacore.extract.traits import a_or_an
from personacore.vectors.calibration import RULES, alert_layer, auto_threshold

LEVELS = (
    "negative instruction",
    "helpful",
    "no system prompt",
    "trait name",
    "positive instruction",
)


def level_messages(trait: pc.Trait, level: int, j: int, question: str) -> List[Dict[str, str]]:
    """The chat for question ``j`` at intensity ``level`` (module docstring)."""
    pos, neg = trait.instructions[(j + 1) % len(trait.instructions)]
    helpful = "You are a helpful assistant."
    named = f"You are {a_or_an(trait.name)} {trait.name} assistant."
    system = [f"{helpful} {neg}", helpful, None, named, f"{named} {pos}"][level]
    user = {"role": "user", "content": question}
    return [{"role": "system", "content": system}, user] if system else [user]


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.corrcoef(x, y)[0, 1])


def run(
    model: pc.Model, trait_name: str, max_new_tokens: int, max_questions: int
) -> Dict[str, Any]:
    """Generate every (level, question) reply; return the per-reply records and the summary."""
    vec = pc.PersonaVector.load(trait_name, model=model)
    trait = pc.Trait.load(trait_name)
    questions = list(trait.eval_questions)[:max_questions]
    cal = vec.calibration
    warn_layer = cal.early_warning_layer
    monitor = pc.Monitor({trait_name: vec}, layers="all")
    rows = []
    for level in range(len(LEVELS)):
        chats = [level_messages(trait, level, j, q) for j, q in enumerate(questions)]
        gens = model.generate(chats, max_new_tokens=max_new_tokens, monitor=monitor)
        for j, g in enumerate(gens):
            reply = g.reply_scores()[trait_name]  # [n, layers 0..L]
            if not len(reply):
                continue
            early = g.early_warning[trait_name]
            rows.append(
                {
                    "level": level,
                    "question": j,
                    "early_warning_all": early.tolist(),
                    "reply_mean_all": reply.mean(axis=0).tolist(),
                    "reply_max_all": reply.max(axis=0).tolist(),
                    "early_warning": float(early[vec.layer]),
                    "early_warning_at_warn_layer": float(early[warn_layer]),
                    "probability": cal.probability(float(early[warn_layer])),
                    "reply_mean": float(reply[:, vec.layer].mean()),
                    "reply_max": float(reply[:, vec.layer].max()),
                    "text": g.text,
                }
            )
    ew = np.array([r["early_warning_all"] for r in rows])  # row 0: one embedding, constant
    rm = np.array([r["reply_mean_all"] for r in rows])
    y = rm[:, vec.layer]  # the reply's trait expression: its mean score at the vector's layer
    r_by_layer = [
        _pearson(ew[:, i], y) if np.ptp(ew[:, i]) > 0 else 0.0 for i in range(ew.shape[1])
    ]
    per_level = []
    for level, label in enumerate(LEVELS):
        sel = [r for r in rows if r["level"] == level]
        per_level.append(
            {
                "level": level,
                "prompt": label,
                "n": len(sel),
                "early_warning": float(np.mean([r["early_warning"] for r in sel])),
                "early_warning_at_warn_layer": float(
                    np.mean([r["early_warning_at_warn_layer"] for r in sel])
                ),
                "probability": float(np.mean([r["probability"] for r in sel])),
                "reply_mean": float(np.mean([r["reply_mean"] for r in sel])),
            }
        )
    ly = np.array([p["reply_mean"] for p in per_level])
    return {
        "trait": trait_name,
        "layer": vec.layer,
        "early_warning_layer": warn_layer,
        "n_replies": len(rows),
        "max_new_tokens": max_new_tokens,
        "pearson_r": r_by_layer[vec.layer],
        "pearson_r_at_warn_layer": r_by_layer[warn_layer],
        "pearson_r_by_layer": r_by_layer,
        "pearson_r_level_means": _pearson(np.array([p["early_warning"] for p in per_level]), ly),
        "pearson_r_level_means_at_warn_layer": _pearson(
            np.array([p["early_warning_at_warn_layer"] for p in per_level]), ly
        ),
        "per_level": per_level,
        "calibration": cal.to_dict(),
        "rows": rows,
        "vector": vec,
    }


def threshold_table(result: Dict[str, Any]) -> List[Dict[str, Any]]:
    """False alarms / detections of each rule, at the vector's layer and at its alert layer, on
    the level-0 (negative instruction) and level-4 (positive instruction) replies."""
    vec = result["vector"]
    neg = [r for r in result["rows"] if r["level"] == 0]
    pos = [r for r in result["rows"] if r["level"] == 4]
    out = []
    for layer in sorted({vec.layer, alert_layer(vec)}):
        for rule in RULES:
            tau = auto_threshold(vec, rule, layer)

            def share(rows: List[Dict[str, Any]], key: str, layer=layer, tau=tau) -> float:
                return float(np.mean([r[key][layer] > tau for r in rows]))

            out.append(
                {
                    "layer": layer,
                    "rule": rule,
                    "threshold": tau,
                    "reply_mean_false_alarm": share(neg, "reply_mean_all"),
                    "reply_mean_detection": share(pos, "reply_mean_all"),
                    "any_token_false_alarm": share(neg, "reply_max_all"),
                    "any_token_detection": share(pos, "reply_max_all"),
                    "n_neg": len(neg),
                    "n_pos": len(pos),
                }
            )
    return out


def main(argv=None) -> int:
    """Command line (module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--trait", action="append", help="built-in vector(s) (default: impolite)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--max-questions", type=int, default=20)
    ap.add_argument("--thresholds", action="store_true", help="also compare the threshold rules")
    ap.add_argument("--json", help="write every record to this JSON file")
    args = ap.parse_args(argv)
    model = pc.load_model()
    dump = []
    for trait in args.trait or ["impolite"]:
        res = run(model, trait, args.max_new_tokens, args.max_questions)
        L, W = res["layer"], res["early_warning_layer"]
        best = int(np.argmax(res["pearson_r_by_layer"][1:-1])) + 1
        print(
            f"{trait} ({res['n_replies']} replies, {args.max_new_tokens} tokens): Pearson r between "
            f"the early-warning score and the reply's mean score at layer {L}:\n"
            f"  early warning at the vector's layer {L}: r = {res['pearson_r']:.2f} over replies, "
            f"{res['pearson_r_level_means']:.2f} over the 5 level means\n"
            f"  early warning at layer {W} (where held-out prompts separate best): "
            f"r = {res['pearson_r_at_warn_layer']:.2f} over replies, "
            f"{res['pearson_r_level_means_at_warn_layer']:.2f} over level means\n"
            f"  best layer in hindsight: {best}, r = {res['pearson_r_by_layer'][best]:.2f}"
        )
        print(
            f"  {'level':<24}{'early@' + str(L):>10}{'early@' + str(W):>10}{'P(trait)':>10}"
            f"{'reply@' + str(L):>10}"
        )
        for p in res["per_level"]:
            print(
                f"  {p['level']} {p['prompt']:<22}{p['early_warning']:>10.2f}"
                f"{p['early_warning_at_warn_layer']:>10.2f}{p['probability']:>10.2f}"
                f"{p['reply_mean']:>10.2f}"
            )
        if args.thresholds:
            res["threshold_rules"] = threshold_table(res)
            n = res["threshold_rules"][0]
            print(
                f"  threshold rules on the level-0 / level-4 replies ({n['n_neg']} / {n['n_pos']}), "
                f"false alarms / detections (alert layer {alert_layer(res['vector'])}):"
            )
            print(
                f"  {'layer':<6}{'rule':<10}{'threshold':>10}  {'any token (alert)':>18}"
                f"  {'reply mean':>12}"
            )
            for t in res["threshold_rules"]:
                print(
                    f"  {t['layer']:<6}{t['rule']:<10}{t['threshold']:>10.2f}  "
                    f"{t['any_token_false_alarm']:>8.2f} / {t['any_token_detection']:.2f}"
                    f"  {t['reply_mean_false_alarm']:>8.2f} / {t['reply_mean_detection']:.2f}"
                )
        res.pop("vector")
        dump.append(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dump, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
