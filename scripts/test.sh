#!/usr/bin/env bash
# The Python tests, against the installed personacore (a wheel, or `pip install .`); needs no Rust
# toolchain. Install with the test extras first (`pip install ".[test]"` or
# `pip install "personacore-….whl[test]"`). Extra arguments go to pytest
# (e.g. `bash scripts/test.sh -k parity`). The Rust tests run from the tree: scripts/test-rust.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

where=$(python -c 'import os, personacore; print(os.path.dirname(personacore.__file__))')
echo "== python -m pytest -q tests  (personacore from $where)"
python -m pytest -q tests "$@"
