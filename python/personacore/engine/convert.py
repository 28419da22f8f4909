"""Type conversion of caller arguments into what the native engine takes, and nothing else.

Values (ranges, emptiness, finiteness, names) are checked once, in the engine, which raises
:class:`~personacore.errors.InvalidInputError` naming the argument (docs/architecture.md, "Values
are checked once"). These helpers only turn Python objects into ints, floats, strs, lists of ids
and float32 arrays, and raise the same error class when an argument has the wrong type.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from typing import Any, List, Optional

import numpy as np

from ..errors import InvalidInputError

__all__ = [
    "type_name",
    "as_int",
    "as_float",
    "as_optional_float",
    "as_str",
    "as_ids",
    "as_messages",
    "as_array",
]


def type_name(x: Any) -> str:
    """The name of ``x``'s type, for messages."""
    return type(x).__name__


def as_int(x: Any, what: str) -> int:
    """An integer that is not a bool."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral):
        raise InvalidInputError(f"{what} must be an int, got {x!r}")
    return int(x)


def as_i64(x: Any, what: str) -> int:
    """:func:`as_int` within a signed 64-bit integer (what the engine's arguments hold)."""
    v = as_int(x, what)
    if not -(1 << 63) <= v < 1 << 63:
        raise InvalidInputError(f"{what} is out of range, got {v}")
    return v


def as_float(x: Any, what: str) -> float:
    """A real number that is not a bool."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real):
        raise InvalidInputError(f"{what} must be a number, got {x!r}")
    return float(x)


def as_optional_float(x: Any, what: str) -> Optional[float]:
    """None, or :func:`as_float`."""
    return None if x is None else as_float(x, what)


def as_str(x: Any, what: str) -> str:
    """A str."""
    if not isinstance(x, str):
        raise InvalidInputError(f"{what} must be a str, got {x!r}")
    return x


def as_ids(ids: Any, what: str = "ids") -> List[int]:
    """Token ids: a list/tuple of ints or a 1-D integer numpy array (range checked by the engine)."""
    if isinstance(ids, (str, bytes)) or ids is None:
        raise InvalidInputError(f"{what} must be a list of token ids (ints), got {type_name(ids)}")
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1:
            raise InvalidInputError(f"{what} must be 1-D, got an array of shape {ids.shape}")
        if ids.size and ids.dtype.kind not in "iu":
            raise InvalidInputError(f"{what} must be integers, got an array of dtype {ids.dtype}")
        return [int(i) for i in ids.tolist()]
    try:
        seq = list(ids)
    except TypeError:
        raise InvalidInputError(
            f"{what} must be a list of token ids (ints), got {type_name(ids)}"
        ) from None
    out = []
    for pos, i in enumerate(seq):
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise InvalidInputError(
                f"{what}[{pos}] = {i!r} is a {type_name(i)}, expected an int token id"
            )
        out.append(int(i))
    return out


def as_messages(messages: Any, what: str = "messages") -> List[Any]:
    """A chat as a list (its messages are checked by the engine)."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Iterable):
        raise InvalidInputError(
            f"{what} must be a list of message dicts like {{'role': 'user', 'content': '...'}}, "
            f"got {type_name(messages)}"
        )
    return list(messages)


def as_array(x: Any, what: str) -> np.ndarray:
    """A float32 C-contiguous copy of ``x`` (callers may mutate their array later)."""
    try:
        return np.array(x, dtype=np.float32, order="C")
    except (TypeError, ValueError):
        raise InvalidInputError(f"{what} must be an array of numbers, got {type_name(x)}") from None
