"""The built-in persona vectors of the default model (SmolLM2-135M-Instruct).

One ``<trait>.safetensors`` per built-in trait, made by ``scripts/build_vectors.py`` with
``pc.extract`` (its settings, seed, the model's sha256 and the package version are in each file's
metadata). ``pc.PersonaVector.load("impolite")`` — a bare name, no folder and no extension — reads
one of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List

from ..io import VectorNotFoundError, load_vector

__all__ = ["BUILTIN_VECTOR_DIR", "builtin_vectors", "is_builtin_name", "load_builtin"]

#: Folder holding the built-in vectors (``<trait>.safetensors``).
BUILTIN_VECTOR_DIR = Path(__file__).resolve().parent


def builtin_vectors() -> List[str]:
    """The names of the built-in vectors, sorted."""
    return sorted(p.stem for p in BUILTIN_VECTOR_DIR.glob("*.safetensors"))


def is_builtin_name(path: object) -> bool:
    """True when ``path`` is a bare name (a str without a folder or an extension)."""
    return (
        isinstance(path, str)
        and bool(path)
        and "/" not in path
        and "\\" not in path
        and Path(path).suffix == ""
        and path not in (".", "..")
    )


def load_builtin(name: str, **kwargs: Any) -> Any:
    """The built-in vector ``name`` (a :class:`~personacore.PersonaVector`); an unknown name raises
    :class:`~personacore.vectors.io.VectorNotFoundError` listing the available ones."""
    path = BUILTIN_VECTOR_DIR / f"{name}.safetensors"
    if not path.is_file():
        raise VectorNotFoundError(
            f"{name!r} is neither a file nor a built-in vector; built-in vectors (for the default "
            f"model): {', '.join(builtin_vectors()) or 'none'}"
        )
    return load_vector(path, **kwargs)
