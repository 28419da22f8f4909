"""What the engine accepts as steering and monitoring: two abstract specs.

The engine sits below the steering layer (see docs/architecture.md), so it never imports
:class:`~personacore.Steer` or :class:`~personacore.Monitor`. Instead it reads any
:class:`InterventionSpec` / :class:`MonitorSpec` through their ``_request`` methods, which turn a
spec into the plain request dict the native engine takes (its keys are in ``_core.pyi``); the
native engine checks it and resolves it against the model. ``personacore.steering`` implements both.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, Callable, ClassVar, Dict, List, Optional, Tuple

from ..errors import InvalidInputError

__all__ = ["InterventionSpec", "MonitorSpec", "resolve_steers", "resolve_single_forward"]


class InterventionSpec(abc.ABC):
    """An intervention the engine applies in a forward pass (``pc.Steer``, ``pc.Ablate``, ``pc.Cap``)."""

    #: The condition (a ``pc.When``) that switches it on and off, or None (always on).
    when: Any

    @abc.abstractmethod
    def _request(self) -> Dict[str, Any]:
        """The native steer request (``_core.InterventionRequest``), applied to the whole batch."""


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
