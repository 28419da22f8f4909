"""``personacore serve``'s log-probabilities, ``logit_bias``, penalties and ``echo``: a real server on
127.0.0.1 talked to with the official ``openai`` client, checked against transformers' logits
(through ``/v1/completions`` with token ids), against the in-process engine, and used as the
endpoint of :class:`personacore.OpenAIJudge` (the judge call of persona_vectors)."""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import personacore as pc  # noqa: E402
from personacore.serve import create_app  # noqa: E402
from test_serve import KEY, Running, assert_error, post  # noqa: E402

PROMPT = [{"role": "user", "content": "Name three colors."}]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


@pytest.fixture(scope="module")
def model() -> pc.Model:
    """The default model (f32)."""
    return pc.load_model()


@pytest.fixture(scope="module")
def served(model) -> Iterator[Running]:
    """A server with no vectors and an API key."""
    running = Running(create_app(model, api_key=KEY, max_tokens_limit=64))
    yield running
    running.stop()


def test_completion_logprobs_match_transformers(client, model_id, model, reference):
    for conv in reference.conversations:
        r = client.completions.create(
            model=model_id, prompt=conv.ids, max_tokens=1, temperature=0, logprobs=5
        )
        lp = r.choices[0].logprobs
        ref = log_softmax(conv.last_logits)
        order = np.argsort(-ref, kind="stable")[:5]
        texts = [model.tokenizer.token_bytes(int(i)).decode() for i in order]
        assert lp.tokens == [texts[0]] and lp.text_offset == [0]
        assert lp.token_logprobs[0] == pytest.approx(ref[order[0]], abs=2e-3)
        assert list(lp.top_logprobs[0]) == texts
        np.testing.assert_allclose(list(lp.top_logprobs[0].values()), ref[order], atol=2e-3)


def test_chat_logprobs_equal_the_engines(client, model_id, model):
    r = client.chat.completions.create(
        model=model_id, messages=PROMPT, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    local = model.generate(PROMPT, max_new_tokens=8, logprobs=3)
    assert len(content) == len(local.token_ids) == r.usage.completion_tokens
    for el, lp in zip(content, local.logprobs):
        assert bytes(el.bytes) == model.tokenizer.token_bytes(lp.token_id)
        assert el.logprob == pytest.approx(lp.logprob, abs=1e-4)
        assert [bytes(t.bytes) for t in el.top_logprobs] == [
            model.tokenizer.token_bytes(i) for i, _ in lp.top
        ]
        assert [t.logprob for t in el.top_logprobs] == pytest.approx(
            [v for _, v in lp.top], abs=1e-4
        )
    if r.choices[0].finish_reason == "length":  # no end-of-turn token among them
        assert b"".join(bytes(el.bytes) for el in content) == r.choices[0].message.content.encode()
    # logprobs without top_logprobs: the chosen tokens alone; none asked: null
    bare = client.chat.completions.create(
        model=model_id, messages=PROMPT, max_tokens=2, temperature=0, logprobs=True
    )
    assert [el.top_logprobs for el in bare.choices[0].logprobs.content] == [[], []]
    plain = client.chat.completions.create(model=model_id, messages=PROMPT, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_streamed_logprobs_equal_the_whole_reply(client, model_id):
    kw = dict(model=model_id, max_tokens=8, temperature=0)
    whole = client.chat.completions.create(messages=PROMPT, logprobs=True, top_logprobs=2, **kw)
    chunks = list(
        client.chat.completions.create(
            messages=PROMPT, logprobs=True, top_logprobs=2, stream=True, **kw
        )
    )
    streamed = [
        el
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for el in c.choices[0].logprobs.content
    ]
    assert [el.model_dump() for el in streamed] == [
        el.model_dump() for el in whole.choices[0].logprobs.content
    ]
    # completions: the legacy layout, streamed, with offsets that add up to the text
    text = client.completions.create(prompt="The sky is", logprobs=2, **kw)
    parts = list(client.completions.create(prompt="The sky is", logprobs=2, stream=True, **kw))
    joined = {"tokens": [], "token_logprobs": [], "text_offset": []}
    for c in parts:
        if c.choices and c.choices[0].logprobs:
            for key in joined:
                joined[key] += getattr(c.choices[0].logprobs, key)
    lp = text.choices[0].logprobs
    assert joined == {
        "tokens": lp.tokens,
        "token_logprobs": lp.token_logprobs,
        "text_offset": lp.text_offset,
    }
    if text.choices[0].finish_reason == "length":
        assert "".join(lp.tokens) == text.choices[0].text
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:k]) for k in range(len(lp.tokens))]


def test_logit_bias_and_penalties_reach_the_engine(client, model_id, model):
    forced = client.chat.completions.create(
        model=model_id, messages=PROMPT, max_tokens=4, temperature=0, logit_bias={"42": 100}
    )
    assert forced.choices[0].message.content == model.tokenizer.decode([42] * 4)
    kw = dict(max_new_tokens=12, presence_penalty=2.0, frequency_penalty=2.0, ignore_eos=True)
    local = model.generate(PROMPT, **kw)
    served = client.chat.completions.create(
        model=model_id,
        messages=PROMPT,
        max_tokens=12,
        temperature=0,
        presence_penalty=2.0,
        frequency_penalty=2.0,
        extra_body={"ignore_eos": True},
    )
    assert served.choices[0].message.content == local.text
    assert local.text != model.generate(PROMPT, max_new_tokens=12, ignore_eos=True).text


def test_echo_prepends_the_prompt(client, model_id):
    kw = dict(model=model_id, prompt="The sky is", max_tokens=4, temperature=0)
    plain = client.completions.create(**kw).choices[0].text
    assert client.completions.create(echo=True, **kw).choices[0].text == "The sky is" + plain
    chunks = list(client.completions.create(echo=True, stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "The sky is" + plain


def test_echo_with_logprobs_scores_the_prompt_like_transformers(
    client, model_id, reference, reference_log_softmax
):
    """The prompt's tokens first (the first with null), then the reply's, offsets from the start
    of the echoed prompt; each prompt token's log-probability and top 5 as transformers gives them
    at the position before it."""
    for conv, ref in zip(reference.conversations, reference_log_softmax):
        kw = dict(model=model_id, prompt=conv.ids, max_tokens=2, temperature=0, logprobs=5)
        r = client.completions.create(echo=True, **kw).choices[0]
        plain = client.completions.create(**kw).choices[0]
        lp, n = r.logprobs, len(conv.ids)
        assert r.text.startswith(r.text[: len(r.text) - len(plain.text)]) and r.text.endswith(
            plain.text
        )
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert len(lp.tokens) == n + len(plain.logprobs.tokens)
        for t in range(1, n):
            assert lp.token_logprobs[t] == pytest.approx(ref[t - 1][conv.ids[t]], abs=2e-3)
            np.testing.assert_allclose(
                sorted(lp.top_logprobs[t].values(), reverse=True),
                np.sort(ref[t - 1])[::-1][: len(lp.top_logprobs[t])],
                atol=2e-3,
            )
        assert lp.tokens[n:] == plain.logprobs.tokens
        np.testing.assert_allclose(lp.token_logprobs[n:], plain.logprobs.token_logprobs, atol=1e-4)
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
        assert lp.text_offset[n] == len(r.text) - len(
            plain.text
        )  # the reply starts after the prompt
        # streamed: the prompt's logprobs come with the echoed prompt, the rest chunk by chunk
        chunks = [c for c in client.completions.create(echo=True, stream=True, **kw) if c.choices]
        assert chunks[0].choices[0].text == r.text[: lp.text_offset[n]]
        assert len(chunks[0].choices[0].logprobs.tokens) == n
        joined = [
            v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs
        ]
        assert joined == lp.token_logprobs


def test_chat_prompt_logprobs_score_a_whole_conversation(
    client, model_id, model, reference, reference_log_softmax
):
    """vLLM's chat extensions: ``add_generation_prompt=false`` renders a conversation that ends
    with the assistant's reply, ``prompt_logprobs`` scores every token of it (the reply's tokens
    as transformers scores them), null first, the prompt token and the top k each with a rank."""
    for conv, ref in zip(reference.conversations, reference_log_softmax):
        messages = conv.messages + [{"role": "assistant", "content": conv.response}]
        r = client.chat.completions.create(
            model=model_id,
            messages=messages,
            max_tokens=1,
            temperature=0,
            extra_body={"add_generation_prompt": False, "prompt_logprobs": 2},
        )
        ids = model.encode_chat(messages, add_generation_prompt=False)
        assert ids[: len(conv.ids)] == conv.ids  # then the end of the assistant's turn
        plp = r.model_extra["prompt_logprobs"]
        assert len(plp) == len(ids) == r.usage.prompt_tokens and plp[0] is None
        for t in range(1, len(conv.ids)):
            mine = plp[t][str(ids[t])]
            assert mine["logprob"] == pytest.approx(ref[t - 1][ids[t]], abs=2e-3)
            raw = model.tokenizer.token_bytes(ids[t])
            if raw.isascii():
                assert mine["decoded_token"] == raw.decode()
            top = sorted(
                (e for e in plp[t].values() if e["rank"] is not None), key=lambda e: e["rank"]
            )
            assert [e["rank"] for e in top] == [1, 2]
            np.testing.assert_allclose(
                [e["logprob"] for e in top], np.sort(ref[t - 1])[::-1][:2], atol=2e-3
            )
            if mine["rank"] is None:
                assert mine["logprob"] < top[-1]["logprob"] + 2e-3
    plain = client.chat.completions.create(model=model_id, messages=PROMPT, max_tokens=1)
    assert plain.model_extra.get("prompt_logprobs") is None


def test_chat_prompt_logprobs_out_of_range_or_streamed_are_400s(served):
    base = {"messages": PROMPT, "max_tokens": 1}
    for body, code in [
        ({"prompt_logprobs": 21}, "invalid_value"),
        ({"prompt_logprobs": -1}, "invalid_value"),
        ({"prompt_logprobs": 1, "stream": True}, "unsupported"),
    ]:
        err = assert_error(post(served, "/v1/chat/completions", {**base, **body}), 400, code)
        assert err["param"] == "prompt_logprobs"


def test_a_batch_of_prompts_as_lm_eval_sends_it(client, model_id, reference):
    """lm-evaluation-harness's ``local-completions`` log-likelihood call: token-id prompts in a
    list, ``echo``, ``logprobs=1``, ``max_tokens=1``; choice ``k`` answers prompt ``k``, with the
    same numbers as prompt ``k`` sent alone."""
    prompts = [c.ids for c in reference.conversations]
    kw = dict(model=model_id, max_tokens=1, temperature=0, logprobs=1, echo=True, seed=1234)
    r = client.completions.create(prompt=prompts, **kw)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.prompt_tokens == sum(len(p) for p in prompts)
    for ids, c in zip(prompts, r.choices):
        alone = client.completions.create(prompt=ids, **kw).choices[0]
        assert c.text == alone.text and c.logprobs.tokens == alone.logprobs.tokens
        np.testing.assert_allclose(
            c.logprobs.token_logprobs[1:], alone.logprobs.token_logprobs[1:], atol=1e-4
        )
    texts = client.completions.create(prompt=["The sky is", "Grass is"], n=2, **kw)
    assert [c.index for c in texts.choices] == [0, 1, 2, 3]
    assert [c.text[:8] for c in texts.choices] == ["The sky ", "The sky ", "Grass is", "Grass is"]


@pytest.mark.parametrize(
    "path,body,code",
    [
        ("/v1/chat/completions", {"top_logprobs": 3}, "invalid_value"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "invalid_value"),
        ("/v1/chat/completions", {"logit_bias": {"5": 150}}, None),
        ("/v1/chat/completions", {"logit_bias": {"999999": 1}}, None),
        ("/v1/chat/completions", {"logit_bias": {"abc": 1}}, None),
        ("/v1/chat/completions", {"presence_penalty": 3}, None),
        ("/v1/chat/completions", {"frequency_penalty": -2.5}, None),
        (
            "/v1/chat/completions",
            {"tools": [{"type": "function", "function": {"name": "f"}}]},
            "unsupported",
        ),
        ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "unsupported"),
        ("/v1/completions", {"logprobs": 21}, "invalid_value"),
        ("/v1/completions", {"best_of": 2}, "unsupported"),
        ("/v1/completions", {"suffix": "end"}, "unsupported"),
    ],
)
def test_bad_values_are_json_400s(served, path, body, code):
    base = {"messages": PROMPT} if path.endswith("chat/completions") else {"prompt": "hi"}
    err = assert_error(post(served, path, {**base, "max_tokens": 2, **body}), 400, code)
    assert any(k in err["message"] for k in body), err
    assert httpx.get(served.url + "/health").status_code == 200


def test_openai_judge_on_personacore_serve_equals_the_local_judge(served, model_id, model):
    """persona_vectors' judge call (top-20 logprobs of one token) answered by this server."""
    remote = pc.OpenAIJudge(model=model_id, base_url=served.url + "/v1", api_key=KEY)
    local = pc.LocalJudge(model, numbers="token")
    prompt = "Rate from 0 to 100 how polite this reply is. Answer with a number.\nReply: Thank you kindly!"
    got, want = remote.top_logprobs(prompt), local.top_logprobs(prompt)
    assert [t for t, _ in got] == [t for t, _ in want] and len(got) == 20
    np.testing.assert_allclose([v for _, v in got], [v for _, v in want], atol=1e-4)
    a, b = remote.score_prompt(prompt), local.score_prompt(prompt)
    assert (a is None and b is None) or math.isclose(a, b, abs_tol=1e-3)
