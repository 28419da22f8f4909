#!/usr/bin/env bash
# Cross-check that the workspace compiles for 64-bit ARM Linux (aarch64-unknown-linux-gnu): type
# and borrow checks of every crate for that target (`cargo check`, no linking, so no ARM C
# toolchain is needed). Our x86 kernels (AVX2 / AVX-512 / AMX) are compiled out there by their
# `cfg(target_arch = "x86_64")` guards and the portable paths and candle's kernels (NEON) remain.
# Adds the target's standard library with rustup on first use. The Python binding is checked as
# abi3 (pyo3's `abi3-py39`), which needs no ARM Python interpreter.
#   bash scripts/check-aarch64.sh
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-gnu
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
rustup target list --installed | grep -qx "$target" || rustup target add "$target"
start=$(date +%s)
cargo check --release --workspace --all-targets --target "$target"
echo "cargo check --target $target: ok ($(( $(date +%s) - start )) s)"
