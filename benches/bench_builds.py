"""Two builds of the native module side by side: is build B as fast as build A on this machine?

    python benches/bench_builds.py --a python --b /tmp/other/python [--rounds 3]

``--a`` and ``--b`` are directories that hold a ``personacore`` package (each with its own
``_core`` module, e.g. the tree's ``python/`` and a copy whose ``_core`` came from another build:
a wheel built for the x86-64 baseline against the tree's build for this CPU). Each round runs
one child process per build, A then B then (next round) B then A, so a slow patch of a shared host
hits both; a child loads the default model and times a fixed set of workloads (best of 2 each):

- ``decode``: greedy decode rate after a chat prompt, batch 1, f32 (64 new tokens, EOS ignored);
- ``decode_q4``: the same with ``quantized=True`` (Q4_1 kept quantized);
- ``batch16``: 16 prompts x 32 greedy tokens in one call (tokens/s);
- ``pool``: pooled all-row capture of 8 x 128 tokens (tokens/s, compute bound);
- ``prefill2k``: time to first token of a 2,000-token prompt (tokens/s of the prefill).

Prints each workload's rate per build and the ratio B / A (median over rounds of the paired
ratios, and best vs best). Timings only; the two builds must produce the same greedy tokens
(checked).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

CHILD = r"""
import json, sys, time
import numpy as np
import personacore as pc
from bench_generate import BATCH_PROMPTS, PROMPT

def best(fn, n=2):
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return min(out)

res, tokens = {}, {}
for name, quantized in (("decode", False), ("decode_q4", True)):
    m = pc.load_model(quantized=quantized)
    ids = m.encode_chat([{"role": "user", "content": PROMPT}])
    m.generate(ids, max_new_tokens=4, ignore_eos=True)
    t1 = best(lambda: m.generate(ids, max_new_tokens=1, ignore_eos=True))
    t64 = best(lambda: m.generate(ids, max_new_tokens=64, ignore_eos=True))
    res[name] = 63 / (t64 - t1)
    tokens[name] = m.generate(ids, max_new_tokens=16).token_ids
m = pc.load_model()
prompts = [m.encode_chat([{"role": "user", "content": p}]) for p in BATCH_PROMPTS[:16]]
res["batch16"] = 16 * 32 / best(lambda: m.generate(prompts, max_new_tokens=32, ignore_eos=True))
rng = np.random.default_rng(0)
seqs = [rng.integers(100, 40000, 128).tolist() for _ in range(8)]
res["pool"] = 8 * 128 / best(lambda: m.pool([s[:64] for s in seqs], [s[64:] for s in seqs],
                                             batch_size=8))
text = " ".join([PROMPT] * 40)
long_ids = m.tokenizer.encode(text)[:2000]
res["prefill2k"] = len(long_ids) / best(lambda: m.generate(long_ids, max_new_tokens=1))
tokens["long"] = m.generate(long_ids, max_new_tokens=8).token_ids
print(json.dumps({"rates": res, "tokens": tokens}))
"""

WORKLOADS = ("decode", "decode_q4", "batch16", "pool", "prefill2k")
UNITS = {"decode": "tok/s", "decode_q4": "tok/s", "batch16": "tok/s", "pool": "tok/s",
         "prefill2k": "tok/s"}  # fmt: skip


def run_child(pkg_dir: str, threads: int) -> dict:
    """One child process importing personacore from ``pkg_dir``; its rates and tokens."""
    env = dict(os.environ)
    benches = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(pkg_dir), benches])
    env["RAYON_NUM_THREADS"] = str(threads)
    out = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"child for {pkg_dir} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--a", required=True, help="directory holding build A's personacore package")
    ap.add_argument("--b", required=True, help="directory holding build B's personacore package")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print(f"A = {args.a}\nB = {args.b}\nthreads {args.threads}, load average before "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)  # fmt: skip
    runs = {"A": [], "B": []}
    t0 = time.perf_counter()
    for r in range(args.rounds):
        order = ("A", "B") if r % 2 == 0 else ("B", "A")
        for side in order:
            runs[side].append(run_child(args.a if side == "A" else args.b, args.threads))
            rates = runs[side][-1]["rates"]
            print(f"  round {r + 1} {side}: " + ", ".join(f"{k} {rates[k]:.1f}" for k in WORKLOADS),
                  flush=True)  # fmt: skip
    same = all(a["tokens"] == b["tokens"] for a, b in zip(runs["A"], runs["B"]))
    print(f"\ngreedy tokens identical between the builds: {same}")
    print(
        f"{'workload':10s} {'A best':>9s} {'B best':>9s} {'B/A best':>9s} {'B/A paired median':>18s}"
    )
    for k in WORKLOADS:
        a = [x["rates"][k] for x in runs["A"]]
        b = [x["rates"][k] for x in runs["B"]]
        paired = float(np.median([y / x for x, y in zip(a, b)]))
        print(f"{k:10s} {max(a):9.1f} {max(b):9.1f} {max(b) / max(a):9.3f} {paired:18.3f}  "
              f"({UNITS[k]})")  # fmt: skip
    print(f"{time.perf_counter() - t0:.0f} s; load average after "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")  # fmt: skip


if __name__ == "__main__":
    main()
