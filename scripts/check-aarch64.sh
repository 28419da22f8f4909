#!/usr/bin/env bash
# The workspace on 64-bit ARM Linux (aarch64-unknown-linux-gnu), checked from an x86-64 host. Our
# x86 kernels (AVX2 / AVX-512 / AMX) are compiled out there by their `cfg(target_arch = "x86_64")`
# guards; the portable paths and candle's kernels (NEON) remain. Adds the target's standard library
# with rustup on first use.
#   bash scripts/check-aarch64.sh               # cargo check of every crate and target (no linking)
#   bash scripts/check-aarch64.sh --run [ARGS]  # build the Rust tests of the engine and its kernels
#     for aarch64 (linked by zig against glibc 2.28) and run them under qemu-aarch64; ARGS go to
#     the test binaries (a name filter, `--skip NAME`, `--test-threads N`)
#   bash scripts/check-aarch64.sh --wheel       # the abi3 wheel, manylinux_2_28 aarch64, into
#     $OUT_DIR (default dist-aarch64/), built by `maturin --zig`; auditwheel checks its tag
#   bash scripts/check-aarch64.sh --python [--default-model]  # that wheel installed for an ARM
#     CPython (Debian's arm64 python3, unpacked under $CARGO_TARGET_DIR/aarch64-python) and run
#     under qemu-aarch64: scripts/old_cpu_check.py, a tiny Llama against the numpy forward and
#     with --default-model the default GGUF (f32 and quantized=True) against transformers
#   bash scripts/check-aarch64.sh --pytest tests/test_x.py ...  # the same install, running pytest
#     on the named tests (ARGS go to pytest)
# --run needs `pip install ziglang`, Debian's qemu-user and an aarch64 glibc to load the binaries
# (`apt-get install qemu-user libc6-arm64-cross libgcc-s1-arm64-cross`, which puts it in
# /usr/aarch64-linux-gnu; PERSONACORE_AARCH64_SYSROOT overrides that path). --wheel needs
# `pip install "maturin>=1.5,<2" auditwheel ziglang`. The tests that read the default GGUF find
# it where the x86 tests do (~/.cache/personacore, PERSONACORE_CACHE or PERSONACORE_TEST_GGUF).
# The Python binding is checked or built as abi3 (pyo3's `abi3-py39`): no ARM Python is needed to
# build it. --python and --pytest need Debian's apt-get and dpkg (the ARM CPython comes from
# Debian's arm64 packages; PERSONACORE_AARCH64_PYTHON_ROOT=<dir with usr/bin/python3.X> uses
# another) and pip, which fetches the aarch64 wheels of the dependencies (numpy, scikit-learn, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-gnu
mode="${1:---check}"
[ $# -gt 0 ] && shift
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
rustup target list --installed | grep -qx "$target" || rustup target add "$target"

zig_linker() {
  PERSONACORE_ZIG_PYTHON=$(command -v python)
  export PERSONACORE_ZIG_PYTHON
  "$PERSONACORE_ZIG_PYTHON" -m ziglang version >/dev/null 2>&1 \
    || { echo "check-aarch64.sh: zig not found (pip install ziglang)" >&2; exit 2; }
  export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER="$PWD/scripts/aarch64-linker/cc"
}

# An ARM CPython in $2 (usr/bin/python3.X with its glibc), from Debian's arm64 packages unpacked
# with dpkg -x: apt reads the host's sources.list into a private state directory under $1, so the
# host's apt configuration and installed packages are untouched.
aarch64_python_root() {
  local state="$1/apt" root="$2"
  mkdir -p "$state/lists/partial" "$state/cache/archives/partial" "$state/debs"
  touch "$state/status"
  local apt_opts=(-o APT::Architecture=arm64 -o APT::Architectures::=arm64
    -o Dir::State::Lists="$state/lists" -o Dir::State::status="$state/status"
    -o Dir::Cache="$state/cache")
  apt-get "${apt_opts[@]}" update -qq
  # the interpreter Debian's python3 stands for (bookworm: python3.11)
  local py
  py=$(apt-cache "${apt_opts[@]}" depends python3-minimal | grep -Eo 'python3\.[0-9]+-minimal' | head -1)
  py=${py%-minimal}
  (cd "$state/debs" && apt-get "${apt_opts[@]}" download "$py-minimal" "lib$py-minimal" \
    "lib$py-stdlib" libc6 libgcc-s1 libstdc++6 zlib1g libexpat1 libffi8 libbz2-1.0 liblzma5 \
    libcrypt1 libuuid1 libsqlite3-0 libssl3 libtinfo6 libncursesw6 libreadline8)
  rm -rf "$root"
  mkdir -p "$root"
  for deb in "$state"/debs/*.deb; do dpkg -x "$deb" "$root"; done
}

start=$(date +%s)
case "$mode" in
  --check)
    cargo check --release --workspace --all-targets --target "$target"
    echo "cargo check --target $target: ok ($(( $(date +%s) - start )) s)"
    ;;
  --run)
    zig_linker
    command -v qemu-aarch64 >/dev/null \
      || { echo "check-aarch64.sh: qemu-aarch64 not found (apt-get install qemu-user)" >&2; exit 2; }
    sysroot="${PERSONACORE_AARCH64_SYSROOT:-/usr/aarch64-linux-gnu}"
    [ -e "$sysroot/lib/ld-linux-aarch64.so.1" ] || {
      echo "check-aarch64.sh: no aarch64 glibc in $sysroot (apt-get install libc6-arm64-cross" \
        "libgcc-s1-arm64-cross, or set PERSONACORE_AARCH64_SYSROOT)" >&2
      exit 2
    }
    # cargo starts every test binary through the runner: user-mode QEMU, loading the ARM glibc
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L $sysroot"
    packages=(-p personacore-kernels -p personacore)
    cargo test --release --no-run --target "$target" "${packages[@]}"
    echo "test binaries built for $target in $(( $(date +%s) - start )) s"
    start=$(date +%s)
    cargo test --release --target "$target" "${packages[@]}" -- "$@"
    echo "tests ran under qemu-aarch64 in $(( $(date +%s) - start )) s"
    ;;
  --wheel)
    for tool in maturin auditwheel; do
      command -v "$tool" >/dev/null \
        || { echo "check-aarch64.sh: $tool not found (pip install \"maturin>=1.5,<2\" auditwheel ziglang)" >&2; exit 2; }
    done
    zig_linker
    out="${OUT_DIR:-dist-aarch64}"
    rm -f "$out"/personacore-*-manylinux*_aarch64.whl
    maturin build --release --target "$target" --zig --compatibility manylinux_2_28 --out "$out"
    echo "wheel built in $(( $(date +%s) - start )) s"
    wheel=$(ls "$out"/personacore-*-abi3-*aarch64.whl)
    report=$(auditwheel show "$wheel")
    echo "$report"
    if ! grep -Eq 'manylinux_2_(1[0-9]|2[0-8])_aarch64' <<<"$report"; then
      echo "check-aarch64.sh: auditwheel does not place $wheel at manylinux_2_28 or older" >&2
      exit 1
    fi
    ls -l "$wheel"
    ;;
  --python|--pytest)
    # The wheel in $OUT_DIR (from --wheel) imported by an ARM CPython under qemu-aarch64, with the
    # aarch64 wheels of its dependencies (and pytest for --pytest).
    command -v qemu-aarch64 >/dev/null \
      || { echo "check-aarch64.sh: qemu-aarch64 not found (apt-get install qemu-user)" >&2; exit 2; }
    out="${OUT_DIR:-dist-aarch64}"
    wheel=$(ls "$out"/personacore-*-abi3-*aarch64.whl 2>/dev/null) \
      || { echo "check-aarch64.sh: no aarch64 wheel in $out (run --wheel first)" >&2; exit 2; }
    work="$CARGO_TARGET_DIR/aarch64-python"
    root="${PERSONACORE_AARCH64_PYTHON_ROOT:-$work/root}"
    if [ -z "${PERSONACORE_AARCH64_PYTHON_ROOT:-}" ] && ! ls "$root"/usr/bin/python3.* >/dev/null 2>&1; then
      aarch64_python_root "$work" "$root"
    fi
    python_bin=$(ls "$root"/usr/bin/python3.* | grep -E 'python3\.[0-9]+$' | head -1)
    pyver=$(basename "$python_bin"); pyver=${pyver#python}
    site="$work/site-packages"
    rm -rf "$site"
    extra=(); [ "$mode" = --pytest ] && extra=(pytest)
    python -m pip install --quiet --target "$site" --only-binary=:all: --implementation cp \
      --python-version "$pyver" --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 \
      --platform manylinux2014_aarch64 "$wheel" "${extra[@]}"
    echo "installed $(basename "$wheel") and its dependencies for CPython $pyver aarch64 in $site"
    start=$(date +%s)
    if [ "$mode" = --python ]; then
      # forwards against numpy and transformers references; ARGS: --default-model
      PYTHONPATH="$site" qemu-aarch64 -L "$root" "$python_bin" scripts/old_cpu_check.py "$@"
    else
      # the named tests (ARGS go to pytest), against the installed wheel as scripts/test.sh does
      PYTHONPATH="$site" qemu-aarch64 -L "$root" "$python_bin" -m pytest -q -p no:cacheprovider "$@"
    fi
    echo "ran under qemu-aarch64 in $(( $(date +%s) - start )) s"
    ;;
  *)
    echo "usage: bash scripts/check-aarch64.sh [--check | --run [TEST ARGS] | --wheel | --python [--default-model] | --pytest [PYTEST ARGS]]" >&2
    exit 2
    ;;
esac
