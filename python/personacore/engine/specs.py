"""What the engine accepts as steering and monitoring: two abstract specs.

The engine sits below the steering layer (see docs/architecture.md), so it never imports
:class:`~personacore.Steer` or :class:`~personacore.Monitor`. Instead it reads any
:class:`InterventionSpec` / :class:`MonitorSpec` through their ``_request`` methods, which turn a
spec into the plain request dict the native engine takes (its keys are in ``_core.pyi``); the
native engine checks it and resolves it against the model. ``personacore.steering`` implements both.
"""

from __future__ import annotations

import abc
import weakref
from collections.abc import Mapping
from typing import Any, Callable, ClassVar, Dict, List, Optional, Tuple

from ..errors import InvalidInputError, ModelMismatchError
from .defaults import model_identity

__all__ = [
    "InterventionSpec",
    "MonitorSpec",
    "check_vector_model",
    "check_spec_models",
    "resolve_steers",
    "resolve_single_forward",
]


class InterventionSpec(abc.ABC):
    """An intervention the engine applies in a forward pass (``pc.Steer``, ``pc.Ablate``, ``pc.Cap``)."""

    #: The condition (a ``pc.When``) that switches it on and off, or None (always on).
    when: Any

    @abc.abstractmethod
    def _request(self) -> Dict[str, Any]:
        """The native steer request (``_core.InterventionRequest``), applied to the whole batch."""

    def _vector_origins(self) -> List[Tuple[str, Dict[str, Any]]]:
        """``[(vector name, vector metadata)]``: checked against the model by
        :func:`check_spec_models` (none by default)."""
        return []


class MonitorSpec(abc.ABC):
    """A bank of vectors the engine scores every token against (``pc.Monitor``)."""

    #: Builds the default spec from a plain ``{name: vector}`` mapping (set by the subclass that
    #: declares itself ``default=True``).
    _from_mapping: ClassVar[Optional[Callable[[Mapping], "MonitorSpec"]]] = None

    def __init_subclass__(cls, default: bool = False, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if default:
            MonitorSpec._from_mapping = cls

    @abc.abstractmethod
    def _request(self) -> Dict[str, Any]:
        """The native monitor request (``_core.MonitorRequest``)."""

    def _vector_origins(self) -> List[Tuple[str, Dict[str, Any]]]:
        """``[(vector name, vector metadata)]`` (as :meth:`InterventionSpec._vector_origins`)."""
        return []

    def _prepared(self, core: Any) -> Any:
        """The native monitor checked and resolved for ``core`` (a ``_core.Model``), made once per
        model and kept while the request it was made from stays the same: a service that passes
        one monitor to every request does not convert and lay out its vectors per request.

        The key is everything in the request but the vector arrays, which count by identity (the
        entry keeps them alive, so an identity is never reused); ``pc.Monitor`` holds its arrays
        read-only, so they cannot change under the key.
        """
        req = self._request()
        arrays = tuple(v["vector"] for v in req["vectors"])
        key = (
            tuple((v["name"], id(v["vector"]), v["recommended"]) for v in req["vectors"]),
            repr({k: v for k, v in req.items() if k != "vectors"}),
        )
        cache = self.__dict__.get("_prepared_by_model")
        if cache is None:
            cache = self.__dict__["_prepared_by_model"] = weakref.WeakKeyDictionary()
        hit = cache.get(core)
        if hit is not None and hit[0] == key:
            return hit[2]
        prepared = core.prepare_monitor(req)
        cache[core] = (key, arrays, prepared)
        return prepared

    @staticmethod
    def coerce(monitor: Any) -> Optional["MonitorSpec"]:
        """None, a spec, or a ``{name: vector}`` mapping (made into the default spec)."""
        if isinstance(monitor, Mapping) and MonitorSpec._from_mapping is not None:
            monitor = MonitorSpec._from_mapping(monitor)
        if monitor is not None and not isinstance(monitor, MonitorSpec):
            raise InvalidInputError(
                f"monitor must be a pc.Monitor or None, got {type(monitor).__name__}"
            )
        return monitor


def check_vector_model(model: Any, name: Any, metadata: Any) -> None:
    """Raise :class:`ModelMismatchError` when a vector's metadata records a model fingerprint
    (``model_sha256``, as ``pc.extract`` and every built-in vector do) other than ``model``'s
    (:attr:`Model.sha256`); the message names both models. A vector without one is not checked."""
    want = metadata.get("model_sha256") if isinstance(metadata, Mapping) else None
    if not want:
        return
    have = model_identity(model)
    if have["model_sha256"] == want:
        return
    raise ModelMismatchError(
        f"persona vector {name!r} was extracted from {metadata.get('model') or 'another model'} "
        f"(sha256 {str(want)[:16]}...), but the model in use is {have['model'] or 'unnamed'}"
        f"{' (sha256 ' + have['model_sha256'][:16] + '...)' if have['model_sha256'] else ''}: "
        "a direction in one model's hidden states means nothing in another's; extract the vector "
        "on this model (pc.extract)"
    )


def check_spec_models(model: Any, specs: Any) -> None:
    """:func:`check_vector_model` for every PersonaVector behind ``specs`` (steers and monitors)."""
    seen = set()
    for spec in specs:
        for name, metadata in spec._vector_origins():
            key = (name, id(metadata))
            if key not in seen:
                seen.add(key)
                check_vector_model(model, name, metadata)


def _as_steer_list(steer: Any, what: str = "steer") -> List[InterventionSpec]:
    """None, one intervention, or a list of them -> list."""
    if steer is None:
        return []
    if isinstance(steer, InterventionSpec):
        return [steer]
    if isinstance(steer, (list, tuple)):
        for k, s in enumerate(steer):
            if not isinstance(s, InterventionSpec):
                raise InvalidInputError(
                    f"{what}[{k}] must be a pc.Steer, pc.Ablate or pc.Cap, got {type(s).__name__}"
                )
        return list(steer)
    raise InvalidInputError(
        f"{what} must be a pc.Steer/pc.Ablate/pc.Cap or a list of them, got {type(steer).__name__}"
    )


def flat_steers(steer: Any) -> List[InterventionSpec]:
    """Every intervention in a ``steer`` argument (one, a list, or one list per sequence)."""
    if steer is None:
        return []
    if isinstance(steer, (list, tuple)) and any(
        e is None or isinstance(e, (list, tuple)) for e in steer
    ):
        return [s for e in steer if e is not None for s in _as_steer_list(e)]
    return _as_steer_list(steer)


def resolve_steers(steer: Any, n_sequences: int) -> List[Dict[str, Any]]:
    """The engine's steer requests for ``steer`` on a batch of ``n_sequences``.

    ``steer`` is None, one intervention or a list of them (applied to every sequence), or a list
    with one entry per sequence, each None, one intervention or a list. An intervention object
    shared by several sequences becomes one engine steering for all of them.
    """
    if steer is None:
        return []
    per_sequence = (
        isinstance(steer, (list, tuple))
        and len(steer) > 0
        and all(s is None or isinstance(s, (list, tuple)) for s in steer)
    )
    if not per_sequence:
        return [s._request() for s in _as_steer_list(steer)]
    if len(steer) != n_sequences:
        raise InvalidInputError(
            f"per-sequence steer has {len(steer)} entries for {n_sequences} prompts (one list per prompt)"
        )
    groups: Dict[int, Tuple[InterventionSpec, List[int]]] = {}
    for seq, entry in enumerate(steer):
        for s in _as_steer_list(entry, f"steer[{seq}]"):
            groups.setdefault(id(s), (s, []))[1].append(seq)
    return [dict(s._request(), sequences=seqs) for s, seqs in groups.values()]


def resolve_single_forward(steer: Any) -> List[Dict[str, Any]]:
    """Steer requests for ``logits``/``hidden_states`` (one sequence; the engine rejects conditions)."""
    return [s._request() for s in _as_steer_list(steer)]
