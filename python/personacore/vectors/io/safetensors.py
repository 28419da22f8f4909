"""personacore ``.safetensors`` vectors, read and written by the ``safetensors`` package.

Tensor ``directions`` plus the safetensors header ``__metadata__`` (a string→string map): key
``personacore`` holds our JSON (see :func:`~personacore.vectors.io.header_json`) and a few plain
keys (``format_version``, ``name``, ``trait``, ``model``, ``method``, ``pooling``, ``layer``) for tools
that only read strings. A foreign file with one tensor (or one named ``directions``) is read too;
its string metadata becomes the vector's metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy

from . import (
    FORMAT_VERSION,
    Loaded,
    VectorFormatError,
    atomic_write,
    check_directions,
    header_json,
    parse_header_json,
)

__all__ = ["save", "load"]


def save(vector: Any, path: Path) -> None:
    """Write ``vector`` to ``path`` (atomically, see :func:`~personacore.vectors.io.atomic_write`)."""
    meta = {"personacore": header_json(vector), "format_version": str(FORMAT_VERSION)}
    if vector.name is not None:
        meta["name"] = vector.name
    if vector.layer is not None:
        meta["layer"] = str(vector.layer)
    for k in ("trait", "model", "method", "pooling"):
        v = vector.metadata.get(k)
        if isinstance(v, (str, int, float)) and not isinstance(v, bool):
            meta[k] = str(v)
    tensors = {"directions": np.ascontiguousarray(vector.directions, dtype=np.float32)}
    atomic_write(path, lambda tmp: safetensors.numpy.save_file(tensors, str(tmp), metadata=meta))


def load(path: Path) -> Loaded:
    """Directions, stored layer, stored name and metadata of the vector in ``path``."""
    try:
        with safetensors.safe_open(str(path), framework="np") as f:
            header = dict(f.metadata() or {})
            keys = list(f.keys())
            if "directions" in keys:
                key = "directions"
            elif len(keys) == 1:
                key = keys[0]
            else:
                raise VectorFormatError(
                    f"{path}: no 'directions' tensor (tensors: {', '.join(keys) or 'none'})"
                )
            arr = f.get_tensor(key)
    except VectorFormatError:
        raise
    except Exception as e:  # SafetensorError, TypeError for dtypes numpy lacks (bf16), ...
        raise VectorFormatError(f"{path}: not a readable .safetensors vector ({e})") from None
    arr = check_directions(arr, f"{path} tensor {key!r}")
    if "personacore" in header:
        payload = parse_header_json(header["personacore"], str(path))
        return arr, payload.get("layer"), payload.get("name"), payload.get("metadata", {})
    return arr, None, path.stem, header  # a foreign file: keep its string metadata
