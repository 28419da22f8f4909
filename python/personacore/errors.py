"""Exception classes raised by personacore.

Every error personacore raises on purpose is a :class:`PersonacoreError`. Each class also derives
from the closest built-in exception (``FileNotFoundError``, ``ValueError``, ``RuntimeError``,
``OSError``) so that generic ``except ValueError`` code keeps working.

The classes are defined here, in Python, because each has two bases (a ``create_exception!`` class
in Rust has one). The native module (``personacore._core``) fetches them once, when it is first
imported, and maps every engine error variant to one of them with an exhaustive ``match``
(rust/personacore-py/src/errors.rs): ``NotFound`` -> :class:`ModelNotFoundError`, ``Io`` ->
:class:`PersonacoreIOError`, ``InvalidModelFile``, ``Config``, ``UnsupportedArchitecture``,
``Tokenizer``, ``ChatTemplate``, ``InvalidInput``, ``Compute`` -> the class of the same name, and a
caught Rust panic -> :class:`InternalError`. The names below are part of that contract: do not
rename them.
"""

from __future__ import annotations

__all__ = [
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


class PersonacoreError(Exception):
    """Base class of every error personacore raises on purpose."""


class ModelNotFoundError(PersonacoreError, FileNotFoundError):
    """A model path (file or directory) or hub id that does not exist or cannot be reached."""


class PersonacoreIOError(PersonacoreError, OSError):
    """An operating-system level failure while reading or writing a file (permissions, disk full...)."""


class InvalidModelFileError(PersonacoreError, ValueError):
    """A model file that exists but cannot be parsed: random bytes, truncated, wrong tensor shapes."""


class ConfigError(PersonacoreError, ValueError):
    """A model configuration (``config.json`` or GGUF metadata) that is malformed or inconsistent."""


class UnsupportedArchitectureError(PersonacoreError, ValueError):
    """A model architecture the engine does not implement (the message lists the supported ones)."""


class TokenizerError(PersonacoreError, ValueError):
    """A tokenizer that cannot be built or used, e.g. an unknown GGUF ``tokenizer.ggml.pre``."""


class ChatTemplateError(PersonacoreError, ValueError):
    """A chat template that is missing, fails to parse, or fails to render the given messages."""


class InvalidInputError(PersonacoreError, ValueError):
    """Arguments that cannot be used: ids out of range, empty input, mismatched counts, bad options."""


class ComputeError(PersonacoreError, RuntimeError):
    """A failure inside the tensor library that is not the caller's fault (out of memory, device error)."""


class InternalError(PersonacoreError, RuntimeError):
    """A bug in personacore: a Rust panic caught at the Python boundary. Please report it."""


class DownloadError(PersonacoreError, OSError):
    """The default model could not be fetched or failed its integrity (sha256) check."""


class ModelMismatchError(InvalidInputError):
    """A persona vector used with a model other than the one it was extracted from (the message
    names both models)."""
