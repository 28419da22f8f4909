"""The short, fixed-seed fuzz run CI does: every harness of ``fuzz/`` in one process
(``scripts/fuzz.py --targets all``: the first input byte picks the target), 2500 executions,
libFuzzer seed 7, and no crash. The long run (a million executions, one process per target) is
run by hand; its result is in README.md ("Fuzzing")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")  # CI installs it (.ci/run); skipped only where it is missing

ROOT = Path(__file__).resolve().parents[1]


def test_short_fixed_seed_fuzz_run_has_no_crash(tmp_path):
    out = tmp_path / "fuzz"
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "fuzz.py"), "--out", str(out)]
        + ["--runs", "2500", "--seed", "7", "--targets", "all", "--timeout", "60"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = json.loads((out / "summary.json").read_text())
    crashes = sorted(p.name for p in (out / "crashes").iterdir())
    assert r.returncode == 0 and summary["crashes"] == 0, (r.stdout[-3000:], crashes)
    assert summary["executions"] == 2500
