"""personacore: find, watch and steer persona directions inside language models.

A Rust engine (candle) under a Python API. Start with :func:`load_model`::

    import personacore as pc
    model = pc.load_model()            # the embedded default, SmolLM2-135M-Instruct
    ids = model.encode_chat([{"role": "user", "content": "Hi!"}])
    hs = model.hidden_states(ids)      # float32 [num_layers + 1, len(ids), hidden_size]
    out = model.generate("Hi!", steer=[pc.Steer(vec, 4.0, layers=[12])],
                         monitor=pc.Monitor({"evil": vec}, layers="all"))

Every error raised on purpose is a :class:`PersonacoreError` (see :mod:`personacore.errors`).
"""

from __future__ import annotations

# errors first: the native engine imports personacore.errors by name to raise its exceptions.
from . import errors
from ._defaults import default_model_path
from .errors import (
    ChatTemplateError,
    ComputeError,
    ConfigError,
    DownloadError,
    InternalError,
    InvalidInputError,
    InvalidModelFileError,
    ModelNotFoundError,
    PersonacoreError,
    PersonacoreIOError,
    TokenizerError,
    UnsupportedArchitectureError,
)
from .extraction import ab_logit_gap, extract
from .formats import VectorFormatError, VectorNotFoundError, load_vector, save_vector
from .generation import Event, Generation, Step, Stream
from .judges import (
    COHERENCE_PROMPT,
    FilterReport,
    Judge,
    JudgeError,
    LocalJudge,
    NoJudge,
    OpenAIJudge,
    filter_pairs,
    judge_enabled,
)
from .models import VALID_POOLINGS, Model, Tokenizer, load_model
from .monitor import Monitor
from .steering import POSITIONS, Ablate, Cap, Steer, When
from .traits import Trait, TraitError, traits
from .vectors import PersonaVector

__version__ = "0.1.0"


def avx2_enabled() -> bool:
    """True when the native engine was compiled with AVX2/FMA (fast quantized CPU kernels)."""
    from .models import _native

    return bool(_native().avx2_enabled())


def amx_available() -> bool:
    """True when this CPU runs AMX-BF16 tiles, so ``load_model(..., precision="high")`` uses them."""
    from .models import _native

    return bool(_native().amx_available())


__all__ = [
    "__version__",
    "amx_available",
    "load_model",
    "Model",
    "Tokenizer",
    "VALID_POOLINGS",
    "PersonaVector",
    "Trait",
    "TraitError",
    "traits",
    "extract",
    "ab_logit_gap",
    "load_vector",
    "save_vector",
    "VectorFormatError",
    "VectorNotFoundError",
    "Judge",
    "OpenAIJudge",
    "LocalJudge",
    "NoJudge",
    "JudgeError",
    "COHERENCE_PROMPT",
    "filter_pairs",
    "FilterReport",
    "judge_enabled",
    "Steer",
    "Ablate",
    "Cap",
    "When",
    "POSITIONS",
    "Monitor",
    "Generation",
    "Step",
    "Stream",
    "Event",
    "default_model_path",
    "avx2_enabled",
    "errors",
    "PersonacoreError",
    "ModelNotFoundError",
    "PersonacoreIOError",
    "InvalidModelFileError",
    "ConfigError",
    "UnsupportedArchitectureError",
    "TokenizerError",
    "ChatTemplateError",
    "InvalidInputError",
    "ComputeError",
    "InternalError",
    "DownloadError",
]
