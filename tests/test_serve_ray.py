"""``personacore.serve.ray``: two replicas of the server on a local Ray cluster (2 CPUs), requests
sent through Ray Serve's HTTP proxy on 127.0.0.1 reach both (the ``x-personacore-replica`` header
names the replica that answered). Slow (Ray start-up, two model loads): about a minute on 2 cores.
"""

from __future__ import annotations

import socket
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from personacore.serve import REPLICA_HEADER  # noqa: E402
from personacore.serve.ray import deployment  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ray_url():
    """A local Ray cluster with Serve's proxy on a free port of 127.0.0.1; shut down afterwards."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def test_two_replicas_answer(ray_url):
    t0 = time.time()
    app = deployment(
        None,
        num_replicas=2,
        ray_actor_options={"num_cpus": 0.5},
        api_key="k",
        max_batch=4,
        max_tokens_limit=8,
    )
    serve.run(app, name="personacore", route_prefix="/", blocking=False)
    deadline = time.time() + 300
    while True:
        try:
            if httpx.get(ray_url + "/health", timeout=10).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "the Ray Serve app did not come up"
        time.sleep(0.5)
    started = time.time() - t0
    headers = {"authorization": "Bearer k"}
    body = {"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 2, "temperature": 0}
    replicas, texts = set(), set()
    for _ in range(40):
        r = httpx.post(ray_url + "/v1/chat/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        replicas.add(r.headers[REPLICA_HEADER])
        texts.add(r.json()["choices"][0]["message"]["content"])
        if len(replicas) == 2:
            break
    assert len(replicas) == 2, replicas
    assert len(texts) == 1  # the same greedy reply from both replicas
    assert httpx.post(ray_url + "/v1/chat/completions", json=body, timeout=60).status_code == 401
    print(f"Ray Serve: 2 replicas up in {started:.1f} s, both reached")
