#!/usr/bin/env bash
# The project's one test command: the Rust tests of the workspace (the engine and its kernels),
# then the Python tests.
# Needs the package installed first (`pip install ".[test]"`); the Python tests import the
# installed personacore. Extra arguments go to pytest (e.g. `bash scripts/test.sh -k parity`).
set -euo pipefail
cd "$(dirname "$0")/.."

# Same target dir and release profile as `pip install .` (maturin), so candle compiles once.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"

echo "== cargo test --release --workspace"
cargo test --release --workspace

echo "== python -m pytest -q tests"
python -m pytest -q tests "$@"
