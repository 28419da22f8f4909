"""Run every fuzz harness in ``fuzz/`` for a number of executions and write a summary.

    nice -n 19 python scripts/fuzz.py --out fuzz-out --runs 100000          # each target
    python scripts/fuzz.py --out fuzz-out --runs 300 --seed 7 --targets trait_json,vector_pt
    python scripts/fuzz.py --out fuzz-out --runs 3000 --seed 7 --targets all   # one process (CI)

Each target runs in its own process (atheris/libFuzzer) with a fixed libFuzzer seed. A process
that ends early (a hang past ``--timeout`` seconds per input, a signal, an abort) is counted as a
crash and restarted for the executions left, at most ``--restarts`` times. The summary
(``OUT/summary.json`` and a Markdown table on stdout) gives per target: executions, crashes
(exceptions that are not typed ``PersonacoreError`` rejections, ``InternalError`` from a Rust panic,
hangs, aborts; see ``fuzz/_harness.py``), seconds. Crash inputs are in ``OUT/crashes/``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
FUZZ = ROOT / "fuzz"

#: target name -> the harness command (after ``python``)
TARGETS: Dict[str, List[str]] = {
    "model_gguf": ["fuzz_model_gguf.py"],
    "model_safetensors": ["fuzz_model_hf.py", "model.safetensors"],
    "model_config_json": ["fuzz_model_hf.py", "config.json"],
    "model_tokenizer_json": ["fuzz_model_hf.py", "tokenizer.json"],
    "model_tokenizer_config_json": ["fuzz_model_hf.py", "tokenizer_config.json"],
    "model_generation_config_json": ["fuzz_model_hf.py", "generation_config.json"],
    "chat_template": ["fuzz_chat_template.py"],
    "vector_safetensors": ["fuzz_vector_file.py", "safetensors"],
    "vector_gguf": ["fuzz_vector_file.py", "gguf"],
    "vector_pt": ["fuzz_vector_file.py", "pt"],
    "trait_json": ["fuzz_trait_json.py"],
    "screen_jsonl": ["fuzz_screen_samples.py", "jsonl"],
    "screen_parquet": ["fuzz_screen_samples.py", "parquet"],
    "serve_request": ["fuzz_serve_request.py"],
}
#: not in the default list: every target in one process (the short run in CI)
EXTRA_TARGETS: Dict[str, List[str]] = {"all": ["fuzz_all.py"]}
_DONE = re.compile(r"^Done (\d+) runs in (\d+) second", re.M)
_ARTIFACT = re.compile(r"Test unit written to (\S+)")


def run_target(name: str, args: argparse.Namespace) -> Dict[str, object]:
    """Run one target until ``args.runs`` executions are done; its summary row."""
    out: Path = args.out
    executions, crashes, restarts = 0, 0, 0
    ended_early: List[str] = []
    start = time.monotonic()
    log = open(out / "logs" / f"{name}.log", "a")
    while executions < args.runs:
        harness = TARGETS.get(name) or EXTRA_TARGETS[name]
        cmd = [sys.executable, str(FUZZ / harness[0]), *harness[1:]]
        cmd += [
            "--out",
            str(out),
            f"--runs={args.runs - executions}",
            f"--seed={args.seed + restarts}",
            f"--timeout={args.timeout}",
        ]
        stats_file = out / "stats" / f"{name}.json"
        if stats_file.exists():
            stats_file.unlink()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(FUZZ), *(p for p in sys.path if p)]))
        proc = subprocess.run(
            cmd,
            cwd=FUZZ,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        log.write(proc.stdout)
        log.flush()
        # no file: the harness died before its first input ended (counted below as ending early)
        stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
        done = _DONE.search(proc.stdout)
        ran = int(done.group(1)) if done else int(stats.get("executions", 0))
        executions += ran
        crashes += int(stats.get("crashes", 0))
        if proc.returncode != 0 or not done or not stats:
            crashes += 1
            artifact = _ARTIFACT.search(proc.stdout)
            ended_early.append(
                f"exit {proc.returncode}" + (f": {artifact.group(1)}" if artifact else "")
            )
            restarts += 1
            if restarts > args.restarts:
                break
        elif ran == 0:
            break
    log.close()
    return {
        "target": name,
        "executions": executions,
        "crashes": crashes,
        "seconds": round(time.monotonic() - start, 1),
        "ended_early": ended_early,
    }


def main() -> int:
    """Parse the arguments, run the targets one after the other, print and write the summary."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=10_000, help="executions per target")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=20, help="seconds per input before a hang")
    ap.add_argument("--restarts", type=int, default=5)
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated target names")
    args = ap.parse_args()
    names = [t for t in args.targets.split(",") if t]
    unknown = [t for t in names if t not in TARGETS and t not in EXTRA_TARGETS]
    if unknown:
        ap.error(f"unknown targets {unknown}; known: {', '.join([*TARGETS, *EXTRA_TARGETS])}")
    args.out = args.out.resolve()
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        rows.append(run_target(name, args))
        r = rows[-1]
        print(
            f"{name}: {r['executions']} executions, {r['crashes']} crashes, {r['seconds']} s",
            flush=True,
        )
        summary = {
            "seed": args.seed,
            "runs_per_target": args.runs,
            "targets": rows,
            "executions": sum(int(r["executions"]) for r in rows),
            "crashes": sum(int(r["crashes"]) for r in rows),
            "seconds": round(sum(float(r["seconds"]) for r in rows), 1),
        }
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n| target | executions | crashes | seconds |\n| --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['target']} | {r['executions']} | {r['crashes']} | {r['seconds']} |")
    print(f"| total | {summary['executions']} | {summary['crashes']} | {summary['seconds']} |")
    return 1 if summary["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())
