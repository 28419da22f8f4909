"""llama.cpp / repeng control-vector ``.gguf`` files, written with ``gguf.GGUFWriter`` and read with
``gguf.GGUFReader``.

What repeng's ``export_gguf`` and llama.cpp's ``cvector-generator`` write:
``general.architecture = "controlvector"``, ``controlvector.model_hint`` (string),
``controlvector.layer_count`` (uint32 written, any integer accepted; both tools store the *number of
direction tensors*, not the model's depth) and 1-D F32 tensors ``direction.N``. ``direction.N`` is
our row ``N + 1`` (docs/conventions.md, "Control-vector numbering"; :data:`GGUF_ROW_OFFSET`).

Written: the rows steerable both here and in llama.cpp, 2 .. num_layers-1, as ``direction.1 ..
direction.(num_layers-2)``. Row 0 (embeddings), row 1 (block 1: llama.cpp cannot address it) and row
``num_layers`` (the final norm) are not direction tensors (llama.cpp refuses any other tensor); they
travel, with our metadata, in ``personacore.*`` keys that llama.cpp and repeng ignore, so our own
files round-trip exactly. A foreign file gives zeros for rows it has no direction for; its depth is
``personacore.num_layers``, else ``num_layers=``, else inferred (``max(N) + 1``, at least
``layer_count + 1``: both tools write ``direction.1 .. direction.(L-1)``).
"""

from __future__ import annotations

import mmap
import struct
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

import gguf
import numpy as np

from . import (
    FORMAT_VERSION,
    GGUF_ROW_OFFSET,
    Loaded,
    VectorFormatError,
    atomic_write,
    check_directions,
    header_json,
    parse_header_json,
)

__all__ = ["save", "load"]

_T = gguf.GGUFValueType
_INTEGERS = (_T.UINT8, _T.INT8, _T.UINT16, _T.INT16, _T.UINT32, _T.INT32, _T.UINT64, _T.INT64)
_FLOATS = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)


def save(vector: Any, path: Path, model_hint: Optional[str] = None) -> None:
    """Write ``vector`` as a control vector (atomically); ``model_hint`` defaults to the metadata's
    ``model_hint``, ``architecture`` or ``model``."""
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
    metadata = header_json(vector)  # before any file exists: unstorable metadata fails here

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), "controlvector")
        # add_key_value, not add_string: an empty hint is still written (repeng requires the key)
        w.add_key_value("controlvector.model_hint", model_hint, _T.STRING)
        w.add_uint32("controlvector.layer_count", len(rows))
        w.add_uint32("personacore.format_version", FORMAT_VERSION)
        w.add_uint32("personacore.num_layers", n_layers)
        w.add_key_value("personacore.metadata", metadata, _T.STRING)
        w.add_key_value("personacore.extra_rows", extra, _T.ARRAY, sub_type=_T.UINT32)
        w.add_key_value(
            "personacore.extra_data", d[extra].reshape(-1).tolist(), _T.ARRAY, sub_type=_T.FLOAT32
        )
        for r in rows:
            w.add_tensor(f"direction.{r - GGUF_ROW_OFFSET}", np.array(d[r], dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    atomic_write(path, write)


#: byte size of each GGUF scalar value type (strings are 8 + n bytes, arrays 12 + their items)
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


class _Layout:
    """A bounds-checked walk over a GGUF header (magic, counts, key/values, tensor infos).

    ``gguf.GGUFReader`` trusts the counts it reads: an array claiming 2**60 items makes it loop for
    hours (found by fuzzing). Every count is checked here against the bytes left in the file before
    the reader sees it, so a hostile file is refused at once.
    """

    def __init__(self, data: Any, where: str):
        self.data, self.where, self.off = data, where, 0

    def fail(self, what: str) -> VectorFormatError:
        return VectorFormatError(f"{self.where}: not a readable GGUF file ({what})")

    def take(self, n: int) -> int:
        if n < 0 or self.off + n > len(self.data):
            raise self.fail(f"truncated: {n} bytes needed at offset {self.off}")
        start, self.off = self.off, self.off + n
        return start

    def u32(self) -> int:
        return int(struct.unpack_from("<I", self.data, self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack_from("<Q", self.data, self.take(8))[0])

    def string(self) -> None:
        self.take(self.u64())

    def value(self, kind: int, depth: int = 0) -> None:
        if kind in _SCALAR_SIZES:
            self.take(_SCALAR_SIZES[kind])
        elif kind == _STRING:
            self.string()
        elif kind == _ARRAY and depth == 0:
            item, count = self.u32(), self.u64()
            smallest = _SCALAR_SIZES.get(item, 8 if item == _STRING else 12)
            if count * smallest > len(self.data) - self.off:
                raise self.fail(f"an array of {count} items does not fit in the file")
            if item in _SCALAR_SIZES:
                self.take(count * smallest)
            else:
                for _ in range(count):
                    self.value(item, depth + 1)
        else:
            raise self.fail(f"value type {kind} at offset {self.off} is not supported")

    def check(self) -> None:
        if len(self.data) < 24 or bytes(self.data[:4]) != b"GGUF":
            raise self.fail("no GGUF magic")
        self.take(4)
        version = self.u32()
        if version not in (2, 3):
            raise self.fail(f"version {version}; expected 2 or 3")
        tensors, kvs = self.u64(), self.u64()
        if kvs * 13 > len(self.data) - self.off:  # a key/value takes at least 13 bytes
            raise self.fail(f"{kvs} key/values do not fit in the file")
        for _ in range(kvs):
            self.string()
            self.value(self.u32())
        if tensors * 24 > len(self.data) - self.off:  # a tensor info takes at least 24 bytes
            raise self.fail(f"{tensors} tensors do not fit in the file")
        for _ in range(tensors):
            self.string()
            self.take(8 * self.u32() + 12)


def _check_layout(path: Path) -> None:
    """Raise :class:`VectorFormatError` unless the header of ``path`` is a well-bounded GGUF."""
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            raise VectorFormatError(f"{path}: not a readable GGUF file (empty)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            _Layout(data, str(path)).check()


def _read(path: Path):
    """(key/values ``{key: (main type, contents)}``, ``{N: float32 direction.N}``) of a GGUF file."""
    where = str(path)
    _check_layout(path)
    try:
        reader = gguf.GGUFReader(str(path))
        kv = {k: (f.types[0] if f.types else None, f.contents()) for k, f in reader.fields.items()}
        tensors = list(reader.tensors)
    except (ValueError, IndexError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise VectorFormatError(f"{where}: not a readable GGUF file ({e})") from None
    directions: Dict[int, np.ndarray] = {}
    for t in tensors:
        if not t.name.startswith("direction."):
            continue  # repeng ignores other tensors too
        if t.tensor_type not in _FLOATS:
            raise VectorFormatError(
                f"{where}: tensor {t.name!r} has ggml type {t.tensor_type.name}; expected F32"
            )
        dims = [int(x) for x in t.shape]
        if not dims or any(x != 1 for x in dims[1:]):
            raise VectorFormatError(
                f"{where}: tensor {t.name!r} has shape {dims}; expected 1-D [hidden]"
            )
        if t.data.size != t.n_elements:
            raise VectorFormatError(
                f"{where}: tensor {t.name!r} runs past the end of the file (truncated?)"
            )
        idx = t.name[len("direction.") :]
        if not idx.isdigit():
            raise VectorFormatError(f"{where}: bad direction tensor name {t.name!r}")
        directions[int(idx)] = np.array(t.data, dtype=np.float32).reshape(-1)
    return kv, directions


#: The deepest vector a file may declare. No language model has more than a few hundred layers;
#: a file declaring millions (fuzzing found ``personacore.num_layers`` 4294377475, which asked
#: numpy for a terabyte of zeros, and 4194307, which took half a minute) is corrupt or hostile.
MAX_LAYERS = 1 << 16


def _depth(kv: Dict[str, Any], key: str, where: str) -> int:
    """The integer metadata value ``key`` as a depth in ``0..MAX_LAYERS``, or a VectorFormatError."""
    kind, value = kv[key]
    if kind not in _INTEGERS or not 0 <= int(value) <= MAX_LAYERS:
        raise VectorFormatError(
            f"{where}: {key} is {value!r}; expected an integer in 0..{MAX_LAYERS}"
        )
    return int(value)


def load(path: Path, num_layers: Optional[int]) -> Loaded:
    """Directions, stored layer, stored name and metadata of the control vector in ``path``."""
    where = str(path)
    kv, directions = _read(path)
    arch = kv.get("general.architecture", (None, None))[1]
    if arch != "controlvector":
        raise VectorFormatError(
            f"{where}: general.architecture is {arch!r}, not 'controlvector' "
            "(this is a model file, not a control vector)"
        )
    if not directions:
        raise VectorFormatError(f"{where}: no direction.N tensors")
    hidden = {a.size for a in directions.values()}
    if len(hidden) != 1:
        raise VectorFormatError(
            f"{where}: direction tensors have different lengths {sorted(hidden)}"
        )
    (h,) = hidden
    if max(directions) >= MAX_LAYERS:
        raise VectorFormatError(
            f"{where}: direction.{max(directions)} is beyond any model's depth (at most {MAX_LAYERS})"
        )
    lc_type, lc = kv.get("controlvector.layer_count", (None, None))
    layer_count = _depth(kv, "controlvector.layer_count", where) if lc_type in _INTEGERS else None
    ours = "personacore.num_layers" in kv
    if num_layers is None:
        if ours:
            num_layers = _depth(kv, "personacore.num_layers", where)
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
        rows = [int(r) for r in kv.get("personacore.extra_rows", (None, []))[1]]
        data = np.asarray(kv.get("personacore.extra_data", (None, []))[1], dtype=np.float32)
        if len(rows) * h != data.size or any(not 0 <= r <= num_layers for r in rows):
            raise VectorFormatError(
                f"{where}: personacore.extra_rows/extra_data do not fit the vector"
            )
        for k, r in enumerate(rows):
            out[r] = data[k * h : (k + 1) * h]
    out = check_directions(out, where)
    if "personacore.metadata" in kv:
        payload = parse_header_json(kv["personacore.metadata"][1], where)
        return out, payload.get("layer"), payload.get("name"), payload.get("metadata", {})
    metadata: Dict[str, Any] = {"model": kv.get("controlvector.model_hint", (None, ""))[1]}
    if layer_count is not None:
        metadata["gguf_layer_count"] = layer_count
    return out, None, path.stem, metadata
