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
from .errors import (
    ChatTemplateError,
    ComputeError,
    ConfigError,
    DownloadError,
    InternalError,
    InvalidInputError,
    InvalidModelFileError,
    ModelMismatchError,
    ModelNotFoundError,
    PersonacoreError,
    PersonacoreIOError,
    TokenizerError,
    UnsupportedArchitectureError,
)
from .engine import (
    VALID_POOLINGS,
    Engine,
    Event,
    Generation,
    Model,
    RequestHandle,
    Step,
    Stream,
    TokenLogprob,
    Tokenizer,
    amx_available,
    avx2_enabled,
    cuda_available,
    default_model_path,
    load_model,
)
from .vectors import PersonaVector, VectorFormatError, VectorNotFoundError, load_vector, save_vector
from .steering import (
    POSITIONS,
    Ablate,
    Cap,
    Monitor,
    Steer,
    When,
    read_audit_log,
    verify_audit_log,
)
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
from .extract import Trait, TraitError, ab_logit_gap, extract, traits
from .extract.sweep import Evaluation, evaluate
from .screen import ScreenResult, screen
from .screen.shift import FinetuneShift, finetune_shift
from .report import ReportDependencyError, report

__version__ = "0.1.0"


__all__ = [
    "__version__",
    "amx_available",
    "cuda_available",
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
    "evaluate",
    "Evaluation",
    "screen",
    "ScreenResult",
    "finetune_shift",
    "FinetuneShift",
    "report",
    "ReportDependencyError",
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
    "read_audit_log",
    "verify_audit_log",
    "POSITIONS",
    "Monitor",
    "Generation",
    "Engine",
    "RequestHandle",
    "Step",
    "Stream",
    "TokenLogprob",
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
    "ModelMismatchError",
]
