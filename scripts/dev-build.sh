#!/usr/bin/env bash
# Development loop without reinstalling: build the native module in release mode and put it next
# to the Python sources (python/personacore/_core.*.so, git-ignored). Pair it with an editable
# install (`pip install -e .`) or PYTHONPATH=python so `import personacore` reads the tree.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release -p personacore-py
suffix=$(python -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
# copy, then rename: processes that have the old module mapped keep reading it (no SIGBUS)
cp "$CARGO_TARGET_DIR/release/lib_core.so" "python/personacore/._core$suffix.tmp"
mv -f "python/personacore/._core$suffix.tmp" "python/personacore/_core$suffix"
echo "installed python/personacore/_core$suffix"
