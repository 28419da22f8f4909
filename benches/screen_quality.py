"""How well each screening method separates rude from polite replies (issue 14, the README's numbers).

Screens tests/data/screen_pairs.json (a rude and a polite reply to each of 12 prompts, written by
hand) with an ``impolite`` vector and prints, per method, the share of prompts whose rude reply
scores above its polite one and the AUROC of rude vs polite over the whole set.

    python benches/screen_quality.py [--vector V.safetensors] [--layer N] [--max-new-tokens 32]

Without ``--vector`` it extracts the same small vector as tests/test_screen.py (10-30 s).
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

PAIRS = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data" / "screen_pairs.json"
#: The small extraction the tests use (1 instruction pair x 4 questions, greedy, 16 tokens).
SMALL_EXTRACTION = dict(
    max_questions=4, max_instructions=1, max_eval_questions=6, max_new_tokens=16, temperature=0.0
)


def pair_samples() -> list:
    """The test set: rude then polite sample for each prompt, with ``id`` ``"k-rude"``/``"k-polite"``."""
    out = []
    for k, p in enumerate(json.loads(PAIRS.read_text())["pairs"]):
        for kind in ("rude", "polite"):
            out.append({"id": f"{k}-{kind}", "prompt": p["prompt"], "response": p[kind]})
    return out


def separation(scores: np.ndarray) -> tuple:
    """(share of pairs with rude > polite, AUROC rude vs polite) of scores in pair_samples() order."""
    from sklearn.metrics import roc_auc_score

    rude, polite = scores[0::2], scores[1::2]
    labels = np.r_[np.ones(len(rude)), np.zeros(len(polite))]
    return float(np.mean(rude > polite)), float(roc_auc_score(labels, np.r_[rude, polite]))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--vector", help="impolite vector file (default: extract the small one)")
    ap.add_argument("--layer", type=int, default=None, help="layer (default: the vector's own)")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="length of the baseline y'")
    args = ap.parse_args()

    import personacore as pc

    model = pc.load_model()
    if args.vector:
        vec = pc.PersonaVector.load(args.vector)
    else:
        vec = pc.extract(model, "impolite", progress=False, **SMALL_EXTRACTION)
    layer = vec.layer if args.layer is None else args.layer
    samples = pair_samples()
    print(f"{len(samples) // 2} prompts x (rude, polite), impolite vector at layer {layer}")
    print(f"{'method':12s} {'rude > polite':>14s} {'AUROC':>7s}")
    for method in ("delta", "prompt_last", "response"):
        res = pc.screen(
            model,
            {"impolite": vec},
            samples,
            method=method,
            layer=layer,
            max_new_tokens=args.max_new_tokens,
        )
        acc, auc = separation(res.scores["impolite"])
        print(f"{method:12s} {acc:14.2f} {auc:7.3f}")


if __name__ == "__main__":
    main()
