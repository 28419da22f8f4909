"""Peak memory of ``personacore screen`` against dataset size (issue 14: memory flat in dataset size).

Writes JSONL datasets of N short samples, screens each in a child process with
``--method response`` (cheap: one pooled forward per batch) and prints the child's peak RSS
(``ru_maxrss`` from ``wait4``). The pipeline streams input and output, so the peak should not
grow with N; the numbers go to benches/README.md.

    python scripts/screen_rss.py [--sizes 100 10000] [--model tiny|default|PATH] [--batch-size 16]

``--model tiny`` (the default) screens with a tiny random Llama from tests/tiny_models.py, so
10,000 samples take seconds; ``default`` uses SmolLM2-135M (minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_dataset(path: Path, n: int) -> None:
    """``n`` records of a short system + user prompt and a one-line reply, streamed to ``path``."""
    with open(path, "w") as f:
        for k in range(n):
            chat = [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"Say {k}."},
                {"role": "assistant", "content": f"{k}, done."},
            ]
            f.write(json.dumps({"id": f"s{k}", "messages": chat}) + "\n")


def peak_rss_mib(cmd: list) -> tuple:
    """Run ``cmd``; (peak RSS of the child in MiB, seconds). Raises if it fails."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with status {status}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 10000])
    ap.add_argument("--model", default="tiny", help="tiny, default or a model path")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out-suffix", default=".jsonl", choices=[".jsonl", ".parquet"])
    args = ap.parse_args()

    import personacore as pc

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_args = []
        if args.model == "tiny":
            sys.path.insert(0, str(ROOT / "tests"))
            from tiny_models import write_tiny_model

            write_tiny_model(tmp / "tiny", "llama", max_position_embeddings=256)
            model_args = ["--model", str(tmp / "tiny")]
        elif args.model != "default":
            model_args = ["--model", args.model]
        model = pc.load_model(model_args[1] if model_args else None)
        rng = np.random.default_rng(0)
        shape = (model.num_layers + 1, model.hidden_size)
        vec = pc.PersonaVector(rng.standard_normal(shape), layer=model.num_layers // 2, name="r")
        vec.save(str(tmp / "v.safetensors"))
        print(f"model {model.path} ({model.num_layers} layers, hidden {model.hidden_size})")
        for n in args.sizes:
            data = tmp / f"d{n}.jsonl"
            write_dataset(data, n)
            out = tmp / f"o{n}{args.out_suffix}"
            cmd = [sys.executable, "-m", "personacore", "screen", *model_args, "--vector"]
            cmd += [str(tmp / "v.safetensors"), "--input", str(data), "--out", str(out)]
            cmd += ["--method", "response", "--batch-size", str(args.batch_size), "--quiet"]
            rss, secs = peak_rss_mib(cmd)
            print(
                f"{n:>7} samples: peak RSS {rss:8.1f} MiB  ({secs:.1f} s, {n / secs:.0f} samples/s)"
            )


if __name__ == "__main__":
    main()
