"""Short timing of the default model for comparing two builds of the engine on one machine.

    PYTHONPATH=<a tree's python/ dir> python scripts/time_decode.py [--repeats 5] [--tokens 64]

Times (best of ``--repeats``, after one warm-up) greedy decoding of ``--tokens`` tokens with
quantized=True (Q4_1 weights) and with f32 weights, and one prompt forward (``logits`` of a
49-token conversation), and prints one line per case. Run it alternately against each build
(e.g. the x86-64-v3 build and the baseline wheel) and compare the lines; it is a coarse check,
not a benchmark (see benches/ for those).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import personacore as pc

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "smollm2_reference.npz"


def best_time(fn, repeats: int, clock=time.perf_counter) -> float:
    """Best time of ``fn()`` on ``clock`` over ``repeats`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return min(times)


def main() -> None:
    """Parse the flags, time the three cases, print them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="measure the process's CPU time instead of wall time (on a busy host, with "
        "RAYON_NUM_THREADS=1, this counts the work done rather than the waiting)",
    )
    args = parser.parse_args()
    clock = time.process_time if args.cpu_time else time.perf_counter
    with np.load(DATA) as npz:
        ids = [int(i) for i in npz["c0_ids"]]
        prompt = ids[: int(npz["c0_prompt_len"])]
    what = "CPU time" if args.cpu_time else "wall time"
    print(f"engine {pc.engine.native.native().__file__} avx2_enabled={pc.avx2_enabled()}, {what}")
    for quantized in (True, False):
        model = pc.load_model(quantized=quantized)
        n = args.tokens

        def decode(model=model, n=n):
            return model.generate(prompt, max_new_tokens=n, temperature=0.0, ignore_eos=True)

        t = best_time(decode, args.repeats, clock)
        name = "quantized=True" if quantized else "f32"
        print(f"{name:15s} greedy decode {n} tokens: {t * 1e3:8.1f} ms ({n / t:6.1f} tok/s)")
        if not quantized:
            t = best_time(lambda model=model: model.logits(ids), args.repeats, clock)
            print(f"{name:15s} prompt forward {len(ids)} tokens: {t * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
