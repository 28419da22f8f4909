"""Huge pages for the packed f32 weights: the same model loaded twice in one process, once with
``PERSONACORE_HUGE_PAGES=0`` (4 KiB pages) and once without (weights of 2 MiB and more in
mappings marked ``MADV_HUGEPAGE``), greedy decode alternated between them.

    python benches/bench_huge_pages.py                 # 8 rounds of 64 tokens
    python benches/bench_huge_pages.py --rounds 4 --tokens 32
    python benches/bench_huge_pages.py --quantized     # the Q4_1 blocks kept quantized

Prints the paired wall-time ratio (4 KiB / huge), CPU time per run and how much of each model's
memory the kernel backed with huge pages (``AnonHugePages`` of its weight mappings is not split
per model, so the process total after each load is printed). The tokens of both must be equal.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def anon_huge_kb() -> int:
    """This process's ``AnonHugePages`` in kB."""
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--quantized", action="store_true", help="keep the GGUF's Q4_1 blocks")
    args = ap.parse_args()
    import personacore as pc

    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        print(f"transparent huge pages: {f.read().strip()}")
    os.environ["PERSONACORE_HUGE_PAGES"] = "0"
    small = pc.load_model(quantized=args.quantized)
    before = anon_huge_kb()
    del os.environ["PERSONACORE_HUGE_PAGES"]
    huge = pc.load_model(quantized=args.quantized)
    print(f"AnonHugePages: {before} kB after the 4 KiB load, {anon_huge_kb()} kB after the other")
    chat = [{"role": "user", "content": "Name three colors and say why you like them."}]
    for m in (small, huge):
        m.generate(chat, max_new_tokens=4, ignore_eos=True)
    wall = {"4k": [], "huge": []}
    cpu = {"4k": [], "huge": []}
    for i in range(args.rounds):
        order = (("4k", small), ("huge", huge)) if i % 2 == 0 else (("huge", huge), ("4k", small))
        for name, m in order:
            t, c = time.perf_counter(), time.process_time()
            m.generate(chat, max_new_tokens=args.tokens, ignore_eos=True)
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    same = (
        small.generate(chat, max_new_tokens=16).token_ids
        == huge.generate(chat, max_new_tokens=16).token_ids
    )
    ratios = [a / b for a, b in zip(wall["4k"], wall["huge"])]
    print(
        f"{'Q4_1' if args.quantized else 'f32'}, {args.tokens} greedy tokens, {args.rounds} "
        "alternated rounds: 4 KiB pages "
        f"{statistics.median(wall['4k']) * 1000:.0f} ms, huge pages "
        f"{statistics.median(wall['huge']) * 1000:.0f} ms (medians); paired 4 KiB / huge "
        f"{statistics.median(ratios):.3f}x (range {min(ratios):.3f}-{max(ratios):.3f}); CPU "
        f"{statistics.median(cpu['4k']):.2f} vs {statistics.median(cpu['huge']):.2f} s; "
        f"same tokens: {same}"
    )
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
