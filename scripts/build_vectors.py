"""Regenerate the built-in persona vectors of the default model.

Runs ``pc.extract`` (no judge; the settings below) on the default model for each built-in trait
and writes ``python/personacore/vectors/builtin/<trait>.safetensors``, which
``pc.PersonaVector.load("<trait>")`` reads. Each file's metadata records the model (name and
sha256), the extraction settings and seed, the package version and this script.

    RAYON_NUM_THREADS=1 nice python scripts/build_vectors.py impolite evil   # some traits
    RAYON_NUM_THREADS=1 nice python scripts/build_vectors.py                 # all of them

One trait takes 3-5 minutes on one core. The rollouts are greedy, so a rerun on the same build
gives the same vectors.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import personacore as pc
from personacore.engine.defaults import DEFAULT_MODEL_NAME
from personacore.vectors.builtin import BUILTIN_VECTOR_DIR

#: The extraction settings of the shipped vectors (``pc.extract`` keyword arguments).
SETTINGS = dict(
    n_per_question=1,
    max_new_tokens=48,
    method="mean_diff",
    pooling="response_avg",
    temperature=0.0,
    seed=0,
    judge=None,
)


def build(model: pc.Model, trait: str, out_dir: Path, **overrides) -> Path:
    """Extract ``trait`` on ``model`` and write ``out_dir/<trait>.safetensors``."""
    settings = dict(SETTINGS, **overrides)
    t0 = time.perf_counter()
    vec = pc.extract(model, trait, progress=False, **settings)
    vec.metadata["package_version"] = pc.__version__
    vec.metadata["built_by"] = "scripts/build_vectors.py"
    vec.metadata["extract_kwargs"] = {k: v for k, v in settings.items() if k != "judge"}
    vec.metadata.pop("model_path", None)  # a path on the building machine means nothing elsewhere
    out = out_dir / f"{trait}.safetensors"
    vec.save(out)
    st = vec.metadata["stats"]
    print(
        f"{trait}: layer {vec.layer}, held-out AUROC {st['auroc'][vec.layer]:.3f}, "
        f"Cohen's d {st['cohens_d'][vec.layer]:.2f}, {time.perf_counter() - t0:.0f} s -> {out}",
        flush=True,
    )
    return out


def main(argv=None) -> int:
    """Command line: trait names (default: every built-in trait)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("traits", nargs="*", help="built-in traits (default: all)")
    ap.add_argument("--out-dir", type=Path, default=BUILTIN_VECTOR_DIR)
    args = ap.parse_args(argv)
    model = pc.load_model()
    if pc.engine.defaults.model_identity(model)["model"] != DEFAULT_MODEL_NAME:
        print("the loaded model is not the default model", file=sys.stderr)
        return 1
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for trait in args.traits or pc.traits():
        build(model, trait, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
