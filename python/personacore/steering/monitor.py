"""Live monitoring of persona directions: :class:`Monitor`.

A monitor projects the residual stream of every token (prompt and generated) onto each of its
vectors at each monitored layer, inside the decode loop: the score is the scalar projection
``a·v/‖v‖`` (docs/conventions.md, "Projection"; ``a`` unnormalised). Monitored layers are capture rows
``0 .. num_layers`` (row 0 = embeddings, row ``num_layers`` = final norm). With ``thresholds``, every
crossing of a threshold is an event (``"alert"`` going above, ``"clear"`` coming back below) in
``Generation.events`` and the audit log.

Attention sinks: position 0, and any position whose residual norm at a monitored layer is above
5× the median norm of positions ``1 ..`` so far at that layer (the engine's ``SINK_NORM_RATIO``),
is marked in ``Generation.sinks`` / ``Step.sinks``. Its norm is the "massive activation" every
such model gives its first token (25,102 against a median of 143 at layer 12 of the default
model), so its projection says nothing about a trait; by default it raises no alert and switches
no :class:`~personacore.When` (``include_sinks=True`` keeps it). The engine checks every value checks every value (``_core.check_monitor``
when the monitor is built, the rest against the model before any computation); this module only
converts types.
"""

from __future__ import annotations

import numbers
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from ..engine.convert import as_float
from ..engine.native import native
from ..engine.specs import MonitorSpec
from ..errors import InvalidInputError
from ..vectors.calibration import (
    Calibration,
    CalibrationMissingError,
    auto_threshold,
    calibration,
)
from ..vectors.vector import PersonaVector
from .interventions import _as_layer_list, _as_source

#: ``Monitor(thresholds="auto")``: each threshold from its vector's held-out statistics.
AUTO = "auto"

__all__ = ["Monitor"]

LayersSpec = Union[None, str, List[int]]


def _as_layers_spec(spec: Any, what: str) -> LayersSpec:
    """None, a name (only ``"all"`` is one; the engine checks) or a list of ints."""
    if isinstance(spec, str):
        return spec
    return _as_layer_list(spec, what)


class Monitor(MonitorSpec, default=True):
    """Score tokens against named vectors: ``Monitor({"evil": vec, ...}, layers=..., thresholds=...)``.

    Each vector is a :class:`~personacore.PersonaVector`, an array ``[num_layers + 1, hidden]`` or an
    array ``[hidden]`` (the same direction at every monitored layer). ``layers``:

    * ``None``: each PersonaVector's recommended layer (an error for raw arrays);
    * ``"all"``: every capture row ``0 .. num_layers``;
    * an int or a list of ints: those layers, for every vector (scores keep this order);
    * a dict ``{name: None | "all" | int | [ints]}``: per vector.

    ``thresholds`` is a number (for every vector), ``{name: number}``, or ``"auto"`` (also as a
    dict value): the threshold calibrated on the vector's held-out rollouts
    (:func:`personacore.vectors.calibration.auto_threshold`) at the layer the vector is
    monitored at when that is one explicit layer, else at its recommended layer (the number then
    applies at every monitored layer of that vector); ``monitor.calibration`` shows the numbers. A score above it raises an ``"alert"`` event, falling back to or below it a
    ``"clear"`` event. Attention-sink positions
    (module docstring) raise no alert and switch no condition unless ``include_sinks=True``.
    """

    __slots__ = ("_sources", "_layers", "_by_name", "thresholds", "include_sinks", "_vectors")

    def __init__(
        self,
        vectors: Mapping[str, Any],
        layers: Any = None,
        thresholds: Union[None, float, str, Mapping[str, Union[float, str]]] = None,
        include_sinks: bool = False,
    ):
        """See the class docstring."""
        if not isinstance(vectors, Mapping):
            raise InvalidInputError(
                "Monitor needs a non-empty dict {name: vector} (PersonaVector or array)"
            )
        self._sources: Dict[str, Tuple[np.ndarray, Optional[int], Optional[str]]] = {}
        for name, vec in vectors.items():
            if not isinstance(name, str):
                raise InvalidInputError(
                    f"Monitor vector names must be non-empty strs, got {name!r}"
                )
            self._sources[name] = _as_source(vec, f"Monitor vector {name!r}")
        self._vectors = {n: v for n, v in vectors.items() if isinstance(v, PersonaVector)}
        # Layers named per vector (names the monitor lacks are left for the engine to reject).
        self._by_name: Dict[Any, LayersSpec] = {}
        if isinstance(layers, Mapping):
            self._by_name = {
                n: _as_layers_spec(spec, f"Monitor layers for {n!r}") for n, spec in layers.items()
            }
            default: LayersSpec = None
        else:
            default = _as_layers_spec(layers, "Monitor layers")
        self._layers: Dict[str, LayersSpec] = {
            n: self._by_name.get(n, default) for n in self._sources
        }
        if thresholds is None:
            self.thresholds: Dict[str, float] = {}
        elif isinstance(thresholds, str) and thresholds == AUTO:
            self.thresholds = {n: self._auto(n) for n in self._sources}
        elif isinstance(thresholds, Mapping):
            self.thresholds = {
                n: self._auto(n)
                if isinstance(t, str) and t == AUTO
                else as_float(t, f"threshold for {n!r}")
                for n, t in thresholds.items()
            }
        elif isinstance(thresholds, numbers.Real) and not isinstance(thresholds, bool):
            self.thresholds = {n: float(thresholds) for n in self._sources}
        else:
            raise InvalidInputError(
                f"Monitor thresholds must be None, a number, 'auto' or a dict {{name: number | 'auto'}}, "
                f"got {thresholds!r}"
            )
        if not isinstance(include_sinks, (bool, np.bool_)):
            raise InvalidInputError(f"Monitor include_sinks must be a bool, got {include_sinks!r}")
        self.include_sinks = bool(include_sinks)
        native().check_monitor(self._request())

    def _auto(self, name: str) -> float:
        """The calibrated threshold of vector ``name`` (``thresholds="auto"``): at the one layer
        it is monitored at when that is a single explicit layer, else at its recommended layer."""
        vec = self._vectors.get(name)
        if vec is None:
            raise CalibrationMissingError(
                f"Monitor threshold 'auto' for {name!r} needs a PersonaVector with held-out "
                "statistics (from pc.extract or a built-in vector), not a raw array"
            )
        spec = self._layers.get(name)
        one = spec[0] if isinstance(spec, list) and len(spec) == 1 else None
        return auto_threshold(vec, layer=one)

    @property
    def calibration(self) -> Dict[str, Calibration]:
        """``{name: Calibration}`` of each PersonaVector with held-out statistics (the numbers
        ``thresholds="auto"`` and :meth:`early_warning_probability` use)."""
        out = {}
        for n, v in self._vectors.items():
            spec = self._layers.get(n)
            one = spec[0] if isinstance(spec, list) and len(spec) == 1 else None
            try:
                out[n] = calibration(v, layer=one)
            except CalibrationMissingError:
                continue
        return out

    def early_warning_probability(self, generation: Any) -> Dict[str, float]:
        """P(trait) of each calibrated vector from a generation's early-warning score: the last
        prompt token's projection, before the first reply token, at the layer the vector's
        early-warning fit reads (``vec.calibration.early_warning_layer``, where the held-out
        prompts separate best; monitor it, e.g. ``layers={name: [vec.layer, that layer]}``).

        ``generation`` is a :class:`~personacore.Generation` (or any object with
        ``early_warning`` and ``score_layers``). Names whose early-warning layer this monitor does
        not score are left out; when that leaves none, or a vector has no early-warning fit,
        :class:`CalibrationMissingError` says which layer to monitor.
        """
        out, missing = {}, []
        for n, v in self._vectors.items():
            if n not in generation.early_warning:
                continue
            cal = calibration(v)
            layers = list(generation.score_layers[n])
            want = cal.early_warning_layer
            if want is None:
                cal.probability(0.0)  # raises the clear error
            if want in layers:
                out[n] = cal.probability(float(generation.early_warning[n][layers.index(want)]))
            else:
                missing.append(f"{n!r} at layer {want} (scored at {layers})")
        if missing and not out:
            raise CalibrationMissingError(
                "the early-warning probability is calibrated at a layer this monitor does not "
                f"score: {', '.join(missing)}"
            )
        return out

    def _vector_origins(self) -> List[Tuple[str, Dict[str, Any]]]:
        """``[(name, metadata)]`` of the PersonaVectors monitored."""
        return [(n, v.metadata) for n, v in self._vectors.items()]

    @property
    def names(self) -> List[str]:
        """The monitored vector names, in score order."""
        return list(self._sources)

    def layers_for(self, model: Any) -> Dict[str, List[int]]:
        """The layers each vector is scored at on ``model`` (resolves None and ``"all"``)."""
        return {n: list(ls) for n, ls in model._core.monitor_layers(self._request())}

    def _request(self) -> Dict[str, Any]:
        """The native monitor request (``_core.MonitorRequest``)."""
        return {
            "vectors": [
                {"name": n, "vector": arr, "recommended": rec}
                for n, (arr, rec, _) in self._sources.items()
            ],
            "layers": None,
            "layers_by_name": list(self._layers.items())
            + [(n, spec) for n, spec in self._by_name.items() if n not in self._sources],
            "thresholds": list(self.thresholds.items()),
            "include_sinks": self.include_sinks,
        }

    def __repr__(self) -> str:
        extra = ", include_sinks=True" if self.include_sinks else ""
        return f"Monitor(names={self.names}, layers={self._layers}, thresholds={self.thresholds}{extra})"
