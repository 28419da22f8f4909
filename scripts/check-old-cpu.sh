#!/usr/bin/env bash
# Proof that the installed personacore runs on an x86-64 CPU without AVX/AVX2/FMA/F16C: runs
# scripts/old_cpu_check.py (forwards checked against numpy and transformers references) in user-mode
# QEMU emulating an older CPU. Uses whatever `import personacore` finds for $PYTHON (the installed
# wheel in a venv, or the tree with PYTHONPATH=python). Needs Debian's qemu-user
# (`apt-get install qemu-user`).
#   bash scripts/check-old-cpu.sh                   # tiny model, -cpu Nehalem
#   bash scripts/check-old-cpu.sh --default-model   # also the default GGUF, f32 and quantized=True
# Env: PYTHON (default python), QEMU_CPU (default Nehalem: SSE4.2, no AVX).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v qemu-x86_64 >/dev/null || { echo "qemu-x86_64 not found (apt-get install qemu-user)" >&2; exit 2; }
# The interpreter binary itself (a pyenv shim is a shell script; a venv's python keeps its path so
# the venv's site-packages are found).
py=$("${PYTHON:-python}" -c 'import sys; print(sys.executable)')
exec qemu-x86_64 -cpu "${QEMU_CPU:-Nehalem}" "$py" scripts/old_cpu_check.py "$@"
