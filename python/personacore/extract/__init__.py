"""Extraction: traits (built-in and persona_vectors files), rollouts, fitting, layer choice.

:mod:`.traits` (trait data), :mod:`.rollouts` (contrastive generation, judge filter, pooling),
:mod:`.fit` (directions per layer), :mod:`.evaluate` (held-out separation, A/B logit gap),
:mod:`.extraction` (:func:`extract`, the whole pipeline) and :mod:`.sweep` (``pc.evaluate``: steering
evaluated over layers × coefficients; not re-exported here, where ``evaluate`` is the module).
"""

from .evaluate import ab_logit_gap, separation
from .extraction import extract
from .traits import Trait, TraitError, traits

__all__ = ["Trait", "TraitError", "ab_logit_gap", "extract", "separation", "traits"]
