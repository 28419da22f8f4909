"""Persona vector files: ``.safetensors`` (ours), ``.pt`` (persona_vectors), ``.gguf`` (llama.cpp / repeng).

:func:`save_vector` and :func:`load_vector` pick the format from the file extension (or ``format=``).
Rows follow DESIGN.md section 2: ``directions`` is float32 ``[num_layers + 1, hidden]``, row 0 = embeddings,
row ``i`` = output of decoder block ``i`` (1-based), row ``num_layers`` = the final norm.

``.safetensors``
    Tensor ``directions`` plus the safetensors header ``__metadata__`` (a string→string map): key
    ``personacore`` holds ``json.dumps({"name", "layer", "metadata"})`` and a few plain keys
    (``format_version``, ``name``, ``trait``, ``model``, ``method``, ``pooling``, ``layer``) for tools that
    only read strings. Metadata round-trips through JSON: nested dicts, lists, floats (exactly), ints,
    strings, ``None``; numpy arrays and scalars become lists and Python numbers, tuples become lists,
    non-string dict keys become strings.
``.pt``
    persona_vectors' format: a bare tensor ``[num_layers + 1, hidden]`` saved with ``torch.save``. Read
    with ``torch.load(weights_only=True)`` when torch is importable; otherwise with a restricted reader
    of torch's zip layout that only accepts what a bare float tensor needs (``_rebuild_tensor_v2``,
    float/half/bfloat16/double storages, ``OrderedDict``) and never runs anything else. Written by
    ``torch.save`` when torch is importable, otherwise in the same layout by this module. No metadata:
    ``load`` names the vector after the file.
``.gguf``
    A llama.cpp control vector (what repeng's ``export_gguf`` and llama.cpp's ``cvector-generator``
    write): ``general.architecture = "controlvector"``, ``controlvector.model_hint`` (string),
    ``controlvector.layer_count`` (uint32 written, int32 accepted; both tools store the *number of
    direction tensors*, not the model's depth) and 1-D F32 tensors ``direction.N``. llama.cpp adds
    ``direction.N`` to the output of its 0-based layer ``N`` (``build_cvec(cur, il)`` in the layer loop)
    and rejects ``direction.0``; repeng hooks ``model.layers[N]`` and trains ``direction.N`` on
    ``hidden_states[N + 1]``. That place is our row ``N + 1``, so ``direction.N`` ⇄ row ``N + 1``
    (:data:`GGUF_ROW_OFFSET`). Written: the rows steerable both here and in llama.cpp, 2 .. num_layers-1,
    as ``direction.1 .. direction.(num_layers-2)``. Row 0 (embeddings), row 1 (block 1: llama.cpp cannot
    address it) and row ``num_layers`` (the final norm, not steerable) are not direction tensors; they
    travel, with our metadata, in ``personacore.*`` keys that llama.cpp and repeng ignore, so our own
    files round-trip exactly. A foreign file gives zeros for rows it has no direction for; its depth is
    ``personacore.num_layers``, else ``num_layers=``, else inferred (``max(N) + 1``, at least
    ``layer_count + 1``: both tools write ``direction.1 .. direction.(L-1)``).

Saving writes a temporary file next to the target and renames it over the target, so an error never
leaves a half-written file or destroys the previous one.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import secrets
import stat
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from ..errors import PersonacoreError, PersonacoreIOError

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
#: llama.cpp / repeng ``direction.N`` is our row ``N + GGUF_ROW_OFFSET`` (see the module docstring).
GGUF_ROW_OFFSET = 1

PathLike = Union[str, "os.PathLike[str]"]


class VectorFormatError(PersonacoreError, ValueError):
    """A persona vector file that cannot be read or written in the asked format: unknown extension,
    corrupt or truncated file, wrong dtype or shape, a ``.pt`` holding something other than one float
    tensor, metadata that cannot be stored."""


class VectorNotFoundError(PersonacoreIOError, FileNotFoundError):
    """A persona vector file that does not exist."""


# ----------------------------------------------------------------------------------------- helpers


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


def _header_json(vector: Any) -> str:
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


def _parse_header_json(text: str, where: str) -> Dict[str, Any]:
    try:
        payload = json.loads(text)
    except ValueError as e:
        raise VectorFormatError(f"{where}: personacore metadata is not valid JSON ({e})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("metadata", {}), dict):
        raise VectorFormatError(f"{where}: personacore metadata is not a JSON object")
    return payload


def _check_directions(arr: Any, where: str) -> np.ndarray:
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


def _make_vector(
    directions: np.ndarray,
    stored_layer: Any,
    stored_name: Any,
    metadata: Dict[str, Any],
    where: str,
    layer: Optional[int],
    name: Optional[str],
):
    from .vector import PersonaVector

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


def _atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)``, then rename the temporary file over ``path`` (removed on failure)."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise PersonacoreIOError(f"cannot write {path}: directory {parent} does not exist")
    tmp = parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        # os.open with 0o666 honours the umask, as a plain open() of the target would.
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        mode = stat.S_IMODE(os.stat(tmp).st_mode)
        write(tmp)
        # A writer may replace the file (safetensors writes its own temporary file with mode
        # 0600 and renames it): give the result the mode the umask gave the file we created.
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


def _write_bytes(data: bytes):
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    return write


def _torch():
    """torch if importable, else None (the .pt code then uses its own reader/writer)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return None
    return torch


# ---------------------------------------------------------------------------------- safetensors


def _safetensors():
    try:
        import safetensors  # noqa: F401
        import safetensors.numpy
    except ImportError:
        raise VectorFormatError(
            ".safetensors vectors need the 'safetensors' package (pip install safetensors)"
        ) from None
    return safetensors


def _save_safetensors(vector: Any, path: Path) -> None:
    st = _safetensors()
    meta = {"personacore": _header_json(vector), "format_version": str(FORMAT_VERSION)}
    if vector.name is not None:
        meta["name"] = vector.name
    if vector.layer is not None:
        meta["layer"] = str(vector.layer)
    for k in ("trait", "model", "method", "pooling"):
        v = vector.metadata.get(k)
        if isinstance(v, (str, int, float)) and not isinstance(v, bool):
            meta[k] = str(v)
    tensors = {"directions": np.ascontiguousarray(vector.directions, dtype=np.float32)}
    _atomic_write(path, lambda tmp: st.numpy.save_file(tensors, str(tmp), metadata=meta))


def _load_safetensors(path: Path) -> Tuple[np.ndarray, Any, Any, Dict[str, Any]]:
    st = _safetensors()
    try:
        with st.safe_open(str(path), framework="np") as f:
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
    arr = _check_directions(arr, f"{path} tensor {key!r}")
    if "personacore" in header:
        payload = _parse_header_json(header["personacore"], str(path))
        return arr, payload.get("layer"), payload.get("name"), payload.get("metadata", {})
    return arr, None, path.stem, header  # a foreign file: keep its string metadata


# ------------------------------------------------------------------------------------------- .pt

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
    except zipfile.BadZipFile:
        raise VectorFormatError(
            f"{path}: not a torch zip archive (a corrupt file, or torch's legacy pre-1.6 format, "
            "which needs torch installed)"
        ) from None
    with zf:
        pkls = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise VectorFormatError(
                f"{path}: not a torch.save archive (no single <root>/data.pkl record)"
            )
        root = pkls[0][: -len("data.pkl")]
        try:
            if zf.read(root + "byteorder").strip() == b"big":
                raise VectorFormatError(f"{path}: big-endian .pt files need torch installed")
        except KeyError:
            pass
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


def _load_pt(path: Path) -> np.ndarray:
    torch = _torch()
    if torch is None:
        arr = _read_pt_without_torch(path)
    else:
        try:
            obj = torch.load(str(path), weights_only=True, map_location="cpu")
        except (
            Exception
        ) as e:  # UnpicklingError for disallowed globals, RuntimeError for corrupt zips
            raise VectorFormatError(f"{path}: cannot read the .pt file with torch: {e}") from None
        if not isinstance(obj, torch.Tensor):
            raise VectorFormatError(
                f"{path}: holds a {type(obj).__name__}, not a bare tensor [num_layers + 1, hidden] "
                "(persona_vectors' format)"
            )
        if not obj.is_floating_point():
            raise VectorFormatError(f"{path}: expected a floating-point tensor, got {obj.dtype}")
        arr = obj.detach().to("cpu", torch.float32).numpy()
    return _check_directions(arr, str(path))


def _pickle_tensor(rows: int, cols: int) -> bytes:
    """The pickle ``torch.save`` writes for a contiguous float32 tensor ``[rows, cols]`` (protocol 2)."""

    def s(text: str) -> bytes:  # BINUNICODE
        b = text.encode()
        return b"X" + struct.pack("<I", len(b)) + b

    def i(n: int) -> bytes:  # BININT (all values here fit in 31 bits for any real vector)
        if not 0 <= n < 2**31:
            raise VectorFormatError(
                f"tensor dimension {n} is too large for a .pt file written without torch"
            )
        return b"J" + struct.pack("<i", n)

    return b"".join(
        [
            b"\x80\x02",
            b"ctorch._utils\n_rebuild_tensor_v2\n",
            b"(",
            b"(",
            s("storage"),
            b"ctorch\nFloatStorage\n",
            s("0"),
            s("cpu"),
            i(rows * cols),
            b"tQ",
            i(0),
            i(rows),
            i(cols),
            b"\x86",
            i(cols),
            i(1),
            b"\x86",
            b"\x89",
            b"ccollections\nOrderedDict\n",
            b")R",
            b"tR.",
        ]
    )


def _pt_bytes_without_torch(arr: np.ndarray) -> bytes:
    """torch's zip layout (uncompressed records, tensor data 64-byte aligned), readable by torch.load."""
    root = "archive/"
    records = [
        ("data.pkl", _pickle_tensor(*arr.shape)),
        (".format_version", b"1"),
        (".storage_alignment", b"64"),
        ("byteorder", b"little"),
        ("data/0", arr.astype("<f4").tobytes()),
        ("version", b"3\n"),
        (
            ".data/serialization_id",
            str(int.from_bytes(os.urandom(16), "little")).zfill(40).encode(),
        ),
    ]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in records:
            info = zipfile.ZipInfo(root + name, date_time=(1980, 1, 1, 0, 0, 0))
            # pad the local header's extra field so the record's data starts on a 64-byte boundary
            start = buf.tell() + 30 + len(info.filename.encode()) + 4
            info.extra = struct.pack("<HH", 0x4246, (-start) % 64) + b"Z" * ((-start) % 64)
            zf.writestr(info, data)
    return buf.getvalue()


def _save_pt(vector: Any, path: Path) -> None:
    arr = np.ascontiguousarray(vector.directions, dtype=np.float32)
    torch = _torch()
    if torch is None:
        data = _pt_bytes_without_torch(arr)
    else:
        buf = io.BytesIO()
        torch.save(torch.from_numpy(arr.copy()), buf)
        data = buf.getvalue()
    _atomic_write(path, _write_bytes(data))


# ----------------------------------------------------------------------------------------- .gguf

_GGUF_MAGIC = b"GGUF"
_GGML_F32, _GGML_F16 = 0, 1
# GGUF value types: (struct format, size) for the fixed-size ones; 8 = string, 9 = array
_GGUF_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_GGUF_NP = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "<u1",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
_T_UINT32, _T_STRING, _T_ARRAY, _T_FLOAT32 = 4, 8, 9, 6


def _gguf_str(text: str) -> bytes:
    b = text.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _gguf_kv(key: str, vtype: int, value: Any) -> bytes:
    out = _gguf_str(key) + struct.pack("<I", vtype)
    if vtype == _T_STRING:
        return out + _gguf_str(value)
    if vtype == _T_ARRAY:
        etype, arr = value
        arr = np.ascontiguousarray(arr, dtype=_GGUF_NP[etype])
        return out + struct.pack("<IQ", etype, arr.size) + arr.tobytes()
    return out + struct.pack("<" + _GGUF_SCALARS[vtype], value)


def _gguf_bytes(
    kvs: List[Tuple[str, int, Any]], tensors: List[Tuple[str, np.ndarray]], align: int = 32
) -> bytes:
    """A GGUF v3 file with the given key/values and 1-D F32 tensors (the layout llama.cpp reads)."""
    head = [_GGUF_MAGIC, struct.pack("<IQQ", 3, len(tensors), len(kvs))]
    head += [_gguf_kv(k, t, v) for k, t, v in kvs]
    data, offset = [], 0
    for name, arr in tensors:
        blob = np.ascontiguousarray(arr, dtype="<f4").tobytes()
        head.append(_gguf_str(name) + struct.pack("<IQIQ", 1, arr.size, _GGML_F32, offset))
        pad = (-len(blob)) % align
        data.append(blob + b"\0" * pad)
        offset += len(blob) + pad
    meta = b"".join(head)
    return meta + b"\0" * ((-len(meta)) % align) + b"".join(data)


class _Cursor:
    def __init__(self, buf: bytes, where: str):
        self.buf, self.pos, self.where = buf, 0, where

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise VectorFormatError(f"{self.where}: truncated GGUF file")
        b = self.buf[self.pos : self.pos + n]
        self.pos += n
        return b

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))

    def string(self) -> str:
        (n,) = self.unpack("Q")
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise VectorFormatError(f"{self.where}: a GGUF string is not UTF-8") from None

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype == _T_STRING:
            return self.string()
        if vtype in _GGUF_SCALARS:
            (v,) = self.unpack(_GGUF_SCALARS[vtype])
            return v
        if vtype == _T_ARRAY and depth < 4:
            etype, count = self.unpack("IQ")
            if etype in _GGUF_NP:
                size = np.dtype(_GGUF_NP[etype]).itemsize
                return np.frombuffer(self.take(count * size), dtype=_GGUF_NP[etype])
            if count > len(self.buf):
                raise VectorFormatError(f"{self.where}: corrupt GGUF array length {count}")
            return [self.value(etype, depth + 1) for _ in range(count)]
        raise VectorFormatError(f"{self.where}: unknown GGUF value type {vtype}")


def _read_gguf(path: Path) -> Tuple[Dict[str, Tuple[int, Any]], Dict[str, np.ndarray]]:
    """Key/values ``{key: (type, value)}`` and the ``direction.*`` tensors (as float32) of a GGUF file."""
    where = str(path)
    c = _Cursor(path.read_bytes(), where)
    if c.take(4) != _GGUF_MAGIC:
        raise VectorFormatError(f"{where}: not a GGUF file (bad magic)")
    (version,) = c.unpack("I")
    if version not in (2, 3):
        raise VectorFormatError(
            f"{where}: unsupported GGUF version {version} (expected 2 or 3; "
            "big-endian files are not supported)"
        )
    n_tensors, n_kv = c.unpack("QQ")
    if n_tensors > len(c.buf) or n_kv > len(c.buf):
        raise VectorFormatError(f"{where}: corrupt GGUF header")
    kv: Dict[str, Tuple[int, Any]] = {}
    for _ in range(n_kv):
        key = c.string()
        (vtype,) = c.unpack("I")
        kv[key] = (vtype, c.value(vtype))
    infos = []
    for _ in range(n_tensors):
        name = c.string()
        (n_dims,) = c.unpack("I")
        if n_dims > 4:
            raise VectorFormatError(f"{where}: tensor {name!r} has {n_dims} dimensions")
        dims = c.unpack("Q" * n_dims)
        ttype, offset = c.unpack("IQ")
        infos.append((name, dims, ttype, offset))
    align = kv.get("general.alignment", (None, 32))[1]
    if not isinstance(align, int) or align <= 0:
        raise VectorFormatError(f"{where}: bad general.alignment {align!r}")
    start = c.pos + (-c.pos) % align
    tensors: Dict[str, np.ndarray] = {}
    for name, dims, ttype, offset in infos:
        if not name.startswith("direction."):
            continue  # repeng ignores other tensors too
        if ttype not in (_GGML_F32, _GGML_F16):
            raise VectorFormatError(
                f"{where}: tensor {name!r} has ggml type {ttype}; expected F32 (0)"
            )
        if not dims or any(d != 1 for d in dims[1:]):
            raise VectorFormatError(
                f"{where}: tensor {name!r} has shape {list(dims)}; expected 1-D [hidden]"
            )
        dtype = "<f4" if ttype == _GGML_F32 else "<f2"
        n = int(np.prod(dims))
        begin = start + offset
        end = begin + n * np.dtype(dtype).itemsize
        if end > len(c.buf):
            raise VectorFormatError(
                f"{where}: tensor {name!r} runs past the end of the file (truncated?)"
            )
        tensors[name] = np.frombuffer(c.buf[begin:end], dtype=dtype).astype(np.float32)
    return kv, tensors


def _save_gguf(vector: Any, path: Path, model_hint: Optional[str] = None) -> None:
    d = vector.directions
    n_layers = d.shape[0] - 1
    rows = list(range(1 + GGUF_ROW_OFFSET, n_layers))  # direction.1 .. direction.(L-2)
    if vector.layer is not None and vector.layer not in rows:
        warnings.warn(
            f"layer {vector.layer} is not addressable by a llama.cpp control vector "
            f"(rows {rows[0] if rows else '-'}..{rows[-1] if rows else '-'} are); "
            "the file keeps it only for personacore",
            stacklevel=3,
        )
    extra = [r for r in range(n_layers + 1) if r not in rows]
    if model_hint is None:
        md = vector.metadata
        model_hint = next(
            (str(md[k]) for k in ("model_hint", "architecture", "model") if md.get(k)), ""
        )
    kvs = [
        ("general.architecture", _T_STRING, "controlvector"),
        ("controlvector.model_hint", _T_STRING, model_hint),
        ("controlvector.layer_count", _T_UINT32, len(rows)),
        ("personacore.format_version", _T_UINT32, FORMAT_VERSION),
        ("personacore.num_layers", _T_UINT32, n_layers),
        ("personacore.metadata", _T_STRING, _header_json(vector)),
        ("personacore.extra_rows", _T_ARRAY, (_T_UINT32, np.array(extra, dtype=np.uint32))),
        ("personacore.extra_data", _T_ARRAY, (_T_FLOAT32, d[extra].reshape(-1))),
    ]
    tensors = [(f"direction.{r - GGUF_ROW_OFFSET}", d[r]) for r in rows]
    _atomic_write(path, _write_bytes(_gguf_bytes(kvs, tensors)))


def _load_gguf(
    path: Path, num_layers: Optional[int]
) -> Tuple[np.ndarray, Any, Any, Dict[str, Any]]:
    where = str(path)
    kv, tensors = _read_gguf(path)
    arch = kv.get("general.architecture", (None, None))[1]
    if arch != "controlvector":
        raise VectorFormatError(
            f"{where}: general.architecture is {arch!r}, not 'controlvector' "
            "(this is a model file, not a control vector)"
        )
    directions: Dict[int, np.ndarray] = {}
    for name, arr in tensors.items():
        idx = name[len("direction.") :]
        if not idx.isdigit():
            raise VectorFormatError(f"{where}: bad direction tensor name {name!r}")
        directions[int(idx)] = arr
    if not directions:
        raise VectorFormatError(f"{where}: no direction.N tensors")
    hidden = {a.size for a in directions.values()}
    if len(hidden) != 1:
        raise VectorFormatError(
            f"{where}: direction tensors have different lengths {sorted(hidden)}"
        )
    (h,) = hidden
    lc = kv.get("controlvector.layer_count")
    layer_count = int(lc[1]) if lc and lc[0] in (_T_UINT32, 5) else None
    ours = "personacore.num_layers" in kv
    if num_layers is None:
        if ours:
            num_layers = int(kv["personacore.num_layers"][1])
        else:
            num_layers = max(max(directions) + GGUF_ROW_OFFSET, (layer_count or 0) + 1)
    top = max(directions) + GGUF_ROW_OFFSET
    if top > num_layers:
        raise VectorFormatError(
            f"{where}: direction.{max(directions)} needs at least {top} layers, "
            f"but num_layers is {num_layers}"
        )
    out = np.zeros((num_layers + 1, h), dtype=np.float32)
    for n, arr in directions.items():
        out[n + GGUF_ROW_OFFSET] = arr
    if ours:
        rows = kv.get("personacore.extra_rows", (None, np.zeros(0)))[1]
        data = kv.get("personacore.extra_data", (None, np.zeros(0)))[1]
        if len(rows) * h != len(data) or any(int(r) > num_layers for r in rows):
            raise VectorFormatError(
                f"{where}: personacore.extra_rows/extra_data do not fit the vector"
            )
        for k, r in enumerate(rows):
            out[int(r)] = data[k * h : (k + 1) * h]
    out = _check_directions(out, where)
    if "personacore.metadata" in kv:
        payload = _parse_header_json(kv["personacore.metadata"][1], where)
        return out, payload.get("layer"), payload.get("name"), payload.get("metadata", {})
    metadata: Dict[str, Any] = {"model": kv.get("controlvector.model_hint", (None, ""))[1]}
    if layer_count is not None:
        metadata["gguf_layer_count"] = layer_count
    return out, None, path.stem, metadata


# --------------------------------------------------------------------------------------- public


def save_vector(
    vector: Any, path: PathLike, *, format: Optional[str] = None, model_hint: Optional[str] = None
) -> Path:
    """Write ``vector`` (a :class:`~personacore.PersonaVector`) to ``path``; returns the path.

    The format comes from the extension (``.safetensors``, ``.pt``, ``.gguf``) or ``format=``
    (``"safetensors"``, ``"pt"``, ``"gguf"``). ``model_hint`` sets the GGUF ``controlvector.model_hint``
    (default: the metadata's ``model_hint``, ``architecture`` or ``model``). The file is written to a
    temporary name and renamed, so an existing file is replaced only by a complete new one.
    Raises :class:`VectorFormatError` (unknown format, unstorable metadata) or
    :class:`~personacore.PersonacoreIOError` (directory missing, permissions, disk full).
    """
    from .vector import PersonaVector

    if not isinstance(vector, PersonaVector):
        raise VectorFormatError(f"save_vector needs a PersonaVector, got {type(vector).__name__}")
    p = Path(os.fspath(path))
    fmt = _format_of(p, format)
    if fmt == ".safetensors":
        _save_safetensors(vector, p)
    elif fmt == ".pt":
        _save_pt(vector, p)
    else:
        _save_gguf(vector, p, model_hint)
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
            arr, st_layer, st_name, metadata = _load_safetensors(p)
        elif fmt == ".pt":
            arr, st_layer, st_name, metadata = _load_pt(p), None, p.stem, {}
        else:
            arr, st_layer, st_name, metadata = _load_gguf(p, num_layers)
    except OSError as e:
        raise PersonacoreIOError(f"cannot read {p}: {e.strerror or e}") from e
    return _make_vector(arr, st_layer, st_name, metadata, str(p), layer, name)
