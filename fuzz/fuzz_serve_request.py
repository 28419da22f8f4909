"""Fuzz the server's request bodies through the whole app (FastAPI's ``TestClient``, no socket).

The first input byte picks the route (even: ``/v1/chat/completions``, odd: ``/v1/completions``),
the rest is the body, sent with ``Content-Type: application/json`` to ``create_app`` serving the
tiny llama model with one vector (``fuzzy``, with statistics so ``"auto"`` thresholds work) and
``max_tokens_limit=4``, so that every accepted request really generates. A crash is any 5xx, a
non-JSON error body, or an error chunk inside a stream that is not the client's fault (type
``server_error``). Seeds: chat and completion bodies with steering, caps, conditional ablation,
monitors, streams and stop strings.
"""

from __future__ import annotations

import json
from pathlib import Path

import seeds
from _harness import Crash, main

import personacore as pc

NAME = "serve_request"
ROUTES = ("/v1/chat/completions", "/v1/completions")
_STATE = {}


def _client(work: Path):
    if "client" not in _STATE:
        from fastapi.testclient import TestClient

        from personacore.serve import create_app

        model = pc.load_model(str(seeds.write_hf(work / "m", "llama")))
        app = create_app(model, {"fuzzy": seeds.vector()}, max_tokens_limit=4, model_name="m")
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()  # runs the lifespan; the process ends with the harness
        _STATE["client"] = client
    return _STATE["client"]


def one_input(data: bytes, work: Path) -> None:
    """POST ``data[1:]`` to the route ``data[0]`` picks; check the answer is a 2xx or a JSON 4xx."""
    if not data:
        return
    client = _client(work)
    route = ROUTES[data[0] & 1]
    r = client.post(route, content=data[1:], headers={"content-type": "application/json"})
    if r.status_code >= 500:
        raise Crash(f"{route} answered {r.status_code}: {r.text[:500]}")
    if r.status_code >= 400:
        body = r.json()
        if not isinstance(body.get("error", {}).get("message"), str):
            raise Crash(f"{route} answered {r.status_code} without an OpenAI error body: {body}")
        return
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        for line in r.text.splitlines():
            if line.startswith("data: {") and '"error"' in line[:20]:
                err = json.loads(line[6:])["error"]
                if err.get("type") == "server_error":
                    raise Crash(f"{route} stream ended with a server error: {err}")
    else:
        r.json()


if __name__ == "__main__":
    main(NAME, seeds.request_seeds, one_input)
