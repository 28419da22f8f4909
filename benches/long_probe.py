"""Probes of long-context costs on a busy host: CPU time and peak memory rather than wall time.

    python benches/long_probe.py pool highest 1 4096 2     # PREC BATCH TOKENS REPEATS
    python benches/long_probe.py decode high 8000 12       # PREC PROMPT_TOKENS NEW_TOKENS

pool: ``Model.pool`` of BATCH synthetic sequences of TOKENS ids (half prompt, half response,
three poolings), REPEATS times; prints wall and process CPU seconds per run, the peak resident
memory and a checksum of the pooled values (equal across builds that compute the same values).
decode: ``Model.stream`` of a synthetic prompt, greedy; prints the peak resident memory after
loading and at the end, time to first token, and the wall and CPU time per new token (min and
median). Run under ``perf stat`` / ``perf record`` for page faults and sample shares.
"""

from __future__ import annotations

import sys
import time
from typing import List

import personacore as pc


def peak_mib() -> int:
    """Peak resident memory of this process (VmHWM), MiB."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) // 1024


def pool(prec: str, batch: int, t: int, repeats: int) -> None:
    model = pc.load_model(precision=prec)
    ids = list(range(1000, 1000 + batch * t))
    seqs = [ids[i * t : (i + 1) * t] for i in range(batch)]
    prompts, responses = [s[: t // 2] for s in seqs], [s[t // 2 :] for s in seqs]
    walls: List[float] = []
    cpus: List[float] = []
    out = {}
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        out = model.pool(
            prompts,
            responses,
            poolings=("response_avg", "prompt_avg", "prompt_last"),
            batch_size=batch,
        )
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    checksum = float(sum(abs(v).sum() for v in out.values()))
    print(
        "wall",
        " ".join(f"{x:.2f}" for x in walls),
        "cpu",
        " ".join(f"{x:.2f}" for x in cpus),
        f"peak {peak_mib()} MiB checksum {checksum}",
    )


def decode(prec: str, n: int, new: int) -> None:
    model = pc.load_model(precision=prec)
    after_load = peak_mib()
    ids = [1000 + (i * 7919) % 40000 for i in range(n)]
    walls: List[float] = []
    cpus: List[float] = []
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in model.stream(ids, max_new_tokens=new, temperature=0.0, ignore_eos=True):
        walls.append(time.perf_counter())
        cpus.append(time.process_time())
    dw = sorted(b - a for a, b in zip(walls, walls[1:]))
    dc = sorted(b - a for a, b in zip(cpus, cpus[1:]))
    print(
        f"{prec}: peak after load {after_load} MiB, at end {peak_mib()} MiB; "
        f"TTFT wall {walls[0] - w0:.1f} s cpu {cpus[0] - c0:.1f} s; per token "
        f"wall min {dw[0] * 1e3:.0f} ms median {dw[len(dw) // 2] * 1e3:.0f} ms, "
        f"cpu min {dc[0] * 1e3:.0f} ms median {dc[len(dc) // 2] * 1e3:.0f} ms"
    )


def main(argv: List[str]) -> None:
    if len(argv) == 5 and argv[0] == "pool":
        pool(argv[1], int(argv[2]), int(argv[3]), int(argv[4]))
    elif len(argv) == 4 and argv[0] == "decode":
        decode(argv[1], int(argv[2]), int(argv[3]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
