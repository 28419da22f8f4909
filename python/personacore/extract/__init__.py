"""Extraction: traits (built-in and persona_vectors files), rollouts, fitting, layer choice."""

from .extraction import ab_logit_gap, extract, separation
from .traits import Trait, TraitError, traits

__all__ = ["Trait", "TraitError", "ab_logit_gap", "extract", "separation", "traits"]
