"""Fuzz the persona vector readers: ``pc.PersonaVector.load`` of ``.safetensors``, ``.gguf``, ``.pt``.

``python fuzz/fuzz_vector_file.py EXT --out DIR ...`` with EXT ``safetensors``, ``gguf`` or ``pt``.
Seeds: a vector saved by personacore in that format; for ``.pt`` also pickles whose ``__reduce__``
calls :func:`canary.trip`, bare and inside torch's zip layout. The ``.pt`` reader must never run a
pickle's code: after every input the harness checks that the canary was not called and that no
process was started, a shared library loaded or code compiled (a Python audit hook), and counts
either as a crash. ``.pt`` files are read with torch (``torch.load(weights_only=True)``) and with
personacore's own reader for users without torch, so both are fuzzed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import canary
import seeds
from _harness import Crash, main

# modules PersonaVector.load imports on first use: imported (compiled) here, before the audit hook
# is watching, so that their import is not taken for a file running code
import personacore.vectors.builtin  # noqa: E402,F401
from personacore import PersonaVector
from personacore.errors import PersonacoreError
from personacore.vectors.io import VectorFormatError
from personacore.vectors.io import pt as pt_format

EXTS = ("safetensors", "gguf", "pt")
#: audit events that mean a file read ran code of its own (none may happen while reading)
FORBIDDEN_EVENTS = (
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.fork",
    "os.kill",
    "subprocess.Popen",
    "ctypes.dlopen",
    "compile",
    "socket.connect",
    "shutil.rmtree",
    "os.remove",
)
_SEEN = []
_ARMED = [False]


def _audit(event: str, args: tuple) -> None:
    if _ARMED[0] and event.startswith(FORBIDDEN_EVENTS):
        _SEEN.append(f"{event}{args!r}"[:200])


def make_one_input(ext: str):
    """The per-input function: write ``data`` as ``v.<ext>`` and load it."""

    def one_input(data: bytes, work: Path) -> None:
        path = work / f"v.{ext}"
        path.write_bytes(data)
        _ARMED[0] = True
        try:
            PersonaVector.load(path)
            if ext == "pt":
                try:  # the reader for users without torch, on the same bytes
                    pt_format.check_directions(pt_format._read_pt_without_torch(path), str(path))
                except VectorFormatError:
                    pass
        except PersonacoreError:
            if ext == "pt":
                try:
                    pt_format._read_pt_without_torch(path)
                except VectorFormatError:
                    pass
            raise
        finally:
            _ARMED[0] = False

    return one_input


def check_nothing_ran() -> None:
    """A crash when a pickle called the canary or the audit hook saw a forbidden event."""
    if canary.TRIPPED or _SEEN:
        what = f"canary calls {canary.TRIPPED}, audit events {_SEEN}"
        canary.TRIPPED.clear()
        _SEEN.clear()
        raise Crash(f"reading a vector file ran code: {what}")


def seed_list(ext: str):
    """The format's seeds."""
    if ext == "pt":
        return seeds.pt_seeds()
    return [seeds.vector_file(f".{ext}")]


if __name__ == "__main__":
    ext = sys.argv[1] if len(sys.argv) > 1 else ""
    if ext not in EXTS:
        sys.exit(f"usage: fuzz_vector_file.py EXT --out DIR ...; EXT one of {', '.join(EXTS)}")
    del sys.argv[1]
    if ext == "pt":
        try:
            import torch  # noqa: F401 - imported before the audit hook is armed
        except ImportError:
            pass
    sys.addaudithook(_audit)
    main(f"vector_{ext}", lambda: seed_list(ext), make_one_input(ext), check_nothing_ran)
