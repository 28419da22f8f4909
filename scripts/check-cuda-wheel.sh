#!/usr/bin/env bash
# Checks the CUDA wheel that scripts/build-cuda.sh left in dist-cuda/ (or $OUT_DIR) where there is
# no GPU: installs it into a fresh venv (the host's numpy etc. visible, --no-deps), then
#  1. the extension loads no CUDA library (ldd lists none of libcuda, libcudart, libcublas, ...);
#  2. it imports, reports cuda_compiled() = True and cuda_available() = False, and refuses
#     device="cuda" with InvalidInputError, printing nothing to stderr;
#  3. the given tests (default: the CUDA error tests and the parity tests) pass with it, on the CPU.
#   bash scripts/check-cuda-wheel.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT_DIR:-dist-cuda}"
wheel=$(ls "$out"/personacore-*.whl | head -1)
venv=$(mktemp -d)/venv
python3 -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install -q --no-deps --force-reinstall "$wheel"
ext=$("$venv/bin/python" -c "import importlib.util as u; print(u.find_spec('personacore._core').origin)")
echo "extension: $ext"
if ldd "$ext" | grep -Ei 'libcuda|libcudart|libcublas|libcurand|libnvrtc'; then
  echo "check-cuda-wheel.sh: the extension links a CUDA library at load time" >&2
  exit 1
fi
readelf -d "$ext" | grep -E 'RUNPATH|RPATH' || true
cd "$(dirname "$venv")" # not the repository: `import personacore` must find the installed wheel
"$venv/bin/python" - <<'EOF' 2>stderr.txt
import personacore as pc
from personacore.engine.native import native

assert pc.__file__.startswith(__import__("sys").prefix), pc.__file__
assert native().cuda_compiled() is True
assert pc.cuda_available() is False
try:
    pc.load_model(device="cuda")
except pc.InvalidInputError as e:
    print("device='cuda' ->", e)
else:
    raise SystemExit("device='cuda' did not fail without a GPU")
EOF
if [ -s stderr.txt ]; then
  echo "check-cuda-wheel.sh: stderr was not empty:" >&2
  cat stderr.txt >&2
  exit 1
fi
cd - >/dev/null
if [ $# -eq 0 ]; then
  "$venv/bin/python" -m pytest -q tests/test_errors.py -k cuda
  set -- tests/test_parity.py
fi
"$venv/bin/python" -m pytest -q "$@"
echo "check-cuda-wheel.sh: ok ($wheel)"
