"""Log-probabilities, ``logit_bias`` and the presence/frequency penalties of a generation
(``model.generate``, ``model.stream``, ``pc.Engine``), checked against transformers' logits and
against OpenAI's penalty formula written in numpy."""

from __future__ import annotations

import numpy as np
import pytest

import personacore as pc


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


def test_first_token_logprobs_match_transformers(default_model, reference):
    for conv in reference.conversations:
        g = default_model.generate(conv.ids, max_new_tokens=1, logprobs=5)
        ref = log_softmax(conv.last_logits)
        order = np.argsort(-ref, kind="stable")
        lp = g.logprobs[0]
        assert lp.token_id == g.token_ids[0] == order[0]
        assert lp.logprob == pytest.approx(ref[order[0]], abs=2e-3)
        assert [i for i, _ in lp.top] == [int(i) for i in order[:5]]
        np.testing.assert_allclose([v for _, v in lp.top], ref[order[:5]], atol=2e-3)


def test_every_step_is_the_log_softmax_of_that_position(default_model, reference):
    conv = reference.conversations[0]
    g = default_model.generate(conv.prompt_ids, max_new_tokens=6, logprobs=3)
    assert g.logprobs is not None and len(g.logprobs) == len(g.token_ids) == 6
    for k, lp in enumerate(g.logprobs):
        want = log_softmax(default_model.logits(conv.prompt_ids + g.token_ids[:k])[-1])
        assert lp.token_id == g.token_ids[k]
        assert lp.logprob == pytest.approx(want[lp.token_id], abs=1e-3)
        assert lp.top[0][0] == lp.token_id  # greedy picks the most likely
        assert [i for i, _ in lp.top] == [int(i) for i in np.argsort(-want, kind="stable")[:3]]
    # logprobs=0: the chosen token alone; no logprobs asked: None
    assert (
        default_model.generate(conv.prompt_ids, max_new_tokens=2, logprobs=0).logprobs[1].top == []
    )
    assert default_model.generate(conv.prompt_ids, max_new_tokens=2).logprobs is None


def test_logprobs_are_the_models_own_under_sampling_and_bias(default_model, reference):
    """Temperature, top-k and logit_bias change the choice, not the reported distribution."""
    conv = reference.conversations[0]
    ref = log_softmax(conv.last_logits)
    second = int(np.argsort(-ref, kind="stable")[1])
    g = default_model.generate(
        conv.ids, max_new_tokens=1, logprobs=2, temperature=0.7, top_k=5, logit_bias={second: 100}
    )
    assert g.token_ids == [second]
    assert g.logprobs[0].logprob == pytest.approx(ref[second], abs=2e-3)


def test_logit_bias_moves_and_bans_tokens(default_model, reference):
    conv = reference.conversations[0]
    order = np.argsort(-log_softmax(conv.last_logits), kind="stable")
    banned = default_model.generate(conv.ids, max_new_tokens=1, logit_bias={int(order[0]): -100})
    assert banned.token_ids == [int(order[1])]
    # keys as OpenAI's JSON sends them (strings)
    forced = default_model.generate(conv.prompt_ids, max_new_tokens=4, logit_bias={"42": 100})
    assert forced.token_ids == [42] * 4


def numpy_penalised_greedy(model, ids, n, presence, frequency):
    """OpenAI's formula over the model's logits at each position, greedy: the expected tokens."""
    out: list = []
    for _ in range(n):
        logits = np.asarray(model.logits(ids + out)[-1], dtype=np.float64)
        for t in set(out):
            c = out.count(t)
            logits[t] -= c * frequency + (c > 0) * presence
        out.append(int(np.argmax(logits)))
    return out


@pytest.mark.parametrize("presence,frequency", [(0.0, 1.5), (2.0, 0.0), (-0.5, 0.8)])
def test_penalties_follow_the_openai_formula(default_model, reference, presence, frequency):
    prompt = reference.conversations[1].prompt_ids
    g = default_model.generate(
        prompt,
        max_new_tokens=10,
        ignore_eos=True,
        presence_penalty=presence,
        frequency_penalty=frequency,
    )
    assert g.token_ids == numpy_penalised_greedy(default_model, prompt, 10, presence, frequency)


def test_stream_and_engine_carry_logprobs(default_model, reference):
    conv = reference.conversations[0]
    whole = default_model.generate(conv.prompt_ids, max_new_tokens=5, logprobs=4)
    steps = list(default_model.stream(conv.prompt_ids, max_new_tokens=5, logprobs=4))
    assert [lp for s in steps for lp in s.logprobs] == whole.logprobs
    with pc.Engine(default_model) as engine:
        # beside requests with other settings (penalties, bias, no logprobs), the numbers are the same
        others = [
            engine.submit(conv.prompt_ids, max_new_tokens=5, frequency_penalty=1.0),
            engine.submit(conv.prompt_ids, max_new_tokens=5, logit_bias={7: 5.0}, logprobs=1),
        ]
        handle = engine.submit(conv.prompt_ids, max_new_tokens=5, logprobs=4)
        streamed = [lp for s in handle for lp in s.logprobs]
        result = handle.result()
        for o in others:
            o.result()
    assert result.token_ids == whole.token_ids
    assert streamed == result.logprobs
    for a, b in zip(result.logprobs, whole.logprobs):
        assert a.token_id == b.token_id and [i for i, _ in a.top] == [i for i, _ in b.top]
        np.testing.assert_allclose(
            [a.logprob] + [v for _, v in a.top], [b.logprob] + [v for _, v in b.top], atol=1e-4
        )


def test_generation_dict_round_trip_keeps_logprobs(default_model, reference):
    g = default_model.generate(reference.conversations[0].prompt_ids, max_new_tokens=3, logprobs=2)
    back = pc.Generation.from_dict(g.to_dict())
    assert back.logprobs == g.logprobs
    assert pc.Generation.from_dict({**g.to_dict(), "logprobs": None}).logprobs is None
    with pytest.raises(pc.InvalidInputError, match="logprobs"):
        pc.Generation.from_dict({**g.to_dict(), "logprobs": [{"token_id": 1}]})


def _check_prompt_logprobs(lps, ids, ref, top):
    """``lps`` are the log-probabilities of ``ids[1:]``, each against row ``t - 1`` of ``ref``."""
    assert len(lps) == len(ids) - 1
    for t, lp in enumerate(lps, start=1):
        want = ref[t - 1]
        assert lp.token_id == ids[t]
        assert lp.logprob == pytest.approx(want[ids[t]], abs=2e-3)
        assert len(lp.top) == top
        np.testing.assert_allclose([v for _, v in lp.top], np.sort(want)[::-1][:top], atol=2e-3)
        assert all(want[i] == pytest.approx(v, abs=2e-3) for i, v in lp.top)


def test_prompt_logprobs_match_transformers(default_model, reference, reference_log_softmax):
    """Every prompt token's log-probability and top-3 at its position, from generate, stream and
    the engine (its prompt read whole and in chunks of 7 tokens, beside another request)."""
    for conv, ref in zip(reference.conversations, reference_log_softmax):
        g = default_model.generate(conv.ids, max_new_tokens=1, prompt_logprobs=3)
        _check_prompt_logprobs(g.prompt_logprobs, conv.ids, ref, 3)
        assert g.logprobs is None  # the reply's were not asked for
        steps = list(default_model.stream(conv.ids, max_new_tokens=2, prompt_logprobs=3))
        assert steps[0].prompt_logprobs == g.prompt_logprobs
        assert all(not s.prompt_logprobs for s in steps[1:])
        for chunk in (512, 7):
            with pc.Engine(default_model, prefill_chunk=chunk) as engine:
                other = engine.submit(conv.prompt_ids, max_new_tokens=4, logprobs=2)
                handle = engine.submit(conv.ids, max_new_tokens=2, prompt_logprobs=3)
                streamed = [lp for s in handle for lp in s.prompt_logprobs]
                result, _ = handle.result(), other.result()
            assert streamed == result.prompt_logprobs
            _check_prompt_logprobs(result.prompt_logprobs, conv.ids, ref, 3)
    assert default_model.generate(conv.ids, max_new_tokens=1).prompt_logprobs is None


def test_prompt_logprobs_in_a_batch_and_under_steering(default_model, reference):
    """Left-padded prompts of a batch get their own positions' numbers; a steered prompt pass
    reports the steered model's log-probabilities (those of ``Model.logits`` with the steer)."""
    a, b = (c.prompt_ids for c in reference.conversations)
    short = a[: len(a) // 2]
    batch = default_model.generate([short, b], max_new_tokens=1, prompt_logprobs=0)
    for ids, g in zip((short, b), batch):
        alone = default_model.generate(ids, max_new_tokens=1, prompt_logprobs=0).prompt_logprobs
        assert [lp.token_id for lp in g.prompt_logprobs] == ids[1:]
        np.testing.assert_allclose(
            [lp.logprob for lp in g.prompt_logprobs], [lp.logprob for lp in alone], atol=1e-4
        )
        assert all(lp.top == [] for lp in g.prompt_logprobs)
    rng = np.random.default_rng(3)
    vec = rng.standard_normal((default_model.num_layers + 1, default_model.hidden_size))
    steer = pc.Steer(pc.PersonaVector(vec.astype(np.float32), layer=10), 4.0, [10], "all")
    steered = default_model.generate(b, max_new_tokens=1, prompt_logprobs=0, steer=steer)
    logits = default_model.logits(b, steer=steer)
    want = [log_softmax(logits[t - 1])[b[t]] for t in range(1, len(b))]
    np.testing.assert_allclose([lp.logprob for lp in steered.prompt_logprobs], want, atol=1e-3)
    plain = default_model.generate(b, max_new_tokens=1, prompt_logprobs=0).prompt_logprobs
    assert max(abs(x.logprob - y.logprob) for x, y in zip(plain, steered.prompt_logprobs)) > 0.1


def test_generation_dict_round_trip_keeps_prompt_logprobs(default_model, reference):
    g = default_model.generate(reference.conversations[0].ids, max_new_tokens=1, prompt_logprobs=1)
    assert pc.Generation.from_dict(g.to_dict()).prompt_logprobs == g.prompt_logprobs
    with pytest.raises(pc.InvalidInputError, match="prompt_logprobs"):
        pc.Generation.from_dict({**g.to_dict(), "prompt_logprobs": 3})


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"logprobs": 21}, r"top logprobs must be in \[0, 20\]"),
        ({"logprobs": -1}, "top logprobs must be an int >= 0"),
        ({"logprobs": "5"}, "logprobs"),
        ({"logit_bias": {10**6: 1.0}}, "logit_bias names token 1000000, out of range"),
        ({"logit_bias": {-3: 1.0}}, "logit_bias keys must be token ids >= 0"),
        ({"logit_bias": {5: 101.0}}, r"logit_bias of token 5 must be in \[-100, 100\]"),
        ({"logit_bias": {5: float("nan")}}, "logit_bias of token 5"),
        ({"logit_bias": [5, 1.0]}, "logit_bias must be a mapping"),
        ({"logit_bias": {"five": 1.0}}, "logit_bias key"),
        ({"presence_penalty": 2.5}, r"presence_penalty must be in \[-2, 2\]"),
        ({"frequency_penalty": float("inf")}, "frequency_penalty"),
        ({"prompt_logprobs": 21}, r"prompt_logprobs must be in \[0, 20\]"),
        ({"prompt_logprobs": -1}, "prompt_logprobs must be an int >= 0"),
        ({"prompt_logprobs": 2.5}, "prompt_logprobs"),
        # beyond what the engine's 64-bit arguments hold: still named, never a TypeError
        ({"logit_bias": {"99999999999999999999": 1}}, "logit_bias key .* is out of range"),
        ({"logprobs": 10**30}, "logprobs is out of range"),
        ({"max_new_tokens": 10**30}, "max_new_tokens is out of range"),
        ({"top_k": -(10**30)}, "top_k is out of range"),
        ({"seed": 10**40}, r"seed must be an int in \[0, 18446744073709551615\]"),
    ],
)
def test_bad_values_are_named(default_model, kwargs, match):
    with pytest.raises(pc.InvalidInputError, match=match):
        default_model.generate("hi", **{"max_new_tokens": 1, **kwargs})
    with pc.Engine(default_model) as engine:
        with pytest.raises(pc.InvalidInputError, match=match):
            engine.submit("hi", **{"max_new_tokens": 1, **kwargs})


def test_token_bytes_rebuild_split_characters(default_model):
    tok = default_model.tokenizer
    for text in ["plain words", "naïve — “quoted” 日本語 🙂🚀"]:
        ids = tok.encode(text)
        assert b"".join(tok.token_bytes(i) for i in ids) == text.encode()
    pieces = [tok.token_bytes(i) for i in tok.encode("🙂")]
    assert len(pieces) > 1 and all("\ufffd" in p.decode("utf-8", "replace") for p in pieces)
    assert tok.token_bytes(-1) is None and tok.token_bytes(tok.vocab_size + 10) is None
    with pytest.raises(pc.InvalidInputError):
        tok.token_bytes("3")
