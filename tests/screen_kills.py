"""Kill ``personacore screen`` with SIGKILL at random moments, resume each time, compare.

Used by tests/test_screen.py (a few kills, in CI) and scripts/screen_kill_test.py (20 kills per
output format, run by hand; its result is recorded in README.md, Bad input and faults). On a tiny
random-weight model:

    report = kill_and_resume(workdir, suffix=".jsonl", kills=20, seed=19)

writes a model, a vector and ``n_samples`` JSONL records (one malformed) into ``workdir``, runs
one uninterrupted ``personacore screen --method delta`` as the reference, then starts the same
command and SIGKILLs it at a random moment, ``kills`` times, each later start with ``--resume``,
and a last ``--resume`` runs to the end. Moments are drawn from ``random.Random(seed)``: one kill
in five lands at a uniform moment of start-up (imports, model load, reading the state); the
others wait until the run has committed a batch of its own and the committed rows pass a random
target (``kills`` sorted targets over the input), then a uniform 0 .. 2 batch times more, so they land inside batches and their commits,
spread over the whole run, which is still unfinished at the last kill.
The report says how many kills happened while rows were being committed, and whether the final
output equals the reference with every sample exactly once.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
_WORDS = "the cat dog runs fast slow red blue a an is was very small big home".split()


@dataclass
class KillReport:
    """What one kill-and-resume run saw."""

    suffix: str
    kills: int = 0
    kills_after_first_commit: int = 0
    committed_rows_at_kills: List[Optional[int]] = field(default_factory=list)
    equal_to_reference: bool = False
    indices_exactly_once: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Every kill resumed into the reference output, each sample once."""
        return self.equal_to_reference and self.indices_exactly_once


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))


def prepare(workdir: Path, n_samples: int) -> None:
    """A tiny model, a vector file and ``n_samples`` records (record 3 has no response)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import personacore as pc
    from tiny_models import write_tiny_model

    write_tiny_model(workdir / "model", "llama", seed=0)
    model = pc.load_model(str(workdir / "model"))
    rng = np.random.default_rng(0)
    directions = rng.standard_normal((model.num_layers + 1, model.hidden_size)).astype(np.float32)
    pc.save_vector(pc.PersonaVector(directions, layer=2, name="t"), workdir / "t.safetensors")
    with open(workdir / "in.jsonl", "w") as f:
        for i in range(n_samples):
            rec = {"prompt": " ".join(rng.choice(_WORDS, 5)), "id": f"s{i}"}
            if i != 3:
                rec["response"] = " ".join(rng.choice(_WORDS, 8))
            f.write(json.dumps(rec) + "\n")


def _cmd(workdir: Path, src: Path, out: Path, *extra: str) -> List[str]:
    return [sys.executable, "-m", "personacore", "screen", "--model", str(workdir / "model"),
            "--vector", f"t={workdir / 't.safetensors'}", "--input", str(src), "--out", str(out),
            "--method", "delta", "--max-new-tokens", "3", "--batch-size", "4", "--quiet",
            *extra]  # fmt: skip


def _timed_run(cmd: List[str]) -> float:
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, env=_env(), stderr=subprocess.DEVNULL, timeout=600)
    return time.monotonic() - t0


def _committed_rows(out: Path) -> Optional[int]:
    try:
        return json.loads((Path(str(out) + ".partial") / "state.json").read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return None


def _rows(path: Path) -> List[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in path.read_text().splitlines()]


def kill_and_resume(
    workdir: Path, suffix: str, kills: int, seed: int, n_samples: int = 400
) -> KillReport:
    """See the module docstring."""
    t_start = time.monotonic()
    workdir = Path(workdir)
    src = workdir / "in.jsonl"
    if not src.exists():
        prepare(workdir, n_samples)
    one = workdir / "one.jsonl"
    one.write_text(src.read_text().splitlines()[0] + "\n")
    startup = _timed_run(_cmd(workdir, one, workdir / f"one-out{suffix}"))
    ref = workdir / f"ref{suffix}"
    work = max(_timed_run(_cmd(workdir, src, ref)) - startup, 0.1)
    out, partial = workdir / f"out{suffix}", Path(str(workdir / f"out{suffix}") + ".partial")
    rng = random.Random(seed)
    report = KillReport(suffix=suffix)
    batch_time = work / (n_samples / 4)
    targets = sorted(rng.sample(range(1, n_samples - 4), kills))
    for k in range(kills):
        extra = ["--resume"] if k else []
        proc = subprocess.Popen(
            _cmd(workdir, src, out, *extra), env=_env(), stderr=subprocess.DEVNULL
        )
        if rng.random() < 0.2:  # during start-up (imports, model load, reading the state)
            time.sleep(rng.uniform(0.0, startup))
        else:  # once this run has committed a batch and passed the target, within 2 batches
            goal = max(targets[k], (_committed_rows(out) or 0) + 1)
            deadline = time.monotonic() + 600
            while proc.poll() is None and time.monotonic() < deadline:
                if (_committed_rows(out) or 0) >= goal:
                    break
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 2 * batch_time))
        if proc.poll() is None:
            before = _committed_rows(out)
            proc.send_signal(signal.SIGKILL)
            report.kills += 1
            report.kills_after_first_commit += bool(before)
        proc.wait()
        report.committed_rows_at_kills.append(_committed_rows(out))
    subprocess.run(_cmd(workdir, src, out, "--resume"), check=True, env=_env(),
                   stderr=subprocess.DEVNULL, timeout=600)  # fmt: skip
    if suffix == ".jsonl":
        report.equal_to_reference = out.read_bytes() == ref.read_bytes()
    else:
        report.equal_to_reference = _rows(out) == _rows(ref)
    indices = [r["index"] for r in _rows(out)]
    expected = [i for i in range(n_samples) if i != 3]  # record 3 is malformed: skipped
    report.indices_exactly_once = indices == expected and not partial.exists()
    report.seconds = time.monotonic() - t_start
    return report
