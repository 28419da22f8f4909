"""Live monitoring of persona directions: :class:`Monitor`.

A monitor projects the residual stream of every token (prompt and generated) onto each of its
vectors at each monitored layer, inside the decode loop: the score is the scalar projection
``a·v/‖v‖`` (DESIGN.md section 2; ``a`` unnormalised). Monitored layers are capture rows
``0 .. num_layers`` (row 0 = embeddings, row ``num_layers`` = final norm). With ``thresholds``, every
crossing of a threshold is an event (``"alert"`` going above, ``"clear"`` coming back below) in
``Generation.events`` and the audit log.
"""

from __future__ import annotations

import numbers
from typing import Any, Dict, List, Mapping, Union

import numpy as np

from ..errors import InvalidInputError
from ..engine.specs import MonitorSpec
from .interventions import _as_layer_list, _as_source, _finite, _rows

__all__ = ["Monitor"]

LayersSpec = Union[None, str, int, List[int]]


class Monitor(MonitorSpec, default=True):
    """Score tokens against named vectors: ``Monitor({"evil": vec, ...}, layers=..., thresholds=...)``.

    Each vector is a :class:`~personacore.PersonaVector`, an array ``[num_layers + 1, hidden]`` or an
    array ``[hidden]`` (the same direction at every monitored layer). ``layers``:

    * ``None``: each PersonaVector's recommended layer (an error for raw arrays);
    * ``"all"``: every capture row ``0 .. num_layers``;
    * an int or a list of ints: those layers, for every vector (scores keep this order);
    * a dict ``{name: None | "all" | int | [ints]}``: per vector.

    ``thresholds`` is a number (for every vector) or ``{name: number}``; a score above it raises an
    ``"alert"`` event, falling back to or below it a ``"clear"`` event.
    """

    __slots__ = ("_sources", "_layers", "thresholds")

    def __init__(
        self,
        vectors: Mapping[str, Any],
        layers: Any = None,
        thresholds: Union[None, float, Mapping[str, float]] = None,
    ):
        """See the class docstring."""
        if not isinstance(vectors, Mapping) or not vectors:
            raise InvalidInputError(
                "Monitor needs a non-empty dict {name: vector} (PersonaVector or array)"
            )
        self._sources: Dict[str, Any] = {}
        for name, vec in vectors.items():
            if not isinstance(name, str) or not name:
                raise InvalidInputError(
                    f"Monitor vector names must be non-empty strs, got {name!r}"
                )
            self._sources[name] = _as_source(vec, f"Monitor vector {name!r}")
        if isinstance(layers, Mapping):
            unknown = [n for n in layers if n not in self._sources]
            if unknown:
                raise InvalidInputError(f"Monitor layers names unknown vectors: {unknown}")
            per_name = {n: layers.get(n) for n in self._sources}
        else:
            per_name = {n: layers for n in self._sources}
        self._layers: Dict[str, LayersSpec] = {}
        for n, spec in per_name.items():
            if isinstance(spec, str):
                if spec != "all":
                    raise InvalidInputError(
                        f"Monitor layers for {n!r} must be None, 'all', an int or a list of ints, "
                        f"got {spec!r}"
                    )
                self._layers[n] = "all"
            else:
                self._layers[n] = _as_layer_list(spec, f"Monitor layers for {n!r}")
        if thresholds is None:
            self.thresholds: Dict[str, float] = {}
        elif isinstance(thresholds, Mapping):
            unknown = [n for n in thresholds if n not in self._sources]
            if unknown:
                raise InvalidInputError(
                    f"Monitor thresholds name unknown vectors {unknown}; monitored: {list(self._sources)}"
                )
            self.thresholds = {n: _finite(t, f"threshold for {n!r}") for n, t in thresholds.items()}
        elif isinstance(thresholds, numbers.Real) and not isinstance(thresholds, bool):
            t = _finite(thresholds, "Monitor thresholds")
            self.thresholds = {n: t for n in self._sources}
        else:
            raise InvalidInputError(
                f"Monitor thresholds must be None, a number or a dict {{name: number}}, got {thresholds!r}"
            )

    @property
    def names(self) -> List[str]:
        """The monitored vector names, in score order."""
        return list(self._sources)

    def layers_for(self, model: Any) -> Dict[str, List[int]]:
        """The layers each vector is scored at on ``model`` (resolves None and ``"all"``)."""
        out = {}
        for name, spec in self._layers.items():
            arr, recommended, _ = self._sources[name]
            if spec == "all":
                layers = list(range(model.num_layers + 1))
            elif spec is None:
                if recommended is None:
                    raise InvalidInputError(
                        f"Monitor vector {name!r} has no recommended layer: pass layers=[...] or 'all' "
                        f"(only a PersonaVector with .layer set provides one)"
                    )
                layers = [recommended]
            else:
                layers = list(spec)
            for layer in layers:
                if not 0 <= layer <= model.num_layers:
                    raise InvalidInputError(
                        f"Monitor layer {layer} for {name!r} is outside 0..{model.num_layers}"
                    )
            out[name] = layers
        return out

    def _resolve(self, model: Any) -> Dict[str, Any]:
        """The engine's monitor dict for ``model`` (every check that needs the model happens here)."""
        layers = self.layers_for(model)
        vectors = []
        for name, ls in layers.items():
            rows = _rows(self._sources[name][0], ls, model, f"Monitor vector {name!r}")
            norms = np.linalg.norm(rows, axis=1)
            if (norms == 0).any():
                raise InvalidInputError(
                    f"Monitor vector {name!r} is zero at layer {ls[int(np.argmin(norms))]}: "
                    f"a projection a·v/‖v‖ needs a non-zero v"
                )
            vectors.append(rows)
        return {
            "names": list(layers),
            "layers": [layers[n] for n in layers],
            "vectors": vectors,
            "thresholds": dict(self.thresholds),
        }

    def __repr__(self) -> str:
        return f"Monitor(names={self.names}, layers={self._layers}, thresholds={self.thresholds})"
