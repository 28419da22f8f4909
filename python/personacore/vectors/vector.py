"""Persona vectors as plain values: :class:`PersonaVector`.

A persona vector holds one direction per layer, float32 ``[num_layers + 1, hidden]``, in the layer
layout of docs/conventions.md, Layers (row 0 = embeddings, row ``i`` = output of decoder block ``i``, last row
= final norm). Directions are stored unnormalised. Extraction (``pc.extract``) and the file formats
(``save``/``load``) come with the extraction issue; this module holds the value type they produce,
which :class:`~personacore.Steer` and :class:`~personacore.Monitor` accept.
"""

from __future__ import annotations

import numbers
from typing import Any, Dict, Optional, Tuple

import numpy as np

from ..errors import InvalidInputError

__all__ = ["PersonaVector"]


def _finite_array(x: Any, what: str) -> np.ndarray:
    """``x`` as a float32 array, rejecting non-numeric input and NaN/inf."""
    try:
        arr = np.array(x, dtype=np.float32)  # a copy: callers may mutate their array later
    except (TypeError, ValueError):
        raise InvalidInputError(
            f"{what} must be an array of numbers, got {type(x).__name__}"
        ) from None
    if arr.size == 0:
        raise InvalidInputError(f"{what} is empty")
    if not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0].tolist()
        raise InvalidInputError(f"{what} contains NaN or inf (first at index {bad})")
    return arr


class PersonaVector:
    """A direction per layer for one trait: ``directions`` float32 ``[num_layers + 1, hidden]``.

    ``layer`` is the recommended layer (used when a :class:`~personacore.Steer` or
    :class:`~personacore.Monitor` is given no layers), ``name`` labels scores and events, and
    ``metadata`` is a free-form dict (model, trait, method, statistics...). Vectors support
    ``+``, ``-`` (with another vector of the same shape), ``*`` and ``/`` by a scalar, unary ``-``
    and :meth:`normalized`; each returns a new vector.
    """

    __slots__ = ("_directions", "layer", "name", "metadata")

    def __init__(
        self,
        directions: Any,
        layer: Optional[int] = None,
        name: Optional[str] = None,
        metadata: Optional[Dict[str, Any]] = None,
    ):
        """Build a vector from ``directions`` ``[num_layers + 1, hidden]`` (copied to float32)."""
        arr = _finite_array(directions, "PersonaVector directions")
        if arr.ndim != 2 or arr.shape[0] < 2:
            raise InvalidInputError(
                f"PersonaVector directions must be 2-D [num_layers + 1, hidden], got shape {arr.shape}"
            )
        arr.setflags(write=False)
        self._directions = arr
        if layer is not None:
            if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
                raise InvalidInputError(
                    f"PersonaVector layer must be an int or None, got {layer!r}"
                )
            layer = int(layer)
            if not 0 <= layer < arr.shape[0]:
                raise InvalidInputError(
                    f"PersonaVector layer {layer} is outside 0..{arr.shape[0] - 1} (its rows)"
                )
        self.layer = layer
        if name is not None and not isinstance(name, str):
            raise InvalidInputError(f"PersonaVector name must be a str or None, got {name!r}")
        self.name = name
        if metadata is not None and not isinstance(metadata, dict):
            raise InvalidInputError(
                f"PersonaVector metadata must be a dict, got {type(metadata).__name__}"
            )
        self.metadata = dict(metadata or {})

    @property
    def directions(self) -> np.ndarray:
        """The directions, float32 ``[num_layers + 1, hidden]`` (read-only; copy to modify)."""
        return self._directions

    @property
    def num_layers(self) -> int:
        """Number of decoder blocks of the model it belongs to (rows - 1)."""
        return self._directions.shape[0] - 1

    @property
    def hidden_size(self) -> int:
        """Width of each direction."""
        return self._directions.shape[1]

    @property
    def shape(self) -> Tuple[int, int]:
        """``(num_layers + 1, hidden)``."""
        return tuple(self._directions.shape)  # type: ignore[return-value]

    def __getitem__(self, layer: int) -> np.ndarray:
        """The direction at ``layer`` (a read-only float32 ``[hidden]`` row)."""
        return self._directions[layer]

    def norms(self) -> np.ndarray:
        """The L2 norm of each row, float32 ``[num_layers + 1]``."""
        return np.linalg.norm(self._directions, axis=1).astype(np.float32)

    def normalized(self) -> "PersonaVector":
        """A copy whose every non-zero row has unit norm (zero rows stay zero)."""
        n = self.norms()[:, None]
        return self._like(np.where(n > 0, self._directions / np.where(n > 0, n, 1.0), 0.0))

    def _like(self, directions: np.ndarray) -> "PersonaVector":
        return PersonaVector(directions, layer=self.layer, name=self.name, metadata=self.metadata)

    def _other(self, other: Any, op: str) -> np.ndarray:
        if not isinstance(other, PersonaVector):
            raise InvalidInputError(f"cannot {op} a PersonaVector and a {type(other).__name__}")
        if other.shape != self.shape:
            raise InvalidInputError(
                f"cannot {op} PersonaVectors of shapes {self.shape} and {other.shape}"
            )
        return other._directions

    @staticmethod
    def _scalar(k: Any, op: str) -> float:
        if isinstance(k, bool) or not isinstance(k, numbers.Real) or not np.isfinite(float(k)):
            raise InvalidInputError(
                f"a PersonaVector can only be {op} by a finite number, got {k!r}"
            )
        return float(k)

    def __add__(self, other: Any) -> "PersonaVector":
        return self._like(self._directions + self._other(other, "add"))

    def __sub__(self, other: Any) -> "PersonaVector":
        return self._like(self._directions - self._other(other, "subtract"))

    def __mul__(self, k: Any) -> "PersonaVector":
        if not isinstance(k, numbers.Real):
            return NotImplemented
        return self._like(self._directions * self._scalar(k, "multiplied"))

    __rmul__ = __mul__

    def __truediv__(self, k: Any) -> "PersonaVector":
        k = self._scalar(k, "divided")
        if k == 0:
            raise InvalidInputError("cannot divide a PersonaVector by zero")
        return self._like(self._directions / k)

    def __neg__(self) -> "PersonaVector":
        return self._like(-self._directions)

    def __eq__(self, other: Any) -> bool:
        return (
            isinstance(other, PersonaVector)
            and other.shape == self.shape
            and other.layer == self.layer
            and bool(np.array_equal(other._directions, self._directions))
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"PersonaVector(name={self.name!r}, shape={self.shape}, layer={self.layer}, "
            f"metadata_keys={sorted(self.metadata)})"
        )

    def _repr_html_(self) -> str:
        """HTML for notebooks: name, model, recommended layer and the per-layer curve (held-out
        AUROC when the metadata has it, else direction norms); see :mod:`personacore.vectors.notebook`."""
        from .notebook import vector_html

        return vector_html(self)

    def save(self, path: Any, **kwargs: Any) -> Any:
        """Write the vector to ``path``: ``.safetensors`` (ours, with metadata), ``.pt`` (persona_vectors)
        or ``.gguf`` (llama.cpp / repeng control vector). See :func:`personacore.vectors.io.save_vector`."""
        from .io import save_vector

        return save_vector(self, path, **kwargs)

    @classmethod
    def load(cls, path: Any, model: Any = None, **kwargs: Any) -> "PersonaVector":
        """Read a vector from a ``.safetensors``, ``.pt`` or ``.gguf`` file (``name=``, ``layer=``,
        ``num_layers=``, ``format=`` as in :func:`personacore.vectors.io.load_vector`), or a
        built-in vector of the default model by its bare name (``PersonaVector.load("impolite")``;
        an unknown name lists the built-in ones).

        With ``model=``, a vector whose metadata names the model it was extracted from must
        belong to ``model``, or :class:`~personacore.ModelMismatchError` names both models.
        """
        from .builtin import is_builtin_name
        from .io import load_vector

        if is_builtin_name(path):
            from .builtin import load_builtin

            vec = load_builtin(path, **kwargs)
        else:
            vec = load_vector(path, **kwargs)
        if model is not None:
            vec.check_model(model)
        if cls is PersonaVector:
            return vec
        return cls(vec.directions, layer=vec.layer, name=vec.name, metadata=vec.metadata)

    def check_model(self, model: Any) -> None:
        """Raise :class:`~personacore.ModelMismatchError` when this vector was extracted from a
        model other than ``model`` (judged by the sha256 its metadata records; a vector without
        one is not checked)."""
        from ..engine.specs import check_vector_model

        check_vector_model(model, self.name, self.metadata)

    @property
    def calibration(self) -> Any:
        """The calibrated alert numbers at the recommended layer
        (:class:`~personacore.vectors.calibration.Calibration`: threshold and rule, false-alarm and
        detection rates, per-class held-out statistics, the early-warning fit)."""
        from .calibration import calibration

        return calibration(self)
