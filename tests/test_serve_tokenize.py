"""``POST /tokenize`` and ``/detokenize`` of ``personacore serve`` (vLLM's routes): a real server on
127.0.0.1; the ids must be the ones the completion routes use, so that a reply's ``persona``
positions can be read against them."""

from __future__ import annotations

from typing import Iterator

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import personacore as pc  # noqa: E402
from personacore.serve import create_app  # noqa: E402
from test_serve import KEY, Running, assert_error, make_vector, post  # noqa: E402

MESSAGES = [{"role": "user", "content": "Name a color, café🚀."}]


def openai_text(piece: bytes) -> str:
    """A token's text as the server writes it: its UTF-8, or ``bytes:\\xNN...`` for a piece of a
    split character."""
    try:
        return piece.decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in piece)


@pytest.fixture(scope="module")
def model() -> pc.Model:
    """The default model (f32)."""
    return pc.load_model()


@pytest.fixture(scope="module")
def served(model) -> Iterator[Running]:
    """A server with the ``rnd`` vector and an API key."""
    running = Running(create_app(model, {"rnd": make_vector(model)}, api_key=KEY))
    yield running
    running.stop()


def test_chat_ids_are_the_ones_the_persona_positions_index(served, client, model_id, model):
    r = post(served, "/tokenize", {"messages": MESSAGES, "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = model.encode_chat(MESSAGES, add_generation_prompt=True)
    assert body["tokens"] == ids and body["count"] == len(ids)
    assert body["max_model_len"] == model.max_position_embeddings
    assert body["token_strs"] == [openai_text(model.tokenizer.token_bytes(i)) for i in ids]
    assert any(t.startswith("bytes:") for t in body["token_strs"])  # the emoji's pieces
    reply = client.chat.completions.create(
        model=model_id,
        messages=MESSAGES,
        max_tokens=3,
        temperature=0,
        extra_body={"monitor": {"vectors": ["rnd"]}},
    )
    assert reply.usage.prompt_tokens == body["count"]
    assert reply.persona["positions"][0] == body["count"]  # the first generated token's position


def test_prompt_round_trip_and_special_tokens(served, model):
    text = "The sky is blue, naïve 日本 🙂"
    body = post(served, "/tokenize", {"prompt": text, "return_token_strs": True}).json()
    assert body["tokens"] == model.tokenizer.encode(text, add_special_tokens=True)
    assert b"".join(model.tokenizer.token_bytes(i) for i in body["tokens"]) == text.encode()
    back = post(served, "/detokenize", {"tokens": body["tokens"]}).json()
    assert back == {"prompt": text}
    bare = post(served, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()
    assert bare["tokens"] == model.tokenizer.encode(text) and bare["token_strs"] is None
    im_start = model.tokenizer.token_to_id("<|im_start|>")
    assert post(served, "/detokenize", {"tokens": [im_start]}).json() == {"prompt": "<|im_start|>"}


@pytest.mark.parametrize(
    "path,body,status,code",
    [
        ("/tokenize", {}, 400, "invalid_request"),
        ("/tokenize", {"prompt": "a", "messages": MESSAGES}, 400, "invalid_request"),
        ("/tokenize", {"prompt": "a", "model": "gpt-9"}, 404, "model_not_found"),
        ("/tokenize", {"prompt": 5}, 400, None),
        ("/detokenize", {"tokens": [10**7]}, 400, None),
        ("/detokenize", {"tokens": "abc"}, 400, None),
        ("/detokenize", {}, 400, None),
    ],
)
def test_bad_bodies_are_json_4xx(served, path, body, status, code):
    assert_error(post(served, path, body), status, code)
    assert_error(post(served, path, {"prompt": "a"}, key="wrong"), 401, "invalid_api_key")
    assert httpx.get(served.url + "/health").status_code == 200
