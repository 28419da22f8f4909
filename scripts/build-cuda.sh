#!/usr/bin/env bash
# Builds personacore with CUDA support (candle's CUDA backend, `--features cuda`) without a system
# CUDA toolkit: nvcc, the CUDA headers and the runtime come from NVIDIA's PyPI wheels (CUDA 13),
# installed into a build venv. No GPU is needed to build (the compute capability is given, not
# detected). See docs/gpu.md.
#
#   bash scripts/build-cuda.sh              # venv + toolkit, then the wheel (engine and binding,
#                                           # `maturin build --features cuda`) into dist-cuda/
#   bash scripts/build-cuda.sh --engine     # only `cargo build -p personacore --features cuda`
# (Not one after the other: the binding's dependencies enable other features of crates shared
# with the engine, so the wheel build would compile candle's CUDA kernels a second time.)
#
# Environment (all optional):
#   CUDA_COMPUTE_CAP=80        the compute capability compiled for (default 80, Ampere). candle's
#                              kernels are PTX for it, JIT-compiled by the driver on any newer GPU;
#                              its object-code kernels (GGUF quantized matmuls, MoE) get SASS for it
#                              plus the same PTX (scripts/cuda-nvcc). 90 builds for Hopper only (no
#                              JIT there); CUDA 13 compiles for 75 (Turing) and newer.
#   CUDA_EXTRA_COMPUTE_CAPS="" more capabilities to add SASS for, e.g. "86 90" (longer build).
#   PERSONACORE_CUDA_VENV      the build venv (default target/cuda-venv).
#   PERSONACORE_CUDA_VERSION   the NVIDIA wheels' version (default 13.2.86).
#   CARGO_TARGET_DIR           cargo's target dir (default target/cuda, apart from the CPU build).
#   OUT_DIR                    where the wheel goes (default dist-cuda).
#
# Nothing CUDA is needed to load the extension: the CUDA runtime is linked statically, and the
# patched copy of cudarc built here turns candle's `dynamic-linking` into cudarc's
# `dynamic-loading`, so the driver (libcuda), cuBLAS, cuRAND and NVRTC are opened with dlopen when
# a CUDA device is first used. The wheel imports and runs on the CPU on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
mode="${1:-all}"
case "$mode" in all | --engine) ;; *) echo "usage: build-cuda.sh [--engine]" >&2; exit 2 ;; esac

export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
export CUDA_EXTRA_COMPUTE_CAPS="${CUDA_EXTRA_COMPUTE_CAPS:-}"
venv="${PERSONACORE_CUDA_VENV:-$root/target/cuda-venv}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target/cuda}"
out="${OUT_DIR:-$root/dist-cuda}"
# One CUDA release for every piece. NVIDIA's CUDA 13 wheels carry a whole toolkit (nvcc, cicc,
# cudafe++, fatbinary, headers with CCCL, the runtime) under site-packages/nvidia/cu13/; the
# CUDA 12 wheels (nvidia-cuda-nvcc-cu12) hold only ptxas, libnvvm and libdevice, no nvcc or cicc,
# so they cannot compile CUDA C++. cudarc 0.19.10 knows CUDA up to 13.4. The copy of the tree
# below is made with git, so the script runs in a git checkout.
cuda_version="${PERSONACORE_CUDA_VERSION:-13.2.86}"
packages=("nvidia-cuda-nvcc==$cuda_version" "nvidia-nvvm==$cuda_version"
  "nvidia-cuda-crt==$cuda_version" "nvidia-cuda-runtime==$cuda_version"
  "nvidia-cuda-cccl==$cuda_version")

# 1. The build venv (idempotent: pip skips what is installed).
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q "${packages[@]}" "maturin>=1.5,<2"
site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
toolkit="$site/nvidia/cu13"
[ -x "$toolkit/bin/nvcc" ] || { echo "build-cuda.sh: no nvcc in $toolkit" >&2; exit 1; }

# 2. The CUDA root candle's build is pointed at: bin/nvcc is scripts/cuda-nvcc (the wheel's nvcc,
# which finds its own headers, cicc and libdevice, plus the gencode flags described there);
# lib64/ holds only the static CUDA runtime as libcudart.a, so that candle's `-lcudart` links it
# statically (no libcudart.so in the search path) and the extension needs no CUDA library to load.
cuda_root="$CARGO_TARGET_DIR/cuda-root"
rm -rf "$cuda_root"
mkdir -p "$cuda_root/bin" "$cuda_root/lib64"
ln -s "$toolkit/include" "$cuda_root/include"
ln -s "$toolkit/lib/libcudart_static.a" "$cuda_root/lib64/libcudart.a"
sed -e "s|@REAL_NVCC@|$toolkit/bin/nvcc|" scripts/cuda-nvcc >"$cuda_root/bin/nvcc"
chmod +x "$cuda_root/bin/nvcc"
export CUDA_ROOT="$cuda_root" CUDA_PATH="$cuda_root" CUDA_HOME="$cuda_root"
export NVCC="$cuda_root/bin/nvcc" PATH="$cuda_root/bin:$venv/bin:$PATH"
export LIBRARY_PATH="$cuda_root/lib64${LIBRARY_PATH:+:$LIBRARY_PATH}"
nvcc --version | tail -2

# 3. cudarc with the driver loaded at run time. candle-core asks cudarc for `dynamic-linking`
# (libcuda.so, libcublas.so, ... as link-time dependencies); the copy under the target dir maps
# that feature onto cudarc's own `dynamic-loading` (dlopen on first use).
cudarc_src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10 2>/dev/null | head -1)
if [ -z "$cudarc_src" ]; then
  cargo fetch --locked
  cudarc_src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10 | head -1)
fi
cudarc="$CARGO_TARGET_DIR/patched/cudarc-0.19.10"
# In build.rs every `feature = "dynamic-linking"` condition is renamed to a feature nobody enables
# (no "both features" panic, no link directives; cargo warns about the unknown name, harmlessly).
if [ ! -f "$cudarc/.personacore-patched" ]; then
  rm -rf "$cudarc"
  mkdir -p "$(dirname "$cudarc")"
  cp -r "$cudarc_src" "$cudarc"
  sed -i 's/^dynamic-linking = \[\]$/dynamic-linking = ["dynamic-loading"]/' "$cudarc/Cargo.toml"
  sed -i 's/feature = "dynamic-linking"/feature = "dynamic-linking-as-loading"/g' "$cudarc/build.rs"
  grep -q '^dynamic-linking = \["dynamic-loading"\]$' "$cudarc/Cargo.toml" \
    || { echo "build-cuda.sh: could not patch $cudarc/Cargo.toml" >&2; exit 1; }
  ! grep -q 'feature = "dynamic-linking"' "$cudarc/build.rs" \
    || { echo "build-cuda.sh: could not patch $cudarc/build.rs" >&2; exit 1; }
  touch "$cudarc/.personacore-patched"
fi
patch_config="patch.crates-io.cudarc.path=\"$cudarc\""

# The build runs in a copy of the tree's files (tracked and untracked, not ignored; times kept, so
# cargo rebuilds only what changed): the path patch rewrites cudarc's entry in Cargo.lock, which
# must not touch the tree (nor race a CPU build running in it).
src="$CARGO_TARGET_DIR/src"
rm -rf "$src"
mkdir -p "$src"
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xpf - -C "$src"
cd "$src"

start=$(date +%s)
if [ "$mode" = "--engine" ]; then
  cargo build --release -p personacore --features cuda --config "$patch_config"
  echo "engine built with CUDA (compute capability $CUDA_COMPUTE_CAP) in $(($(date +%s) - start)) s"
  exit 0
fi

# 4. The wheel (it builds the engine too). The extension's RUNPATH is the lib/ folder of
# NVIDIA's CUDA 13 wheels as they install next to the package (site-packages/nvidia/cu13/lib),
# where cuBLAS, cuRAND and NVRTC are opened from when a CUDA device is first used
# (LD_LIBRARY_PATH works too).
rpath='$ORIGIN/../nvidia/cu13/lib'
mkdir -p "$out"
start=$(date +%s)
maturin build --release --features cuda --config "$patch_config" --out "$out" \
  -- -C "link-arg=-Wl,-rpath,$rpath"
echo "wheel built in $(($(date +%s) - start)) s:"
ls -l "$out"
