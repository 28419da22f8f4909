"""``personacore serve``: an OpenAI-compatible HTTP server with per-request steering and live scores.

:func:`create_app` builds the FastAPI app (one :class:`~personacore.Engine` behind it); run it with
uvicorn (``personacore serve`` does), or as a Ray Serve deployment with N replicas
(:func:`personacore.serve.ray.deployment`). Needs the extra ``personacore[serve]``
(fastapi, uvicorn, pydantic). Request and response bodies: :mod:`personacore.serve.schemas`;
errors: :mod:`personacore.serve.errors`.
"""

from __future__ import annotations

from .app import REPLICA_HEADER, ServeOptions, auto_threshold, create_app, load_vectors

__all__ = ["REPLICA_HEADER", "ServeOptions", "auto_threshold", "create_app", "load_vectors"]
