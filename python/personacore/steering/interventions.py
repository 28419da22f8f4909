"""Steering the residual stream: :class:`Steer`, :class:`Ablate`, :class:`Cap`, and :class:`When`.

Conventions (docs/conventions.md, "Layers" and "Positions"): steering at layer ``i`` acts on the output of decoder block ``i``
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
The engine checks every value, once: what needs no model when the object is built (through
``_core.check_intervention`` / ``_core.check_when``), width, row count and layer range against the
model before any computation. This module only converts types.
"""

from __future__ import annotations

import numbers
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..engine.convert import as_array, as_float, as_int, as_optional_float
from ..engine.native import native
from ..engine.specs import InterventionSpec
from ..errors import InvalidInputError
from ..vectors.vector import PersonaVector

__all__ = ["POSITIONS", "When", "Steer", "Ablate", "Cap"]

#: Position modes accepted by ``positions=`` (docs/conventions.md, "Positions").
POSITIONS = ("all", "prompt", "response")

_OPS = {"above": "above", ">": "above", "below": "below", "<": "below"}


def _as_layer_list(layers: Any, what: str) -> Optional[List[int]]:
    """None, an int or a sequence of ints -> list of ints (values checked by the engine)."""
    if layers is None:
        return None
    if isinstance(layers, numbers.Integral) and not isinstance(layers, (bool, np.bool_)):
        return [int(layers)]
    if isinstance(layers, (str, bytes)) or not isinstance(layers, (Sequence, np.ndarray)):
        raise InvalidInputError(f"{what} must be an int or a list of ints, got {layers!r}")
    out = []
    for x in list(layers):
        if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral):
            raise InvalidInputError(f"{what} must be ints, got {x!r}")
        out.append(int(x))
    return out


def _origin(vector: Any, name: Optional[str]) -> List[Tuple[str, Dict[str, Any]]]:
    """``[(name, metadata)]`` of a PersonaVector (what the engine checks against the model it runs
    on, ``engine.specs.check_vector_model``); empty for a raw array."""
    if isinstance(vector, PersonaVector):
        return [(name or vector.name or "vector", vector.metadata)]
    return []


def _as_source(vector: Any, what: str) -> Tuple[np.ndarray, Optional[int], Optional[str]]:
    """(read-only float32 array, recommended layer, name) of a vector argument."""
    if isinstance(vector, PersonaVector):
        arr = np.ascontiguousarray(vector.directions, dtype=np.float32)
        return arr, vector.layer, vector.name
    arr = as_array(vector, what)
    arr.setflags(write=False)
    return arr, None, None


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

    A closed loop that holds (benches/README.md, "Closed loop"): ``min_on=N`` keeps a switched-on
    steer on for at least ``N`` tokens and ``min_off=N`` a switched-off one off, so the loop
    switches at most once per ``N`` tokens instead of on every token. ``mode="proportional"``
    scales the steer by ``min(1, gain × excess)``, the excess being how far the score is past the
    threshold (0 inside the hysteresis band): a small excess gets a gentle push, so the score
    settles near the threshold instead of being thrown far below it (``gain`` defaults to the
    engine's ``DEFAULT_GAIN``). :class:`Cap` with ``max=`` is the smooth control that needs no
    condition at all. Attention-sink positions never decide (see :class:`~personacore.Monitor`).
    """

    __slots__ = (
        "monitor",
        "above",
        "below",
        "hysteresis",
        "layer",
        "min_on",
        "min_off",
        "mode",
        "gain",
    )

    def __init__(
        self,
        monitor: str,
        above: Optional[float] = None,
        below: Optional[float] = None,
        hysteresis: float = 0.0,
        layer: Optional[int] = None,
        *,
        min_on: int = 0,
        min_off: int = 0,
        mode: str = "switch",
        gain: Optional[float] = None,
    ):
        """See the class docstring."""
        if not isinstance(monitor, str):
            raise InvalidInputError(f"When needs the name of a monitored vector, got {monitor!r}")
        self.monitor = monitor
        self.above = as_optional_float(above, "When above")
        self.below = as_optional_float(below, "When below")
        self.hysteresis = as_float(hysteresis, "When hysteresis")
        self.layer = None if layer is None else as_int(layer, "When layer")
        self.min_on = as_int(min_on, "When min_on")
        self.min_off = as_int(min_off, "When min_off")
        if not isinstance(mode, str):
            raise InvalidInputError(f"When mode must be a str, got {mode!r}")
        self.mode = mode
        self.gain = as_optional_float(gain, "When gain")
        native().check_when(self._request())

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

    def _request(self) -> Dict[str, Any]:
        """The native condition request (``_core.WhenRequest``)."""
        return {
            "monitor": self.monitor,
            "above": self.above,
            "below": self.below,
            "hysteresis": self.hysteresis,
            "layer": self.layer,
            "min_on": self.min_on,
            "min_off": self.min_off,
            "mode": self.mode,
            "gain": self.gain,
        }

    def __repr__(self) -> str:
        op = f"above={self.above}" if self.above is not None else f"below={self.below}"
        extra = f", layer={self.layer}" if self.layer is not None else ""
        extra += f", min_on={self.min_on}" if self.min_on else ""
        extra += f", min_off={self.min_off}" if self.min_off else ""
        extra += f", mode={self.mode!r}" if self.mode != "switch" else ""
        extra += f", gain={self.gain}" if self.gain is not None else ""
        return f"When({self.monitor!r}, {op}, hysteresis={self.hysteresis}{extra})"


class _Intervention(InterventionSpec):
    """Shared machinery of :class:`Steer`, :class:`Ablate` and :class:`Cap` (not public)."""

    kind = ""
    __slots__ = ("_source", "_recommended", "layers", "positions", "when", "name", "_origins")

    def __init__(self, vector: Any, layers: Any, positions: str, when: Any, name: Optional[str]):
        cls = type(self).__name__
        self._source, self._recommended, vec_name = _as_source(vector, f"{cls} vector")
        self.layers = _as_layer_list(layers, f"{cls} layers")
        if not isinstance(positions, str):
            raise InvalidInputError(
                f"unknown positions {positions!r}; valid modes: {', '.join(map(repr, POSITIONS))}"
            )
        self.positions = positions
        self.when = When.coerce(when)
        if name is not None and not isinstance(name, str):
            raise InvalidInputError(f"name must be a non-empty str or None, got {name!r}")
        self.name = name if name is not None else (vec_name or self.kind)
        self._origins = _origin(vector, self.name)
        native().check_intervention(self._request())

    def _vector_origins(self) -> List[Tuple[str, Dict[str, Any]]]:
        """``[(name, metadata)]`` of the PersonaVector given (none for a raw array)."""
        return self._origins

    @property
    def vector(self) -> np.ndarray:
        """The direction(s) given: float32 ``[hidden]`` or ``[num_layers + 1, hidden]`` (read-only)."""
        return self._source

    def _bounds(self) -> Dict[str, Optional[float]]:
        """``coef``, ``min`` and ``max`` of the request."""
        return {"coef": None, "min": None, "max": None}

    def _request(self) -> Dict[str, Any]:
        """The native steer request (``_core.InterventionRequest``), for every sequence."""
        return {
            "kind": self.kind,
            "name": self.name,
            **self._bounds(),
            "vector": self._source,
            "recommended": self._recommended,
            "layers": self.layers,
            "positions": self.positions,
            "when": None if self.when is None else self.when._request(),
            "sequences": None,
        }

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
        self.coef = as_float(coef, "Steer coef")
        super().__init__(vector, layers, positions, when, name)

    def _bounds(self) -> Dict[str, Optional[float]]:
        return {"coef": self.coef, "min": None, "max": None}

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
        self.min = as_optional_float(min, "Cap min")
        self.max = as_optional_float(max, "Cap max")
        super().__init__(vector, layers, positions, when, name)

    def _bounds(self) -> Dict[str, Optional[float]]:
        return {"coef": None, "min": self.min, "max": self.max}

    def _repr_fields(self) -> str:
        return f", min={self.min}, max={self.max}"
