"""Reproduce the README's extraction numbers on the default model.

    python benches/extract_report.py [--trait impolite] [--method mean_diff|logreg|pca]

Runs the default extraction (all instruction pairs and questions, greedy rollouts), prints the
recommended layer, its held-out AUROC and Cohen's d, the wall time, and the A/B log-prob gap
(trait answer minus neutral answer) when steering with coefficients -2, 0, +2.
"""

import argparse
import time

import personacore as pc


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--trait", default="impolite", help="built-in trait or JSON path")
    ap.add_argument(
        "--method", default="mean_diff", choices=["mean_diff", "logreg", "pca"], help="fit method"
    )
    args = ap.parse_args()
    model = pc.load_model()
    trait = pc.Trait.load(args.trait)
    t0 = time.perf_counter()
    vec = pc.extract(model, trait, method=args.method)
    took = time.perf_counter() - t0
    st = vec.metadata["stats"]
    print(
        f"{trait.name} {args.method}: layer {vec.layer}, held-out AUROC {st['auroc'][vec.layer]:.3f}, "
        f"Cohen's d {st['cohens_d'][vec.layer]:.2f}, {vec.metadata['counts']}, {took:.0f} s"
    )
    gaps = pc.ab_logit_gap(model, vec, trait.ab_items, coefs=(-2.0, 0.0, 2.0))
    print("A/B gap by coefficient:", {k: round(v, 3) for k, v in gaps.items()})


if __name__ == "__main__":
    main()
