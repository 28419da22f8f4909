"""Extraction: traits (built-in and persona_vectors files), rollouts, fitting, layer choice.

:mod:`.traits` (trait data), :mod:`.rollouts` (contrastive generation, judge filter, pooling),
:mod:`.fit` (directions per layer), :mod:`.evaluate` (held-out separation, A/B logit gap) and
:mod:`.extraction` (:func:`extract`, the whole pipeline).
"""

from .evaluate import ab_logit_gap, separation
from .extraction import extract
from .traits import Trait, TraitError, traits

__all__ = ["Trait", "TraitError", "ab_logit_gap", "extract", "separation", "traits"]
