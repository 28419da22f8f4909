"""Persona vector files: ``.safetensors`` (ours), ``.pt`` (persona_vectors), ``.gguf`` (llama.cpp / repeng).

:func:`save_vector` and :func:`load_vector` pick the format from the file extension (or ``format=``)
and hand the work to one module per format, each using that format's own library:

- :mod:`.safetensors` (the ``safetensors`` package): tensor ``directions`` and our metadata;
- :mod:`.pt` (torch; a restricted reader when torch is missing): persona_vectors' bare tensor;
- :mod:`.gguf` (the ``gguf`` package): a llama.cpp / repeng control vector.

Rows follow docs/conventions.md ("Layers", "Control-vector numbering", "File formats"):
``directions`` is float32 ``[num_layers + 1, hidden]``, row 0 = embeddings, row ``i`` = output of
decoder block ``i`` (1-based), row ``num_layers`` = the final norm. Our metadata travels as JSON
(``json.dumps({"format_version", "name", "layer", "metadata"})``) and round-trips nested dicts,
lists, floats (exactly), ints, strings and ``None``; numpy arrays and scalars become lists and
Python numbers, tuples become lists, non-string dict keys become strings.

Saving writes a temporary file next to the target and renames it over the target, so an error never
leaves a half-written file or destroys the previous one; the file gets the mode the umask gives a
new file, whatever the format's library does with the temporary file.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import numpy as np

from ...errors import PersonacoreError, PersonacoreIOError

__all__ = [
    "save_vector",
    "load_vector",
    "VectorFormatError",
    "VectorNotFoundError",
    "SUPPORTED_FORMATS",
    "FORMAT_VERSION",
    "GGUF_ROW_OFFSET",
]

#: Extensions :func:`save_vector` and :func:`load_vector` understand.
SUPPORTED_FORMATS = (".safetensors", ".pt", ".gguf")
#: Version of our metadata layout (safetensors header and GGUF ``personacore.*`` keys).
FORMAT_VERSION = 1
#: llama.cpp / repeng ``direction.N`` is our row ``N + GGUF_ROW_OFFSET`` (docs/conventions.md).
GGUF_ROW_OFFSET = 1

PathLike = Union[str, "os.PathLike[str]"]
#: What a format's ``load`` returns: directions, stored layer, stored name, metadata.
Loaded = Tuple[np.ndarray, Any, Any, Dict[str, Any]]


class VectorFormatError(PersonacoreError, ValueError):
    """A persona vector file that cannot be read or written in the asked format: unknown extension,
    corrupt or truncated file, wrong dtype or shape, a ``.pt`` holding something other than one float
    tensor, metadata that cannot be stored, a library the format needs that is not installed."""


class VectorNotFoundError(PersonacoreIOError, FileNotFoundError):
    """A persona vector file that does not exist."""


# ----------------------------------------------------------------------- shared by the formats


def _format_of(path: Path, fmt: Optional[str]) -> str:
    ext = ("." + fmt.lower().lstrip(".")) if fmt else path.suffix.lower()
    if ext not in SUPPORTED_FORMATS:
        what = (
            f"format {fmt!r}"
            if fmt
            else (f"extension {path.suffix!r}" if path.suffix else "no extension")
        )
        raise VectorFormatError(
            f"{path}: {what} is not a persona vector format; supported: {', '.join(SUPPORTED_FORMATS)}"
        )
    return ext


def _json_default(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, (set, frozenset)):
        return sorted(x, key=repr)
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    raise TypeError(f"a {type(x).__name__} cannot be stored as JSON")


def header_json(vector: Any) -> str:
    """The vector's name, layer and metadata as the JSON text both of our formats store."""
    payload = {
        "format_version": FORMAT_VERSION,
        "name": vector.name,
        "layer": vector.layer,
        "metadata": vector.metadata,
    }
    try:
        return json.dumps(payload, default=_json_default, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise VectorFormatError(f"the vector's metadata cannot be stored: {e}") from None


def parse_header_json(text: str, where: str) -> Dict[str, Any]:
    """The payload :func:`header_json` wrote, or a :class:`VectorFormatError` naming ``where``."""
    try:
        payload = json.loads(text)
    except ValueError as e:
        raise VectorFormatError(f"{where}: personacore metadata is not valid JSON ({e})") from None
    except RecursionError:  # json.loads of "[[[[..." a few thousand deep
        raise VectorFormatError(f"{where}: personacore metadata is nested too deeply") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("metadata", {}), dict):
        raise VectorFormatError(f"{where}: personacore metadata is not a JSON object")
    return payload


def check_directions(arr: Any, where: str) -> np.ndarray:
    """``arr`` as a float32 ``[rows >= 2, hidden]`` finite array, or a :class:`VectorFormatError`."""
    arr = np.asarray(arr)
    if arr.dtype.kind != "f":
        raise VectorFormatError(f"{where}: expected a floating-point tensor, got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[0] < 2 or arr.shape[1] < 1:
        raise VectorFormatError(
            f"{where}: expected a 2-D tensor [num_layers + 1, hidden], got shape {tuple(arr.shape)}"
        )
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise VectorFormatError(f"{where}: the tensor contains NaN or inf")
    return np.ascontiguousarray(arr)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)``, then rename the temporary file over ``path`` (removed on failure).

    The result has the mode the umask gives a new file (``0o666 & ~umask``), even when ``write``
    replaces the temporary file with one of its own (safetensors does, with mode 0600).
    """
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise PersonacoreIOError(f"cannot write {path}: directory {parent} does not exist")
    tmp = parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        # os.open with 0o666 honours the umask, as a plain open() of the target would.
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        mode = stat.S_IMODE(os.stat(tmp).st_mode)
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as e:
        raise PersonacoreIOError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        if tmp.exists():
            try:
                tmp.unlink()
            except OSError:
                pass


def _make_vector(
    directions: np.ndarray,
    stored_layer: Any,
    stored_name: Any,
    metadata: Dict[str, Any],
    where: str,
    layer: Optional[int],
    name: Optional[str],
):
    from ..vector import PersonaVector

    if stored_layer is not None and (
        isinstance(stored_layer, bool)
        or not isinstance(stored_layer, int)
        or not 0 <= stored_layer < directions.shape[0]
    ):
        raise VectorFormatError(
            f"{where}: stored layer {stored_layer!r} is not a row of a {tuple(directions.shape)} vector"
        )
    if not isinstance(stored_name, str):
        stored_name = None
    return PersonaVector(
        directions,
        layer=stored_layer if layer is None else layer,
        name=stored_name if name is None else name,
        metadata=metadata,
    )


# --------------------------------------------------------------------------------------- public


def save_vector(
    vector: Any, path: PathLike, *, format: Optional[str] = None, model_hint: Optional[str] = None
) -> Path:
    """Write ``vector`` (a :class:`~personacore.PersonaVector`) to ``path``; returns the path.

    The format comes from the extension (``.safetensors``, ``.pt``, ``.gguf``) or ``format=``
    (``"safetensors"``, ``"pt"``, ``"gguf"``). ``model_hint`` sets the GGUF ``controlvector.model_hint``
    (default: the metadata's ``model_hint``, ``architecture`` or ``model``). The file is written to a
    temporary name and renamed, so an existing file is replaced only by a complete new one.
    Raises :class:`VectorFormatError` (unknown format, unstorable metadata, ``.pt`` without torch)
    or :class:`~personacore.PersonacoreIOError` (directory missing, permissions, disk full).
    """
    from ..vector import PersonaVector

    if not isinstance(vector, PersonaVector):
        raise VectorFormatError(f"save_vector needs a PersonaVector, got {type(vector).__name__}")
    p = Path(os.fspath(path))
    fmt = _format_of(p, format)
    if fmt == ".safetensors":
        from . import safetensors as st_format

        st_format.save(vector, p)
    elif fmt == ".pt":
        from . import pt as pt_format

        pt_format.save(vector, p)
    else:
        from . import gguf as gguf_format

        gguf_format.save(vector, p, model_hint)
    return p


def load_vector(
    path: PathLike,
    *,
    format: Optional[str] = None,
    name: Optional[str] = None,
    layer: Optional[int] = None,
    num_layers: Optional[int] = None,
):
    """Read a :class:`~personacore.PersonaVector` from ``path`` (format by extension or ``format=``).

    ``name`` and ``layer`` override what the file stores (a ``.pt`` stores neither: the name defaults
    to the file's stem, the layer to None). ``num_layers`` sets the depth of a foreign ``.gguf`` whose
    directions do not reach the last layers (llama.cpp files do not record it). Raises
    :class:`VectorNotFoundError` for a missing file and :class:`VectorFormatError` for anything that is
    not a valid vector in that format.
    """
    p = Path(os.fspath(path))
    fmt = _format_of(p, format)
    if not p.exists():
        raise VectorNotFoundError(f"persona vector file not found: {p}")
    if p.is_dir():
        raise VectorFormatError(f"{p} is a directory, not a persona vector file")
    if num_layers is not None and (
        isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1
    ):
        raise VectorFormatError(f"num_layers must be a positive int, got {num_layers!r}")
    try:
        if fmt == ".safetensors":
            from . import safetensors as st_format

            arr, st_layer, st_name, metadata = st_format.load(p)
        elif fmt == ".pt":
            from . import pt as pt_format

            arr, st_layer, st_name, metadata = pt_format.load(p), None, p.stem, {}
        else:
            from . import gguf as gguf_format

            arr, st_layer, st_name, metadata = gguf_format.load(p, num_layers)
    except OSError as e:
        raise PersonacoreIOError(f"cannot read {p}: {e.strerror or e}") from e
    return _make_vector(arr, st_layer, st_name, metadata, str(p), layer, name)
