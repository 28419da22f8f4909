"""The engine layer: load a model, read its layers, generate (see docs/architecture.md).

Imports only :mod:`personacore.errors` and the native module; steering and monitoring reach it as
the abstract specs of :mod:`personacore.engine.specs`.
"""

from .defaults import default_model_path
from .generation import Event, Generation, Step, Stream, TokenLogprob
from .model import VALID_DTYPES, VALID_POOLINGS, Model, Tokenizer, load_model
from .native import amx_available, avx2_enabled, cuda_available
from .serving import ON_ALERT, Engine, RequestHandle
from .specs import InterventionSpec, MonitorSpec

__all__ = [
    "ON_ALERT",
    "VALID_DTYPES",
    "Engine",
    "VALID_POOLINGS",
    "Event",
    "Generation",
    "InterventionSpec",
    "Model",
    "MonitorSpec",
    "RequestHandle",
    "Step",
    "Stream",
    "TokenLogprob",
    "Tokenizer",
    "amx_available",
    "cuda_available",
    "avx2_enabled",
    "default_model_path",
    "load_model",
]
