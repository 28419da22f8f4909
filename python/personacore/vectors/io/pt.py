"""persona_vectors ``.pt`` vectors: a bare float tensor ``[num_layers + 1, hidden]``, no metadata.

Written by ``torch.save`` (writing needs torch: ``pip install torch``). Read with
``torch.load(weights_only=True)`` when torch is installed; without torch, with a restricted reader
of torch's zip layout that accepts only what a bare float tensor needs (``_rebuild_tensor_v2``,
float/half/bfloat16/double storages, ``OrderedDict``) and never runs anything else, so users
without torch can still read persona_vectors' files.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from . import VectorFormatError, atomic_write, check_directions

__all__ = ["save", "load"]


def _torch():
    """torch if importable, else None (reading then uses the restricted reader)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def save(vector: Any, path: Path) -> None:
    """Write ``vector``'s directions with ``torch.save`` (atomically); needs torch."""
    torch = _torch()
    if torch is None:
        raise VectorFormatError(
            f"cannot write {path}: writing .pt vectors needs torch (pip install torch, or "
            "pip install 'personacore[torch]'); .safetensors and .gguf need no torch"
        )
    tensor = torch.from_numpy(np.array(vector.directions, dtype=np.float32))
    atomic_write(path, lambda tmp: torch.save(tensor, str(tmp)))


def load(path: Path) -> np.ndarray:
    """The float32 directions of the bare tensor in ``path`` (with or without torch)."""
    torch = _torch()
    if torch is None:
        arr = _read_pt_without_torch(path)
    else:
        try:
            obj = torch.load(str(path), weights_only=True, map_location="cpu")
        except Exception as e:  # UnpicklingError for disallowed globals, RuntimeError for bad zips
            raise VectorFormatError(f"{path}: cannot read the .pt file with torch: {e}") from None
        if not isinstance(obj, torch.Tensor):
            raise VectorFormatError(
                f"{path}: holds a {type(obj).__name__}, not a bare tensor [num_layers + 1, hidden] "
                "(persona_vectors' format)"
            )
        if not obj.is_floating_point():
            raise VectorFormatError(f"{path}: expected a floating-point tensor, got {obj.dtype}")
        arr = obj.detach().to("cpu", torch.float32).numpy()
    return check_directions(arr, str(path))


# ------------------------------------------------------------- the reader for users without torch

_PT_DTYPES = {  # torch storage class name -> (numpy dtype of the raw little-endian bytes, element size)
    "FloatStorage": "<f4",
    "DoubleStorage": "<f8",
    "HalfStorage": "<f2",
    "BFloat16Storage": "bf16",
}


class _StorageType:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


class _Rebuilt:
    """A tensor rebuilt by the restricted unpickler (only ever produced by ``_rebuild_tensor_v2``)."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
    if not isinstance(storage, np.ndarray):
        raise pickle.UnpicklingError("_rebuild_tensor_v2 got no storage")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or any(s < 0 for s in size + stride) or storage_offset < 0:
        raise pickle.UnpicklingError(f"bad tensor geometry: size {size}, stride {stride}")
    last = (
        storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if all(size)
        else storage_offset - 1
    )
    if last >= storage.size:
        raise pickle.UnpicklingError(
            f"tensor of size {size} does not fit its storage ({storage.size} elements)"
        )
    view = np.lib.stride_tricks.as_strided(
        storage[storage_offset:], shape=size, strides=tuple(s * storage.itemsize for s in stride)
    )
    return _Rebuilt(np.array(view, dtype=np.float32))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    if not isinstance(data, _Rebuilt):
        raise pickle.UnpicklingError("_rebuild_parameter got no tensor")
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles exactly what ``torch.save`` writes for one dense float tensor (or Parameter)."""

    def __init__(self, file, records: zipfile.ZipFile, root: str):
        super().__init__(file)
        self._zip, self._root = records, root

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _PT_DTYPES:
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return dict
        raise pickle.UnpicklingError(
            f"{module}.{name} is not allowed: this reader (torch is not installed) only reads a bare "
            "float tensor; install torch to load other .pt files"
        )

    def persistent_load(self, pid):
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and pid[2].isdigit()
        ):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        kind, key, numel = pid[1].name, pid[2], int(pid[4])
        try:
            raw = self._zip.read(f"{self._root}data/{key}")
        except KeyError:
            raise pickle.UnpicklingError(f"storage record data/{key} is missing") from None
        if kind == "BFloat16Storage":
            u16 = np.frombuffer(raw, dtype="<u2")
            arr = (u16.astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(raw, dtype=_PT_DTYPES[kind])
        if arr.size < numel:
            raise pickle.UnpicklingError(
                f"storage data/{key} holds {arr.size} elements, expected {numel}"
            )
        return arr


def _read_pt_without_torch(path: Path) -> np.ndarray:
    try:
        zf = zipfile.ZipFile(path)
    except Exception as e:  # noqa: BLE001 - zipfile's errors on hostile bytes are many kinds
        # BadZipFile, a seek before the start (OSError), names that are not UTF-8
        # (UnicodeDecodeError), an early end (EOFError), "zip file version 24.9"
        # (NotImplementedError): found by fuzzing
        raise VectorFormatError(
            f"{path}: not a torch zip archive (a corrupt file, or torch's legacy pre-1.6 format, "
            f"which needs torch installed): {e}"
        ) from None
    with zf:
        pkls = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise VectorFormatError(
                f"{path}: not a torch.save archive (no single <root>/data.pkl record)"
            )
        root = pkls[0][: -len("data.pkl")]
        try:
            big_endian = zf.read(root + "byteorder").strip() == b"big"
        except KeyError:
            big_endian = False
        except Exception as e:  # noqa: BLE001 - zip records: BadZipFile, CRC, OSError, zlib...
            raise VectorFormatError(f"{path}: cannot read the .pt file: {e}") from None
        if big_endian:
            raise VectorFormatError(f"{path}: big-endian .pt files need torch installed")
        try:
            obj = _RestrictedUnpickler(io.BytesIO(zf.read(pkls[0])), zf, root).load()
        except VectorFormatError:
            raise
        except Exception as e:  # UnpicklingError, EOFError, struct errors, zip CRC errors...
            raise VectorFormatError(f"{path}: cannot read the .pt file: {e}") from None
    if not isinstance(obj, _Rebuilt):
        raise VectorFormatError(
            f"{path}: holds a {type(obj).__name__}, not a bare tensor [num_layers + 1, hidden] "
            "(persona_vectors' format)"
        )
    return obj.array
