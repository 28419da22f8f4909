"""The steering layer: interventions (:class:`Steer`, :class:`Ablate`, :class:`Cap`, :class:`When`)
and the :class:`Monitor` bank, as plain values the engine applies (see docs/architecture.md).
"""

from .interventions import POSITIONS, Ablate, Cap, Steer, When
from .monitor import Monitor

__all__ = ["POSITIONS", "Ablate", "Cap", "Monitor", "Steer", "When"]
