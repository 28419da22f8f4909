"""The compiled engine (``personacore._core``), imported once, and what it was built with."""

from __future__ import annotations

import logging
import platform
from types import ModuleType

__all__ = ["native", "avx2_enabled", "amx_available", "cuda_available"]

_LOG = logging.getLogger("personacore")
_LOGGED_BUILD = False


def native() -> ModuleType:
    """Import the compiled engine, with a helpful message when it has not been built.

    The first import logs (logger ``personacore``) whether the CPU kernels have AVX2 and how many
    threads the engine uses; an x86 CPU without AVX2 is logged as a warning (quantized matmuls are
    slow); on other CPUs (ARM) our x86 kernels are compiled out and candle's and the portable ones run.
    """
    global _LOGGED_BUILD
    try:
        import personacore._core as _core
    except ImportError as e:  # pragma: no cover - only without a build
        raise ImportError(
            "personacore's native engine (personacore._core) is not built; install the package "
            "with `pip install .` from the repository root"
        ) from e
    if not _LOGGED_BUILD:
        _LOGGED_BUILD = True
        machine = platform.machine().lower()
        if _core.avx2_enabled():
            _LOG.info("personacore engine: AVX2 on, %d CPU threads", _core.num_threads())
        elif machine not in ("x86_64", "amd64", "i386", "i686"):
            # not a missing CPU feature: our AVX2 / AVX-512 / AMX kernels are compiled out off x86
            _LOG.info(
                "personacore engine: %s CPU, candle's kernels and our portable loops (our SIMD "
                "kernels are x86-64 only), %d CPU threads",
                machine,
                _core.num_threads(),
            )
        else:
            _LOG.warning(
                "personacore engine: this CPU has no AVX2, so the portable (SSE2) kernels run: "
                "correct, but slower"
            )
    return _core


def avx2_enabled() -> bool:
    """True when this CPU has AVX2 (detected at run time; the engine then uses its AVX2 kernels)."""
    return bool(native().avx2_enabled())


def amx_available() -> bool:
    """True when this CPU runs AMX-BF16 tiles, so ``load_model(..., precision="high")`` uses them."""
    return bool(native().amx_available())


def cuda_available() -> bool:
    """True when ``load_model(..., device="cuda")`` can run here: the engine was built with CUDA
    support (see docs/gpu.md; the default wheel is CPU-only) and the NVIDIA driver, the CUDA
    libraries and a GPU are present."""
    return bool(native().cuda_available())
