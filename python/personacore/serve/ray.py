"""``personacore serve`` on Ray Serve: the same app as a deployment with N replicas.

The app keeps no state between requests, so replicas are independent: each loads the model and
the vectors, runs its own :class:`~personacore.Engine`, and Ray Serve's proxy spreads requests over
them. Every response names its replica in the ``x-personacore-replica`` header. Needs
``pip install "ray[serve]"`` besides ``personacore[serve]``. Example::

    import ray
    from ray import serve
    from personacore.serve.ray import deployment

    ray.init()
    app = deployment(None, {"impolite": "impolite.safetensors"}, num_replicas=2,
                     api_key="secret", max_batch=16)
    serve.run(app, route_prefix="/")            # http://127.0.0.1:8000/v1/chat/completions

``model`` and the vector values are paths (or None for the default model): each replica loads its
own copy, so nothing large is pickled. ``ray_actor_options`` sets each replica's resources
(default ``{"num_cpus": 1}``); the other keyword arguments are :class:`~personacore.serve.ServeOptions`.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Union

from .app import ServeOptions, create_app

__all__ = ["deployment"]

PathLike = Union[str, "os.PathLike[str]"]


def deployment(
    model: Optional[PathLike] = None,
    vectors: Optional[Mapping[str, PathLike]] = None,
    *,
    num_replicas: int = 2,
    ray_actor_options: Optional[Dict[str, Any]] = None,
    name: str = "personacore",
    **options: Any,
) -> Any:
    """A bound Ray Serve application of ``num_replicas`` personacore servers (pass it to ``serve.run``)."""
    from ray import serve

    ServeOptions(**options)  # a misspelt option fails here, not in every replica

    @serve.ingress()
    class PersonacoreServer:
        """One replica: the model, its engine and the FastAPI app of :func:`create_app`."""

        def __init__(self, model: Optional[str], vectors: Dict[str, str], options: Dict[str, Any]):
            self._args = (model, vectors, options)

        def __serve_build_asgi_app__(self) -> Any:
            model, vectors, options = self._args
            replica = serve.get_replica_context().replica_tag
            return create_app(model, vectors, replica_id=replica, **options)

    vecs = {k: os.fspath(v) for k, v in (vectors or {}).items()}
    dep = serve.deployment(
        name=name,
        num_replicas=num_replicas,
        ray_actor_options=ray_actor_options or {"num_cpus": 1},
    )(PersonacoreServer)
    return dep.bind(None if model is None else os.fspath(model), vecs, dict(options))
