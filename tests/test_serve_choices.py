"""``n`` > 1 choices in ``personacore serve``: a real server on 127.0.0.1 talked to with the official
``openai`` client and httpx. Each choice is its own engine request (seed ``seed + i``, request id
``RID.i``), so choice ``i`` must equal the single-choice request it stands for: same text, same
``persona`` scores and events; whole replies, streams and ``/v1/completions`` with ``echo`` and
``logprobs`` alike."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Dict, Iterator

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import personacore as pc  # noqa: E402
from personacore.serve import create_app  # noqa: E402
from test_serve import KEY, PROMPT, Running, assert_error, make_vector, post  # noqa: E402

N = 3
MONITOR = {"vectors": ["rnd"], "layers": [4, 12], "thresholds": 0.5}
STEER = [{"vector": "rnd", "coef": 2.0, "layers": [8]}]


@pytest.fixture(scope="module")
def model() -> pc.Model:
    """The default model (f32)."""
    return pc.load_model()


@pytest.fixture(scope="module")
def served(model, tmp_path_factory) -> Iterator[Running]:
    """A server with the vector ``rnd``, a batch of 4, no queue and an API key."""
    path = tmp_path_factory.mktemp("choices") / "rnd.safetensors"
    make_vector(model).save(path)
    running = Running(create_app(model, {"rnd": path}, api_key=KEY, max_batch=4, max_queued=0))
    yield running
    running.stop()


def _chat(client, model_id, **kw) -> Any:
    return client.chat.completions.create(
        model=model_id,
        messages=PROMPT,
        max_tokens=8,
        temperature=1.0,
        extra_body={"monitor": MONITOR, "steer": STEER},
        **kw,
    )


def _scores(persona: Dict[str, Any]) -> np.ndarray:
    return np.array(persona["scores"]["rnd"], dtype=np.float64)


def test_each_chat_choice_equals_the_single_request_it_stands_for(client, model_id):
    r = _chat(client, model_id, n=N, seed=11)
    assert [c.index for c in r.choices] == list(range(N))
    assert r.model_extra.get("persona") is None  # one per choice instead
    singles = [_chat(client, model_id, seed=11 + i) for i in range(N)]
    for c, one in zip(r.choices, singles):
        assert c.message.content == one.choices[0].message.content
        assert c.finish_reason == one.choices[0].finish_reason
        mine, alone = c.model_extra["persona"], one.model_extra["persona"]
        assert mine["request_id"] == f"{r.id}.{c.index}"
        assert mine["positions"] == alone["positions"] and mine["layers"] == alone["layers"]
        np.testing.assert_allclose(_scores(mine), _scores(alone), rtol=1e-4, atol=1e-4)
        assert [e["kind"] for e in mine["events"]] == [e["kind"] for e in alone["events"]]
    assert len({c.message.content for c in r.choices}) > 1, "three seeds, one reply"
    assert r.usage.prompt_tokens == singles[0].usage.prompt_tokens
    assert r.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_a_stream_of_choices_interleaves_them_each_whole_and_in_order(client, model_id):
    whole = _chat(client, model_id, n=N, seed=3)
    text, finish, rows = defaultdict(str), {}, defaultdict(list)
    opened, usage = set(), None
    for chunk in _chat(
        client, model_id, n=N, seed=3, stream=True, stream_options={"include_usage": True}
    ):
        if not chunk.choices:
            usage = chunk.usage
            continue
        (c,) = chunk.choices
        persona = chunk.model_extra["persona"]
        assert persona["request_id"] == f"{chunk.id}.{c.index}"
        if c.delta.role == "assistant":
            assert c.index not in opened and persona["layers"] == {"rnd": [4, 12]}
            opened.add(c.index)
            continue
        assert c.index in opened and c.index not in finish  # nothing after a choice's end
        text[c.index] += c.delta.content or ""
        rows[c.index] += persona["scores"]["rnd"]
        if c.finish_reason is not None:
            finish[c.index] = c.finish_reason
    assert opened == set(finish) == set(range(N))
    for c in whole.choices:
        assert text[c.index] == c.message.content and finish[c.index] == c.finish_reason
        np.testing.assert_allclose(
            np.array(rows[c.index]), _scores(c.model_extra["persona"]), rtol=1e-4, atol=1e-4
        )
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_completion_choices_each_echo_the_prompt_or_carry_their_own_logprobs(client, model_id):
    prompt = "The colour of the sky is"
    base = dict(model=model_id, prompt=prompt, max_tokens=5, temperature=1.0)
    for extra in ({"echo": True}, {"logprobs": 2}):
        kw = {**base, **extra}
        r = client.completions.create(n=2, seed=21, **kw)
        assert len({c.text for c in r.choices}) == 2, r.choices
        for c in r.choices:
            one = client.completions.create(seed=21 + c.index, **kw).choices[0]
            assert c.text == one.text and c.text.startswith(prompt) == ("echo" in extra)
            if "logprobs" in extra:
                assert c.logprobs.tokens == one.logprobs.tokens
                assert c.logprobs.text_offset == one.logprobs.text_offset
                np.testing.assert_allclose(
                    c.logprobs.token_logprobs, one.logprobs.token_logprobs, atol=1e-4
                )
        streamed = defaultdict(str)
        for chunk in client.completions.create(n=2, seed=21, stream=True, **kw):
            for c in chunk.choices:
                streamed[c.index] += c.text
        assert [streamed[c.index] for c in r.choices] == [c.text for c in r.choices]


@pytest.mark.parametrize("n", [0, 5, -1])
def test_n_outside_the_batch_is_a_400(served, n):
    err = assert_error(
        post(served, "/v1/chat/completions", {"messages": PROMPT, "max_tokens": 2, "n": n}),
        400,
        "invalid_value",
    )
    assert err["param"] == "n" and "1..4" in err["message"]
    assert httpx.get(served.url + "/health").status_code == 200


def test_choices_take_a_place_each_in_flight(served):
    """``max_batch + max_queued`` = 4 places: an open stream of n=4 holds all of them, so another
    request is a 429 (it would be admitted if a request took one place); when the stream closes,
    every place is free again (the engine cancels its choices)."""
    body = {"messages": PROMPT, "max_tokens": 2000, "ignore_eos": True, "n": 4, "stream": True}
    headers = {"authorization": f"Bearer {KEY}"}
    one = {"messages": PROMPT, "max_tokens": 2}
    with httpx.Client(base_url=served.url, headers=headers, timeout=120) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as held:
            assert held.status_code == 200
            lines = held.iter_lines()  # kept: a dropped iterator closes the response
            next(lines)  # admitted and running
            assert_error(post(served, "/v1/chat/completions", one), 429, "queue_full")
        deadline = time.time() + 30
        while "personacore_requests_in_flight 0" not in http.get("/metrics").text:
            assert time.time() < deadline, "places not freed after the stream closed"
            time.sleep(0.05)
    assert post(served, "/v1/chat/completions", {**one, "n": 4}).status_code == 200


def test_a_refused_prompt_in_a_list_refuses_the_request_and_runs_none(served, model):
    """The second prompt names a token the vocabulary lacks: a 400 naming the prompt and the
    token, and none of the request's choices runs (nothing stays in the engine)."""
    bad = [8, model.vocab_size + 5]
    body = {"prompt": [[5, 6, 7], bad], "max_tokens": 2000, "ignore_eos": True, "n": 2}
    err = assert_error(post(served, "/v1/completions", body), 400, "invalid_token")
    assert err["message"] == f"prompt[1] token 1 is {bad[1]}: token ids must be in [0, 49152)"
    deadline = time.time() + 10  # the queued choices would run for minutes
    while True:
        metrics = httpx.get(served.url + "/metrics").text
        if "personacore_engine_running 0" in metrics and "personacore_engine_queued 0" in metrics:
            break
        assert time.time() < deadline, metrics
        time.sleep(0.05)
    assert "personacore_requests_in_flight 0" in metrics


def test_default_steer_applies_to_requests_without_their_own(served, model, tmp_path):
    """``default_steer`` (``personacore serve --steer``): a request that sends no ``steer`` gets
    the reply the same steer sent explicitly gets; ``"steer": []`` gets the unsteered one."""
    steer = [{"vector": "rnd", "coef": 8.0, "layers": [10]}]
    steered = Running(
        create_app(model, {"rnd": make_vector(model)}, api_key=KEY, default_steer=steer)
    )
    try:
        body = {"messages": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}

        def text(srv: Running, **kw: Any) -> str:
            reply = post(srv, "/v1/chat/completions", {**body, **kw}).json()
            return reply["choices"][0]["message"]["content"]

        by_default, explicit = text(steered), text(served, steer=steer)
        plain, opted_out = text(served), text(steered, steer=[])
        assert by_default == explicit and opted_out == plain and by_default != plain
    finally:
        steered.stop()


@pytest.mark.parametrize(
    "steer,match",
    [
        ([{"vector": "nope", "coef": 1.0}], "unknown vector 'nope'"),
        ([{"vector": "rnd"}], "coef"),
        ([{"vector": "rnd", "coef": 1.0, "bogus": 1}], "bogus"),
    ],
)
def test_a_bad_default_steer_fails_at_start(model, steer, match):
    with pytest.raises(pc.InvalidInputError, match=match):
        create_app(model, {"rnd": make_vector(model)}, default_steer=steer)


def test_serve_cli_refuses_a_steer_that_is_not_json(capsys):
    from personacore.cli import main

    assert main(["serve", "--steer", "{vector: rnd}"]) != 0
    assert "--steer" in capsys.readouterr().err


def test_choices_submitted_before_a_refused_one_are_cancelled(model):
    """The engine refuses a later prompt of a list (it needs more KV-cache positions than the
    engine's budget: ``max_batch`` 2 with prompt + ``max_tokens`` at the context): a 400 naming
    the budget, and the choice already submitted for the first prompt is cancelled, not run."""
    running = Running(create_app(model, api_key=KEY, max_batch=2, max_queued=0))
    try:
        context = model.max_position_embeddings
        long = [5] * (context - 100)
        body = {"prompt": [[5, 6, 7], long], "max_tokens": 100, "ignore_eos": True}
        err = assert_error(post(running, "/v1/completions", body), 400)
        assert "max_tokens_in_flight" in err["message"]
        deadline = time.time() + 30
        while True:
            stats = running.app.state.engine.stats()
            ended = stats["cancelled"] + stats["finished"] + stats["failed"]
            if stats["submitted"] == ended == 1 and stats["running"] == stats["queued"] == 0:
                break
            assert time.time() < deadline, stats
            time.sleep(0.05)
        assert (stats["cancelled"], stats["finished"]) == (1, 0), stats
    finally:
        running.stop()
