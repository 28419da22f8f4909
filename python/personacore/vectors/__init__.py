"""Persona vectors as values (:class:`PersonaVector`) and their file formats (see docs/conventions.md)."""

from .io import VectorFormatError, VectorNotFoundError, load_vector, save_vector
from .vector import PersonaVector

__all__ = [
    "PersonaVector",
    "VectorFormatError",
    "VectorNotFoundError",
    "load_vector",
    "save_vector",
]
