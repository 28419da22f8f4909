#!/usr/bin/env bash
# The Rust tests of the workspace (the engine and its kernels), from the tree. Same target dir and
# release profile as `pip install .` and scripts/build-wheels.sh (maturin), so candle compiles once.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"

echo "== cargo test --release --workspace"
cargo test --release --workspace
