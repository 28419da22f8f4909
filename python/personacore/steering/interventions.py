"""Steering the residual stream: :class:`Steer`, :class:`Ablate`, :class:`Cap`, and :class:`When`.

Conventions (DESIGN.md section 2): steering at layer ``i`` acts on the output of decoder block ``i``
(1-based), so the steerable layers are ``1 .. num_layers - 1``. Positions: ``"all"`` = every
position of every forward pass, ``"prompt"`` = the prompt (prefill) pass only, ``"response"`` = the
last position of every forward pass (the last prompt token, then each generated token).

* ``Steer(v, coef)`` adds ``coef * v[layer]`` (``v`` unnormalised, as persona_vectors does);
* ``Ablate(v)`` removes the component along ``v[layer]``: ``x - (x·u) u`` with ``u = v/‖v‖``;
* ``Cap(v, min=, max=)`` clamps the scalar projection ``x·u`` into ``[min, max]``.

Several interventions sum (they are applied one after the other, in the order given). Any of them
can be made conditional with ``when=When("evil", above=3.0)``: active only while the named monitor
score is above (or below) a threshold, which needs a :class:`~personacore.Monitor` in the same call.

A vector is a :class:`~personacore.PersonaVector`, an array ``[num_layers + 1, hidden]`` (the row of
each steered layer is used) or an array ``[hidden]`` (the same direction at every steered layer).
Everything that can be checked without the model is checked when the object is built; width, row
count and layer range are checked against the model before any computation.
"""

from __future__ import annotations

import numbers
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import InvalidInputError
from ..engine.specs import InterventionSpec
from ..vectors.vector import PersonaVector, _finite_array

__all__ = ["POSITIONS", "When", "Steer", "Ablate", "Cap"]

#: Position modes accepted by ``positions=`` (DESIGN.md section 2).
POSITIONS = ("all", "prompt", "response")

_OPS = {"above": "above", ">": "above", "below": "below", "<": "below"}


def _finite(x: Any, what: str, allow_none: bool = False) -> Optional[float]:
    if x is None and allow_none:
        return None
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise InvalidInputError(f"{what} must be a number, got {x!r}")
    x = float(x)
    if not np.isfinite(x):
        raise InvalidInputError(f"{what} must be finite, got {x}")
    return x


def _as_layer_list(layers: Any, what: str) -> Optional[List[int]]:
    """None, an int or a sequence of distinct ints -> list of ints (range checked later)."""
    if layers is None:
        return None
    if isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
        return [int(layers)]
    if isinstance(layers, (str, bytes)) or not isinstance(layers, (Sequence, np.ndarray)):
        raise InvalidInputError(f"{what} must be an int or a list of ints, got {layers!r}")
    out = []
    for x in list(layers):
        if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral):
            raise InvalidInputError(f"{what} must be ints, got {x!r}")
        out.append(int(x))
    if not out:
        raise InvalidInputError(f"{what} is empty: give at least one layer")
    if len(set(out)) != len(out):
        raise InvalidInputError(f"{what} lists a layer twice: {out}")
    return out


def _as_source(vector: Any, what: str) -> Tuple[np.ndarray, Optional[int], Optional[str]]:
    """(float32 array [hidden] or [rows, hidden], recommended layer, name) of a vector argument."""
    if isinstance(vector, PersonaVector):
        return vector.directions, vector.layer, vector.name
    arr = _finite_array(vector, what)
    if arr.ndim not in (1, 2):
        raise InvalidInputError(
            f"{what} must be [hidden] or [num_layers + 1, hidden], got an array of shape {arr.shape}"
        )
    arr.setflags(write=False)
    return arr, None, None


def _rows(arr: np.ndarray, layers: List[int], model: Any, what: str) -> np.ndarray:
    """The direction at each of ``layers``: float32 ``[len(layers), hidden]``, shape-checked."""
    hidden, rows = model.hidden_size, model.num_layers + 1
    if arr.shape[-1] != hidden:
        raise InvalidInputError(
            f"{what} has width {arr.shape[-1]}, but the model's hidden size is {hidden}"
        )
    if arr.ndim == 1:
        return np.ascontiguousarray(np.broadcast_to(arr, (len(layers), hidden)), dtype=np.float32)
    if arr.shape[0] != rows:
        raise InvalidInputError(
            f"{what} has {arr.shape[0]} rows, but the model needs num_layers + 1 = {rows} "
            f"(one direction per layer, DESIGN.md section 2)"
        )
    return np.ascontiguousarray(arr[layers], dtype=np.float32)


class When:
    """A condition for a steering intervention: on while a monitor score crosses a threshold.

    ``When("evil", above=3.0, hysteresis=0.5)`` switches on when the ``"evil"`` monitor score
    rises above 3.0 and back off only once it falls to ``3.0 - 0.5`` or below;
    ``When("calm", below=-1.0)`` is on while the score is below -1.0 (off again above
    ``-1.0 + hysteresis``). ``layer`` picks which monitored layer decides (default: the first layer the
    monitor watches for that name). The score of a token is read in the forward pass that processes
    it, so a switch takes effect from the next forward pass. Give exactly one of ``above``/``below``.
    A tuple ``("evil", "above", 3.0)`` (or ``">"``/``"<"``, with an optional fourth item, the
    hysteresis) is accepted wherever a ``When`` is.
    """

    __slots__ = ("monitor", "above", "below", "hysteresis", "layer")

    def __init__(
        self,
        monitor: str,
        above: Optional[float] = None,
        below: Optional[float] = None,
        hysteresis: float = 0.0,
        layer: Optional[int] = None,
    ):
        """See the class docstring."""
        if not isinstance(monitor, str) or not monitor:
            raise InvalidInputError(f"When needs the name of a monitored vector, got {monitor!r}")
        if (above is None) == (below is None):
            raise InvalidInputError("When needs exactly one of above= or below=")
        self.monitor = monitor
        self.above = _finite(above, "When above", allow_none=True)
        self.below = _finite(below, "When below", allow_none=True)
        self.hysteresis = _finite(hysteresis, "When hysteresis")
        if self.hysteresis < 0:
            raise InvalidInputError(f"When hysteresis must be >= 0, got {self.hysteresis}")
        if layer is not None and (
            isinstance(layer, bool) or not isinstance(layer, numbers.Integral)
        ):
            raise InvalidInputError(f"When layer must be an int or None, got {layer!r}")
        self.layer = None if layer is None else int(layer)

    @classmethod
    def coerce(cls, when: Any) -> Optional["When"]:
        """Accept None, a :class:`When`, or a tuple.

        The tuple is ``(name, op, threshold)`` or ``(name, op, threshold, hysteresis)`` with ``op`` one
        of ``"above"``, ``"below"``, ``">"``, ``"<"``.
        """
        if when is None or isinstance(when, When):
            return when
        if (
            isinstance(when, tuple)
            and len(when) in (3, 4)
            and isinstance(when[1], str)
            and when[1] in _OPS
        ):
            hysteresis = when[3] if len(when) == 4 else 0.0
            return cls(when[0], hysteresis=hysteresis, **{_OPS[when[1]]: when[2]})
        raise InvalidInputError(
            f"when must be a pc.When or a tuple (name, 'above'|'below', threshold[, hysteresis]), "
            f"got {when!r}"
        )

    def _resolve(self, monitor_layers: Optional[Dict[str, List[int]]]) -> Dict[str, Any]:
        if monitor_layers is None:
            raise InvalidInputError(
                f"a conditional steer (when={self!r}) needs monitor=pc.Monitor({{{self.monitor!r}: ...}})"
            )
        if self.monitor not in monitor_layers:
            raise InvalidInputError(
                f"when= names monitor {self.monitor!r}, which is not monitored "
                f"(monitored: {', '.join(map(repr, monitor_layers)) or 'none'})"
            )
        layers = monitor_layers[self.monitor]
        layer = layers[0] if self.layer is None else self.layer
        if layer not in layers:
            raise InvalidInputError(
                f"when= reads {self.monitor!r} at layer {layer}, but the monitor watches it only at {layers}"
            )
        return {
            "monitor": self.monitor,
            "layer": layer,
            "above": self.above,
            "below": self.below,
            "hysteresis": self.hysteresis,
        }

    def __repr__(self) -> str:
        op = f"above={self.above}" if self.above is not None else f"below={self.below}"
        extra = f", layer={self.layer}" if self.layer is not None else ""
        return f"When({self.monitor!r}, {op}, hysteresis={self.hysteresis}{extra})"


class _Intervention(InterventionSpec):
    """Shared machinery of :class:`Steer`, :class:`Ablate` and :class:`Cap` (not public)."""

    kind = ""
    __slots__ = ("_source", "_recommended", "layers", "positions", "when", "name")

    def __init__(self, vector: Any, layers: Any, positions: str, when: Any, name: Optional[str]):
        what = f"{type(self).__name__} vector"
        self._source, self._recommended, vec_name = _as_source(vector, what)
        self.layers = _as_layer_list(layers, f"{type(self).__name__} layers")
        if not isinstance(positions, str) or positions not in POSITIONS:
            raise InvalidInputError(
                f"unknown positions {positions!r}; valid modes: {', '.join(map(repr, POSITIONS))}"
            )
        self.positions = positions
        self.when = When.coerce(when)
        if name is not None and (not isinstance(name, str) or not name):
            raise InvalidInputError(f"name must be a non-empty str or None, got {name!r}")
        self.name = name or vec_name or self.kind

    @property
    def vector(self) -> np.ndarray:
        """The direction(s) given: float32 ``[hidden]`` or ``[num_layers + 1, hidden]`` (read-only)."""
        return self._source

    def _coef(self) -> float:
        return 1.0

    def _extra(self) -> Dict[str, Any]:
        return {"min": None, "max": None}

    def _resolve(
        self, model: Any, sequences: List[int], monitor_layers: Optional[Dict[str, List[int]]]
    ) -> Dict[str, Any]:
        """The engine's steer dict for ``model`` (all checks that need the model happen here)."""
        cls = type(self).__name__
        layers = self.layers
        if layers is None:
            if self._recommended is None:
                raise InvalidInputError(
                    f"{cls} needs layers=[...]: the vector has no recommended layer "
                    f"(only a PersonaVector with .layer set provides one)"
                )
            layers = [self._recommended]
        n = model.num_layers
        for layer in layers:
            if not 1 <= layer <= n - 1:
                raise InvalidInputError(
                    f"{cls} layer {layer} is not steerable: valid layers are 1..{n - 1} "
                    f"(the output of decoder block i; DESIGN.md section 2)"
                )
        vectors = _rows(self._source, layers, model, f"{cls} vector")
        if self.kind != "add":
            norms = np.linalg.norm(vectors, axis=1)
            if (norms == 0).any():
                raise InvalidInputError(
                    f"{cls} needs a non-zero direction, but the vector is zero at layer "
                    f"{layers[int(np.argmin(norms))]}"
                )
        d = {
            "kind": self.kind,
            "name": self.name,
            "coef": self._coef(),
            "layers": list(layers),
            "vectors": vectors,
            "positions": self.positions,
            "sequences": list(sequences),
            "when": None if self.when is None else self.when._resolve(monitor_layers),
        }
        d.update(self._extra())
        return d

    def _repr_fields(self) -> str:
        return ""

    def __repr__(self) -> str:
        layers = self.layers if self.layers is not None else f"recommended({self._recommended})"
        when = f", when={self.when!r}" if self.when is not None else ""
        return (
            f"{type(self).__name__}({self.name!r}{self._repr_fields()}, layers={layers}, "
            f"positions={self.positions!r}{when})"
        )


class Steer(_Intervention):
    """Add ``coef * vector[layer]`` to the residual stream at each of ``layers``.

    ``layers=None`` uses the PersonaVector's recommended layer. ``positions`` is ``"all"``,
    ``"prompt"`` or ``"response"``; ``when`` makes it conditional (:class:`When`); ``name`` labels
    its events (default: the vector's name, else ``"add"``).
    """

    kind = "add"
    __slots__ = ("coef",)

    def __init__(
        self,
        vector: Any,
        coef: float,
        layers: Union[int, Sequence[int], None] = None,
        positions: str = "all",
        when: Any = None,
        name: Optional[str] = None,
    ):
        """See the class docstring."""
        self.coef = _finite(coef, "Steer coef")
        super().__init__(vector, layers, positions, when, name)

    def _coef(self) -> float:
        return self.coef

    def _repr_fields(self) -> str:
        return f", coef={self.coef}"


class Ablate(_Intervention):
    """Remove the component along ``vector[layer]`` (``x - (x·u) u``, ``u`` the unit vector).

    Arguments as :class:`Steer`, without a coefficient.
    """

    kind = "ablate"
    __slots__ = ()

    def __init__(
        self,
        vector: Any,
        layers: Union[int, Sequence[int], None] = None,
        positions: str = "all",
        when: Any = None,
        name: Optional[str] = None,
    ):
        """See the class docstring."""
        super().__init__(vector, layers, positions, when, name)


class Cap(_Intervention):
    """Clamp the scalar projection ``x·u`` on ``vector[layer]`` into ``[min, max]``.

    Give ``min``, ``max`` or both (``min <= max``); the other arguments are as :class:`Steer`.
    """

    kind = "cap"
    __slots__ = ("min", "max")

    def __init__(
        self,
        vector: Any,
        layers: Union[int, Sequence[int], None] = None,
        min: Optional[float] = None,
        max: Optional[float] = None,  # noqa: A002
        positions: str = "all",
        when: Any = None,
        name: Optional[str] = None,
    ):
        """See the class docstring."""
        self.min = _finite(min, "Cap min", allow_none=True)
        self.max = _finite(max, "Cap max", allow_none=True)
        if self.min is None and self.max is None:
            raise InvalidInputError("Cap needs min=, max= or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise InvalidInputError(f"Cap min ({self.min}) is greater than max ({self.max})")
        super().__init__(vector, layers, positions, when, name)

    def _extra(self) -> Dict[str, Any]:
        return {"min": self.min, "max": self.max}

    def _repr_fields(self) -> str:
        return f", min={self.min}, max={self.max}"
