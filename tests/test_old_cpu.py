"""The installed engine on an x86-64 CPU without AVX/AVX2/FMA/F16C (user-mode QEMU, Nehalem).

A build that assumed any of those instruction sets dies there with SIGILL at import; a build that
picks its kernels at run time takes the baseline paths and must still match the reference
(scripts/old_cpu_check.py: a tiny Llama's hidden states and logits against the numpy forward; ~7 s.
`bash scripts/check-old-cpu.sh --default-model` adds the default GGUF in f32 and quantized=True
against transformers, ~7 min under emulation, so it is not part of the suite). Skipped where
Debian's qemu-user is not installed.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    platform.machine() != "x86_64" or shutil.which("qemu-x86_64") is None,
    reason="needs an x86_64 host with qemu-x86_64 (apt-get install qemu-user)",
)


def test_forward_on_a_cpu_without_avx():
    env = {**os.environ, "PYTHON": sys.executable, "QEMU_CPU": "Nehalem"}
    run = subprocess.run(
        ["bash", str(ROOT / "scripts" / "check-old-cpu.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, f"exit status {run.returncode} under qemu -cpu Nehalem:\n{out}"
    # candle's own feature probe ran inside the emulated CPU, which has no AVX2
    assert "avx2_enabled=False" in out, out
    assert "old-cpu check: ok" in out, out
