"""``personacore demo`` end to end, as a user runs it: a subprocess on the default model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _demo(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run(
        [sys.executable, "-m", "personacore", "demo", "--out-dir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


@pytest.fixture(scope="module")
def demo_json(default_model_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo-json")
    proc = _demo("--json", "--max-new-tokens", "32", tmp_path=tmp)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_plain_output_shows_the_workflow(default_model_path, tmp_path):
    proc = _demo("--max-new-tokens", "32", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "\x1b[" not in out  # not a terminal: no color codes
    unsteered, steered = out.split("== unsteered ==")[1].split("== steered")
    # the early warning comes before the first scored reply token
    warn = unsteered.index("early warning (last prompt token")
    first_token = re.search(r"\S\[[+-]\d+\.\d\d\]", unsteered)
    assert first_token is not None and warn < first_token.start()
    assert re.search(r"P\(impolite\) = \d\.\d\d", unsteered)
    assert "! alert: impolite@" in unsteered
    assert "pc.Cap(impolite" in steered
    assert "reply mean score" in out and "alerts (prompt + reply)" in out
    audit = tmp_path / "unsteered.audit.jsonl"
    first = audit.read_text().splitlines()[0]
    assert f"audit log, unsteered ({audit}" in out and first in out
    pytest.importorskip("plotly")
    report = tmp_path / "demo.html"
    assert f"report of both runs: {report}" in out
    html = report.read_text()
    for figure in ("separation", "projections", "generation-1", "generation-2"):
        assert f'data-figure="{figure}"' in html


def test_json_output_has_both_runs(demo_json, tmp_path):
    runs = demo_json["runs"]
    assert set(runs) == {"unsteered", "steered"}
    un, st = runs["unsteered"]["summary"], runs["steered"]["summary"]
    assert st["mean"] < un["mean"]
    assert demo_json["calibration"]["layer"] == demo_json["layer"]
    assert un["alerts"] >= 1 and un["alerts"] == len(
        [e for e in runs["unsteered"]["events"] if e["kind"] == "alert"]
    )
    assert 0.0 <= un["early_warning_probability"] <= 1.0
    assert un["early_warning_layer"] == demo_json["early_warning_layer"]
    for run in runs.values():
        assert len(run["tokens"]) == run["summary"]["tokens"] and run["text"]
        lines = Path(run["audit_log"]).read_text().splitlines()
        assert run["audit_lines"] == lines
        assert all(json.loads(line)["vector"] == "impolite" for line in lines)
    assert demo_json["calibration"]["threshold"] == demo_json["threshold"]
    print(f"demo --json took {demo_json['seconds']:.1f} s (model load and both runs)")


def test_another_trait_and_bad_options(default_model_path, tmp_path):
    proc = _demo("--trait", "grumpy", tmp_path=tmp_path)
    assert proc.returncode != 0 and "grumpy" in proc.stderr
    proc = _demo("--max-new-tokens", "0", tmp_path=tmp_path)
    assert proc.returncode != 0 and "--max-new-tokens" in proc.stderr
