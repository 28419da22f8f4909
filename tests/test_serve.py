"""``personacore serve`` end to end: a real server on 127.0.0.1 (uvicorn in a thread, a free port)
with the default model and a vector file, talked to with the official ``openai`` client and httpx.

The vector is a fixed random direction per layer (seeded), scaled so that steering with it changes
the greedy reply, saved as a personacore ``.safetensors`` with ``stats`` metadata (so that
``thresholds: "auto"`` has numbers to use) and loaded by the server from that file.
"""

from __future__ import annotations

import json
import math
import re
import socket
import threading
import time
from typing import Any, Dict, Iterator, List

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import uvicorn  # noqa: E402

import personacore as pc  # noqa: E402
from personacore.serve import REPLICA_HEADER, create_app  # noqa: E402

KEY = "test-key-123"
PROMPT = [{"role": "user", "content": "Name a color."}]
LAYER = 12


def free_port() -> int:
    """A port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Running:
    """A uvicorn server in a daemon thread; ``url`` is its root."""

    def __init__(self, app: Any):
        self.app = app
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.time() < deadline, "the server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def make_vector(model: pc.Model) -> pc.PersonaVector:
    """Seeded random directions with the norm of typical activations' spread, and stats metadata."""
    rng = np.random.default_rng(7)
    d = rng.standard_normal((model.num_layers + 1, model.hidden_size)).astype(np.float32)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    rows = model.num_layers + 1
    stats = {
        "pos_mean": [3.0] * rows,
        "neg_mean": [-1.0] * rows,
        "pos_std": [1.0] * rows,
        "neg_std": [1.0] * rows,
    }
    return pc.PersonaVector(d, layer=LAYER, name="rnd", metadata={"trait": "rnd", "stats": stats})


@pytest.fixture(scope="module")
def model() -> pc.Model:
    """The default model (SmolLM2-135M-Instruct, f32)."""
    return pc.load_model()


@pytest.fixture(scope="module")
def served(model, tmp_path_factory) -> Iterator[Running]:
    """A server with the vector ``rnd`` loaded from a .safetensors file, small limits, an API key."""
    path = tmp_path_factory.mktemp("serve") / "rnd.safetensors"
    make_vector(model).save(path)
    app = create_app(
        model,
        {"rnd": path},
        api_key=KEY,
        max_batch=2,
        max_queued=0,
        max_streams=1,
        max_body_bytes=16384,
        max_tokens_limit=64,
        max_prompt_tokens=256,
    )
    running = Running(app)
    yield running
    running.stop()


def chat(client, model_id, max_tokens=6, **extra) -> Any:
    """A greedy chat reply to PROMPT with personacore's extra body keys."""
    return client.chat.completions.create(
        model=model_id,
        messages=PROMPT,
        max_tokens=max_tokens,
        temperature=0,
        extra_body=extra or None,
    )


def post(served, path: str, body: Any, key: str = KEY, timeout: float = 120) -> Any:
    """POST raw bytes (or JSON) with the API key."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        served.url + path,
        content=content,
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
        timeout=timeout,
    )


def assert_error(r, status: int, code: str = None) -> Dict[str, Any]:
    """An OpenAI-style JSON error body with this status (and code)."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"]
    if code is not None:
        assert err["code"] == code, err
    return err


# ---- the OpenAI surface ------------------------------------------------------------------------
def test_models_and_vectors(served, client, model_id):
    models = client.models.list().data
    assert [m.id for m in models] == [model_id]
    r = httpx.get(served.url + "/v1/vectors", headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    (card,) = r.json()["data"]
    assert card["name"] == "rnd" and card["layer"] == LAYER
    # pc.Monitor's rule; this vector stores no token statistics, so it is neg_mean + 1.645 neg_std
    assert card["auto_threshold"] == pytest.approx(-1.0 + 1.6448536 * 1.0)
    health = httpx.get(served.url + "/health").json()
    assert health["status"] == "ok"


def test_chat_with_scores(client, model_id, model):
    monitor = {"vectors": ["rnd"], "layers": "all", "thresholds": "auto"}
    r = chat(client, model_id, monitor=monitor)
    text = r.choices[0].message.content
    assert text and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens >= 1
    persona = r.persona
    assert persona["request_id"] == r.id
    assert persona["layers"]["rnd"] == list(range(model.num_layers + 1))
    assert persona["thresholds"] == {"rnd": pytest.approx(-1.0 + 1.6448536)}  # neg_fpr fallback
    scores = np.array(persona["scores"]["rnd"])
    assert scores.shape[1] == model.num_layers + 1
    assert 1 <= scores.shape[0] <= r.usage.completion_tokens
    assert np.isfinite(scores).all()
    # float32 scores, each written as the shortest decimal that reads back as the same float32
    # (not its float64 expansion), within float32 rounding of the engine's own numbers
    assert [x for x in scores.ravel() if float(str(np.float32(x))) != x] == []
    local = model.generate(
        PROMPT, max_new_tokens=6, monitor=pc.Monitor({"rnd": make_vector(model)}, layers="all")
    )
    n_prompt = r.usage.prompt_tokens
    np.testing.assert_allclose(
        scores, local.scores["rnd"][n_prompt : n_prompt + scores.shape[0]], rtol=1e-5, atol=1e-5
    )
    assert persona["positions"] == list(range(n_prompt, n_prompt + scores.shape[0]))
    assert len(persona["prompt_last"]["rnd"]) == model.num_layers + 1
    assert isinstance(persona["events"], list)
    # the same greedy reply as the model gives without the server
    assert text == model.generate(PROMPT, max_new_tokens=6).text


def test_chat_stream_matches_non_stream(client, model_id):
    monitor = {"vectors": ["rnd"]}
    full = chat(client, model_id, monitor=monitor)
    chunks = list(
        client.chat.completions.create(
            model=model_id,
            messages=PROMPT,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"monitor": monitor},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == [full.choices[0].finish_reason]
    with_persona = [c for c in chunks if c.choices]
    assert all(c.persona["request_id"] == chunks[0].id for c in with_persona)
    # what the scores refer to comes once, in the opening chunk (the one with the role)
    assert with_persona[0].choices[0].delta.role == "assistant"
    assert with_persona[0].persona["layers"] == full.persona["layers"]
    assert with_persona[0].persona["thresholds"] == full.persona["thresholds"]
    assert all(c.persona["layers"] is None for c in with_persona[1:])
    assert all(c.persona["thresholds"] is None for c in with_persona[1:])
    streamed = [row for c in with_persona for row in c.persona["scores"].get("rnd", [])]
    np.testing.assert_allclose(streamed, full.persona["scores"]["rnd"], rtol=1e-4, atol=1e-4)
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def _raw_stream(served, path: str, body: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The data chunks of a streamed request, parsed (everything before ``[DONE]``)."""
    out = []
    with httpx.stream(
        "POST",
        served.url + path,
        json={**body, "stream": True},
        headers={"authorization": f"Bearer {KEY}"},
        timeout=120,
    ) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[6:]))
    assert out
    return out


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_stream_chunks_have_the_schema_shape(served, path):
    """Every chunk (written per token without a pydantic model) has exactly the fields, in the
    order, of the schema's model: the same JSON as ``model_dump()`` of the validated chunk."""
    from personacore.serve.schemas import ChatCompletionChunk, CompletionResponse, PersonaInfo

    schema = ChatCompletionChunk if path.endswith("chat/completions") else CompletionResponse
    body: Dict[str, Any] = {"max_tokens": 5, "temperature": 0, "monitor": {"vectors": ["rnd"]}}
    body.update({"messages": PROMPT} if schema is ChatCompletionChunk else {"prompt": "Hello"})
    chunks = _raw_stream(served, path, {**body, "stream_options": {"include_usage": True}})
    assert len(chunks) >= 5  # the opening chunk, a chunk per token, the usage chunk
    for chunk in chunks:
        dumped = json.loads(json.dumps(schema.model_validate(chunk).model_dump()))
        persona = chunk["persona"]
        assert list(chunk) == list(dumped), chunk
        assert {**chunk, "persona": None} == {**dumped, "persona": None}
        if persona is not None:
            assert list(persona) == list(PersonaInfo.model_fields), persona


def test_stream_chunk_bytes_equal_the_schema_models(served):
    """The per-token chunk bytes (built as dicts) equal those of the pydantic model path, for
    unicode text, every finish reason, events and float32 scores with a non-finite value."""
    from personacore.engine.generation import Event, Step
    from personacore.serve.render import ChatRender, TextRender, sse, sse_dict
    from personacore.serve.state import Prepared

    server = served.app.state.server
    layers = {"a": [1, 2, 3], "b": [4]}
    p = Prepared("rid-1", [1, 2, 3, 4], 8, {}, {"a": 1.0}, layers)
    rng = np.random.default_rng(3)
    scores = {"a": rng.standard_normal((1, 3)).astype(np.float32), "b": np.ones((1, 1), np.float32)}
    scores["a"][0, 1] = np.inf
    events = [Event("alert", 0, 5, 2, vector="a", layer=2, score=3.5, threshold=1.0)]
    steps = [
        Step(7, "h\u00e9llo \u2603", scores, events, None, [5], [False]),
        Step(8, "", scores, [], "length", [6], [False]),
        # the first step: prompt rows (not sent) and the prompt's last row (sent as prompt_last)
        Step(
            9, "x", {n: np.vstack([s] * 4) for n, s in scores.items()}, [], None, [0, 1, 2, 3], []
        ),
    ]
    for render in (ChatRender(server, "rid-1"), TextRender(server, "rid-1")):
        for step in steps:
            for finish in (None, "stop", "content_filter"):
                persona = server.persona_of_step(p, step)
                fast = sse_dict(render.chunk_dict(step.text, finish, persona))
                assert fast == sse(render.chunk(p, step.text, finish), persona)
                sent = json.loads(fast[len(b"data: ") :])
                if step.positions[0] >= len(p.prompt_ids):  # a decode step: its row is sent
                    assert sent["persona"]["scores"]["a"][0][1] is None  # inf is written as null
                    assert sent["persona"]["events"] == [events[0].to_dict()] or not step.events


def test_completions(client, model_id):
    r = client.completions.create(
        model=model_id, prompt="The capital of France is", max_tokens=4, temperature=0
    )
    assert r.choices[0].text.strip()
    assert r.persona["scores"] == {}
    parts = list(
        client.completions.create(
            model=model_id,
            prompt="The capital of France is",
            max_tokens=4,
            temperature=0,
            stream=True,
        )
    )
    assert "".join(p.choices[0].text for p in parts if p.choices) == r.choices[0].text


def test_steering_changes_greedy_output(client, model_id):
    plain = chat(client, model_id, max_tokens=8).choices[0].message.content
    steered = chat(client, model_id, max_tokens=8, steer=[{"vector": "rnd", "coef": 40.0}])
    assert steered.choices[0].message.content != plain
    again = chat(client, model_id, max_tokens=8).choices[0].message.content
    assert again == plain  # the steering belonged to that request only


def test_policy_stop_ends_with_content_filter(client, model_id):
    # a threshold every score is above: the first alert stops the reply
    monitor = {"vectors": ["rnd"], "thresholds": -1e6}
    r = chat(client, model_id, max_tokens=8, monitor=monitor, on_alert="stop")
    assert r.choices[0].finish_reason == "content_filter"
    assert any(e["kind"] == "alert" for e in r.persona["events"])
    flagged = chat(client, model_id, max_tokens=8, monitor=monitor, on_alert="flag")
    assert flagged.choices[0].finish_reason != "content_filter"


def test_requests_that_monitor_alike_share_a_monitor_and_others_get_their_own(
    served, client, model_id, model, monkeypatch
):
    # The server keeps one built monitor per (vectors, layers, thresholds), in turn here: each
    # request must still be scored at its own layers and alert at its own threshold.
    import personacore.serve.state as serve_state

    server = served.app.state.server
    server._monitors.clear()
    low = {"vectors": ["rnd"], "thresholds": -1e6, "layers": [3, 7]}
    high = {"vectors": ["rnd"], "thresholds": 1e6, "layers": [3, 7]}
    every = {"vectors": ["rnd"], "thresholds": -1e6, "layers": "all"}
    built: List[Any] = []
    for k, monitor in enumerate((low, high, every, low, high, every)):
        if k == 3:  # the second pass must reuse the three monitors the first one built
            built = [m for m, _ in server._monitors.values()]
        r = chat(client, model_id, max_tokens=4, monitor=monitor)
        persona = r.persona
        assert persona["thresholds"] == {"rnd": monitor["thresholds"]}
        alerted = any(e["kind"] == "alert" for e in persona["events"])
        assert alerted == (monitor["thresholds"] < 0)
        want = [3, 7] if monitor["layers"] != "all" else list(range(model.num_layers + 1))
        assert persona["layers"]["rnd"] == want
        assert np.array(persona["scores"]["rnd"]).shape[1] == len(want)
    assert len(built) == 3 and [m for m, _ in server._monitors.values()] == built
    # the oldest kinds are dropped beyond MONITOR_CACHE
    monkeypatch.setattr(serve_state, "MONITOR_CACHE", 2)
    chat(client, model_id, max_tokens=1, monitor={"vectors": ["rnd"], "layers": [5]})
    assert len(server._monitors) == 2


def test_served_conditional_steer_holds_by_default(client, model_id):
    """A served conditional steer holds for 8 tokens unless the request sets ``min_on``: the loop
    that chatters with ``min_on=0`` switches off no sooner than 8 tokens after switching on."""
    monitor = {"vectors": ["rnd"], "layers": [LAYER]}
    plain = chat(client, model_id, max_tokens=24, monitor=monitor)
    scores = [row[0] for row in plain.persona["scores"]["rnd"]]
    thr = float(np.quantile(scores, 0.3))

    def switches(**when):
        steer = [
            {
                "vector": "rnd",
                "coef": -40.0,
                "layers": [LAYER],
                "when": {"vector": "rnd", "above": thr, "layer": LAYER, **when},
            }
        ]
        r = chat(client, model_id, max_tokens=24, monitor=monitor, steer=steer)
        return [e for e in r.persona["events"] if e["kind"] in ("steer_on", "steer_off")]

    chatter = switches(min_on=0)
    assert len(chatter) > 24 // 8 + 1, chatter  # plain switching flips back and forth
    held = switches()
    assert held and held[0]["kind"] == "steer_on"
    for on, off in zip(held[::2], held[1::2]):
        assert (on["kind"], off["kind"]) == ("steer_on", "steer_off")
        assert off["position"] - on["position"] >= 8


# ---- bad requests: each a 4xx with a JSON body, and the server lives on -----------------------
MSG = [{"role": "user", "content": "hi"}]

BAD = {
    "bad_json": (b'{"messages": [', 400, "invalid_json"),
    "wrong_type": ({"messages": "hi"}, 400, "invalid_request"),
    "unknown_key_in_steer": (
        {"messages": MSG, "steer": [{"vector": "rnd", "coeff": 1}]},
        400,
        None,
    ),
    "unknown_vector": (
        {"messages": MSG, "steer": [{"vector": "nope", "coef": 1.0}]},
        400,
        "vector_not_found",
    ),
    "unknown_monitor_vector": (
        {"messages": MSG, "monitor": {"vectors": ["nope"]}},
        400,
        "vector_not_found",
    ),
    "bad_layer": (
        {"messages": MSG, "steer": [{"vector": "rnd", "coef": 1.0, "layers": [99]}]},
        400,
        None,
    ),
    "nan_coef": (
        b'{"messages": [{"role": "user", "content": "hi"}], "steer": [{"vector": "rnd", "coef": NaN}]}',
        400,
        None,
    ),
    "too_long_prompt": (
        {"messages": [{"role": "user", "content": "word " * 400}]},
        400,
        "context_length_exceeded",
    ),
    "max_tokens_over_limit": ({"messages": MSG, "max_tokens": 65}, 400, "max_tokens_out_of_range"),
    "unknown_model": ({"messages": MSG, "model": "gpt-9"}, 404, "model_not_found"),
    "bad_on_alert": ({"messages": MSG, "on_alert": "explode"}, 400, None),
    # bounded lists: one request must not stall the engine thread for the others
    "too_many_stop_strings": ({"messages": MSG, "stop": [f"s{i}" for i in range(17)]}, 400, None),
    "stop_string_too_long": ({"messages": MSG, "stop": ["x" * 513]}, 400, None),
    "too_many_layers": (
        {"messages": MSG, "monitor": {"vectors": ["rnd"], "layers": list(range(1025))}},
        400,
        None,
    ),
    "no_messages": ({"max_tokens": 4}, 400, "invalid_request"),
    "empty_messages": ({"messages": []}, 400, None),
    "negative_temperature": ({"messages": MSG, "temperature": -1.0}, 400, None),
    "top_p_zero": ({"messages": MSG, "top_p": 0.0}, 400, None),
    "body_not_an_object": (b"[1, 2]", 400, None),
    "steer_not_a_list": ({"messages": MSG, "steer": "rnd"}, 400, None),
    "body_too_large": (
        {"messages": [{"role": "user", "content": "x" * 20000}]},
        413,
        "body_too_large",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_request_is_a_json_4xx(served, case):
    body, status, code = BAD[case]
    err = assert_error(post(served, "/v1/chat/completions", body), status, code)
    if case == "bad_layer":
        assert "99" in err["message"]
    if case == "nan_coef":
        assert "nan" in err["message"].lower()
    assert httpx.get(served.url + "/health").status_code == 200


def test_api_key_is_enforced(served, model_id):
    assert_error(
        post(served, "/v1/chat/completions", {"messages": MSG}, key="wrong"), 401, "invalid_api_key"
    )
    r = httpx.get(served.url + "/v1/models")
    assert_error(r, 401, "invalid_api_key")
    bad = openai.OpenAI(base_url=served.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def _stream_request(served, max_tokens: int = 64) -> Any:
    body = {"messages": PROMPT, "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    return httpx.stream(
        "POST",
        served.url + "/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {KEY}"},
        timeout=120,
    )


def _stats(served) -> Dict[str, Any]:
    return served.app.state.engine.stats()


def _wait(pred, timeout: float = 30.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def test_limits_answer_429(served):
    with _stream_request(served) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        # max_streams=1: a second stream is refused while this one is open
        second = post(served, "/v1/chat/completions", {"messages": MSG, "stream": True})
        assert_error(second, 429, "too_many_streams")
        assert second.headers.get("retry-after") == "1"
        # max_batch=2, max_queued=0: one more request fits, a third is refused
        holder = threading.Thread(
            target=post,
            args=(
                served,
                "/v1/chat/completions",
                {"messages": MSG, "max_tokens": 64, "ignore_eos": True},
            ),
        )
        holder.start()
        assert _wait(lambda: served.app.state.server.metrics.in_flight >= 2)
        assert_error(post(served, "/v1/chat/completions", {"messages": MSG}), 429, "queue_full")
    holder.join(timeout=120)


def test_disconnect_cancels_the_request(served):
    before = _stats(served)["cancelled"]
    with _stream_request(served, max_tokens=64) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert next(lines) == ""
        assert next(lines).startswith("data: ")
    # the client closed the connection after two chunks of a 64-token reply
    assert _wait(lambda: _stats(served)["cancelled"] > before), _stats(served)
    assert _wait(lambda: served.app.state.server.metrics.streams == 0)
    # every request the engine took has ended (engine.stats()["running"] is the scheduler's count
    # after its last step, so it is not refreshed when the last request is cancelled between steps)
    settled = lambda s: s["submitted"] == s["finished"] + s["cancelled"] + s["failed"]  # noqa: E731
    assert _wait(lambda: settled(_stats(served))), repr(_stats(served))


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def parse_prometheus(text: str) -> Dict[str, List[float]]:
    """Check every line of a Prometheus text exposition; ``{metric name: [sample values]}``."""
    out: Dict[str, List[float]] = {}
    typed = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge"), line
            typed.add(name)
        elif line.startswith("# HELP ") or not line:
            continue
        else:
            m = _SAMPLE.match(line)
            assert m, f"not a Prometheus sample line: {line!r}"
            assert m[1] in typed, f"sample before its TYPE line: {line!r}"
            value = float(m[3])
            assert not math.isnan(value)
            out.setdefault(m[1], []).append(value)
    return out


def test_metrics_parse_as_prometheus_text(served, client, model_id):
    chat(client, model_id, max_tokens=2)
    r = httpx.get(served.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = parse_prometheus(r.text)
    for name in (
        "personacore_requests_total",
        "personacore_prompt_tokens_total",
        "personacore_generation_tokens_total",
        "personacore_alerts_total",
        "personacore_steer_switches_total",
        "personacore_engine_queued",
        "personacore_engine_batch_size",
    ):
        assert name in families, name
    assert sum(families["personacore_requests_total"]) >= 1
    assert families["personacore_generation_tokens_total"][0] >= 2
    try:  # the official parser too, where it is installed (ray[serve] brings it)
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        return
    names = {f.name for f in text_string_to_metric_families(r.text)}
    assert "personacore_requests" in names  # prometheus_client drops the _total suffix


def test_replica_header(served):
    r = httpx.get(served.url + "/health")
    assert r.headers[REPLICA_HEADER]


def test_disconnect_cancels_a_non_streamed_request(served):
    before = _stats(served)["cancelled"]
    body = {"messages": PROMPT, "max_tokens": 64, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        post(served, "/v1/chat/completions", body, timeout=0.5)
    assert _wait(lambda: _stats(served)["cancelled"] > before), repr(_stats(served))
    assert _wait(lambda: served.app.state.server.metrics.in_flight == 0)


def test_cli_serves_on_loopback(model, tmp_path):
    """``personacore serve`` as a process: binds 127.0.0.1 by default, loads --vector NAME=PATH."""
    import os
    import subprocess
    import sys

    path = tmp_path / "v.safetensors"
    make_vector(model).save(path)
    port = free_port()
    env = dict(os.environ, PERSONACORE_API_KEY="from-env")
    proc = subprocess.Popen(
        [sys.executable, "-m", "personacore", "serve", "--vector", f"mine={path}"]
        + ["--port", str(port), "--log-level", "warning"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert proc.poll() is None, proc.stdout.read()
            try:
                return httpx.get(url + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        assert _wait(up, timeout=120)
        headers = {"authorization": "Bearer from-env"}
        cards = httpx.get(url + "/v1/vectors", headers=headers).json()["data"]
        assert [c["name"] for c in cards] == ["mine"]
        assert httpx.get(url + "/v1/vectors").status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=60)
